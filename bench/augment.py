"""Augmented flows (model.augment) against plain ones at equal wall time.

    python bench/augment.py                                  # every case, 2 min per run, 2 seeds (~45 min)
    python bench/augment.py --cases rings,2spirals --objectives mle --minutes 1 --seeds 1
    python bench/augment.py --cases rings --objectives mle --aug-set objective.trace=hutchinson

Cases: the topology cases (checkerboard, data.name=rings, 2spirals: the 2-D recipes, both objectives), digits as
8x8 images (the U-Net recipe with extra channels) and a table (gmm8: 2,000 rows of an 8-D, 5-component Gaussian
mixture from bench/tabular.py, the table recipe). Each case trains the recipe plain (A = 0) and augmented (A =
``--augment``, or the case's default) for the same ``--minutes`` (train.time_limit), one thread per run, two runs
at a time. Reported per run: the held-out NLL (the augmented flow's is its default bound: K = 8 importance
samples with the exact trace, the ELBO with Hutchinson's; an upper bound on its NLL, and the gap from K to 4K
says how tight it is), the paired difference augmented − plain on the same test points with its standard
error, the mean NFE per training step (maximum likelihood: forward solves) and per sampling solve of one member
(dopri5 at the run's eval tolerances), the steps taken (one member) and the wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from common import ROOT, records, table

CASES = {  # name: (data, recipe per objective, default augmentation A)
    "checkerboard": ("checkerboard", {"mle": "toy2d_mle", "fm": "toy2d_fm"}, 2),
    "rings": ("rings", {"mle": "toy2d_mle", "fm": "toy2d_fm"}, 2),
    "2spirals": ("2spirals", {"mle": "toy2d_mle", "fm": "toy2d_fm"}, 2),
    # digits_fm: 8x8 images, a U-Net on 1 + A channels (Hutchinson's trace: the ELBO, K = 1); digits_mle: 64-D
    # vectors, an MLP on 64 + A inputs (the exact trace: K = 8)
    "digits": ("digits", {"fm": "digits_fm", "mle": "digits_mle"}, 1),
    "gmm8": ("gmm8", {"fm": "tabular"}, 4),
}
EVAL_POINTS = 3000  # test points scored per run (digits: all 359)


def overrides(case: str, augment: int, minutes: float, run: Path, seed: int, extra: list[str]) -> list[str]:
    data = CASES[case][0]
    out = [f"run_dir={run}", f"model.augment={augment}", f"train.time_limit={minutes}", f"train.seed={seed}"]
    out += extra if augment else []  # --aug-set: the augmented contestant's own settings
    out += ["eval.plot=false", "train.steps=1000000"]
    if case == "gmm8":
        sys.path.insert(0, str(ROOT / "bench"))
        from tabular import write_split

        folder = write_split("gmm8", run.parent.parent / "tables")
        return [*out, f"data.path={folder / 'train.npy'}", f"data.test_path={folder / 'test.npy'}"]
    return [*out, f"data.name={data}"] if case != "digits" else out


def worker(case: str, objective: str, augment: int, minutes: float, run: Path, seed: int, extra: list[str]) -> dict:
    import torch

    torch.set_num_threads(1)
    import flows
    from flows.config import load_config
    from flows.data import build_data

    config = ROOT / "configs" / f"{CASES[case][1][objective]}.yaml"
    cfg = load_config(str(config), overrides(case, augment, minutes, run, seed, extra))
    start = time.perf_counter()
    flows.train(cfg)
    wall = time.perf_counter() - start
    flow = flows.load(run)
    test = build_data(cfg.data).test[:EVAL_POINTS]
    gen = torch.Generator().manual_seed(1)
    lp = flow.log_prob(test, generator=gen)  # an augmented flow's default K: its bound (flows.augment)
    _, info = flow.sample(1000, generator=gen, return_info=True)
    members = len(getattr(flow, "members", [flow]))  # a mixture's NFE is its members' sum: per member here
    steps, _ = records(run)
    nfe = [r["nfe_forward"] for r in steps if "nfe_forward" in r]
    result = json.loads((run / "eval.json").read_text())
    return {
        "lp": lp.tolist(),
        "eval_nll": result["nll"],
        "bound_gap": result.get("bound_gap"),
        "steps": steps[-1]["step"] if steps else 0,
        "train_nfe": float(np.mean(nfe)) if nfe else None,
        "sample_nfe": info["nfe"] / members,
        "members": members,
        "wall": wall,
    }


def launch(job: tuple, out: Path, extra: list[str]) -> tuple[tuple, dict]:
    case, objective, augment, minutes, seed = job
    tag = f"{case}_{objective}_a{augment}_{minutes:g}min_s{seed}"
    tag += "".join(f"_{e}" for e in extra) if augment else ""
    result = out / "results" / f"{tag}.json"
    if result.exists():
        return job, json.loads(result.read_text())
    result.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--worker", json.dumps([*job, str(out / "runs" / tag), str(result), extra])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode or not result.exists():
        return job, {"error": proc.stderr[-800:]}
    return job, json.loads(result.read_text())


def row(case: str, objective: str, augment: int, plain: list[dict], aug: list[dict]) -> list:
    """One line: NLL of both (mean over seeds), the paired difference on the same points, NFE, steps."""
    if any("error" in r for r in plain + aug):
        bad = next(r for r in plain + aug if "error" in r)["error"].strip().splitlines()
        return [case, objective, augment, "error", bad[-1][:80] if bad else "", "", "", "", "", ""]
    diffs = [np.asarray(p["lp"]) - np.asarray(a["lp"]) for p, a in zip(plain, aug, strict=True)]  # NLL_aug − NLL
    mean = float(np.mean([d.mean() for d in diffs]))
    se = math.sqrt(sum(d.var(ddof=1) / len(d) for d in diffs)) / len(diffs)
    nll = [-float(np.mean([np.mean(r["lp"]) for r in rs])) for rs in (plain, aug)]
    gaps = [r["bound_gap"]["gap"] for r in aug if r.get("bound_gap")]

    def avg(rs: list[dict], key: str) -> str:
        values = [r[key] for r in rs if r.get(key) is not None]
        return f"{np.mean(values):.0f}" if values else "-"

    return [
        case,
        objective,
        augment,
        f"{nll[0]:.3f}",
        f"{nll[1]:.3f} (gap {np.mean(gaps):+.3f})" if gaps else f"{nll[1]:.3f}",
        f"{mean:+.3f} ± {se:.3f} ({sum(d.mean() < 0 for d in diffs)}/{len(diffs)})",
        f"{avg(plain, 'train_nfe')} / {avg(aug, 'train_nfe')}",
        f"{avg(plain, 'sample_nfe')} / {avg(aug, 'sample_nfe')}",
        f"{avg(plain, 'steps')} / {avg(aug, 'steps')}",
        f"{avg(plain, 'wall')} / {avg(aug, 'wall')}",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--objectives", default="mle,fm")
    p.add_argument("--augment", type=int, help="extra dimensions / channels (default: per case, 2, 1 or 4)")
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="bench_out/augment")
    p.add_argument("--aug-set", action="append", default=[], help="KEY=VALUE for the augmented runs only")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        *job, run, result, extra = json.loads(args.worker)
        Path(result).write_text(json.dumps(worker(*job[:4], Path(run), job[4], extra)))
        return
    out = Path(args.out).resolve()
    plan = []
    for case in args.cases.split(","):
        for objective in (o for o in args.objectives.split(",") if o in CASES[case][1]):
            a = args.augment if args.augment is not None else CASES[case][2]
            plan.append((case, objective, a))
    jobs = [(c, o, aa, args.minutes, s) for c, o, a in plan for s in range(args.seeds) for aa in (0, a)]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(pool.map(lambda j: launch(j, out, args.aug_set), jobs))
    rows = []
    for c, o, a in plan:
        seeds = range(args.seeds)
        plain = [results[(c, o, 0, args.minutes, s)] for s in seeds]
        rows.append(row(c, o, a, plain, [results[(c, o, a, args.minutes, s)] for s in seeds]))
    headers = ["case", "objective", "A", "NLL plain", "NLL augmented (bound)", "aug − plain (seeds won)"]
    headers += ["train NFE plain/aug", "sample NFE plain/aug", "steps plain/aug", "wall s plain/aug"]
    given = f"; augmented runs with {' '.join(args.aug_set)}" if args.aug_set else ""
    print(f"{args.minutes:g} min per run, {args.seeds} seed(s); NLL in nats on the same test points{given}")
    print(table(headers, rows))


if __name__ == "__main__":
    main()
