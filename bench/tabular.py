"""Your own table: flows' default tabular recipe against zuko's CNF, at equal wall time, one thread each.

    python bench/tabular.py                                   # every table, 1 and 3 minutes (~2 h, 2 jobs)
    python bench/tabular.py --minutes 1 --tables wine,iris    # a subset
    python bench/tabular.py --only flows,zuko --jobs 2
    python bench/tabular.py --tables strikes,nile --minutes 1 --only flows,flows-holdout,zuko --splits 5

Tables (all offline): scikit-learn's bundled iris (150x4), wine (178x13), diabetes (442x10),
breast_cancer (569x30), digits as a 64-column table (1797x64, the columns constant in every row
dropped) and iris's two petal columns (150x2); synthetic tables with a known density: an 8-D Gaussian
mixture (2,000 rows), a 5-D "banana" (1,000 rows) and a 16-D Gaussian mixture with 10,000 rows (the size
target); and "counts22", 303 rows of 10 overdispersed counts and 12 rounded shares (no known density).
Small ones (``SMALL``): statsmodels' strikes (62x2), nile (100x2: the year and the Nile's flow) and
statecrime (51x7), and "gmm2_small", 125 rows of a 2-D three-component Gaussian mixture (a known density).
Each is split 80/20 (split k: a permutation seeded by k) and written as train.npy / test.npy: every
contestant sees the same rows. A table with fewer than ``FEW`` training rows has a handful of test rows, so it
is scored over ``--splits`` splits (default 3): its NLL is the mean over the splits' test rows (each split
weighs the same), its paired difference likewise, and "splits won" counts the splits where it is lower.

Contestants, each in its own process with one thread, for the same wall time:
- flows: ``train.py --config configs/tabular.yaml data.path=train.npy data.test_path=test.npy
  train.time_limit=M``, the default recipe as a user would run it (flow matching; validation split,
  selection and schedule by default); the time limit counts training and validation, not the final
  test evaluation;
- flows-mle: the same with ``configs/tabular_mle.yaml`` (maximum likelihood on the same field);
- flows-potential: ``configs/tabular_mle.yaml`` on the potential field (OT-Flow: ``POTENTIAL`` below);
- flows-holdout: the default recipe with one validation split whatever the size (the small-data threshold set
  to 0 in its process): the ablation that measures the cross-validation of tables under 1,000 rows;
- zuko: ``zuko.flows.CNF(D, hidden_features=(128, 128, 128), exact=False)``, Adam 1e-3, batch
  min(256, rows), its defaults otherwise, on the training rows standardized like ours.
Held-out NLL in the table's own units (the standardization's log-det counted), exact trace,
dopri5 1e-5 for everyone, per row, so the difference to zuko is paired on the same rows. For the
synthetic tables the last column is the gap to the true NLL of the same rows.
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

ROOT = Path(__file__).resolve().parents[1]
TABLES = (
    "iris",
    "wine",
    "diabetes",
    "breast_cancer",
    "digits",
    "gmm8",
    "banana5",
    "gmm16_10k",
    "iris_petals",
    "counts22",
)
FEW = 150  # training rows: below this a table is scored over several train/test splits
SMALL = ("strikes", "nile", "statecrime", "gmm2_small")  # under 150 rows: scored over several splits
STATSMODELS = {"strikes": "strikes", "nile": "nile", "statecrime": "statecrime"}


# ------------------------------------------------------------------ tables
def _gmm(rng: np.random.Generator, n: int, d: int, k: int):
    means = rng.normal(0, 3, size=(k, d))
    chol = [np.tril(rng.normal(0, 0.3, size=(d, d)), -1) + np.diag(rng.uniform(0.3, 1.2, d)) for _ in range(k)]
    weights = rng.dirichlet(np.ones(k) * 2)
    comp = rng.choice(k, size=n, p=weights)
    x = np.stack([means[c] + chol[c] @ rng.normal(size=d) for c in comp])

    def logpdf(y: np.ndarray) -> np.ndarray:
        from scipy.stats import multivariate_normal

        parts = [
            np.log(w) + multivariate_normal(m, c @ c.T).logpdf(y) for w, m, c in zip(weights, means, chol, strict=True)
        ]
        return np.logaddexp.reduce(np.stack(parts), axis=0)

    return x, logpdf


def _banana(rng: np.random.Generator, n: int, d: int = 5):
    """z ~ N(0, I); x_1 = z_1, x_i = z_i + 0.5 (x_{i-1}² − 1) for i > 1 (unit Jacobian)."""
    z = rng.normal(size=(n, d))
    x = z.copy()
    for i in range(1, d):
        x[:, i] = z[:, i] + 0.5 * (x[:, i - 1] ** 2 - 1)

    def logpdf(y: np.ndarray) -> np.ndarray:
        z = y.copy()
        z[:, 1:] = y[:, 1:] - 0.5 * (y[:, :-1] ** 2 - 1)
        return -0.5 * (z**2).sum(1) - 0.5 * d * math.log(2 * math.pi)

    return x, logpdf


def _counts_and_shares(rng: np.random.Generator, n: int = 303) -> np.ndarray:
    """303 rows x 22 columns like a survey table: 10 overdispersed counts driven by two latent factors, and 12
    shares (of a 13-part composition, the last part dropped) rounded to 3 decimals."""
    factors = rng.normal(size=(n, 2))
    rates = np.exp(1.5 + factors @ rng.normal(0, 0.6, size=(2, 10)))
    counts = rng.negative_binomial(5, 5 / (5 + rates))
    alpha = np.exp(0.5 + factors @ rng.normal(0, 0.4, size=(2, 13)))
    shares = np.stack([rng.dirichlet(a) for a in alpha])[:, :12].round(3)
    return np.hstack([counts, shares]).astype(np.float64)


def make_table(name: str):
    """(values (N, D) float64, true log-density or None)."""
    from sklearn import datasets

    rng = np.random.default_rng(123)
    if name in ("iris", "wine", "diabetes", "breast_cancer"):
        loader = {
            "iris": datasets.load_iris,
            "wine": datasets.load_wine,
            "diabetes": lambda: datasets.load_diabetes(scaled=False),
            "breast_cancer": datasets.load_breast_cancer,
        }[name]
        return loader().data.astype(np.float64), None
    if name == "digits":
        x = datasets.load_digits().data.astype(np.float64)
        return x[:, x.std(0) > 0], None
    if name == "gmm8":
        return _gmm(rng, 2000, 8, 5)
    if name == "gmm16_10k":
        return _gmm(rng, 10_000, 16, 8)
    if name == "iris_petals":  # two columns: petal length and width (bimodal, ties from 0.1 cm rounding)
        return datasets.load_iris().data[:, 2:].astype(np.float64), None
    if name == "counts22":
        return _counts_and_shares(rng), None
    if name == "banana5":
        return _banana(rng, 1000, 5)
    if name == "gmm2_small":  # 125 rows of a 2-D, 3-component Gaussian mixture (a known density)
        return _gmm(rng, 125, 2, 3)
    if name in STATSMODELS:  # statsmodels' bundled data sets (offline), their numeric columns
        import statsmodels.api as sm

        frame = getattr(sm.datasets, STATSMODELS[name]).load_pandas().data.select_dtypes("number")
        return frame.to_numpy(np.float64), None
    raise SystemExit(f"unknown table {name}")


def write_split(name: str, out: Path, split: int = 0) -> Path:
    """The 80/20 split number ``split`` (a seeded permutation) as train.npy / test.npy (and the true log-density
    of the test rows, when known) in ``out/name`` (split 0) or ``out/name/split_K``."""
    folder = out / name if split == 0 else out / name / f"split_{split}"
    folder.mkdir(parents=True, exist_ok=True)
    values, logpdf = make_table(name)
    perm = np.random.default_rng(split).permutation(len(values))
    n_test = round(0.2 * len(values))
    test, train = values[perm[:n_test]], values[perm[n_test:]]
    np.save(folder / "train.npy", train.astype(np.float32))
    np.save(folder / "test.npy", test.astype(np.float32))
    if logpdf is not None:
        np.save(folder / "true_lp.npy", logpdf(test.astype(np.float32).astype(np.float64)))
    return folder


# ------------------------------------------------------------------ workers (one process each)
def exact_test_lp(flow, test) -> np.ndarray:
    """Per-row log p in table units: exact trace, dopri5 1e-5 (the same evaluator for everyone): ``Flow.log_prob``,
    the package's one log-density path in data units (a ``flows.Mixture`` too), on each contestant's model."""
    solver = dict(method="dopri5", atol=1e-5, rtol=1e-5)
    return flow.log_prob(test, trace="exact", batch_size=1000, **solver).cpu().numpy()


POTENTIAL = [  # maximum likelihood on the potential field, OT-Flow's objective, RK4 in training
    "model.name=potential",
    "model.hidden=[64,64,64]",
    "objective.jacobian=0",
    "objective.kinetic=0.01",
    "objective.hjb=0.05",
    "solver.method=rk4",
    "solver.step_size=0.125",
    "train.lr=1e-2",
    "train.grad_clip=1.0",
]


def worker_holdout(folder: Path, minutes: float, run: Path, extra: list[str]) -> dict:
    """The default recipe with one validation split whatever the table's size (the path above the small-data
    threshold): the ablation that measures cross-validation."""
    import shutil

    import flows
    from flows.training import crossval

    shutil.rmtree(run, ignore_errors=True)
    crossval.THRESHOLD = 0
    overrides = [f"data.path={folder / 'train.npy'}", f"data.test_path={folder / 'test.npy'}"]
    overrides += [f"train.time_limit={minutes}", f"run_dir={run}", "eval.plot=false", *extra]
    start = time.perf_counter()
    flows.train(str(ROOT / "configs/tabular.yaml"), overrides=overrides)
    return scored(run, folder, time.perf_counter() - start)


def scored(run: Path, folder: Path, wall: float) -> dict:
    """A flows contestant's result: its steps and the exact log-density of every test row."""
    import torch

    import flows

    loaded = flows.load(run)
    lp = exact_test_lp(loaded, torch.from_numpy(np.load(folder / "test.npy")))
    return {"steps": loaded.step, "lp": lp.tolist(), "wall": wall}


