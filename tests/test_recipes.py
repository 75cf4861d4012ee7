"""The recipes and their ``devices`` sections: a run applies the section of its device above the file and below
every override, keeps the resolved values, and says in one line what it applied."""

import os
import subprocess
import sys

import pytest
import yaml
from helpers import ROOT, tiny_overrides

import flows
from flows.config import DEVICE_TYPES, device_notice, load_config, to_dict
from flows.errors import ConfigError

RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
MNIST_FM, TOY_MLE = ROOT / "configs" / "mnist_fm.yaml", ROOT / "configs" / "toy2d_mle.yaml"


def needs(path) -> list[str]:
    return ["data.path=x.npy"] if path.name.startswith(("tabular", "posterior")) else []


@pytest.mark.parametrize("device", [None, "cpu", "cuda"])
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_on_every_device_and_a_run_keeps_no_section(path, device):
    cfg = load_config(path, needs(path), device=device)
    sections = yaml.safe_load(path.read_text()).get("devices") or {}
    if device is None:  # kept, as dotted keys
        assert set(cfg.devices) == set(sections)
        assert all("." in key or key == "notice" for section in cfg.devices.values() for key in section)
    else:  # resolved: the values are in the config itself, and it loads back to itself
        assert cfg.devices == {}
        assert load_config(to_dict(cfg)) == cfg
        assert load_config(to_dict(cfg), device=device) == cfg


def test_the_gpu_recipes_apply_their_cuda_section_on_cuda_only():
    base, cpu, cuda = (load_config(MNIST_FM, device=d) for d in (None, "cpu", "cuda"))
    t, e = cuda.train, cuda.eval
    assert (t.batch_size, t.lr, t.warmup_steps, t.steps) == (1024, 1e-3, 500, 8000)
    assert (t.mixed_precision, t.compile, e.batch_size) == ("bf16", True, None)
    for c in (base, cpu):  # the CPU-safe base values
        assert (c.train.batch_size, c.train.lr, c.train.steps, c.train.mixed_precision) == (128, 5e-4, 50000, "no")
        assert (c.train.compile, c.eval.batch_size) == (False, 250)
    assert cuda.model == cpu.model  # never the model: a GPU run and a CPU run train the same network
    toy_cpu, toy_cuda = load_config(TOY_MLE, device="cpu"), load_config(TOY_MLE, device="cuda")
    assert (toy_cpu.solver.method, toy_cpu.solver.compile, toy_cpu.train.batch_size) == ("dopri5", False, 256)
    s = toy_cuda.solver
    assert (s.method, s.step_size, s.compile, s.adjoint, toy_cuda.train.batch_size) == ("rk4", 0.1, True, False, 1024)
    assert load_config(TOY_MLE, device="mps") == load_config(TOY_MLE, device="cpu")  # no section: the file


def test_the_callers_keys_win_over_the_section():
    cfg = load_config(MNIST_FM, ["train.batch_size=256", "eval.batch_size=100"], {"train": {"lr": 0.5}}, device="cuda")
    assert (cfg.train.batch_size, cfg.eval.batch_size, cfg.train.lr) == (256, 100, 0.5)
    assert (cfg.train.mixed_precision, cfg.train.steps) == ("bf16", 8000)  # the rest of the section applies
    # the section itself is the caller's to change, or to turn off
    assert load_config(MNIST_FM, ["devices.cuda.train.batch_size=64"], device="cuda").train.batch_size == 64
    assert load_config(MNIST_FM, ["devices=null"], device="cuda") == load_config(MNIST_FM, device="mps")
    assert load_config(MNIST_FM, device="cuda", updates={"devices": {"cuda": None}}).train.batch_size == 128


def test_a_saved_run_config_resumes_with_its_values_not_the_section_again(tmp_path):
    cfg = load_config(MNIST_FM, ["train.mixed_precision=no"], device="cuda")
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))  # as the run writer does
    again = load_config(saved, device="cuda")
    assert again == cfg and again.train.mixed_precision == "no" and again.train.batch_size == 1024


def test_nested_and_dotted_keys_are_one_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "devices:\n  cuda:\n    train:\n      batch_size: 64\n    train.lr: 0.5\n    model:\n      hidden: [4]\n"
    )
    cfg = load_config(path, device="cuda")
    assert (cfg.train.batch_size, cfg.train.lr, cfg.model.hidden) == (64, 0.5, [4])
    assert load_config(path).devices == {"cuda": {"train.batch_size": 64, "train.lr": 0.5, "model.hidden": [4]}}


