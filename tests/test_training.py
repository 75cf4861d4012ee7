"""Training end to end: subprocess CLI, resume, non-finite steps, and two processes = one."""

import json
import sys

import pytest
import torch
from helpers import assert_resume_is_exact, conditional_overrides, launch, model_weights, run, tiny_overrides
from safetensors.torch import load_file

from flows.api import train
from flows.config import load_config
from flows.errors import TrainingAborted
from flows.training import Trainer


def test_default_command_trains_samples_and_plots(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [o for o in tiny_overrides(run_dir, steps=4) if not o.startswith("eval.plot")]
    launch_one = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"]
    proc = run([*launch_one, "--num_cpu_threads_per_process", "1", "train.py", *overrides])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("model.safetensors", "config.yaml", "metrics.jsonl", "eval.json", "samples.png"):
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps[-1]["step"] == 4 and steps[-1]["nfe_forward"] > 0
    assert json.loads((run_dir / "eval.json").read_text())["n"] == 16

    proc = run([sys.executable, "sample.py", str(run_dir), "-n", "50", "--out", str(tmp_path / "s")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    import numpy as np

    assert np.load(tmp_path / "s" / "samples.npz")["samples"].shape == (50, 2)
    assert (tmp_path / "s" / "samples.png").is_file()


def test_config_typo_exits_nonzero_and_names_the_key(tmp_path):
    proc = run([sys.executable, "train.py", f"run_dir={tmp_path}/r", "train.stpes=3"])
    assert proc.returncode == 2
    assert "unknown config key 'train.stpes'. Did you mean 'train.steps'" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_resume_continues_at_the_same_step_and_matches_an_uninterrupted_run(tmp_path):
    assert_resume_is_exact(tmp_path)


def test_non_finite_loss_skips_the_step_and_stops_with_a_resumable_checkpoint(tmp_path):
    cfg = load_config(None, [*tiny_overrides(tmp_path / "nan", steps=50), "train.max_bad_steps=3"])
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.field.state_dict().items()}
    trainer.objective.forward = lambda x, draws=None: (torch.tensor(float("nan")), {})
    with pytest.raises(TrainingAborted, match="stopped after 3 bad steps"):
        trainer.run()
    for k, v in trainer.field.state_dict().items():
        torch.testing.assert_close(v, before[k])  # nothing was applied
    assert (tmp_path / "nan" / "checkpoints" / "step_00000000").is_dir()
    resumed = Trainer(load_config(tmp_path / "nan" / "config.yaml", ["train.steps=2"]), resume=True)
    assert resumed.progress.step == 0 and resumed.progress.bad_steps == 3
    trainer.accelerator.end_training()


WORKER = """
import sys, torch
from safetensors.torch import save_file
from flows.config import load_config
from flows.training import Trainer
from flows.training.accelerator import end
torch.set_num_threads(1)
trainer = Trainer(load_config(None, sys.argv[2:]))
trainer.run()
rank = trainer.accelerator.process_index
state = {k: v.contiguous() for k, v in trainer.field.state_dict().items()}
save_file(state, f"{sys.argv[1]}/rank{rank}.safetensors")
end(trainer.accelerator)
"""


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case", ["unconditional", "context", "augmented"])
def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path, case):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    results = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        out.mkdir()
        overrides = (
            conditional_overrides(tmp_path, out / "run") if case == "context" else tiny_overrides(out / "run", steps=3)
        )
        overrides += ["model.augment=1"] if case == "augmented" else []
        proc = run([*launch(n), str(worker), str(out), *overrides], extra_env={"ACCELERATE_USE_CPU": "1"})
        errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error:" in line]
        assert proc.returncode == 0, "\n".join(errors[:20]) + "\n...\n" + proc.stderr[-2000:]
        # one file per rank: two processes really ran (the wrong flags silently start one)
        assert sorted(p.name for p in out.glob("rank*.safetensors")) == [f"rank{r}.safetensors" for r in range(n)]
        results[n] = [load_file(str(out / f"rank{r}.safetensors")) for r in range(n)]
        # every rank's state landed in the final checkpoint, nothing half-written left behind
        ckpts = sorted((out / "run" / "checkpoints").iterdir())
        assert ckpts and not [c for c in ckpts if c.name.startswith(".tmp")], ckpts
        assert {f"random_states_{r}.pkl" for r in range(n)} <= {p.name for p in ckpts[-1].iterdir()}
    (single,), (rank0, rank1) = results[1], results[2]
    for key in single:
        torch.testing.assert_close(rank0[key], rank1[key], atol=0, rtol=0)  # ranks agree exactly
        if case != "augmented":  # each process draws its rows' augmentations: equal in law, not in value
            torch.testing.assert_close(rank0[key], single[key], atol=1e-6, rtol=1e-5)  # = one process
    if case != "unconditional":
        return
    # the two-process run resumes with two processes
    run_dir = tmp_path / "p2" / "run"
    resume = [*launch(2), "train.py", "--resume", str(run_dir), "train.steps=5"]
    proc = run(resume, extra_env={"ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("objective", ["fm", "mle"])
def test_gradient_accumulation_equals_one_large_batch(tmp_path, objective):
    """K micro-batches of B/K give the parameters of one batch of B (FM: the draws are made per batch)."""
    weights = {}
    for k in (1, 2, 4):
        run_dir = tmp_path / f"k{k}"
        extra = [f"objective.name={objective}", f"train.grad_accum={k}", "train.log_every=3"]
        train(load_config(None, [*tiny_overrides(run_dir, steps=5), *extra]))
        weights[k] = model_weights(run_dir)
    for k in (2, 4):
        for key, value in weights[1].items():
            torch.testing.assert_close(weights[k][key], value, atol=1e-6, rtol=1e-5)
    records = [json.loads(line) for line in (tmp_path / "k2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 3]


def test_resume_with_gradient_accumulation_is_exact(tmp_path):
    assert_resume_is_exact(tmp_path, "objective.name=fm", "train.grad_accum=2")


def test_batch_must_split_over_accumulation(tmp_path):
    with pytest.raises(TrainingAborted, match=r"train.grad_accum \(3\)"):
        Trainer(load_config(None, [*tiny_overrides(tmp_path / "r"), "train.grad_accum=3"]))
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # torch.compile on a CPU
@pytest.mark.filterwarnings("ignore")  # inductor's warnings on a machine without CUDA
def test_compiled_flow_matching_trains_and_its_checkpoint_loads_without_compile(tmp_path):
    from flows import load

    overrides = [*tiny_overrides(tmp_path / "c", steps=3), "objective.name=fm", "train.compile=true"]
    probe = Trainer(load_config(None, [*overrides, "run_dir=" + str(tmp_path / "probe")]))
    compiled = probe.accelerator.unwrap_model(probe.objective)._forward_field  # compiled, eager if that fails
    assert isinstance(compiled.compiled, torch._dynamo.eval_frame.OptimizedModule)
    probe.accelerator.end_training()
    result = train(load_config(None, overrides)).result
    assert result is not None and torch.isfinite(torch.tensor(result["nll"]))
    flow = load(tmp_path / "c")  # plain keys: no _orig_mod prefix
    assert not any("_orig_mod" in k for k in flow.field.state_dict())
    resumed = Trainer(
        load_config(tmp_path / "c" / "config.yaml", ["train.steps=4", "train.compile=false"]), resume=True
    )
    assert resumed.progress.step == 3  # Accelerate's state (the objective's keys) loads without compile
    resumed.accelerator.end_training()
    with pytest.raises(Exception, match="train.compile is for flow matching"):
        load_config(None, ["train.compile=true"])