def worker_flows(folder: Path, minutes: float, objective: str, run: Path, extra: list[str]) -> dict:
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    args = [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        str(ROOT / ("configs/tabular.yaml" if objective == "default" else "configs/tabular_mle.yaml")),
        f"data.path={folder / 'train.npy'}",
        f"data.test_path={folder / 'test.npy'}",
        f"train.time_limit={minutes}",
        f"run_dir={run}",
        "eval.plot=false",
    ]
    args += [*(POTENTIAL if objective == "potential" else []), *extra]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - start
    if proc.returncode:
        return {"error": (proc.stderr or proc.stdout)[-800:]}
    return scored(run, folder, wall)


def worker_zuko(folder: Path, minutes: float) -> dict:
    import torch
    import zuko
    from common import train_zuko_for

    from flows.data import Preprocess

    torch.manual_seed(0)
    train = torch.from_numpy(np.load(folder / "train.npy"))
    test = torch.from_numpy(np.load(folder / "test.npy"))
    pre = Preprocess(train.mean(0), train.std(0))
    x_train = pre(train)
    flow = zuko.flows.CNF(train.shape[1], hidden_features=(128, 128, 128), exact=False)
    batch, gen, start = min(256, len(train)), torch.Generator().manual_seed(0), time.perf_counter()
    steps = train_zuko_for(
        flow, lambda: x_train[torch.randint(0, len(x_train), (batch,), generator=gen)], 1e-3, minutes
    )
    with torch.no_grad():
        lp = torch.cat([flow().log_prob(pre(p)).double() + pre.log_det(pre(p)) for p in test.split(1000)])
    return {"steps": steps, "lp": lp.numpy().tolist(), "wall": time.perf_counter() - start}


