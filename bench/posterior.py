"""Posterior estimation (simulation-based inference): flows' conditional flows against sbi's NPE and FMPE, scored
by C2ST against reference posteriors, at equal wall time, one thread each.

    python bench/posterior.py                                     # 4 tasks x N = 1e3, 1e4, 1e5 (hours, 1 core)
    python bench/posterior.py --tasks two_moons,slcp --sizes 10000
    python bench/posterior.py --only flows --minutes 2            # flows alone, sbi's results kept in --out
    python bench/posterior.py --quick                             # smoke run: two_moons, N=1000, npe + flows

Protocol, per task (bench/simulators.py: two_moons, gaussian_linear, slcp, gaussian_mixture) and simulation
budget N:
- N (θ, x) pairs from the prior and the simulator, seeded by (task, N), written to OUT/task/N/sims.npz (keys
  ``theta`` and ``x``, float32): every contestant trains on the same pairs.
- 10 observations from the prior and the simulator (fixed seed, the same for every N), and 2,000 reference
  posterior samples each (exact for two_moons, gaussian_linear, gaussian_mixture; tempered SMC for slcp;
  validated by ``python bench/simulators.py``), cached in OUT/task/reference/.
- Contestants, each in its own process (OMP_NUM_THREADS=1, torch.set_num_threads(1)), one after another:
  - npe: sbi's ``NPE(prior)`` with its default density estimator (a MAF), ``append_simulations(θ, x).train()``
    with its defaults (its own validation split and early stopping), ``posterior.sample((2000,), x=x_obs)``;
  - fmpe: sbi's ``FMPE(prior)`` likewise (flow matching, ODE sampling);
  - flows: ``flows.train("configs/posterior.yaml", data.path=sims.npz, data.key=theta, data.context_key=x,
    data.bounds=<the prior box>, train.time_limit=M)``, then ``flows.load(run).sample(2000, context=x_obs)``;
  - flows_mle: the same with ``FLOWS_MLE`` below (maximum likelihood).
  sbi's priors: ``BoxUniform`` for box priors, a torch ``MultivariateNormal`` for gaussian_linear.
- Equal wall time: the sbi contestants train first, to their own convergence; the flows contestants get M =
  --minutes, by default the longest sbi training time of that task and N (rounded up to 0.1 min, at least
  0.5 min; from the sbi results saved in OUT when sbi does not run now). Train seconds are measured around
  the training call and printed for everyone.
- Score: C2ST (sbibm's MLP classifier, 5 folds) of each contestant's 2,000 samples against the 2,000 reference
  samples, per observation; tables give the mean over observations ± its standard error, and flows − the best
  sbi contestant (lowest mean C2ST) paired on the observations. 0.5 is perfect.
Results: OUT/task/N/<contestant>/{samples.npy, result.json}, OUT/summary.json.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # the scorer's BLAS, before numpy
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from simulators import OBSERVATION_SEED, TASKS, Task, c2st, observations, simulations  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLOWS_CONFIG = "configs/posterior.yaml"
FLOWS_EXTRA: list[str] = []  # overrides for both flows contestants
FLOWS_MLE: list[str] = ["objective.name=mle"]  # the maximum-likelihood recipe's overrides
SBI = ("npe", "fmpe")
FLOWS = ("flows", "flows_mle")
DEFAULTS = dict(tasks=",".join(TASKS), sizes="1000,10000,100000", observations=10, samples=2000, only="npe,fmpe,flows")
QUICK = dict(tasks="two_moons", sizes="1000", observations=2, samples=500, only="npe,flows")
SIM_SEED = 7


# ------------------------------------------------------------------ data and references
def write_sims(task: Task, n: int, folder: Path) -> Path:
    path = folder / "sims.npz"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        theta, x = simulations(task, n, [SIM_SEED, zlib.crc32(task.name.encode()), n])
        np.savez(path, theta=theta.astype(np.float32), x=x.astype(np.float32))
    return path


def write_observations(task: Task, k: int, out: Path) -> Path:
    path = out / task.name / f"observations_{k}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        pairs = observations(task, k, OBSERVATION_SEED)
        theta, x = (np.stack(v).astype(np.float32) for v in zip(*pairs, strict=True))
        np.savez(path, theta=theta, x=x)
    return path


def references(task: Task, x_obs: np.ndarray, samples: int, out: Path) -> np.ndarray:
    """(k, samples, theta_dim) reference posterior samples of the (float32) observations, cached per observation."""
    folder = out / task.name / "reference"
    folder.mkdir(parents=True, exist_ok=True)
    refs = []
    for i, x in enumerate(x_obs):
        path = folder / f"seed{OBSERVATION_SEED}_obs{i}_n{samples}.npy"
        if not path.exists():
            np.save(path, task.reference(x.astype(np.float64), samples, np.random.default_rng([OBSERVATION_SEED, i])))
        refs.append(np.load(path))
    return np.stack(refs)


# ------------------------------------------------------------------ workers (one process each)
class NullTracker:
    """sbi's tracker protocol, doing nothing (sbi's default writes TensorBoard logs into the working directory)."""

    log_dir = None

    def log_metric(self, name: str, value: float, step: int | None = None) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def add_figure(self, name: str, figure: Any, step: int | None = None) -> None: ...

    def flush(self) -> None: ...


def sbi_prior(task: Task) -> Any:
    import torch
    from sbi.utils import BoxUniform

    if task.bounds is not None:
        lo, hi = torch.tensor(task.bounds, dtype=torch.float32).T
        return BoxUniform(low=lo, high=hi)
    mean, var = task.gaussian_prior
    dim = task.theta_dim
    return torch.distributions.MultivariateNormal(torch.full((dim,), mean), var * torch.eye(dim))


def worker_sbi(kind: str, task: Task, sims: Path, x_obs: np.ndarray, samples: int) -> tuple[np.ndarray, dict]:
    import torch
    from sbi.inference import FMPE, NPE

    torch.manual_seed(0)
    data = np.load(sims)
    theta, x = torch.from_numpy(data["theta"]), torch.from_numpy(data["x"])
    inference = {"npe": NPE, "fmpe": FMPE}[kind](prior=sbi_prior(task), show_progress_bars=False, tracker=NullTracker())
    start = time.perf_counter()
    inference.append_simulations(theta, x).train()
    train_seconds = time.perf_counter() - start
    posterior = inference.build_posterior()
    start = time.perf_counter()
    out = [posterior.sample((samples,), x=torch.from_numpy(xo), show_progress_bars=False) for xo in x_obs]
    info = {"train_seconds": train_seconds, "sample_seconds": time.perf_counter() - start}
    info["epochs"] = inference.summary["epochs_trained"][-1]
    return torch.stack(out).numpy(), info


def worker_flows(
    kind: str, task: Task, sims: Path, x_obs: np.ndarray, samples: int, minutes: float, run: Path
) -> tuple[np.ndarray, dict]:
    import shutil

    import torch

    import flows

    shutil.rmtree(run, ignore_errors=True)
    overrides = [f"data.path={sims}", "data.key=theta", "data.context_key=x", f"train.time_limit={minutes}"]
    overrides += [f"data.bounds={json.dumps(task.bounds)}"] if task.bounds else []
    overrides += FLOWS_EXTRA + (FLOWS_MLE if kind == "flows_mle" else [])
    start = time.perf_counter()
    flows.train(str(ROOT / FLOWS_CONFIG), run_dir=str(run), overrides=overrides)
    train_seconds = time.perf_counter() - start
    model = flows.load(run)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.sample(samples, context=torch.as_tensor(x_obs))
    out = torch.as_tensor(out).cpu().numpy()
    if out.shape != (len(x_obs), samples, task.theta_dim):
        raise ValueError(f"flows' samples have shape {out.shape}, not {(len(x_obs), samples, task.theta_dim)}")
    info = {"train_seconds": train_seconds, "sample_seconds": time.perf_counter() - start, "minutes": minutes}
    info["steps"] = getattr(model, "step", None)
    return out, info


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    task, folder = TASKS[args.tasks], Path(args.folder)
    x_obs = np.load(args.observations_file)["x"]
    if args.worker in SBI:
        samples, info = worker_sbi(args.worker, task, folder.parent / "sims.npz", x_obs, args.samples)
    else:
        run = folder / "run"
        samples, info = worker_flows(
            args.worker, task, folder.parent / "sims.npz", x_obs, args.samples, args.minutes, run
        )
    np.save(folder / "samples.npy", samples.astype(np.float32))
    (folder / "result.json").write_text(json.dumps(info))


# ------------------------------------------------------------------ the race
def launch(contestant: str, task: Task, sims: Path, obs_file: Path, samples: int, minutes: float) -> dict:
    """Run one contestant in its own process; its result.json (with ``error`` on failure)."""
    folder = sims.parent / contestant
    folder.mkdir(parents=True, exist_ok=True)
    for stale in ("samples.npy", "result.json"):
        (folder / stale).unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        contestant,
        "--tasks",
        task.name,
        "--folder",
        str(folder),
    ]
    cmd += ["--observations-file", str(obs_file), "--samples", str(samples), "--minutes", str(minutes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    env["TQDM_DISABLE"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=folder)
    if proc.returncode or not (folder / "result.json").exists():
        return {"error": (proc.stderr or proc.stdout).strip()[-1500:] or f"exit {proc.returncode}"}
    return json.loads((folder / "result.json").read_text())


def flows_unavailable() -> str | None:
    """Why the flows contestants cannot run (None when they can)."""
    try:
        import inspect

        import flows

        params = inspect.signature(flows.train).parameters
        if not {"run_dir", "overrides"} <= set(params):
            return f"flows.train{inspect.signature(flows.train)} takes no run_dir / overrides"
        if not (ROOT / FLOWS_CONFIG).exists():
            return f"{FLOWS_CONFIG} does not exist"
    except Exception as exc:  # any failure to import means 'not available'
        return repr(exc)
    return None


def flows_budget(sbi_seconds: list[float]) -> float:
    """Minutes for flows: the longest sbi training, rounded up to 0.1 min, at least 0.5."""
    return max(0.5, math.ceil(max(sbi_seconds) / 60 * 10 - 1e-9) / 10)


def saved_sbi_seconds(folder: Path) -> list[float]:
    found = []
    for c in SBI:
        path = folder / c / "result.json"
        if path.exists():
            found.append(json.loads(path.read_text()).get("train_seconds"))
    return [s for s in found if s is not None]


def score(samples: np.ndarray, refs: np.ndarray) -> list[float]:
    return [c2st(refs[i].astype(np.float64), samples[i].astype(np.float64), seed=i) for i in range(len(refs))]


def run_cell(task: Task, n: int, args: argparse.Namespace, obs_file: Path, refs: np.ndarray) -> dict[str, dict]:
    """Every contestant on one task and N: sbi first, then flows at the budget; each scored against refs."""
    sims = write_sims(task, n, Path(args.out) / task.name / str(n))
    only = args.only.split(",")
    results: dict[str, dict] = {}
    for c in [c for c in SBI if c in only]:
        results[c] = launch(c, task, sims, obs_file, args.samples, 0.0)
    wanted_flows = [c for c in FLOWS if c in only]
    if wanted_flows:
        minutes, source = budget_for(args.minutes, results, sims.parent)
        print(f"  {task.name} N={n}: flows get {minutes:g} min ({source})", flush=True)
        why = flows_unavailable()
        for c in wanted_flows:
            if why:
                print(f"  {c}: not available: {why}", flush=True)
                results[c] = {"error": f"not available: {why}"}
            else:
                results[c] = launch(c, task, sims, obs_file, args.samples, minutes)
    for c, res in results.items():
        if "error" not in res:
            res["c2st"] = score(np.load(sims.parent / c / "samples.npy"), refs)
            (sims.parent / c / "result.json").write_text(json.dumps(res))
        else:
            print(f"  {c} failed: {res['error'].splitlines()[-1]}", flush=True)
    return results


def budget_for(minutes: float | None, results: dict[str, dict], folder: Path) -> tuple[float, str]:
    if minutes is not None:
        return minutes, "--minutes"
    now = [r["train_seconds"] for r in results.values() if "train_seconds" in r]
    if now:
        return flows_budget(now), f"the longest sbi training now: {max(now):.0f} s"
    saved = saved_sbi_seconds(folder)
    if saved:
        return flows_budget(saved), f"the longest sbi training saved in {folder}: {max(saved):.0f} s"
    raise SystemExit(f"no sbi training time for {folder}: run an sbi contestant or pass --minutes")


# ------------------------------------------------------------------ tables
def mean_se(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values)
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(v.mean()), se


def fmt_c2st(res: dict) -> str:
    if "c2st" not in res:
        return "error"
    m, se = mean_se(res["c2st"])
    return f"{m:.3f} ± {se:.3f}"


def cell_rows(results: dict[str, dict]) -> list[list[Any]]:
    rows = []
    for c, res in results.items():
        if "error" in res:
            rows.append([c, "error", "", "", res["error"].splitlines()[-1][:70]])
            continue
        note = f"{res['epochs']} epochs" if "epochs" in res else f"budget {res.get('minutes', 0):g} min"
        rows.append([c, fmt_c2st(res), f"{res['train_seconds']:.1f}", f"{res['sample_seconds']:.1f}", note])
    return rows


def flows_vs_sbi(results: dict[str, dict]) -> str:
    """flows − the best sbi contestant (lowest mean C2ST), paired on the observations, ± SE."""
    sbi = [(np.mean(r["c2st"]), c) for c, r in results.items() if c in SBI and "c2st" in r]
    if "c2st" not in results.get("flows", {}) or not sbi:
        return ""
    best = min(sbi)[1]
    diff = np.asarray(results["flows"]["c2st"]) - np.asarray(results[best]["c2st"])
    m, se = mean_se(list(diff))
    return f"{m:+.3f} ± {se:.3f} ({best})"


def print_summary(
    all_results: dict[tuple[str, int], dict[str, dict]], contestants: list[str], fmt: Callable[..., str]
) -> None:
    headers = ["task", "N", *contestants, "flows − best sbi (paired)", "flows min"]
    rows = []
    for (task, n), results in all_results.items():
        minutes = results.get("flows", {}).get("minutes", "")
        cells = [fmt_c2st(results[c]) if c in results else "" for c in contestants]
        rows.append([task, n, *cells, flows_vs_sbi(results), minutes])
    print("\n## Summary: mean C2ST over observations ± SE (0.5 is perfect), equal wall time, 1 thread each\n")
    print(fmt(headers, rows))


# ------------------------------------------------------------------ main
def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", help=f"comma-separated (default: {DEFAULTS['tasks']})")
    p.add_argument("--sizes", help=f"simulation budgets N (default: {DEFAULTS['sizes']})")
    p.add_argument("--observations", type=int, help=f"per task (default: {DEFAULTS['observations']})")
    p.add_argument("--samples", type=int, help=f"posterior samples per observation (default: {DEFAULTS['samples']})")
    p.add_argument("--only", help=f"contestants (default: {DEFAULTS['only']}; also flows_mle)")
    p.add_argument("--minutes", type=float, help="flows' budget (default: the longest sbi training of each cell)")
    p.add_argument("--out", default=str(ROOT / "bench/out/posterior"))
    p.add_argument("--quick", action="store_true", help="smoke run: " + json.dumps(QUICK))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--observations-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.out = str(Path(args.out).resolve())
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> None:
    args = parse()
    if args.worker:
        worker(args)
        return
    from common import table

    out, start = Path(args.out), time.perf_counter()
    contestants = [c for c in (*SBI, *FLOWS) if c in args.only.split(",")]
    all_results: dict[tuple[str, int], dict[str, dict]] = {}
    for name in args.tasks.split(","):
        task = TASKS[name]
        obs_file = write_observations(task, args.observations, out)
        refs = references(task, np.load(obs_file)["x"], args.samples, out)
        for n in (int(s) for s in args.sizes.split(",")):
            results = run_cell(task, n, args, obs_file, refs)
            all_results[(name, n)] = results
            head = f"\n## {name}, N={n}: C2ST over {args.observations} observations, {args.samples} samples each\n"
            print(head + "\n" + table(["contestant", "C2ST ± SE", "train s", "sample s", ""], cell_rows(results)))
            if flows_vs_sbi(results):
                print(f"\nflows − best sbi (paired): {flows_vs_sbi(results)}")
            sys.stdout.flush()
    print_summary(all_results, contestants, table)
    print(f"\n({time.perf_counter() - start:.0f} s in all)")
    summary = {f"{t}/{n}": r for (t, n), r in all_results.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
