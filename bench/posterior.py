"""Posterior estimation (simulation-based inference): flows' conditional flows against sbi's NPE and FMPE, scored
by C2ST against reference posteriors, at equal wall time, one thread each.

    python bench/posterior.py                                     # 4 tasks x N = 1e3, 1e4, 1e5 (hours, 1 core)
    python bench/posterior.py --tasks two_moons,slcp --sizes 10000
    python bench/posterior.py --only flows --minutes 2            # flows alone, sbi's results kept in --out
    python bench/posterior.py --quick                             # smoke run: two_moons, N=1000, npe + flows
    python bench/posterior.py --tasks slcp --sizes 10000 --only npe,fmpe,flows   # one cell, equal time
    python bench/posterior.py --tasks slcp --rounds 2                # focused: 2 rounds, 2 observations, N=1e4
    python bench/posterior.py --tasks slcp --rounds 4 --observations 2 --sizes 10000
    python bench/posterior.py --calibration --tasks two_moons,slcp --minutes 3   # coverage of the amortized flows

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
  A task whose x is M i.i.d. trials of d numbers (``Task.context_shape``; slcp: 4 draws of 2-D points, x stored
  flattened) gives the flows contestants ``data.context_shape=[M,d]``: a permutation-invariant trial embedding.
  sbi's priors: ``BoxUniform`` for box priors, a torch ``MultivariateNormal`` for gaussian_linear.
- Equal wall time: the sbi contestants train first, to their own convergence; the flows contestants get M =
  --minutes, by default the longest sbi training time of that task and N (rounded up to 0.1 min, at least
  0.5 min; from the sbi results saved in OUT when sbi does not run now). Train seconds are measured around
  the training call and printed for everyone.
- Score: C2ST (sbibm's MLP classifier, 5 folds) of each contestant's 2,000 samples against the 2,000 reference
  samples, per observation; tables give the mean over observations ± its standard error, and flows − the best
  sbi contestant (lowest mean C2ST) paired on the observations. 0.5 is perfect.
Results: OUT/task/N/<contestant>/{samples.npy, result.json}, OUT/summary.json.

Focused mode, ``--rounds R`` (defaults: --sizes 10000, --observations 2, --only snpe,tsnpe,flows): for each of
the first K observations x_o, N simulations in total, split into R equal rounds (the remainder to round 0):
  - snpe: sbi 0.27's multi-round recipe, APT / SNPE-C: ``inference = NPE(prior)``, proposal = prior; per round
    θ = proposal.sample((n,)), x = simulator(θ), ``inference.append_simulations(θ, x, proposal=proposal).train()``,
    ``posterior = inference.build_posterior(estimator)``, proposal = ``posterior.set_default_x(x_o)``;
  - tsnpe: sbi's truncated proposals (Deistler et al. 2022): ``.train(force_first_round_loss=True)``, then
    proposal = ``RestrictedPrior(prior, get_density_thresholder(posterior, quantile=1e-4), sample_with="rejection")``;
  - flows: ``flows.infer(simulator, prior, N, x_obs=x_o, rounds=R, run_dir=..., train={"time_limit": M})`` (plus
    ``data={"context_shape": [M, d]}`` for trial tasks), its rounds from the prior truncated to the posterior's
    HPD region at x_o; M = the longest sbi training time (sum of its rounds' ``train()`` calls) at that
    observation, rounded up as above, or --minutes.
  Each in its own process, one thread; the simulator is ``simulators.TorchSimulator`` (sbi's seeded by (task, N,
  R, observation), flows' by flows.infer's per-batch seeds); 2,000 samples at x_o, C2ST against the same
  reference. Results: OUT/task/N/rounds_R/obs<i>/<contestant>/, OUT/summary_rounds<R>.json.

Calibration mode, ``--calibration`` (defaults: --sizes 10000): the amortized flows posterior of each task and N,
the run kept in OUT/task/N/flows/run by the race (else trained now for --minutes, or the saved sbi time), checked
by ``flows.calibrate(model, θ, x, samples=100).summary()`` on --pairs 1,000 fresh (θ, x) from the prior and the
simulator (seed ``CALIBRATION_SEED``, not the training pairs' ``SIM_SEED``): the largest coverage error of its
HPD regions (|empirical coverage − level|), the verdict of the KS test, the 95% band of a calibrated estimate,
the smallest SBC p-value. Results: OUT/task/N/calibration/result.json, OUT/calibration.json.
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
from simulators import (  # noqa: E402
    OBSERVATION_SEED,
    TASKS,
    Task,
    TorchSimulator,
    c2st,
    observations,
    simulations,
)

ROOT = Path(__file__).resolve().parents[1]
FLOWS_CONFIG = "configs/posterior.yaml"
# overrides for both flows contestants (also from the environment: FLOWS_EXTRA="model.hidden=[256,256] ...")
FLOWS_EXTRA: list[str] = [s for s in os.environ.get("FLOWS_EXTRA", "").split() if s]
FLOWS_MLE: list[str] = ["objective.name=mle"]  # the maximum-likelihood recipe's overrides
SBI = ("npe", "fmpe")
FLOWS = ("flows", "flows_mle")
DEFAULTS = dict(tasks=",".join(TASKS), sizes="1000,10000,100000", observations=10, samples=2000, only="npe,fmpe,flows")
QUICK = dict(tasks="two_moons", sizes="1000", observations=2, samples=500, only="npe,flows")
SIM_SEED = 7
CALIBRATION_SEED = 8  # the held-out pairs of --calibration (the training pairs use SIM_SEED)
SEQUENTIAL = ("snpe", "tsnpe")  # sbi's multi-round contestants of --rounds
ROUNDS_DEFAULTS = dict(sizes="10000", observations=2, only="snpe,tsnpe,flows")
CALIBRATION_DEFAULTS = dict(sizes="10000", only="flows")


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
    overrides += [f"data.context_shape={list(task.context_shape)}"] if task.context_shape else []
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


def shares(total: int, rounds: int) -> list[int]:
    """Equal shares of the simulations, the remainder to round 0 (as flows.infer splits them)."""
    each = total // rounds
    return [total - each * (rounds - 1)] + [each] * (rounds - 1)


def worker_sequential(
    kind: str, task: Task, n: int, rounds: int, x_o: np.ndarray, samples: int, seed: list[int]
) -> tuple[np.ndarray, dict]:
    """sbi 0.27's multi-round recipes focused on x_o. snpe: APT / SNPE-C, each round's proposal the last posterior
    at x_o (``append_simulations(θ, x, proposal=proposal)``). tsnpe: truncated proposals (Deistler et al. 2022),
    each round's proposal the prior restricted to the last posterior's 1 - 1e-4 HPD region at x_o
    (``get_density_thresholder`` + ``RestrictedPrior``), trained with the first-round loss."""
    import torch
    from sbi.inference import NPE
    from sbi.utils import RestrictedPrior, get_density_thresholder

    torch.manual_seed(0)
    prior, simulator, xo = sbi_prior(task), TorchSimulator(task, seed), torch.from_numpy(x_o)
    inference = NPE(prior=prior, show_progress_bars=False, tracker=NullTracker())
    proposal, train_seconds, per_round, start = prior, 0.0, [], time.perf_counter()
    for r, m in enumerate(shares(n, rounds)):
        theta = proposal.sample((m,))
        x = simulator(theta)
        t0 = time.perf_counter()
        if kind == "snpe":
            estimator = inference.append_simulations(theta, x, proposal=proposal).train()
        else:
            estimator = inference.append_simulations(theta, x).train(force_first_round_loss=True)
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        per_round.append(
            {"simulations": m, "train_seconds": seconds, "epochs": inference.summary["epochs_trained"][-1]}
        )
        posterior = inference.build_posterior(estimator).set_default_x(xo)
        if r < rounds - 1:
            if kind == "snpe":
                proposal = posterior
            else:
                proposal = RestrictedPrior(
                    prior, get_density_thresholder(posterior, quantile=1e-4), sample_with="rejection"
                )
    total = time.perf_counter() - start
    start = time.perf_counter()
    out = posterior.sample((samples,), x=xo, show_progress_bars=False)
    info = {"train_seconds": train_seconds, "loop_seconds": total, "sample_seconds": time.perf_counter() - start}
    info["rounds"] = per_round
    return out[None].numpy(), info


def worker_infer(
    task: Task, n: int, rounds: int, x_o: np.ndarray, samples: int, minutes: float, run: Path
) -> tuple[np.ndarray, dict]:
    """``flows.infer`` focused on x_o: round 0 from the prior, later rounds from the prior truncated to the
    posterior's HPD region at x_o, train.time_limit = minutes for all rounds together."""
    import shutil

    import torch

    import flows

    shutil.rmtree(run, ignore_errors=True)
    sections: dict[str, Any] = {"train": {"time_limit": minutes}}
    if task.context_shape:
        sections["data"] = {"context_shape": list(task.context_shape)}
    start = time.perf_counter()
    model = flows.infer(
        TorchSimulator(task), sbi_prior(task), n, x_obs=torch.from_numpy(x_o), rounds=rounds, run_dir=run, **sections
    )
    loop_seconds = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        out = torch.as_tensor(model.sample(samples, context=torch.from_numpy(x_o))).cpu().numpy()
    if out.shape != (samples, task.theta_dim):
        raise ValueError(f"flows' samples have shape {out.shape}, not {(samples, task.theta_dim)}")
    report = json.loads((run / "inference.json").read_text())
    info = {"loop_seconds": loop_seconds, "sample_seconds": time.perf_counter() - start, "minutes": minutes}
    info["train_seconds"] = sum(_train_seconds(run / f"round_{r}") for r in range(rounds))
    info["rounds"] = report["rounds"]
    return out[None], info


