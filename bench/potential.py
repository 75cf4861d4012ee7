"""The potential field (OT-Flow) against the time-conditioned MLP, on 2 cores.

    python bench/potential.py                       # every part (~25 min)
    python bench/potential.py --parts cost          # part 1 only (a minute)
    python bench/potential.py --minutes 2           # shorter training runs

1. Cost of one function evaluation of (v, exact trace), as the ODE solver calls it (our augmented
   dynamics): TimeMLP 3x64 (D vector-Jacobian products) against a potential of about the same number
   of parameters (one batched recursion), D = 2, 16, 64, batch 1,000; in evaluation (no graph) and in
   training (graph kept, then backward). Median of repeated calls, both in this process.
2. Checkerboard by maximum likelihood, ``--minutes`` each, both runs at once (one thread each):
   configs/toy2d_mle.yaml (today's default TimeMLP recipe) against configs/toy2d_potential.yaml. Then
   the exact likelihood of the 10,000 held-out points by the project's evaluator (``Flow.log_prob``,
   each model's own default evaluation solver, dopri5 1e-5), with points/s, NFE and the tolerance
   self-check (200 points at 100x tighter tolerances; "ok" when the largest change is below the
   standard error).
3. Digits as 64-D vectors, ``--minutes`` each, both at once: configs/digits_mle.yaml (Hutchinson in
   training, exact trace in evaluation) against configs/digits_potential.yaml; bits/dim of the 359
   held-out digits with the exact trace, and evaluation points/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import ROOT, setup_threads, table

import flows
from flows.data import build_data
from flows.evaluation import summarize, tolerance_check
from flows.nn import Potential, TimeMLP
from flows.ode import Dynamics


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def matched_potential(dim: int, target: int) -> Potential:
    """A depth-3 potential whose parameter count is the closest to ``target``."""
    width = min(range(4, 512), key=lambda m: abs(n_params(Potential(dim, m, 3)) - target))
    return Potential(dim, width, 3)


def time_call(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cost_per_evaluation(dims: list[int], batch: int, repeats: int) -> list[list]:
    rows = []
    for dim in dims:
        torch.manual_seed(0)
        mlp = TimeMLP(dim, [64, 64, 64])
        pot = matched_potential(dim, n_params(mlp))
        x = torch.randn(batch, dim)
        t = torch.tensor(0.5)
        state = (x, torch.zeros(batch))
        timings = {}
        for name, field in (("mlp", mlp), ("potential", pot)):
            dyn = Dynamics(field, integrals=("divergence",), trace="exact")

            def evaluate(dyn=dyn, t=t, state=state):
                with torch.no_grad():
                    dyn(t, state)

            def train(dyn=dyn, field=field, t=t, state=state):
                xg = state[0].detach().requires_grad_(True)
                v, div = dyn(t, (xg, state[1]))
                (v.pow(2).sum() + div.sum()).backward()
                field.zero_grad(set_to_none=True)

            timings[name] = (time_call(evaluate, repeats), time_call(train, max(3, repeats // 3)))
        (me, mt), (pe, pt) = timings["mlp"], timings["potential"]
        rows.append([dim, n_params(mlp), n_params(pot), me * 1e3, pe * 1e3, me / pe, mt * 1e3, pt * 1e3, mt / pt])
        print(f"D={dim}: evaluation {me / pe:.2f}x, training {mt / pt:.2f}x", flush=True)
    return rows


def launch(config: str, run_dir: Path, minutes: float, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    args = [sys.executable, str(ROOT / "train.py"), "--config", config, f"run_dir={run_dir}"]
    args += [f"train.time_limit={minutes}", "eval.plot=false", *extra]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def train_pair(runs: dict[str, tuple[str, list[str]]], out: Path, minutes: float) -> dict[str, float]:
    """Train each (config, overrides) at once, one thread each; returns the wall seconds of each."""
    procs, start, wall = {}, time.perf_counter(), {}
    for name, (config, extra) in runs.items():
        shutil.rmtree(out / name, ignore_errors=True)
        procs[name] = launch(config, out / name, minutes, extra)
    for name, proc in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"{name} failed: see {out / name}.log")
        wall[name] = time.perf_counter() - start
    return wall


def exact_likelihood(run: Path, raw: torch.Tensor, batch: int) -> dict:
    """The evaluator's numbers for one run: NLL ± se (bits/dim), points/s, NFE, tolerance self-check."""
    model = flows.load(run)
    lp, info = model.log_prob(raw, trace="exact", batch_size=batch, return_info=True)
    res = summarize(lp, info["variance"], 1, model.dim, model.levels)
    solver = info["solver"]
    check = tolerance_check(model, raw[:200], trace="exact")
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {
        **res,
        "points_per_s": len(raw) / info["seconds"],
        "nfe": info["nfe"],
        "check_max": check["max_abs_change"],
        "check_ok": check["max_abs_change"] <= res["nll_se"],
        "steps": max(r["step"] for r in steps if "loss" in r),
        "solver": f"{solver['method']} {solver['atol']:g}",
    }


def compare(names: list[str], results: dict[str, dict], bpd: bool) -> str:
    rows = []
    base = results[names[0]]
    for name in names:
        r = results[name]
        figure = f"{r['bpd']:.3f}" if bpd else f"{r['nll']:.4f} ± {r['nll_se']:.4f}"
        rows.append(
            [
                name,
                r["steps"],
                figure,
                r["solver"],
                r["nfe"],
                r["points_per_s"],
                r["points_per_s"] / base["points_per_s"],
                f"{r['check_max']:.1e} ({'ok' if r['check_ok'] else 'above the se'})",
            ]
        )
    head = ["model", "steps", "bits/dim" if bpd else "held-out NLL", "eval solver", "NFE", "points/s", "speed", "check"]
    return table(head, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="cost,checkerboard,digits")
    p.add_argument("--minutes", type=float, default=10.0, help="training minutes per model (parts 2 and 3)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=str(ROOT / "bench/out/potential"))
    args = p.parse_args()
    setup_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads for timing and evaluation\n", flush=True)

    if "cost" in parts:
        rows = cost_per_evaluation([2, 16, 64], 1000, args.repeats)
        print("\n## One evaluation of (v, exact trace), batch 1,000 (ms; ratio = MLP / potential)\n")
        head = ["D", "MLP params", "potential params", "MLP eval", "potential eval", "ratio"]
        print(table([*head, "MLP train", "potential train", "ratio"], rows), flush=True)

    races = {
        "checkerboard": ("toy2d", 2000, False, "Checkerboard, maximum likelihood"),
        "digits": ("digits", 400, True, "Digits as 64-D vectors, maximum likelihood"),
    }
    for part, (prefix, batch, bpd, title) in races.items():
        if part in parts:
            race(out / part, prefix, batch, bpd, f"{title}, {args.minutes:g} min each", args.minutes)


def race(out: Path, prefix: str, batch: int, bpd: bool, title: str, minutes: float) -> None:
    """configs/{prefix}_mle.yaml (the MLP) against configs/{prefix}_potential.yaml, trained at once, then
    the exact likelihood of the held-out split for each."""
    runs = {
        name: (str(ROOT / f"configs/{prefix}_{kind}.yaml"), [])
        for name, kind in (("mlp", "mle"), ("potential", "potential"))
    }
    wall = train_pair(runs, out, minutes)
    test = build_data(flows.load(out / "mlp").config.data).test
    results = {name: exact_likelihood(out / name, test, batch) for name in runs}
    print(f"\n## {title} (wall {wall})\n")
    print(compare(list(runs), results, bpd=bpd), flush=True)


if __name__ == "__main__":
    main()
