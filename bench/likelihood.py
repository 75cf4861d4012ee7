"""Exact likelihood of 10,000 held-out points: flows against flow_matching and zuko on the same weights.

    pip install -e ".[bench]"   # zuko, flow-matching (benchmark only)
    python bench/likelihood.py [--run2d runs/toy2d_mle] [--run64 runs/digits_mle]

All three integrate the same trained field with dopri5 (zuko: its own adaptive Dormand-Prince),
atol = rtol = 1e-5 and the exact trace, on the same 10,000 points in one batch, 2 threads.
flows: ``flows.likelihood.log_prob`` (model space, like the others); flow_matching 1.0:
``ODESolver.compute_likelihood(exact_divergence=True)``; zuko 1.6:
``NormalizingFlow(FreeFormJacobianTransform(...), DiagNormal).log_prob`` with the field run backwards
in zuko's time (zuko maps data at t=0 to noise at t=1). For the 64-D model the 359 held-out digits
are dequantized 28 times each (10,052 points; same inputs for all).
Without --run2d/--run64 short models are trained first (cached in bench/out/likelihood).
Every library calls the same backbone, which embeds a time shared by the batch once and broadcasts
it; the last row forces one embedding per sample (what every contestant paid before that change).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from common import ROOT, Counted, setup_threads, table, timed, trained_run

import flows
from flows.data import build_data
from flows.likelihood import log_prob, standard_normal_log_prob


def inputs(loaded, n: int) -> torch.Tensor:
    """n held-out points in model space (dequantized copies for discrete data)."""
    test = build_data(loaded.config.data).test
    torch.manual_seed(0)
    reps = math.ceil(n / len(test))
    return loaded.preprocess(test.repeat(reps, 1))[: max(n, len(test))] if reps > 1 else loaded.preprocess(test[:n])


def ours(field, x, tol):
    counted = Counted(field)
    with torch.no_grad():  # one batch of all points, model space (no preprocessing log-det)
        res = log_prob(counted, x, trace="exact", method="dopri5", atol=tol, rtol=tol, adjoint=False)
    return res.log_prob, counted.calls


def ours_per_sample_time(field, x, tol):
    """As ``ours``, but the backbone embeds the time once per sample (what it did before it broadcast a
    shared time): measures that change in the same run."""

    class PerSample(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, y, t):
            return self.inner(y, t.expand(y.shape[0]).clone())

    return ours(PerSample(field), x, tol)


def flow_matching_lp(field, x, tol):
    from flow_matching.solver import ODESolver
    from flow_matching.utils import ModelWrapper

    counted = Counted(field)

    class Wrapped(ModelWrapper):
        def forward(self, x, t, **extras):
            return self.model(x, t.expand(x.shape[0]))

    solver = ODESolver(velocity_model=Wrapped(counted))
    _, lp = solver.compute_likelihood(
        x_1=x,
        log_p0=standard_normal_log_prob,
        step_size=None,
        method="dopri5",
        atol=tol,
        rtol=tol,
        exact_divergence=True,
    )
    return lp.detach(), counted.calls


def zuko_lp(field, x, tol):
    from zuko.distributions import DiagNormal, NormalizingFlow
    from zuko.transforms import FreeFormJacobianTransform

    counted = Counted(field)
    dim = x.shape[1]

    def f(t, y):  # zuko: data at t=0, noise at t=1; ours: noise at 0, data at 1
        return -counted(y, (1 - t).expand(y.shape[0]))

    transform = FreeFormJacobianTransform(
        f=f, t0=torch.tensor(0.0), t1=torch.tensor(1.0), phi=(), atol=tol, rtol=tol, exact=True
    )
    flow = NormalizingFlow(transform, DiagNormal(torch.zeros(dim), torch.ones(dim)))
    with torch.no_grad():
        return flow.log_prob(x), counted.calls


def bench(name: str, run: Path, n: int, tol: float, repeats: int) -> list[list]:
    loaded = flows.load(run)
    x = inputs(loaded, n)
    rows, results = [], {}
    contestants = (
        ("flows", ours),
        ("flow_matching", flow_matching_lp),
        ("zuko", zuko_lp),
        ("flows, time per sample (before)", ours_per_sample_time),
    )
    for label, fn in contestants:
        try:
            seconds, (lp, nfe) = timed(lambda fn=fn: fn(loaded.field, x, tol), repeats)
        except ImportError as e:
            rows.append([name, label, "not installed", "", "", "", "", str(e)[:40]])
            continue
        results[label] = lp.double()
        rows.append([name, label, len(x), seconds, len(x) / seconds, nfe, -lp.double().mean().item(), ""])
    base = results["flows"]
    for row in rows:
        if row[1] in results:
            row[-1] = f"{(results[row[1]] - base).abs().max().item():.1e}"
    best_peer = max(
        (r[4] for r in rows if not r[1].startswith("flows") and isinstance(r[4], float)), default=float("nan")
    )
    rows[0].append(f"{rows[0][4] / best_peer:.2f}x")
    for r in rows[1:]:
        r.append("")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run2d", help="a 2D run (default: a short checkerboard training)")
    p.add_argument("--run64", help="a digits run (default: a short digits training)")
    p.add_argument("-n", type=int, default=10_000)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default="2d,64d", help="which models: 2d, 64d or both (64-D takes ~30 min: zuko)")
    p.add_argument("--out", default=str(ROOT / "bench/out/likelihood"))
    args = p.parse_args()
    setup_threads(2)
    out = Path(args.out)
    models = args.models.split(",")
    rows = []
    if "2d" in models:
        run2d = trained_run(args.run2d, "configs/toy2d_mle.yaml", ["train.time_limit=2", "train.steps=1000"], out)
        rows += bench("2D checkerboard", run2d, args.n, args.tol, args.repeats)
    if "64d" in models:
        run64 = trained_run(args.run64, "configs/digits_mle.yaml", ["train.steps=300", "train.eval_every=0"], out)
        rows += bench("64-D digits", run64, args.n, args.tol, args.repeats)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; dopri5 atol=rtol={args.tol:g}, exact trace, "
        f"median of {args.repeats} after a warm-up"
    )
    print(
        table(
            [
                "model",
                "library",
                "points",
                "seconds",
                "points/s",
                "NFE",
                "NLL (model space)",
                "max |Δ log p| vs flows",
                "flows / best peer",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
