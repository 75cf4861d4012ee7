"""Sampling 10,000 points: NFE and time per solver, and flow_matching's sampler on the same weights.

    python bench/sampling.py [--run runs/toy2d_mle]

flows: ``flows.ode.solve`` from t=0 to 1 (the solve ``flows.sampling.sample`` makes, without its
kinetic-energy integral; same noise for every solver). Peer: flow_matching 1.0
``ODESolver.sample(method="dopri5")`` at the same tolerances. The error column is the mean distance
of each solver's samples to those of dopri5 at 1e-7 from the same noise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import ROOT, Counted, setup_threads, table, timed, trained_run

import flows
from flows.ode import solve

SOLVERS = [
    ("dopri5 1e-5", dict(method="dopri5", atol=1e-5, rtol=1e-5, adjoint=False)),
    ("dopri5 1e-3", dict(method="dopri5", atol=1e-3, rtol=1e-3, adjoint=False)),
    ("bosh3 1e-3", dict(method="bosh3", atol=1e-3, rtol=1e-3, adjoint=False)),
    ("rk4 x10", dict(method="rk4", step_size=0.1, adjoint=False)),
    ("midpoint x20", dict(method="midpoint", step_size=0.05, adjoint=False)),
    ("euler x100", dict(method="euler", step_size=0.01, adjoint=False)),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a run directory (default: a short checkerboard training)")
    p.add_argument("-n", type=int, default=10_000)
    p.add_argument("--out", default=str(ROOT / "bench/out/likelihood"))
    args = p.parse_args()
    setup_threads(2)
    run = trained_run(args.run, "configs/toy2d_mle.yaml", ["train.time_limit=2", "train.steps=1000"], Path(args.out))
    field = flows.load(run).field
    z = torch.randn(args.n, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = solve(field, z, 0.0, 1.0, method="dopri5", atol=1e-7, rtol=1e-7, adjoint=False).x
    rows = []
    for name, solver in SOLVERS:
        with torch.no_grad():
            seconds, sol = timed(lambda solver=solver: solve(field, z, 0.0, 1.0, **solver))
        rows.append(["flows", name, sol.nfe.forward, seconds, (sol.x - ref).norm(dim=1).mean().item()])
    try:
        from flow_matching.solver import ODESolver
        from flow_matching.utils import ModelWrapper

        class Wrapped(ModelWrapper):
            def forward(self, x, t, **extras):
                return self.model(x, t.expand(x.shape[0]))

        for tol in (1e-5, 1e-3):
            counted = Counted(field)
            fm = ODESolver(velocity_model=Wrapped(counted))

            def go(fm=fm, counted=counted, tol=tol):
                counted.calls = 0
                return fm.sample(x_init=z, step_size=None, method="dopri5", atol=tol, rtol=tol)

            with torch.no_grad():
                seconds, x = timed(go)
            rows.append(
                ["flow_matching", f"dopri5 {tol:g}", counted.calls, seconds, (x - ref).norm(dim=1).mean().item()]
            )
    except ImportError:
        rows.append(["flow_matching", "not installed", "", "", ""])
    print(f"{args.n:,} samples from {run}, torch {torch.__version__}, {torch.get_num_threads()} threads, median of 3")
    print(table(["library", "solver", "NFE", "seconds", "mean error vs dopri5 1e-7"], rows))


if __name__ == "__main__":
    main()
