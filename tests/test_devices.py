"""Device placement, testable without a GPU.

Two traps stand in for a CUDA device:

- ``meta`` data: a tensor left on the CPU that meets a tensor on the ``meta`` device raises
  ("Tensor on device meta is not on the expected device cpu!") exactly as a CPU tensor meeting a
  CUDA tensor does. The trainer is built with the accelerator's device patched to ``meta``.
- ``meta`` as the default device while the data and the field stay on the CPU: every tensor
  factory called without ``device=`` then makes a meta tensor, which raises when it meets the
  data, so whole solves, evaluations and samplings run on real numbers with the trap armed.

Plus a static check that every tensor factory in the package names its device.
"""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from helpers import ROOT, tiny_overrides

import flows
from flows.api import train
from flows.config import load_config
from flows.coupling import ot_coupling
from flows.data import Preprocess
from flows.data.batches import Batches
from flows.divergence import draw_probe
from flows.evaluation import tolerance_check
from flows.flow import Flow
from flows.likelihood import log_prob
from flows.nn import TimeMLP
from flows.ode import solve
from flows.paths import sample_time
from flows.sampling import encode, sample
from flows.training import Trainer

META = torch.device("meta")
FACTORIES = {
    "zeros", "ones", "empty", "full", "rand", "randn", "randint", "randperm", "tensor", "as_tensor",
    "arange", "linspace", "logspace", "eye", "normal", "Generator",
}  # fmt: skip


def test_every_tensor_factory_in_the_package_names_its_device():
    """``torch.zeros(...)`` without ``device=`` lands on the CPU whatever the data's device is."""
    missing = []
    for path in sorted((ROOT / "flows").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            base = node.func.value
            if not (isinstance(base, ast.Name) and base.id == "torch" and node.func.attr in FACTORIES):
                continue
            named = any(k.arg == "device" for k in node.keywords)
            if not named and not (node.func.attr == "Generator" and node.args):
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno} torch.{node.func.attr}")
    assert not missing, "tensor factories without device=: " + ", ".join(missing)


# ------------------------------------------------------------------ data on the meta device
def test_preprocessing_follows_the_data_device():
    pre = Preprocess(torch.randn(3), torch.rand(3) + 0.5, levels=17, logit_alpha=0.05)
    raw = torch.randint(0, 17, (5, 3), device=META).float()
    x = pre(raw)
    assert x.device == META and pre.log_det(x).device == META and pre.inverse(x).device == META
    moved = pre.to(META)
    assert moved.shift.device == META and moved.scale.device == META


def test_probes_times_noise_and_the_fm_loss_on_the_data_device():
    x = torch.empty(6, 3, device=META)
    assert draw_probe(x, "rademacher").device == META and draw_probe(x, "gaussian").device == META
    assert sample_time(6, "logit_normal", device=META).device == META
    field = TimeMLP(3, [8, 8]).to(META)
    z = torch.randn(4, 3, device=META)
    assert field(z, torch.rand(4, device=META)).device == META