def worker(args) -> None:
    import torch

    torch.set_num_threads(1)
    folder, run = Path(args.folder), Path(args.run)
    if args.worker == "zuko":
        result = worker_zuko(folder, args.minutes)
    elif args.worker == "flows-holdout":
        result = worker_holdout(folder, args.minutes, run, args.set)
    else:
        objective = {"flows-mle": "mle", "flows-potential": "potential"}.get(args.worker, "default")
        result = worker_flows(folder, args.minutes, objective, run, args.set)
    Path(args.result).write_text(json.dumps(result))


# ------------------------------------------------------------------ the race
def launch(
    contestant: str, table: str, split: int, folder: Path, minutes: float, out: Path, extra: list[str]
) -> tuple[tuple[str, int, str, float], dict]:
    tag = f"{table}_s{split}_{contestant}_{minutes:g}min"
    result = out / "results" / f"{tag}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        contestant,
        "--folder",
        str(folder),
        "--minutes",
        str(minutes),
        "--run",
        str(out / "runs" / tag),
        "--result",
        str(result),
        *(f"--set={e}" for e in extra),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    key = (table, split, contestant, minutes)
    if proc.returncode or not result.exists():
        return key, {"error": proc.stderr[-800:]}
    return key, json.loads(result.read_text())


def summarize(table: str, folders: list[Path], contestant: str, minutes: float, res: list, refs: list) -> list:
    """One row: the held-out NLL over every split's test rows (each split weighs the same), the paired difference
    to zuko on the same rows, the splits won, and the gap to the true density."""
    n, d = np.load(folders[0] / "train.npy").shape
    head = [table, f"{n}x{d}", f"{minutes:g}", contestant, len(folders)]
    errors = [r for r in res if "error" in r]
    if errors:
        return [*head, "error", errors[0]["error"].strip().splitlines()[-1][:60], "", "", ""]
    lps = [np.asarray(r["lp"]) for r in res]
    nll = -np.mean([lp.mean() for lp in lps])
    se = math.sqrt(sum(lp.var(ddof=1) / len(lp) for lp in lps)) / len(lps)
    paired, won = "", ""
    if all(ref is not None and "lp" in ref for ref in refs) and contestant != "zuko":
        diffs = [-lp + np.asarray(ref["lp"]) for lp, ref in zip(lps, refs, strict=True)]  # NLL(this) − NLL(zuko)
        mean = np.mean([x.mean() for x in diffs])
        dse = math.sqrt(sum(x.var(ddof=1) / len(x) for x in diffs)) / len(diffs)
        paired, won = f"{mean:+.3f} ± {dse:.3f}", f"{sum(x.mean() < 0 for x in diffs)}/{len(diffs)}"
    gap = ""
    if (folders[0] / "true_lp.npy").exists():
        gap = f"{nll + np.mean([np.load(f / 'true_lp.npy').mean() for f in folders]):.3f}"
    steps = int(np.mean([r["steps"] for r in res]))
    return [*head, steps, f"{nll:.3f} ± {se:.3f}", paired, won, gap]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", default=",".join(TABLES + SMALL))
    p.add_argument("--minutes", default="1,3", help="comma-separated budgets")
    p.add_argument("--only", default="flows,zuko,flows-mle")
    p.add_argument("--splits", type=int, default=3, help=f"train/test splits of a table under {FEW} training rows")
    p.add_argument("--keep", default="", help="contestants whose results already in OUT/results are read, not rerun")
    p.add_argument("--jobs", type=int, default=2, help="contestants run at once (one thread each)")
    p.add_argument("--out", default=str(ROOT / "bench/out/tabular"))
    p.add_argument("--set", action="append", default=[], help="an extra override for the flows contestants")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.minutes = float(args.minutes)
        worker(args)
        return
    sys.path.insert(0, str(ROOT))
    out = Path(args.out)
    tables, contestants = args.tables.split(","), args.only.split(",")
    folders = {}
    for t in tables:
        folders[t] = [write_split(t, out)]
        if len(np.load(folders[t][0] / "train.npy")) < FEW:  # a handful of test rows: several splits
            folders[t] += [write_split(t, out, k) for k in range(1, args.splits)]
    budgets = [float(m) for m in args.minutes.split(",")]
    jobs = [
        (c, t, k, f, m, out, args.set)
        for m in budgets
        for t in tables
        for k, f in enumerate(folders[t])
        for c in contestants
    ]
    start, keep, results = time.perf_counter(), set(args.keep.split(",")) - {""}, {}
    for c, t, k, _, m, _, _ in jobs:
        saved = out / "results" / f"{t}_s{k}_{c}_{m:g}min.json"
        if c in keep and saved.exists():
            results[(t, k, c, m)] = json.loads(saved.read_text())
    jobs = [j for j in jobs if (j[1], j[2], j[0], j[4]) not in results]
    with ThreadPoolExecutor(args.jobs) as pool:
        results |= dict(pool.map(lambda j: launch(*j), jobs))
    rows = []
    for m in budgets:
        for t in tables:
            splits = range(len(folders[t]))
            refs = [results.get((t, k, "zuko", m)) for k in splits]
            for c in contestants:
                rows.append(summarize(t, folders[t], c, m, [results[(t, k, c, m)] for k in splits], refs))
    sys.path.insert(0, str(ROOT / "bench"))
    from common import table as fmt

    seconds = time.perf_counter() - start
    print(f"\n## Held-out NLL (nats, table units), equal wall time, 1 thread each ({seconds:.0f} s)\n")
    headers = ["table", "train rows x cols", "min", "contestant", "splits", "steps", "NLL ± SE", "− zuko (paired)"]
    print(fmt([*headers, "splits won", "gap to truth"], rows))
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    if len(budgets) > 1 and "flows" in contestants:
        print(more_budget(results, folders, budgets))


