"""Conditional flows p(x | c): context vectors, class labels with guidance, bounded parameters."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import assert_same_tensors, script, unit, weights, write_sims
from torch import nn

import flows
from flows.config import load_config
from flows.context import Context, guided
from flows.errors import ConfigError, DataError, FlowsError
from flows.flow import Flow
from flows.nn import TimeMLP, TimeUNet
from flows.objectives import draw_context
from flows.preprocess import Preprocess


class ShiftScaleField(nn.Module):
    """The straight flow from N(0, s² ... ) base N(0, I) to N(A c, s² I): x_t = (1 − t + t s) z + t A c."""

    def __init__(self, a: torch.Tensor, s: float):
        super().__init__()
        self.a, self.s = nn.Parameter(a), s

    def forward(self, x, t, context):
        m = context @ self.a.T
        t = t.reshape(-1, 1) if t.ndim else t
        z = (x - t * m) / (1 - t + t * self.s)
        return (self.s - 1) * z + m


def randomized(module: nn.Module) -> nn.Module:
    """Every weight drawn at random (the U-Net's last layer starts at zero, which would hide the label)."""
    torch.manual_seed(0)
    for p in module.parameters():
        nn.init.normal_(p, std=0.2)
    return module


# ------------------------------------------------------------------ the field reads the context
def test_the_context_reaches_the_output_and_changes_samples():
    torch.manual_seed(0)
    field = TimeMLP(2, [16, 16], context_dim=3, context_embedding=[8])
    x, t = torch.randn(5, 2), torch.rand(5)
    c = torch.randn(5, 3, requires_grad=True)
    field(x, t, c).sum().backward()
    assert c.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in field.embed.parameters())
    flow = Flow(field.eval(), unit(2, torch.float64), (2,), context=Context("vector", 3))
    gen = torch.Generator().manual_seed(1)
    a = flow.sample(50, context=torch.zeros(3), generator=gen.manual_seed(1), steps=8)
    b = flow.sample(50, context=torch.ones(3), generator=gen.manual_seed(1), steps=8)
    assert (a - b).abs().max() > 1e-3  # same noise, different context
    unet = randomized(TimeUNet((1, 8, 8), channels=8, channel_mult=[1], classes=3))
    images = torch.randn(2, 1, 8, 8)
    out = [unet(images, torch.rand(1), torch.full((2,), y)) for y in range(4)]  # 3 is the null label
    assert all((out[i] - out[j]).abs().max() > 0 for i in range(4) for j in range(i))


def test_rows_do_not_interact_with_a_context():
    field = TimeMLP(3, [16], context_dim=2).double()
    x, c = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda y: field(y, torch.tensor(0.3, dtype=torch.float64), c), x)
    for i in range(4):
        for j in range(4):
            if i != j:
                assert jac[i, :, j, :].abs().max() == 0


# ------------------------------------------------------------------ closed forms
def test_log_prob_of_a_conditional_gaussian_equals_the_closed_form():
    a = torch.tensor([[1.0, -2.0], [0.5, 0.0], [0.0, 3.0]], dtype=torch.float64)
    s = 0.6
    flow = Flow(ShiftScaleField(a, s), unit(3, torch.float64), (3,), context=Context("vector", 2))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    c = torch.randn(20, 2, generator=gen, dtype=torch.float64)
    lp = flow.log_prob(x, context=c, atol=1e-9, rtol=1e-9)
    expected = torch.distributions.Normal(c @ a.T, s).log_prob(x).sum(1)
    torch.testing.assert_close(lp, expected, atol=1e-6, rtol=0)
    one = flow.log_prob(x, context=c[0], atol=1e-9, rtol=1e-9)  # one context for every row
    torch.testing.assert_close(one, torch.distributions.Normal(c[0] @ a.T, s).log_prob(x).sum(1), atol=1e-6, rtol=0)
    # samples: one context -> (n, D) around A c; K contexts -> (K, n, D)
    samples = flow.sample(4000, context=c[0], generator=gen, atol=1e-7, rtol=1e-7)
    assert samples.shape == (4000, 3)
    torch.testing.assert_close(samples.mean(0), c[0] @ a.T, atol=0.05, rtol=0)
    assert flow.sample(7, context=c[:4], steps=4).shape == (4, 7, 3)
    assert flow.sample(7, context=c[:1], steps=4).shape == (7, 3)