@pytest.fixture
def meta_accelerator(monkeypatch):
    """Accelerate reports ``meta`` as its device: prepare() and every .to(acc.device) go there."""
    monkeypatch.setattr(Accelerator, "device", property(lambda self: META))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step()`")  # the optimizer step is stubbed
@pytest.mark.parametrize("objective", ["fm", "mle", "mle-rk4"])
def test_trainer_puts_field_ema_preprocessing_and_data_on_the_accelerator_device(tmp_path, meta_accelerator, objective):
    fixed = ["solver.method=rk4", "solver.step_size=0.5", "solver.adjoint=false"] if objective == "mle-rk4" else []
    objective = objective.split("-")[0]
    overrides = [*tiny_overrides(tmp_path / "r"), f"objective.name={objective}", "data.name=tabular", *fixed]
    np.save(tmp_path / "t.npy", np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32) * [1, 5, 9])
    cfg = load_config(None, [*overrides, f"data.path={tmp_path / 't.npy'}"])
    trainer = Trainer(cfg)
    assert {p.device for p in trainer.field.parameters()} == {META}
    assert {t.device for t in [*trainer.ema.module.parameters(), trainer.ema.n_averaged]} == {META}
    assert trainer.data.preprocess.shift.device == META and trainer.data.preprocess.shift.shape == (3,)
    assert next(trainer.batches()).device == META
    if objective == "fm" or fixed:
        # a step between logging steps makes no host synchronization, so it runs on meta end to end:
        # data, preprocessing, noise, times, loss, backward, clipping, the skip flag, EMA. (Fused Adam
        # has no meta kernel: its found_inf is checked instead.) Maximum likelihood too, with a fixed-step
        # solver: flows' own loop reads no step control back (an adaptive solve does, every step).
        flags = []
        trainer.stepper.optimizer_step = lambda: flags.append(trainer.opt.optimizer.found_inf.device)
        assert trainer.step(next(trainer.batches()), full_record=False) == {}
        assert trainer.step(next(trainer.batches()), full_record=False) == {}
        assert trainer.ema.count == 2 and trainer.guard.skipped.device == META and flags == [META, META]


# ------------------------------------------------------------------ meta as the default device
def trap() -> torch.device:
    """Inside ``with trap():`` tensors created without ``device=`` go to meta and clash with the CPU data."""
    return torch.device(META)


def test_solves_likelihood_and_sampling_create_nothing_off_device():
    field = TimeMLP(3, [8, 8], time_features=4)
    x = torch.randn(5, 3)
    with trap():
        solves(field, x)


def solves(field, x):
    solver = dict(method="rk4", step_size=0.25)
    for trace in ("exact", "hutchinson"):
        res = log_prob(field, x, trace=trace, kinetic=True, jacobian=True, **solver)
        assert torch.isfinite(res.log_prob).all()
    adaptive = dict(atol=1e-4, rtol=1e-4, adjoint=True)
    loss = -log_prob(field, x, trace="hutchinson", **adaptive).log_prob.mean()
    loss.backward()  # the adjoint
    gen = torch.Generator("cpu").manual_seed(0)
    assert sample(field, 7, (3,), batch_size=4, generator=gen, **adaptive).x.device.type == "cpu"
    assert encode(field, x, **adaptive).x.device.type == "cpu"
    assert solve(field, x, 0.0, 1.0, kinetic=True, **adaptive).kinetic.device.type == "cpu"
    x0, x1 = ot_coupling(torch.randn(6, 1, 2, 2, device="cpu"), torch.randn(6, 1, 2, 2, device="cpu"))
    assert x0.device.type == "cpu"


def test_evaluation_with_dequantization_creates_nothing_off_device():
    field = TimeMLP(4, [8])
    pre = Preprocess(torch.full((4,), 0.5), torch.full((4,), 0.3), levels=17)
    raw = torch.randint(0, 17, (6, 4)).float()
    flow = Flow(field, pre, (4,), dict(atol=1e-4, rtol=1e-4))
    opts = dict(trace="hutchinson", deq_samples=2)
    with trap():
        gen = torch.Generator("cpu").manual_seed(0)
        lp, info = flow.log_prob(raw, generator=gen, batch_size=6, return_info=True, probes=3, **opts)
        assert lp.shape == info["variance"].shape == (6,) and lp.device.type == "cpu"
        assert tolerance_check(flow, raw, probes=1, **opts)["n"] == 6


def test_training_steps_and_evaluation_create_nothing_off_device(tmp_path):
    for objective in ("mle", "fm"):
        overrides = [*tiny_overrides(tmp_path / objective, steps=4), f"objective.name={objective}"]
        trainer = Trainer(load_config(None, [*overrides, "train.log_every=2", "objective.coupling=ot"]))
        batches = trainer.batches()
        with trap():
            for i in range(4):  # logging and non-logging steps
                assert trainer.step(next(batches), full_record=i % 2 == 0) is not None
            out = trainer.evaluate("final")
        assert np.isfinite(out["nll"])


def test_a_step_with_a_non_finite_gradient_is_skipped_on_the_device(tmp_path):
    """Between logging steps the update is skipped without a host sync, and counted at the next check."""
    cfg = load_config(None, [*tiny_overrides(tmp_path / "r", steps=20), "objective.name=fm", "train.log_every=5"])
    trainer = Trainer(cfg)
    batches = trainer.batches()
    trainer.step(next(batches))
    before = [p.clone() for p in trainer.field.parameters()]
    ema_before = [p.clone() for p in trainer.ema.module.parameters()]
    state_step = next(iter(trainer.opt.optimizer.state.values()))["step"].clone()
    field = trainer.field
    forward = field.forward
    field.forward = lambda x, t: forward(x, t) * float("nan")
    assert trainer.step(next(batches), full_record=False) == {}  # not detected on the host yet
    field.forward = forward
    for a, b in zip(before, trainer.field.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(ema_before, trainer.ema.module.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(next(iter(trainer.opt.optimizer.state.values()))["step"], state_step)
    assert trainer.progress.bad_steps == 0
    trainer.step(next(batches), full_record=True)
    assert trainer.progress.bad_steps == 1
    assert any("since the last logging step" in line for line in (tmp_path / "r" / "metrics.jsonl").open())


# ------------------------------------------------------------------ the CLIs
def test_loaded_runs_move_with_to(tmp_path):
    train(load_config(None, tiny_overrides(tmp_path / "r", steps=2)))
    loaded = flows.load(tmp_path / "r").to(META)
    assert loaded.device == META and loaded.preprocess.shift.device == META


def test_evaluate_and_sample_report_and_use_the_accelerator_device(tmp_path, capsys):
    from flows.cli.evaluate import main as evaluate_main
    from flows.cli.sample import main as sample_main

    train(load_config(None, tiny_overrides(tmp_path / "r", steps=2)))
    evaluate_main([str(tmp_path / "r"), "--check", "5", "--json", str(tmp_path / "e.json")])
    import json

    device = str(Accelerator().device)
    assert json.loads(Path(tmp_path / "e.json").read_text())["device"] == device
    assert f"on {device}" in capsys.readouterr().out
    sample_main([str(tmp_path / "r"), "-n", "20", "--out", str(tmp_path / "s"), "--trajectories", "3"])
    assert json.loads((tmp_path / "s" / "info.json").read_text())["device"] == device


def test_resident_batches_equal_batches_copied_per_step():
    data = torch.randn(50, 3)
    host = Batches(data, 10, seed=3, resident_bytes=0)
    resident = Batches(data, 10, seed=3)
    assert resident.resident and not host.resident
    a, b = host.from_step(7), resident.from_step(7)
    for _ in range(6):
        torch.testing.assert_close(next(a), next(b), rtol=0, atol=0)


def test_a_skip_not_yet_counted_travels_with_the_checkpoint(tmp_path):
    """kill -9 after a save that follows an uncounted skip: the resumed run counts it at the same step."""
    cfg = load_config(None, [*tiny_overrides(tmp_path / "r", steps=20), "objective.name=fm", "train.log_every=5"])
    trainer = Trainer(cfg)
    batches = trainer.batches()
    trainer.step(next(batches))
    trainer.progress.step = 1
    forward = trainer.field.forward
    trainer.field.forward = lambda x, t: forward(x, t) * float("nan")
    assert trainer.step(next(batches), full_record=False) == {}  # skipped on the device, not counted yet
    trainer.field.forward = forward
    trainer.progress.step = 2
    trainer.save()
    trainer.accelerator.end_training()
    resumed = Trainer(load_config(tmp_path / "r" / "config.yaml"), resume=True)
    assert resumed.progress.step == 2 and resumed.progress.bad_steps == 0 and int(resumed.guard.skipped) == 1
    resumed.step(next(resumed.batches()), full_record=True)
    assert resumed.progress.bad_steps == 1
    resumed.accelerator.end_training()
