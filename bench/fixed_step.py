"""Maximum likelihood on the embedded default (checkerboard, configs/toy2d_mle.yaml) with the adaptive solver it
ships against fixed-step RK4 in flows' own loop (no host read per step), eager and compiled.

    python bench/fixed_step.py                    # 1,500 steps per row, batch 256 (~25 min on 2 CPU cores)
    python bench/fixed_step.py --steps 300 --rows dopri5 rk4-compiled --batch 1024
    python bench/fixed_step.py --quick            # a smoke run (seconds + one compile)

Every row trains the same recipe from the same seed for the same number of steps through the real trainer;
only the training solve differs. The held-out NLL (10k points, exact trace, dopri5 1e-5: the recipe's
evaluation) tells whether a fixed-step training solve learns as well per step; seconds per step (median of
the logged steps, compile time excluded by the median) tell what it costs. Ratios are against the dopri5 row
of the same run. On a GPU the compiled rows (``--mode reduce-overhead`` for CUDA graphs) are issue 19's
"≥ 4x today's steps/s" measurement.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from common import ROOT, median, records, setup_threads, table, train_run

ROWS = {
    "dopri5": [],  # the shipped recipe: dopri5, atol = rtol = 1e-4, direct backprop
    "rk4": ["solver.method=rk4", "solver.step_size=0.05"],
    "rk4-compiled": ["solver.method=rk4", "solver.step_size=0.05", "solver.compile={mode}"],
    "rk4-10": ["solver.method=rk4", "solver.step_size=0.1"],
    "rk4-10-compiled": ["solver.method=rk4", "solver.step_size=0.1", "solver.compile={mode}"],
    "dopri5-sync8": ["solver.sync_every=8"],  # flows' own dopri5, one host read per round of up to 8 steps
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--mode", default="true", help="solver.compile's value for the compiled rows (e.g. reduce-overhead)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "fixed_step"))
    args = p.parse_args()
    setup_threads(args.threads)
    steps, test = (20, 500) if args.quick else (args.steps, 10_000)
    out, results = Path(args.out), {}
    shutil.rmtree(out, ignore_errors=True)  # every run starts afresh
    for name in args.rows:
        overrides = [o.format(mode=args.mode) for o in ROWS[name]] + [
            f"run_dir={out / name}",
            f"train.steps={steps}",
            f"train.batch_size={args.batch}",
            "train.time_limit=null",
            "train.eval_every=0",
            f"train.save_every={steps}",
            "eval.plot=false",
            f"data.test_size={test}",
        ]
        run, seconds = train_run(str(ROOT / "configs" / "toy2d_mle.yaml"), overrides)
        logged, _ = records(run)
        final = json.loads((run / "eval.json").read_text())
        step_times = [r["step_time"] for r in logged if "step_time" in r][1:]  # the first holds start-up / compile
        results[name] = {
            "s_per_step": median(step_times) if step_times else float("nan"),
            "nll": final["nll"],
            "nll_se": final.get("nll_se", float("nan")),
            "nfe_train": median([r["nfe_forward"] for r in logged if "nfe_forward" in r]),
            "wall_s": seconds,
        }
        print(name, results[name], flush=True)
    base = results.get("dopri5")
    rows = []
    for name, r in results.items():
        speed = base["s_per_step"] / r["s_per_step"] if base else float("nan")
        delta = r["nll"] - base["nll"] if base else float("nan")
        rows.append(
            [
                name,
                f"{r['s_per_step'] * 1e3:.1f}",
                f"{speed:.2f}x",
                r["nfe_train"],
                f"{r['nll']:.3f} ± {r['nll_se']:.3f}",
                f"{delta:+.3f}",
                f"{r['wall_s']:.0f}",
            ]
        )
    print(f"\ncheckerboard MLE, {steps} steps, batch {args.batch}, held-out {test:,} points (dopri5 1e-5, exact)")
    print(
        table(
            ["training solve", "ms/step", "steps/s vs dopri5", "train NFE", "held-out NLL", "vs dopri5", "wall s"], rows
        )
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "fixed_step.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