def test_bounds_keep_every_sample_inside_and_count_their_log_det():
    low, high = torch.tensor([-1.0, 0.0], dtype=torch.float64), torch.tensor([2.0, float("inf")])
    pre = Preprocess(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), None, 0.0, low, high)

    class Zero(nn.Module):
        def forward(self, x, t):
            return torch.zeros_like(x)

    flow = Flow(Zero(), pre, (2,))
    y = torch.tensor([[0.5, 3.0], [-0.9, -2.0], [1.99, 0.1]], dtype=torch.float64)
    u = (y[:, 0] + 1) / 3
    s = torch.logit(u)
    normal = torch.distributions.Normal(0.0, 1.0)
    expected = normal.log_prob(s) - torch.log(3 * u * (1 - u)) + normal.log_prob(y[:, 1])  # second column: free
    torch.testing.assert_close(flow.log_prob(y, steps=2), expected)
    x = flow.sample(5000, steps=2)
    assert ((x[:, 0] > -1) & (x[:, 0] < 2)).all() and x[:, 1].min() < 0
    torch.testing.assert_close(pre.inverse(pre(y)), y)


# ------------------------------------------------------------------ labels, dropout, guidance
def test_label_dropout_and_the_null_label():
    labels = torch.arange(10).repeat(100)
    torch.manual_seed(0)
    assert torch.equal(draw_context(labels, 0.0, 10)["context"], labels)
    dropped = draw_context(labels, 0.3, 10)["context"]
    share = (dropped == 10).float().mean().item()
    assert 0.25 < share < 0.35
    assert torch.equal(dropped[dropped != 10], labels[dropped != 10])
    assert (draw_context(labels, 0.999999, 10)["context"] == 10).all()


def test_guidance_equals_the_explicit_formula():
    torch.manual_seed(0)
    unet = randomized(TimeUNet((1, 8, 8), channels=8, channel_mult=[1], classes=4)).eval()
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 2, 3])
    w = 2.5
    with torch.no_grad():
        explicit = (1 + w) * unet(x, t, y) - w * unet(x, t, torch.full_like(y, 4))
        torch.testing.assert_close(guided(unet, w, 4)(x, t, y), explicit, atol=1e-5, rtol=1e-5)
        shared = torch.tensor(0.4).expand(3)  # the solver's one time for the batch
        explicit = (1 + w) * unet(x, shared, y) - w * unet(x, shared, torch.full_like(y, 4))
        torch.testing.assert_close(guided(unet, w, 4)(x, shared, y), explicit, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(guided(unet, 0.0, 4)(x, t, y), unet(x, t, y), atol=1e-5, rtol=1e-5)


def label_flow(dropout: float = 0.1) -> Flow:
    torch.manual_seed(0)
    unet = randomized(TimeUNet((1, 4, 4), channels=8, channel_mult=[1], classes=3)).eval().requires_grad_(False)
    pre = Preprocess(torch.tensor(0.5), torch.tensor(0.5), levels=5)
    prior = torch.tensor([1.0, 2.0, 5.0])
    return Flow(unet, pre, (1, 4, 4), context=Context("labels", classes=3, prior=prior, dropout=dropout))


def test_the_marginal_over_labels_is_the_log_sum_exp_of_the_conditionals():
    flow = label_flow()
    x = torch.randint(0, 5, (6, 1, 4, 4))
    opts = dict(trace="exact", steps=3)
    g = torch.Generator().manual_seed(0)
    per_label = torch.stack([flow.log_prob(x, context=y, generator=g.manual_seed(4), **opts) for y in range(3)])
    prior = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64) / 8
    expected = torch.logsumexp(per_label + prior.log()[:, None], 0)
    torch.testing.assert_close(flow.log_prob(x, generator=g.manual_seed(4), **opts), expected)
    samples, info = flow.sample(9, steps=2, return_info=True)  # labels drawn from p(y)
    assert samples.shape == (9, 1, 4, 4) and info["label"].shape == (9,)
    assert flow.sample(2, context=[0, 1, 2], guidance=1.5, steps=2).shape == (3, 2, 1, 4, 4)