@pytest.mark.parametrize("device", [None, "cpu", "cuda"])  # a bad section is refused on every device
@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"cuda": {"train.batchsize": 1}},
            r"devices\.cuda\.train\.batchsize: unknown config key 'train\.batchsize'\. "
            r"Did you mean 'train\.batch_size'",
        ),  # fmt: skip
        ({"cuda": {"train.steps": "ten"}}, r"devices\.cuda\.train\.steps: .*expects int"),
        ({"cuda": {"model.chanels": 4}}, r"devices\.cuda\.model\.chanels: .*Did you mean 'model\.channels'"),
        ({"cuda": {"eval.trace": "gauss"}}, r"devices\.cuda\.eval\.trace: .*unknown value 'gauss'"),
        ({"cuda": {"notice": 3}}, r"devices\.cuda\.notice' expects a string"),
        ({"cuda": {"devices.cpu.train.lr": 1}}, r"devices\.cuda\.devices\.cpu\.train\.lr'"),
        ({"cuda": [1]}, r"'devices\.cuda' must map dotted keys"),
        ({"gpu": {"train.lr": 1}}, r"unknown device type 'gpu'\. Valid: cuda, cpu, mps, xpu"),
    ],
)
def test_a_bad_section_names_its_key_inside_devices(section, message, device):
    with pytest.raises(ConfigError, match=message):
        load_config({"devices": section}, device=device)


def test_a_section_key_is_checked_against_the_recipes_kind(capsys):
    with pytest.raises(ConfigError, match=r"devices\.cuda\.model\.channels: .*expects int"):
        load_config(MNIST_FM, ["devices.cuda.model.channels=wide"])  # the recipe's U-Net, not the default MLP
    cfg = load_config({"devices": {"cuda": {"model.name": "unet", "model.channels": 8}}}, device="cuda")
    assert cfg.model.name == "unet" and cfg.model.channels == 8 and capsys.readouterr().err == ""


def test_a_section_that_breaks_a_rule_across_sections_is_named():
    with pytest.raises(ConfigError, match=r"solver\.compile=true\. \(devices\.cuda set train\.compile=true"):
        load_config({"devices": {"cuda": {"train.compile": True}}}, device="cuda")  # maximum likelihood
    load_config({"devices": {"cuda": {"train.compile": True}}}, device="cpu")  # not this device's section


def test_eval_batch_size_is_chosen_by_the_evaluator_unless_given():
    assert load_config(None).eval.batch_size is None
    assert load_config(None, ["eval.batch_size=null"]).eval.batch_size is None
    assert load_config(None, ["eval.batch_size=300"]).eval.batch_size == 300
    with pytest.raises(ConfigError, match=r"eval\.batch_size must be > 0"):
        load_config(None, ["eval.batch_size=0"])


FIXED = ["solver.method=rk4", "solver.step_size=0.05", "solver.adjoint=false"]


def test_solver_compile_takes_a_fixed_step_solve_without_the_adjoint(tmp_path):
    assert load_config(None, [*FIXED, "solver.compile=true"]).solver.compile is True
    assert load_config(None, [*FIXED, "solver.compile=reduce-overhead"]).solver.compile == "reduce-overhead"
    # eval.solver keeps its own defaults (adjoint=false) when a key of it is given
    assert load_config(None, ["eval.solver.method=euler", "eval.solver.compile=true"]).eval.solver.compile is True
    path = tmp_path / "c.yaml"
    path.write_text("solver:\n  method: midpoint\n  step_size: 0.1\n  adjoint: false\n  compile: true\n")
    assert load_config(path).solver.compile is True
    assert load_config(None).solver.compile is False
    with pytest.raises(ConfigError, match=r"solver\.compile compiles a fixed-step solve.*method=dopri5"):
        load_config(None, ["solver.adjoint=false", "solver.compile=true"])
    with pytest.raises(ConfigError, match=r"solver\.compile compiles a fixed-step solve.*adjoint=True"):
        load_config(None, ["solver.method=rk4", "solver.step_size=0.05", "solver.adjoint=true", "solver.compile=true"])
    with pytest.raises(ConfigError, match=r"solver\.compile: unknown value 'fast'"):
        load_config(None, [*FIXED, "solver.compile=fast"])