def more_budget(results: dict, folders: dict[str, list[Path]], budgets: list[float]) -> str:
    """The target 'more budget never hurts': flows' NLL at the longest budget minus at the shortest, paired on
    the same test rows (every split), against one standard error of the shorter run's NLL."""
    from common import table as fmt

    short, long = min(budgets), max(budgets)
    rows = []
    for t, splits in folders.items():
        pairs = [
            (results.get((t, k, "flows", short), {}), results.get((t, k, "flows", long), {}))
            for k in range(len(splits))
        ]
        if not all("lp" in a and "lp" in b for a, b in pairs):
            continue
        lp_a = [np.asarray(a["lp"]) for a, _ in pairs]
        lp_b = [np.asarray(b["lp"]) for _, b in pairs]
        diff = np.mean([(a - b).mean() for a, b in zip(lp_a, lp_b, strict=True)])  # NLL(long) − NLL(short)
        se = math.sqrt(sum(a.var(ddof=1) / len(a) for a in lp_a)) / len(lp_a)
        nll_a, nll_b = -np.mean([a.mean() for a in lp_a]), -np.mean([b.mean() for b in lp_b])
        verdict = "met" if diff <= se else "**missed**"
        rows.append([t, f"{nll_a:.3f}", f"{nll_b:.3f}", f"{diff:+.3f}", f"{se:.3f}", verdict])
    headers = ["table", f"{short:g} min", f"{long:g} min", "difference (paired)", "1 SE", "≤ +1 SE"]
    return f"\n## More budget: flows at {long:g} min against {short:g} min\n\n" + fmt(headers, rows)


if __name__ == "__main__":
    main()