def test_bad_contexts_are_clear_errors():
    vector = Flow(TimeMLP(2, [8], context_dim=3), unit(2, torch.float64), (2,), context=Context("vector", 3))
    with pytest.raises(FlowsError, match="context of 3 features"):
        vector.sample(4, context=torch.zeros(2))
    with pytest.raises(FlowsError, match="pass context="):
        vector.log_prob(torch.zeros(4, 2))
    with pytest.raises(FlowsError, match="3 contexts for 4 points"):
        vector.log_prob(torch.zeros(4, 2), context=torch.zeros(3, 3))
    with pytest.raises(FlowsError, match="NaN"):
        vector.sample(4, context=torch.tensor([0.0, float("nan"), 1.0]))
    with pytest.raises(FlowsError, match="cannot be guided"):
        vector.sample(4, context=torch.zeros(3), guidance=2.0)
    plain = Flow(TimeMLP(2, [8]), unit(2, torch.float64), (2,))
    with pytest.raises(FlowsError, match="unconditional"):
        plain.sample(4, context=torch.zeros(3))
    with pytest.raises(FlowsError, match="cannot be guided"):
        plain.sample(4, guidance=1.0)
    labels = label_flow()
    with pytest.raises(FlowsError, match="outside the 3 classes"):
        labels.sample(2, context=3)
    with pytest.raises(FlowsError, match="integers"):
        labels.sample(2, context=1.5)
    with pytest.raises(FlowsError, match="without objective.label_dropout"):
        label_flow(dropout=0.0).sample(2, context=1, guidance=2.0)


# ------------------------------------------------------------------ data and config
def sims_overrides(tmp_path, run="run", steps=6, extra=()):
    sims = tmp_path / "sims.npz"
    if not sims.exists():
        write_sims(sims)
    return [
        f"run_dir={tmp_path / run}",
        "data.name=tabular",
        f"data.path={sims}",
        "data.key=theta",
        "data.context_key=x",
        "data.val_fraction=0.1",
        f"train.steps={steps}",
        "train.batch_size=32",
        "train.warmup_steps=1",
        "train.log_every=1",
        "train.eval_every=3",
        "train.save_every=3",
        "model.hidden=[16,16]",
        "solver.method=rk4",
        "solver.step_size=0.25",
        "eval.solver.method=rk4",
        "eval.solver.step_size=0.25",
        "eval.plot=false",
        *extra,
    ]


def test_bad_data_and_config_are_clear_errors(tmp_path):
    write_sims(tmp_path / "sims.npz")
    base = sims_overrides(tmp_path)
    with pytest.raises(DataError, match="no array 'obs'.*theta, x"):
        flows.train(None, overrides=[*base, "data.context_key=obs"])
    with pytest.raises(ConfigError, match="coupling=ot with a context vector"):
        load_config(None, [*base, "objective.name=fm", "objective.coupling=ot"])
    with pytest.raises(ConfigError, match="label_dropout.*data.labels"):
        load_config(None, [*base, "objective.name=fm", "objective.label_dropout=0.1"])
    with pytest.raises(ConfigError, match="model.name=potential takes no context vector"):
        load_config(None, [*base, "model.name=potential"])
    with pytest.raises(ConfigError, match="data.labels"):
        load_config(None, ["data.name=checkerboard", "data.labels=true"])
    with pytest.raises(ConfigError, match="tables"):
        load_config(None, ["data.name=digits", "data.context_key=x"])
    with pytest.raises(DataError, match="not inside data.bounds"):
        flows.train(None, overrides=[*base, "data.bounds=[[-0.5,1],[-1,1]]"])
    with pytest.raises(DataError, match="2 pairs"):
        flows.train(None, overrides=[*base, "data.bounds=[[-1,1],[-1,1]]", "data.key=x", "data.context_key=theta"])
    np.save(tmp_path / "table.npy", np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32))
    with pytest.raises(DataError, match="context_columns"):
        flows.train(
            None,
            overrides=[
                *base,
                f"data.path={tmp_path / 'table.npy'}",
                "data.key=null",
                "data.context_key=null",
                "data.context_columns=[5]",
            ],
        )
    assert not (tmp_path / "run" / "model.safetensors").exists()  # nothing half-written