def test_train_compile_for_maximum_likelihood_points_to_the_compiled_solve():
    with pytest.raises(
        ConfigError, match="compile the fixed-step solve instead: solver.method=rk4 .*solver.compile=true"
    ):
        load_config(None, ["train.compile=true"])


def test_the_notice_names_what_the_section_applied(capsys):
    load_config(MNIST_FM, ["train.batch_size=256"], device="cuda", notice=True)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("notice: devices.cuda applied: ")
    assert "train.mixed_precision=bf16 train.compile=true eval.batch_size=null" in lines[0]
    assert "train.lr=0.001" in lines[0] and "train.batch_size" not in lines[0]  # the caller's own key: not named
    load_config(MNIST_FM, device="cpu", notice=True)  # the CPU advice: what applies, and the model to override
    (line,) = capsys.readouterr().err.splitlines()
    assert "devices.cpu applied: train.batch_size=128 train.mixed_precision=no train.compile=false" in line
    assert "sized for a GPU" in line and "model.channels=32 model.num_res_blocks=1" in line
    load_config(TOY_MLE, device="cpu", notice=True)  # a section for another device only: nothing
    load_config(MNIST_FM, device="cuda")  # no notice asked (not the main process)
    load_config(MNIST_FM, notice=True)  # no device: nothing applied
    assert capsys.readouterr() == ("", "")


def test_device_notice():
    assert device_notice("cuda", {}) is None
    assert device_notice("cpu", {}, "Shrink it.") == "notice: devices.cpu: Shrink it."
    line = device_notice("cuda", {"train.batch_size": 1024, "eval.batch_size": None, "model.hidden": [8, 8]})
    assert line == (
        "notice: devices.cuda applied: train.batch_size=1024 eval.batch_size=null model.hidden=[8,8] "
        "(give a key on the command line to change it)"
    )
    assert device_notice("cuda", {"train.compile": False}, "Note.").endswith("change it). Note.")


def test_run_device_is_the_cpu_without_visible_gpus():
    code = "from flows.training.accelerator import run_device; print(*run_device())"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    assert out.stdout.split() == ["cpu", "True"]


def test_a_run_applies_the_section_of_its_device_and_saves_the_result(tmp_path, capsys):
    from flows.training.accelerator import run_device

    section = {"train.steps": 2, "train.lr": 0.05, "eval.batch_size": 16}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"devices": dict.fromkeys(DEVICE_TYPES, section)}, sort_keys=False))
    overrides = [o for o in tiny_overrides(tmp_path / "r") if not o.startswith("train.steps")]
    run = flows.train(recipe, overrides=[*overrides, "train.lr=0.01"])
    assert (run.config.train.steps, run.config.train.lr, run.config.eval.batch_size) == (2, 0.01, 16)
    assert flows.load(run).step == 2
    saved = yaml.safe_load((run.path / "config.yaml").read_text())
    assert saved["devices"] == {} and saved["train"]["steps"] == 2 and saved["eval"]["batch_size"] == 16
    device = run_device()[0]
    notices = [line for line in capsys.readouterr().err.splitlines() if line.startswith("notice: devices")]
    applied = f"notice: devices.{device} applied: train.steps=2 eval.batch_size=16 (give a key on the command line"
    assert notices == [f"{applied} to change it)"]  # train.lr: the caller's


def test_choosing_a_solver_on_the_command_line_drops_the_sections_solver():
    """The default's GPU section compiles rk4; solver.method=dopri5 or solver.adjoint=true must not then fail on the
    section's leftover solver.compile, while other keys of the section still apply."""
    for override, method, adjoint in (
        ("solver.adjoint=true", "dopri5", True),
        ("solver.method=dopri5", "dopri5", False),
    ):
        cfg = load_config(str(ROOT / "configs" / "toy2d_mle.yaml"), [override], device="cuda")
        assert (cfg.solver.method, cfg.solver.adjoint, cfg.solver.compile) == (method, adjoint, False)
        assert cfg.train.batch_size == 1024
    kept = load_config(str(ROOT / "configs" / "toy2d_mle.yaml"), ["solver.atol=1e-3"], device="cuda")
    assert (kept.solver.method, kept.solver.compile, kept.solver.atol) == ("rk4", True, 1e-3)