def _train_seconds(run: Path) -> float:
    """A flows.train run's training seconds, from its eval.json when it says (else NaN)."""
    try:
        ev = json.loads((run / "eval.json").read_text())
    except (OSError, ValueError):
        return float("nan")
    for key in ("train_time", "train_seconds"):
        if isinstance(ev.get(key), int | float):
            return float(ev[key])
    return float("nan")


def worker_calibration(task: Task, run: Path, pairs: int, samples: int, seed: list[int]) -> dict:
    """flows.calibrate on ``pairs`` fresh (θ, x) from the prior and the simulator (not the training pairs)."""
    import torch

    import flows

    theta, x = simulations(task, pairs, seed)
    model = flows.load(run)
    start = time.perf_counter()
    summary = flows.calibrate(
        model, torch.from_numpy(theta.astype(np.float32)), torch.from_numpy(x.astype(np.float32)), samples=samples
    ).summary()
    return {**summary, "calibration_seconds": time.perf_counter() - start}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    task, folder = TASKS[args.tasks], Path(args.folder)
    if args.worker == "calibration":
        seed = [CALIBRATION_SEED, zlib.crc32(task.name.encode()), args.size]
        info = worker_calibration(task, Path(args.run), args.pairs, args.samples, seed)
        (folder / "result.json").write_text(json.dumps(info))
        return
    x_obs = np.load(args.observations_file)["x"]
    if args.rounds:
        x_o = x_obs[args.obs_index]
        if args.worker in SEQUENTIAL:
            seed = [SIM_SEED, zlib.crc32(task.name.encode()), args.size, args.rounds, args.obs_index]
            samples, info = worker_sequential(args.worker, task, args.size, args.rounds, x_o, args.samples, seed)
        else:
            samples, info = worker_infer(task, args.size, args.rounds, x_o, args.samples, args.minutes, folder / "run")
    elif args.worker in SBI:
        samples, info = worker_sbi(args.worker, task, folder.parent / "sims.npz", x_obs, args.samples)
    else:
        run = folder / "run"
        samples, info = worker_flows(
            args.worker, task, folder.parent / "sims.npz", x_obs, args.samples, args.minutes, run
        )
    np.save(folder / "samples.npy", samples.astype(np.float32))
    (folder / "result.json").write_text(json.dumps(info))


