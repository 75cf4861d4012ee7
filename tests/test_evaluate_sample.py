"""evaluate.py and sample.py: closed forms, error bars, processes, outputs, bad input."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import LinearField, launch, run, script, tiny_overrides

from flows.api import train
from flows.config import load_config
from flows.data import Preprocess
from flows.evaluation import summarize, tolerance_check
from flows.flow import Flow
from flows.sampling import encode, sample

TIGHT = dict(atol=1e-9, rtol=1e-9)


def scores(field, raw, pre, generator=None, **options):
    """``Flow.log_prob`` of all of ``raw`` in one batch: (log p, probe variance, NFE)."""
    solver = {k: options.pop(k) for k in ("atol", "rtol") if k in options}
    flow = Flow(field, pre, tuple(raw.shape[1:]), solver)
    lp, info = flow.log_prob(raw, generator=generator, batch_size=len(raw), return_info=True, **options)
    return lp, info["variance"], info["nfe"]


class Constant(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x, t):
        return self.c.to(x).expand_as(x)


def test_sampling_a_constant_field_lands_on_the_closed_form():
    c = torch.tensor([1.5, -0.5])
    res = sample(Constant(c), 100, (2,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res.x, res.z + c)
    torch.testing.assert_close(res.kinetic, torch.full((100,), c.pow(2).sum().item()))
    torch.testing.assert_close(res.straightness, torch.ones(100))  # straight, constant speed


def test_encode_of_sample_recovers_the_noise(linear_field):
    res = sample(linear_field, 50, (3,), generator=torch.Generator().manual_seed(0), **TIGHT)
    back = encode(linear_field, res.x, **TIGHT)
    torch.testing.assert_close(back.x, res.z, atol=1e-7, rtol=1e-7)


def gaussian_flow():
    a = 0.5 * torch.randn(2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    field = LinearField(a).float()
    m = torch.linalg.matrix_exp(a)
    return field, torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64), m @ m.T)


def test_evaluation_of_a_gaussian_flow_equals_the_analytic_nll_within_its_error():
    field, gauss = gaussian_flow()
    raw = gauss.sample(
        (4000,),
    ).float()
    pre = Preprocess(torch.tensor(0.0), torch.tensor(1.0))
    lp, var, nfe = scores(field, raw, pre, trace="exact", atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(lp, gauss.log_prob(raw.double()), atol=1e-4, rtol=1e-5)
    s = summarize(lp, var, 1, 2, None)
    assert abs(s["nll"] - gauss.entropy().item()) < 3 * s["nll_se"]
    assert nfe > 0 and s["n"] == 4000


def test_hutchinson_with_many_probes_agrees_with_exact():
    torch.manual_seed(0)
    from flows.nn import TimeMLP

    field = TimeMLP(3, [16, 16])
    raw = torch.randn(20, 3)
    pre = Preprocess(torch.tensor(0.0), torch.tensor(1.0))
    solver = dict(atol=1e-6, rtol=1e-6)
    exact, _, _ = scores(field, raw, pre, trace="exact", **solver)
    est, var, _ = scores(field, raw, pre, torch.Generator().manual_seed(1), trace="hutchinson", probes=400, **solver)
    se = (var / 400).sqrt()
    assert ((est - exact).abs() < 4 * se + 1e-5).all()
    assert se.max() > 0  # probes really varied


def test_importance_weighted_dequantization_tightens_the_bound():
    field, _ = gaussian_flow()
    pre = Preprocess(torch.tensor(0.5), torch.tensor(0.2), levels=4)
    raw = torch.randint(0, 4, (300, 2))
    solver = dict(atol=1e-6, rtol=1e-6, trace="exact")
    one, _, _ = scores(field, raw, pre, torch.Generator().manual_seed(0), **solver)
    many, _, _ = scores(field, raw, pre, torch.Generator().manual_seed(0), deq_samples=16, **solver)
    assert many.mean() > one.mean()  # log-mean-exp ≥ mean log (Jensen), on average strictly


def test_tolerance_check_reports_small_changes_for_tight_solves():
    field, gauss = gaussian_flow()
    raw = gauss.sample((50,)).float()
    pre = Preprocess(torch.tensor(0.0), torch.tensor(1.0))
    flow = Flow(field, pre, (2,))
    loose = tolerance_check(flow, raw, trace="exact", atol=1e-2, rtol=1e-2)
    tight = tolerance_check(flow, raw, trace="exact", atol=1e-6, rtol=1e-6)
    assert tight["max_abs_change"] < 1e-4 < loose["max_abs_change"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("evalrun") / "run"
    train(load_config(None, [*tiny_overrides(path, steps=4), "data.test_size=101"]))
    return path


def test_evaluate_cli_table_json_and_check(run_dir):
    proc = script("evaluate.py", str(run_dir), "--check", "20", "--batch-size", "40")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NLL" in proc.stdout and "tolerance check" in proc.stdout
    result = json.loads((run_dir / "eval_test.json").read_text())
    assert result["n"] == 101 and math.isfinite(result["nll"]) and result["nll_se"] > 0
    assert result["tolerance_check"]["n"] == 20 and result["trace"] == "exact"


@pytest.mark.slow
@pytest.mark.distributed
def test_evaluate_with_two_processes_equals_one(run_dir, tmp_path):
    out = {}
    for n in (1, 2):
        args = ["--check", "0", "--batch-size", "20", "--json", str(tmp_path / f"{n}.json")]
        proc = run([*launch(n), "evaluate.py", str(run_dir), *args], {"ACCELERATE_USE_CPU": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[n] = json.loads((tmp_path / f"{n}.json").read_text())
    assert out[2]["processes"] == 2 and out[1]["n"] == out[2]["n"] == 101  # padding dropped
    assert abs(out[1]["nll"] - out[2]["nll"]) < 1e-4  # adaptive steps differ per batch: tolerance level


def test_sample_cli_outputs(run_dir, tmp_path):
    args = ["-n", "300", "--trajectories", "5", "--out", str(tmp_path / "s"), "--method", "rk4", "--steps", "8"]
    proc = script("sample.py", str(run_dir), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = np.load(tmp_path / "s" / "samples.npz")
    assert files["samples"].shape == (300, 2) and files["noise"].shape == (300, 2)
    assert np.load(tmp_path / "s" / "trajectories.npy").shape == (60, 5, 2)
    for name in ("samples.png", "trajectories.png", "info.json"):
        assert (tmp_path / "s" / name).is_file()
    info = json.loads((tmp_path / "s" / "info.json").read_text())
    assert info["nfe"] == 32 and 0 < info["straightness"] <= 1 + 1e-6  # rk4: 4 evaluations x 8 steps

    proc = script("sample.py", str(run_dir), "--encode", "-n", "50", "--out", str(tmp_path / "e"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.load(tmp_path / "e" / "codes.npz")["codes"].shape == (50, 2)


@pytest.mark.slow  # three CLI subprocesses (the CLIs' errors in process: tests/test_reliability.py)
def test_bad_paths_and_foreign_checkpoints_are_clear_errors(tmp_path):
    proc = script("evaluate.py", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "no checkpoint at" in proc.stderr
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "model.safetensors"), metadata={"format": "other"})
    for name in ("evaluate.py", "sample.py"):
        proc = script(name, str(tmp_path))
        assert proc.returncode == 2 and "not a flows checkpoint" in proc.stderr, proc.stderr[-2000:]
