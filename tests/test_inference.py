"""Simulation-based inference with a simulator in the loop: flows.infer, rounds, i.i.d. trials, calibration."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import sbi_models
import torch
import yaml
from helpers import FLOAT32, ROOT, TESTS, launch, run, script

import flows
from flows.calibration import calibrate
from flows.context import Context
from flows.errors import ConfigError, FlowsError, SimulationError
from flows.flow import Flow
from flows.inference import inside
from flows.nn import TimeMLP
from flows.preprocess import Preprocess
from flows.prior import TruncatedPrior, prior_box
from flows.simulation import SimulationStore

QUICK = {"time_limit": None, "steps": 150, "members": 1, "batch_size": 256, "evals_per_budget": 0}


def quick(**more):
    return {"train": {**QUICK, **more}}


def check_moments(flow: Flow, x_obs: torch.Tensor, n: int = 4000) -> None:
    """The posterior's mean and covariance at x_obs against the closed form, within sampling error plus what a
    short training leaves (the conditional standardization makes the linear-Gaussian posterior exact up to it)."""
    s = flow.sample(n, context=x_obs, generator=torch.Generator().manual_seed(0)).double()
    mean, cov = sbi_models.posterior_moments(x_obs.double())
    sd = cov.diagonal().sqrt()
    assert ((s.mean(0) - mean).abs() < 4 * sd / n**0.5 + 0.08).all(), (s.mean(0), mean)
    torch.testing.assert_close(torch.cov(s.T), cov.double(), atol=0.05, rtol=0.25)


@pytest.fixture(scope="module")
def amortized(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer") / "amortized"
    flow = flows.infer(sbi_models.linear, sbi_models.prior, 2000, run_dir=root, **quick())
    return root, flow


# ------------------------------------------------------------------ the loop
def test_amortized_inference_recovers_the_closed_form_posterior(amortized):
    root, flow = amortized
    assert flow.context is not None and flow.path == root / "model.safetensors"
    for x_obs in (torch.tensor([1.0, -0.5]), torch.tensor([-1.5, 0.3])):
        check_moments(flow, x_obs)
    pairs = np.load(root / "simulations.npz")
    assert pairs["theta"].shape == (2000, 2) and pairs["x"].shape == (2000, 2)
    report = json.loads((root / "inference.json").read_text())
    assert report["simulations"] == 2000 and report["rounds"][0]["dropped"] == 0
    # an amortized run checks its calibration on its held-out pairs at the end
    assert report["calibration"]["pairs"] == 200 and (root / "calibration.png").exists()
    assert report["calibration"] == json.loads((root / "calibration.json").read_text())
    saved = yaml.safe_load((root / "config.yaml").read_text())["simulation"]
    assert saved["simulator"] == "sbi_models:linear" and saved["simulations"] == 2000
    # the pairs are a configs/posterior.yaml file
    assert flows.load(root).config.data.context_key == "x"


def test_rounds_focus_on_the_observation_and_stay_correct(tmp_path):
    x_obs = torch.tensor([2.0, -1.0])
    root = tmp_path / "rounds"
    flow = flows.infer(sbi_models.linear, sbi_models.prior, 2000, x_obs=x_obs, rounds=2, run_dir=root, **quick())
    check_moments(flow, x_obs)
    region = json.loads((root / "simulations" / "round_1" / "proposal.json").read_text())
    pairs = np.load(root / "simulations.npz")
    later = torch.from_numpy(pairs["theta"][pairs["round"] == 1])
    assert len(later) == 1000
    # round 1 was drawn inside the box of the region and the region of round 0's posterior at x_obs
    low, high = torch.tensor(region["low"]), torch.tensor(region["high"])
    assert ((later >= low) & (later <= high)).all()
    first = flows.load(root / "round_0")
    assert (first.log_prob(later, context=x_obs) >= region["tau"] - 1e-3).all()
    # and it is focused: far narrower than the prior
    assert later.std(0).max() < 0.8
    # its held-out pairs are not all from the prior: the calibration check asks for prior pairs
    done = script("evaluate.py", str(root), "--calibration")
    assert done.returncode != 0 and "trained in rounds" in done.stderr + done.stdout


def test_nan_simulations_are_dropped_and_counted(tmp_path):
    root = tmp_path / "nan"
    flows.infer(sbi_models.with_nans, sbi_models.prior, 600, run_dir=root, simulation={"batch": 200}, **quick())
    report = json.loads((root / "inference.json").read_text())["rounds"][0]
    assert report == report | {"simulated": 600, "dropped": 63, "kept": 537}  # 20 NaN + 1 Inf per batch of 200
    assert np.isfinite(np.load(root / "simulations.npz")["x"]).all()


def infer_script(root, kill_at: int, calls) -> subprocess.CompletedProcess:
    code = (
        "import torch, flows, sbi_models\n"
        f"flows.infer(sbi_models.counted, sbi_models.prior, 1000, x_obs=torch.tensor([1.0, 0.5]), rounds=2, "
        f"run_dir={str(root)!r}, resume=True, simulation={{'batch': 250}}, train={QUICK!r})\n"
    )
    extra = {
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]),
        "SBI_CALLS": str(calls),
        "SBI_KILL_AT": str(kill_at),
    }
    return run([sys.executable, "-c", code], extra)


@pytest.mark.slow  # kill -9 and resume in subprocesses
def test_a_run_killed_in_round_two_resumes_without_simulating_twice(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    first = infer_script(killed, kill_at=4, calls=tmp_path / "calls_killed")  # round 1's second batch
    assert first.returncode == -9, first.stderr[-2000:]
    assert len(list((killed / "simulations" / "round_1").glob("batch_*.npz"))) == 1
    again = infer_script(killed, kill_at=0, calls=tmp_path / "calls_resumed")
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "calls_resumed").read_text().split() == ["250"]  # only the missing batch
    ref = infer_script(whole, kill_at=0, calls=tmp_path / "calls_whole")
    assert ref.returncode == 0, ref.stderr[-2000:]
    a, b = np.load(killed / "simulations.npz"), np.load(whole / "simulations.npz")
    for key in ("theta", "x", "round"):
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_wait_for_a_slow_simulator_without_a_collective(tmp_path):
    """The main process simulates for ~7.5 s while the other waits, under a 4 s collective timeout: it waits without a
    collective and trains with it afterwards (with the former barrier, the waiting process timed out)."""
    args = [
        "train.py",
        "--config",
        "configs/posterior.yaml",
        "simulation.simulator=sbi_models:slow",
        "simulation.prior=normal",
        "simulation.prior_loc=[0,0]",
        "simulation.simulations=1500",  # >= 1,000 training pairs: one validation split (no cross-validation)
        "simulation.batch=300",  # 5 batches of 1.5 s
        "simulation.calibration=0",
        f"run_dir={tmp_path / 'two'}",
    ] + [f"train.{k}={'null' if v is None else v}" for k, v in (QUICK | {"steps": 20}).items()]
    extra = {"ACCELERATE_USE_CPU": "1", "FLOWS_PROCESS_TIMEOUT": "4", "PYTHONPATH": str(TESTS)}
    done = run(launch(2) + args, extra, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "two" / "model.safetensors").exists()


def test_the_command_line_runs_a_simulator_from_a_module(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    overrides = [
        "simulation.simulator=sbi_models:linear",
        "simulation.prior=normal",
        "simulation.prior_loc=[0,0]",
        "simulation.prior_scale=[1]",
        "simulation.simulations=500",
        f"run_dir={tmp_path / 'cli'}",
    ] + [f"train.{k}={'null' if v is None else v}" for k, v in QUICK.items()]
    run = flows.train(ROOT / "configs" / "posterior.yaml", overrides=overrides)
    assert (run.path / "model.safetensors").exists() and "nll" in run.result
    with pytest.raises(ConfigError, match="exists"):
        flows.train(ROOT / "configs" / "posterior.yaml", overrides=overrides)
    resumed = flows.train(run_dir=run.path, resume=True)  # finished: nothing simulated or trained again
    assert resumed.result == run.result


def test_a_round_killed_before_its_first_checkpoint_starts_again(tmp_path):
    root = tmp_path / "early"
    flows.infer(
        sbi_models.linear, sbi_models.prior, 300, run_dir=root, simulation={"calibration": 0}, **quick(steps=20)
    )
    first = json.loads((root / "round_0" / "eval.json").read_text())
    for name in ("eval.json", "model.safetensors", "checkpoints", "metrics.jsonl"):  # only its config.yaml left
        target = root / "round_0" / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    flows.infer(sbi_models.linear, sbi_models.prior, 300, run_dir=root, resume=True, **quick(steps=20))
    assert json.loads((root / "round_0" / "eval.json").read_text())["nll"] == first["nll"]


def test_draws_on_a_bound_move_inside_and_have_zero_density(amortized):
    theta = torch.tensor([[-1.0, 0.5], [1.0, 1.0], [0.2, 0.3]])
    moved = inside(theta, [[-1, 1], None])
    assert (moved[:, 0] > -1).all() and (moved[:, 0] < 1).all() and moved[1, 1] == 1.0
    assert moved[2].tolist() == theta[2].tolist()
    bounded = Flow(
        TimeMLP(2, [8]), Preprocess(torch.zeros(2), torch.ones(2), low=-torch.ones(2), high=torch.ones(2)), (2,)
    )
    lp = bounded.log_prob(theta, steps=4)
    assert lp[:2].tolist() == [-math.inf, -math.inf] and math.isfinite(lp[2])


def test_a_box_prior_becomes_the_bounds():
    box = torch.distributions.Independent(torch.distributions.Uniform(-torch.ones(3), 2 * torch.ones(3)), 1)
    low, high = prior_box(box, 3)
    assert low.tolist() == [-1] * 3 and high.tolist() == [2] * 3
    assert prior_box(sbi_models.prior, 2) is None


# ------------------------------------------------------------------ bad input
def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FlowsError, match="log_prob"):
        flows.infer(sbi_models.linear, object(), 100, run_dir=tmp_path / "a")
    with pytest.raises(SimulationError, match="one row per parameter"):
        flows.infer(sbi_models.wrong_rows, sbi_models.prior, 100, run_dir=tmp_path / "b", **quick())
    with pytest.raises(ConfigError, match="pass x_obs="):
        flows.infer(sbi_models.linear, sbi_models.prior, 200, rounds=2, run_dir=tmp_path / "d")
    with pytest.raises(FlowsError, match="x_obs has shape"):
        flows.infer(
            sbi_models.linear, sbi_models.prior, 200, x_obs=torch.zeros(3), rounds=2, run_dir=tmp_path / "c", **quick()
        )
    base = ["data.name=tabular", "simulation.simulator=sbi_models:linear"]
    for extra, message in [
        (["simulation.prior=normal", "simulation.prior_loc=[0,0]", "simulation.rounds=2"], "x_obs"),
        (["simulation.prior=uniform"], "bounds"),
        (["simulation.prior=gauss"], "uniform, normal or 'module:object'"),
        (["simulation.prior=normal", "simulation.prior_loc=[0,0]", "data.path=x.npz"], "not both"),
    ]:
        with pytest.raises(ConfigError, match=message):
            flows.load_config(None, base + extra)
    with pytest.raises(ConfigError, match="goes with simulation.simulator"):
        flows.load_config(None, ["data.name=tabular", "data.path=x.npy", "simulation.rounds=3"])


def test_the_simulation_section_and_older_files_that_kept_its_keys_in_data(tmp_path):
    sim = ["data.name=tabular", "simulation.simulator=sbi_models:linear", "simulation.prior=normal"]
    cfg = flows.load_config(None, [*sim, "simulation.prior_loc=[0,0]", "simulation.workers=2", "simulation.timeout=30"])
    assert (cfg.simulation.workers, cfg.simulation.timeout, cfg.simulation.batch) == (2, 30.0, 1000)
    old = {  # a config.yaml written before the section existed
        "data": {"name": "tabular", "simulator": "sbi_models:linear", "prior": "normal", "prior_loc": [0, 0]}
        | {"simulations": 300, "simulation_batch": 100, "calibration": 0, "rounds": 1},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    cfg = flows.load_config(tmp_path / "config.yaml", lenient=True)
    assert (cfg.simulation.simulator, cfg.simulation.simulations, cfg.simulation.batch) == (
        "sbi_models:linear",
        300,
        100,
    )
    assert cfg.simulation.calibration == 0 and cfg.data.name == "tabular"
    with pytest.raises(ConfigError, match="now 'simulation.batch'"):
        flows.load_config(tmp_path / "config.yaml", ["simulation.batch=5"])
    for bad, message in [
        ("simulation.workers=0", "workers must be >= 1"),
        ("simulation.timeout=0", "timeout must be > 0"),
        ("simulation.scheduler=tcp://h:8786", "not both"),
    ]:
        with pytest.raises(ConfigError, match=message):
            flows.load_config(None, [*sim, "simulation.prior_loc=[0,0]", "simulation.workers=2", bad])
    with pytest.raises(ConfigError, match="simulation.workers goes with simulation.simulator"):
        flows.load_config(None, ["simulation.workers=2"])


def test_a_simulator_that_raises_stops_and_keeps_what_was_simulated(tmp_path):
    store, calls = SimulationStore(tmp_path), []

    def flaky(theta):
        calls.append(len(theta))
        if len(calls) == 2:
            raise RuntimeError("diverged")
        return theta

    def propose(m, seed):
        return torch.randn(m, 2, generator=torch.Generator().manual_seed(seed))

    with pytest.raises(SimulationError, match=r"RuntimeError: diverged \(round 0, batch 1\)\. The 10 pairs"):
        store.run(0, 30, propose, flaky, 10, seed=0)
    assert store.counts(0) == {"simulated": 10, "kept": 10, "dropped": 0}
    store.run(0, 30, propose, lambda t: t, 10, seed=0)  # resumed: only the missing batches
    assert store.counts(0)["kept"] == 30 and len(calls) == 2


# ------------------------------------------------------------------ i.i.d. trials
def test_the_trial_embedding_is_permutation_invariant():
    torch.manual_seed(0)
    field = TimeMLP(2, [16], context_dim=8, context_shape=(4, 2))
    x, t, c = torch.randn(5, 2), torch.rand(5), torch.randn(5, 4, 2)
    perm = torch.tensor([2, 0, 3, 1])
    out = field(x, t, c.reshape(5, 8))
    torch.testing.assert_close(out, field(x, t, c[:, perm].reshape(5, 8)))
    assert not torch.allclose(out, field(x, t, (c + 1).reshape(5, 8)))  # and it reads the trials
    # the whole flow: standardization pooled over trials, the regression on the trials' mean
    ctx = Context("vector", dim=8, shape=(4, 2), shift=torch.arange(2.0).repeat(4), scale=torch.ones(8))
    ctx.fit_affine(torch.randn(50, 2), torch.randn(50, 8))
    flow = Flow(field, Preprocess(torch.zeros(2), torch.ones(2)), (2,), context=ctx)
    theta = torch.randn(5, 2)
    lp = flow.log_prob(theta, context=c, steps=4)  # float64 of float32 work: float32 tolerances
    torch.testing.assert_close(lp, flow.log_prob(theta, context=c[:, perm], steps=4), **FLOAT32)
    with pytest.raises(FlowsError, match=r"4 i.i.d. trials of 2 numbers; expected shape \(4, 2\)"):
        flow.sample(3, context=torch.zeros(3, 2))


def test_a_simulator_of_trials_trains_with_the_invariant_embedding(tmp_path):
    flow = flows.infer(
        sbi_models.trials,
        sbi_models.prior,
        600,
        run_dir=tmp_path / "t",
        data={"context_shape": [4, 2]},
        **quick(steps=30),
    )
    assert flow.context.trials and flow.context.shape == (4, 2)
    assert flow.sample(3, context=torch.zeros(8), steps=2).shape == (3, 2)  # flattened x works too
    x = torch.randn(4, 2)
    a = flow.log_prob(torch.zeros(1, 2), context=x, steps=4)
    torch.testing.assert_close(a, flow.log_prob(torch.zeros(1, 2), context=x.flip(0), steps=4), **FLOAT32)


# ------------------------------------------------------------------ calibration
def exact_posterior(scale: float = 1.0) -> Flow:
    """The closed-form linear-Gaussian posterior as a flow: a zero field and the conditional standardization fitted
    on many pairs (exact for this model), its spread multiplied by ``scale``."""
    torch.manual_seed(0)
    field = TimeMLP(2, [8], context_dim=2)
    for p in field.parameters():
        torch.nn.init.zeros_(p)
    theta = torch.randn(200_000, 2)
    x = sbi_models.linear(theta)
    ctx = Context("vector", dim=2).fit_affine(theta, x)
    ctx.chol = ctx.chol * scale
    return Flow(
        field, Preprocess(torch.zeros(2), torch.ones(2)), (2,), {"method": "euler", "step_size": 1.0}, context=ctx
    )


@pytest.mark.parametrize(("scale", "verdict"), [(1.0, "calibrated"), (0.7, "over-confident"), (1.5, "under-confident")])
def test_calibration_passes_the_true_posterior_and_flags_scaled_ones(scale, verdict):
    theta = sbi_models.prior.sample((600,))
    x = sbi_models.linear(theta)
    summary = calibrate(exact_posterior(scale), theta, x, samples=60, batch=200).summary()
    assert summary["verdict"] == verdict
    if scale == 1.0:
        assert summary["coverage_error_max"] < summary["coverage_band_95"] and summary["sbc_uniform"]
    else:
        assert summary["coverage_error_max"] > 0.1 and not summary["sbc_uniform"]


@pytest.mark.slow  # two CLI subprocesses (calibration in process: the tests above)
def test_evaluate_calibration_and_the_pair_plot_from_the_command_line(amortized):
    root, _ = amortized
    done = script("evaluate.py", str(root), "--calibration", "--samples", "30", "--limit", "100")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((root / "calibration.json").read_text())
    assert summary["pairs"] == 100 and summary["verdict"] in ("calibrated", "over-confident", "under-confident")
    assert (root / "calibration.png").stat().st_size > 10_000 and "coverage error" in done.stdout
    np.save(root / "x_obs.npy", np.array([[1.0, -0.5], [0.0, 0.0]], dtype=np.float32))
    done = script("sample.py", str(root), "--context", str(root / "x_obs.npy"), "-n", "500", "--steps", "4")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (root / "samples" / "corner.png").stat().st_size > 10_000


def test_truncated_prior_draws_only_inside_the_region(amortized):
    _, flow = amortized
    x_obs = torch.tensor([1.0, 0.0])
    region = TruncatedPrior(sbi_models.prior, flow, x_obs, samples=2000, seed=0)
    theta, info = region.sample(300, seed=1)
    assert theta.shape == (300, 2) and 0 < info["acceptance"] <= 1
    assert (flow.log_prob(theta, context=x_obs) >= region.tau - 1e-3).all()
    again = TruncatedPrior(sbi_models.prior, flow, x_obs, state=region.state())
    torch.testing.assert_close(again.sample(300, seed=1)[0], theta)