# ------------------------------------------------------------------ the race
def launch(
    contestant: str,
    task: Task,
    sims: Path,
    obs_file: Path,
    samples: int,
    minutes: float,
    folder: Path | None = None,
    extra: list[str] | None = None,
) -> dict:
    """Run one contestant in its own process; its result.json (with ``error`` on failure)."""
    folder = folder or sims.parent / contestant
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
    cmd += extra or []
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


def saved_sbi_seconds(folder: Path, sbi: tuple[str, ...] = SBI) -> list[float]:
    found = []
    for c in sbi:
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


def budget_for(
    minutes: float | None, results: dict[str, dict], folder: Path, sbi: tuple[str, ...] = SBI
) -> tuple[float, str]:
    if minutes is not None:
        return minutes, "--minutes"
    now = [r["train_seconds"] for r in results.values() if "train_seconds" in r]
    if now:
        return flows_budget(now), f"the longest sbi training now: {max(now):.0f} s"
    saved = saved_sbi_seconds(folder, sbi)
    if saved:
        return flows_budget(saved), f"the longest sbi training saved in {folder}: {max(saved):.0f} s"
    raise SystemExit(f"no sbi training time for {folder}: run an sbi contestant or pass --minutes")


# ------------------------------------------------------------------ --rounds: focused on one observation
def run_rounds(task: Task, n: int, args: argparse.Namespace, obs_file: Path, refs: np.ndarray) -> dict[str, dict]:
    """Per observation i: sbi's sequential contestants, then flows.infer at their longest training time (or
    --minutes); each scored against observation i's reference. Results: {contestant: {"c2st": [per obs], ...}}."""
    only, base = args.only.split(","), Path(args.out) / task.name / str(n) / f"rounds_{args.rounds}"
    extra = ["--rounds", str(args.rounds), "--size", str(n)]
    merged: dict[str, dict] = {}
    for i in range(args.observations):
        results: dict[str, dict] = {}
        for c in [c for c in SEQUENTIAL if c in only]:
            folder = base / f"obs{i}" / c
            results[c] = launch(
                c, task, folder / "unused", obs_file, args.samples, 0.0, folder, [*extra, "--obs-index", str(i)]
            )
        if "flows" in only:
            minutes, source = budget_for(args.minutes, results, base / f"obs{i}", SEQUENTIAL)
            print(f"  {task.name} N={n} R={args.rounds} obs {i}: flows get {minutes:g} min ({source})", flush=True)
            folder = base / f"obs{i}" / "flows"
            results["flows"] = launch(
                "flows",
                task,
                folder / "unused",
                obs_file,
                args.samples,
                minutes,
                folder,
                [*extra, "--obs-index", str(i)],
            )
        for c, res in results.items():
            folder = base / f"obs{i}" / c
            if "error" in res:
                print(f"  {c} obs {i} failed: {res['error'].splitlines()[-1]}", flush=True)
                merged.setdefault(c, {"error": res["error"]})
                continue
            res["c2st"] = score(np.load(folder / "samples.npy"), refs[i : i + 1])
            (folder / "result.json").write_text(json.dumps(res))
            print(
                f"  {c} obs {i}: C2ST {res['c2st'][0]:.3f}, train {res['train_seconds']:.0f} s, "
                f"loop {res['loop_seconds']:.0f} s, sample {res['sample_seconds']:.1f} s",
                flush=True,
            )
            m = merged.setdefault(c, {"c2st": [], "train_seconds_each": [], "loop_seconds_each": []})
            if "c2st" in m:
                m["c2st"] += res["c2st"]
                m["train_seconds_each"].append(res["train_seconds"])
                m["loop_seconds_each"].append(res["loop_seconds"])
    for c, m in merged.items():
        if "c2st" in m:
            m["train_seconds"] = float(np.mean(m["train_seconds_each"]))
            m["sample_seconds"] = float("nan")
            each = [json.loads((base / f"obs{i}" / c / "result.json").read_text()) for i in range(len(m["c2st"]))]
            if c == "flows":
                m["minutes"] = "/".join(f"{r['minutes']:g}" for r in each)
            else:
                m["epochs"] = "/".join("+".join(str(x["epochs"]) for x in r["rounds"]) for r in each)
    return merged