# ------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def sims_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("posterior")
    run = flows.train(None, overrides=sims_overrides(tmp, extra=["data.bounds=[[-1,1],[-1,1]]"]))
    return tmp, run


def test_a_context_run_trains_loads_and_samples_inside_its_bounds(sims_run):
    tmp, run = sims_run
    model = flows.load(run)
    assert model.context is not None and model.context.dim == 3
    s = model.sample(300, context=np.array([0.5, -0.5, 0.0], dtype=np.float32), steps=4)
    assert s.shape == (300, 2) and (s.abs() < 1).all()
    assert model.sample(5, context=torch.zeros(4, 3), steps=4).shape == (4, 5, 2)
    # numpy's float64 arrays meet the float32 field: converted, with the same result
    theta, x = np.array([[0.1, 0.2]]), np.array([0.5, -0.5, 0.0])
    torch.testing.assert_close(
        model.log_prob(theta, context=x, steps=4),
        model.log_prob(torch.tensor(theta, dtype=torch.float32), context=torch.tensor(x, dtype=torch.float32), steps=4),
    )


@pytest.mark.slow  # three CLI subprocesses (evaluate.py = log_prob in process: tests/test_api.py)
def test_evaluate_cli_with_a_context_equals_log_prob(sims_run, tmp_path):
    tmp, run = sims_run
    model = flows.load(run)
    theta, x = write_sims(tmp_path / "other.npz", n=20, seed=5)
    np.save(tmp_path / "theta.npy", theta)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "eval.json"
    cmd = ["evaluate.py", str(run.path), "--data", str(tmp_path / "theta.npy"), "--context", str(tmp_path / "x.npy")]
    proc = script(*cmd, "--json", str(out), "--per-point", str(tmp_path / "lp.npy"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lp = model.log_prob(torch.as_tensor(theta), context=torch.as_tensor(x), batch_size=1000)
    assert np.array_equal(np.load(tmp_path / "lp.npy"), lp.numpy())  # to the last digit
    assert json.loads(out.read_text())["density"] == "p(x | c)"
    missing = script(*cmd[:4])
    assert missing.returncode != 0 and "pass --context" in missing.stderr
    bad = script("sample.py", str(run.path), "-n", "4", "--label", "1")
    assert bad.returncode != 0 and "not --label" in bad.stderr


def test_a_context_run_resumes_exactly_and_serves_init_from(sims_run, tmp_path):
    tmp, _ = sims_run
    full = flows.train(None, overrides=sims_overrides(tmp, "full", steps=6))
    flows.train(None, overrides=sims_overrides(tmp, "cut", steps=3))
    cfg = load_config(tmp / "cut" / "config.yaml", ["train.steps=6"])
    from flows.training import Trainer

    trainer = Trainer(cfg, resume=True)
    trainer.run()
    trainer.accelerator.end_training()
    assert_same_tensors(weights(tmp / "cut"), weights(full.path))
    mle = flows.train(
        None,
        overrides=sims_overrides(tmp, "mle", steps=2, extra=["objective.name=mle", f"train.init_from={full.path}"]),
    )
    assert flows.load(mle).context.dim == 3
    with pytest.raises(flows.CheckpointError):
        flows.train(
            None,
            overrides=[*sims_overrides(tmp, "plain", steps=2), "data.context_key=null", f"train.init_from={full.path}"],
        )


@pytest.mark.slow  # a digits run and two sample.py subprocesses
def test_label_conditional_digits_train_sample_and_evaluate(tmp_path):
    overrides = [
        f"run_dir={tmp_path / 'digits'}",
        "train.steps=2",
        "train.batch_size=16",
        "train.eval_every=0",
        "train.save_every=2",
        "eval.periodic_size=20",
        "eval.solver.method=rk4",
        "eval.solver.step_size=0.5",
        "model.channels=8",
        "model.attention_resolutions=[]",
    ]
    run = flows.train("configs/digits_cond.yaml", overrides=overrides)
    model = flows.load(run)
    assert model.context.kind == "labels" and model.context.classes == 10
    assert math.isclose(float(model.context.prior.sum()), 1.0)
    grid = model.sample(2, context=torch.arange(10), guidance=2.0, steps=2)
    assert grid.shape == (10, 2, 1, 8, 8)
    args = ["--label", "all", "-n", "2", "--guidance", "1", "--steps", "2", "--out", str(tmp_path / "s")]
    proc = script("sample.py", str(run.path), *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.load(tmp_path / "s" / "samples.npz")["samples"].shape == (10, 2, 1, 8, 8)
    assert (tmp_path / "s" / "samples_grid.png").is_file()
    bad = script("sample.py", str(run.path), "--label", "12", "--steps", "2")
    assert bad.returncode != 0 and "outside the 10 classes" in bad.stderr


def test_the_conditional_standardization_is_an_exact_affine_map():
    gen = torch.Generator().manual_seed(0)
    n, a = 20_000, torch.tensor([[1.0, -0.5, 0.0], [0.3, 0.0, 2.0]], dtype=torch.float64)
    chol = torch.tensor([[0.5, 0.0], [0.2, 0.1]], dtype=torch.float64)
    c = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    x = 1.0 + c @ a.T + torch.randn(n, 2, generator=gen, dtype=torch.float64) @ chol.T
    ctx = Context("vector", 3).fit_affine(x, c)
    torch.testing.assert_close(ctx.weights, a, atol=0.02, rtol=0)  # the regression finds A
    z = ctx.whiten(x, c)
    torch.testing.assert_close(z.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), torch.eye(2, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(ctx.color(z, c), x)

    class Zero(nn.Module):
        def forward(self, x, t, context):
            return torch.zeros_like(x)

    flow = Flow(Zero(), unit(2, torch.float64), (2,), context=ctx)
    expected = torch.distributions.MultivariateNormal(ctx.offset + c[:50] @ ctx.weights.T, scale_tril=ctx.chol)
    torch.testing.assert_close(flow.log_prob(x[:50], context=c[:50], steps=2), expected.log_prob(x[:50]))
    samples = flow.sample(20_000, context=c[0], steps=2)
    torch.testing.assert_close(samples.mean(0), expected.mean[0], atol=0.02, rtol=0)


def test_the_trainers_evaluations_repeat_on_image_runs(tmp_path):
    """Hutchinson probes and dequantization noise are seeded: two evaluations of the same weights agree."""
    from flows.training import Trainer

    overrides = [f"run_dir={tmp_path / 'd'}", "eval.periodic_size=16", "eval.solver.method=rk4"]
    overrides += ["eval.solver.step_size=0.5", "model.channels=8", "model.attention_resolutions=[]"]
    trainer = Trainer(load_config("configs/digits_cond.yaml", overrides))
    try:
        first, second = trainer.evaluate("periodic"), trainer.evaluate("periodic")
    finally:
        trainer.accelerator.end_training()
    assert first["trace"] == "hutchinson" and first["nll"] == second["nll"]