# ------------------------------------------------------------------ --calibration: coverage of the amortized flows
def run_calibration(task: Task, n: int, args: argparse.Namespace, obs_file: Path) -> dict:
    """flows.calibrate on 1,000 held-out pairs for the amortized flows run of (task, N): the one kept in
    OUT/task/N/flows/run by the race, else trained now (budget: --minutes, else the saved sbi times)."""
    sims = write_sims(task, n, Path(args.out) / task.name / str(n))
    run = sims.parent / "flows" / "run"
    if not (run / "model.safetensors").exists():
        minutes, source = budget_for(args.minutes, {}, sims.parent)
        print(f"  {task.name} N={n}: training flows for {minutes:g} min ({source})", flush=True)
        res = launch("flows", task, sims, obs_file, args.samples, minutes)
        if "error" in res:
            return res
    folder = sims.parent / "calibration"
    extra = ["--run", str(run), "--pairs", str(args.pairs), "--size", str(n)]
    res = launch("calibration", task, sims, obs_file, args.calibration_samples, 0.0, folder, extra)
    trained = (
        json.loads((sims.parent / "flows" / "result.json").read_text())
        if (sims.parent / "flows" / "result.json").exists()
        else {}
    )
    res["flows_minutes"] = trained.get("minutes")
    (folder / "result.json").write_text(json.dumps(res))
    return res


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
        note = f"{res['epochs']} epochs" if "epochs" in res else f"budget {res.get('minutes', 0)} min"
        rows.append([c, fmt_c2st(res), f"{res['train_seconds']:.1f}", f"{res['sample_seconds']:.1f}", note])
    return rows


def flows_vs_sbi(results: dict[str, dict]) -> str:
    """flows − the best sbi contestant (lowest mean C2ST), paired on the observations, ± SE."""
    sbi = [(np.mean(r["c2st"]), c) for c, r in results.items() if c in (*SBI, *SEQUENTIAL) and "c2st" in r]
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
    p.add_argument(
        "--rounds", type=int, help="focused mode: R rounds per observation; defaults " + json.dumps(ROUNDS_DEFAULTS)
    )
    p.add_argument(
        "--calibration",
        action="store_true",
        help="coverage of the amortized flows; " + json.dumps(CALIBRATION_DEFAULTS),
    )
    p.add_argument("--pairs", type=int, default=1000, help="--calibration: held-out pairs (default 1000)")
    p.add_argument("--calibration-samples", type=int, default=100, help="--calibration: samples per pair (default 100)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--observations-file", help=argparse.SUPPRESS)
    p.add_argument("--obs-index", type=int, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.out = str(Path(args.out).resolve())
    if args.worker:
        return args
    defaults = ROUNDS_DEFAULTS if args.rounds else CALIBRATION_DEFAULTS if args.calibration else {}
    for key, value in {**(QUICK if args.quick else DEFAULTS), **defaults}.items():
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
    if args.calibration:
        main_calibration(args, table)
        return
    contestants = [c for c in (*SBI, *SEQUENTIAL, *FLOWS) if c in args.only.split(",")]
    all_results: dict[tuple[str, int], dict[str, dict]] = {}
    for name in args.tasks.split(","):
        task = TASKS[name]
        obs_file = write_observations(task, args.observations, out)
        refs = references(task, np.load(obs_file)["x"], args.samples, out)
        for n in (int(s) for s in args.sizes.split(",")):
            results = (run_rounds if args.rounds else run_cell)(task, n, args, obs_file, refs)
            all_results[(name, n)] = results
            mode = f"{args.rounds} rounds focused on each observation" if args.rounds else "amortized"
            head = (
                f"\n## {name}, N={n}, {mode}: C2ST over {args.observations} observations, {args.samples} samples each\n"
            )
            print(head + "\n" + table(["contestant", "C2ST ± SE", "train s", "sample s", ""], cell_rows(results)))
            if flows_vs_sbi(results):
                print(f"\nflows − best sbi (paired): {flows_vs_sbi(results)}")
            sys.stdout.flush()
    print_summary(all_results, contestants, table)
    print(f"\n({time.perf_counter() - start:.0f} s in all)")
    summary = {f"{t}/{n}": r for (t, n), r in all_results.items()}
    name = f"summary_rounds{args.rounds}.json" if args.rounds else "summary.json"
    (out / name).write_text(json.dumps(summary, indent=1))


def main_calibration(args: argparse.Namespace, fmt: Callable[..., str]) -> None:
    out, rows, summary = Path(args.out), [], {}
    for name in args.tasks.split(","):
        task = TASKS[name]
        obs_file = write_observations(task, args.observations, out)
        for n in (int(s) for s in args.sizes.split(",")):
            res = run_calibration(task, n, args, obs_file)
            summary[f"{name}/{n}"] = res
            if "error" in res:
                print(f"  {name} N={n}: calibration failed: {res['error'].splitlines()[-1]}", flush=True)
                rows.append([name, n, "error", *[""] * 7])
                continue
            sbc = min(res["sbc_p_values"])
            row = [name, n, f"{res['coverage_error_max']:.3f}", f"{res['coverage_error_at']:.2f}"]
            row += [f"{res['coverage_error_mean']:+.3f}", f"{res['coverage_band_95']:.3f}", res["verdict"]]
            row += [f"{sbc:.3g}", res.get("flows_minutes"), f"{res['calibration_seconds']:.0f}"]
            rows.append(row)
            keys = ("coverage_error_max", "verdict", "coverage_band_95")
            print(f"  {name} N={n}: {json.dumps({k: res[k] for k in keys})}", flush=True)
    headers = ["task", "N", "coverage error max", "at level", "mean error", "95% band", "verdict", "min SBC p"]
    headers += ["flows min", "calibrate s"]
    head = f"{args.pairs} held-out pairs, {args.calibration_samples} samples each"
    print(f"\n## Calibration of the amortized flows posterior: {head}\n")
    print(fmt(headers, rows))
    (out / "calibration.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
