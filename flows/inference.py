"""Simulation-based inference with a simulator in the loop: ``flows.infer(simulator, prior, simulations)``.

One run directory holds everything::

    RUN/config.yaml              the loop's config (its simulation: section: simulator, prior, simulations, rounds, ...)
    RUN/simulations/round_R/     every batch of simulations as it is made (flows.simulation), in worker processes
                                 or on a Dask cluster (simulation.workers / .scheduler; flows.infer: executor=)
    RUN/simulations/progress.log the simulations' progress: done / total, rate, ETA, dropped
    RUN/simulations/round_R/proposal.json   rounds > 0: the truncated prior they were drawn from
    RUN/round_R/                 the posterior trained on the pairs of rounds 0..R (a flows.train run)
    RUN/simulations.npz          every kept pair (theta, x, round): reusable with configs/posterior.yaml
    RUN/model.safetensors, eval.json   the last round's posterior: flows.load(RUN)
    RUN/inference.json           per round: simulations, dropped, the proposal's acceptance, times

Amortized (``rounds=1``): every simulation from the prior; the posterior serves any x. Focused (``rounds=R``
with ``x_obs``): round 0 draws from the prior, each later round from the prior truncated to the current
posterior's highest-probability region at x_o (:class:`flows.prior.TruncatedPrior`), and each round trains one
posterior on all pairs so far with the plain loss. That proposal is the prior times an indicator, so the
posterior it implies equals the true one inside the region, where the true posterior at x_o has its mass: no
correction term (as APT / SNPE-C needs for other proposals) and no leakage outside the prior (guide: Posterior
estimation from a simulator). A killed run resumes: batches on disk are read, not simulated again, and a round's
training resumes from its checkpoint. The main process draws the parameters and hands batches to the simulator
(in itself, its worker processes or a cluster); other training processes wait for it without a collective (a
barrier would time out behind a slow simulator) and then train with it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributions import Independent, Normal, Uniform

from flows.checkpoint import latest_checkpoint
from flows.config import Config, load_config, to_dict
from flows.data.tables import load_array
from flows.errors import ConfigError, FlowsError
from flows.files import atomic_path, atomic_write
from flows.flow import Flow
from flows.loading import load
from flows.prior import TruncatedPrior, check_prior, draw, prior_box
from flows.recipes import POSTERIOR
from flows.simulation import SimulationStore, resolve

__all__ = ["infer", "run_inference", "POSTERIOR", "prior_of", "simulator_of"]

DONE = "done.json"  # RUN/simulations/round_R/done.json: the main process has simulated round R (what other ranks await)


def _spec(obj: Any) -> str:
    """A record of a Python object for config.yaml: ``module:qualname`` when it can be imported back."""
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if module and name and "<" not in name and module != "__main__":
        return f"{module}:{name}"
    return f"python:{type(obj).__name__}"


def infer(
    simulator: Callable[[torch.Tensor], Any],
    prior: Any,
    simulations: int = 10_000,
    *,
    x_obs: Any = None,
    rounds: int = 1,
    workers: int | None = None,
    executor: Executor | None = None,
    config: str | os.PathLike | Config | None = None,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overrides: Sequence[str] = (),
    **sections: Mapping[str, Any],
) -> Flow:
    """Estimate the posterior p(θ | x) of a simulator: simulate, train, and (with ``rounds``) focus on ``x_obs``.

    Args:
        simulator: a batched callable, θ (n, D) float32 tensor → x (n, ...) (a tensor or an array); rows with NaN
            or Inf are dropped and counted; its torch and numpy global random states are seeded per batch.
        prior: any ``torch.distributions.Distribution`` over θ (``sample``, ``log_prob``): sbi's ``BoxUniform``
            and a ``MultivariateNormal`` work as they are. A box prior becomes ``data.bounds``.
        simulations: simulations of all rounds together.
        x_obs: the observation (the shape of one x); needed with ``rounds`` > 1.
        rounds: 1 (amortized: any x) or more (focused on ``x_obs``): equal shares of the simulations.
        workers: run the simulator in this many worker processes (``simulation.workers``; default 1: in this
            process). The simulator must then be importable or picklable (a function of a module, not a lambda).
        executor: any ``concurrent.futures.Executor`` to run the simulator's batches on: a Dask cluster
            (``distributed.Client(address).get_executor()``), Ray's, mpi4py's ``MPIPoolExecutor``; not shut down
            here. The pairs are the same bit for bit whatever runs them (per-batch seeds).
        config: a recipe (default: ``configs/posterior.yaml``'s, built in); ``train.time_limit`` is the training
            time of all rounds together.
        run_dir: the run directory (default: the config's); an existing one needs ``resume=True``.
        resume: continue a killed run: nothing simulated twice, training resumed from its checkpoints.
        overrides, **sections: as for :func:`flows.train` (``data={"context_shape": [4, 2]}``, ``train=...``,
            ``simulation={"batch": 100, "timeout": 60}``).

    Returns:
        The posterior, a :class:`flows.Flow` as ``flows.load(run_dir)`` gives: ``sample(n, context=x)``, exact
        ``log_prob(theta, context=x)``; ``flow.path.parent`` is the run directory.
    """
    check_prior(prior)
    if rounds > 1 and x_obs is None:
        raise ConfigError(f"rounds={rounds} focuses on one observation: pass x_obs= (one x of the simulator's shape)")
    base = config if config is not None else POSTERIOR
    sim = {**dict(sections.pop("simulation", {}) or {}), "simulator": _spec(simulator), "prior": _spec(prior)}
    sim |= {"simulations": simulations, "rounds": rounds} | ({"workers": workers} if workers is not None else {})
    updates: dict[str, Any] = {**sections, "simulation": sim}
    if run_dir is not None:
        updates["run_dir"] = os.fspath(run_dir)
    if x_obs is not None:
        updates["simulation"]["x_obs"] = "<x_obs>"  # written into the run directory below
    cfg = load_config(base, overrides, updates)
    root = Path(cfg.run_dir)
    if resume and (root / "config.yaml").is_file():
        cfg = _saved(root, cfg)
    if x_obs is not None:
        from accelerate import PartialState

        cfg.simulation.x_obs = os.fspath(root / "x_obs.npy")
        state = PartialState()
        if state.is_main_process:
            _start(root, resume)
            _write(root / "x_obs.npy", torch.as_tensor(x_obs, device="cpu").detach().float().numpy())
        state.wait_for_everyone()
    return load(run_inference(cfg, simulator, prior, resume, executor))


def _write(path: Path, content: str | np.ndarray) -> None:
    """A file a resume reads, written whole or not at all (a kill never leaves half of it)."""
    if isinstance(content, str):
        atomic_write(path, content)
        return
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.save(f, content)


def _saved(root: Path, cfg: Config) -> Config:
    """A resumed run keeps its own config (the caller's objects are the same ones again)."""
    saved = load_config(root / "config.yaml", lenient=True)
    for key in ("simulator", "prior"):
        setattr(saved.simulation, key, getattr(cfg.simulation, key))
    return saved


def _start(root: Path, resume: bool) -> None:
    if (root / "config.yaml").exists() and not resume:
        raise ConfigError(
            f"run directory '{root}' exists: resume it (resume=True, --resume) or choose another run_dir."
        )
    root.mkdir(parents=True, exist_ok=True)


def prior_of(cfg: Config) -> Any:
    """The prior that ``simulation.prior`` names: uniform on ``data.bounds``, a diagonal normal, or
    ``module:object`` (a Distribution, or a function of no arguments that returns one)."""
    d = cfg.simulation
    if d.prior == "uniform":
        bounds = cfg.data.bounds or []
        low, high = (torch.tensor([b[i] for b in bounds], dtype=torch.float32, device="cpu") for i in (0, 1))
        return Independent(Uniform(low, high), 1)
    if d.prior == "normal":
        loc = torch.tensor(d.prior_loc, dtype=torch.float32, device="cpu")
        scale = torch.tensor(d.prior_scale or [1.0], dtype=torch.float32, device="cpu").expand(len(loc))
        return Independent(Normal(loc, scale), 1)
    prior = resolve(str(d.prior), "simulation.prior")
    if callable(prior) and not hasattr(prior, "sample"):
        prior = prior()
    check_prior(prior)
    return prior


def simulator_of(cfg: Config) -> Callable[[torch.Tensor], Any]:
    simulator = resolve(str(cfg.simulation.simulator), "simulation.simulator")
    if not callable(simulator):
        raise ConfigError(f"simulation.simulator='{cfg.simulation.simulator}' is not callable")
    return simulator


def _x_obs(cfg: Config) -> torch.Tensor | None:
    """``simulation.x_obs`` as a tensor (a .npy, or the first array of a .npz; checked against x after round 0)."""
    return load_array(cfg.simulation.x_obs, ndim=None) if cfg.simulation.x_obs else None


def _round_config(cfg: Config, r: int, root: Path, bounds: list | None, minutes: float | None) -> Config:
    data = dataclasses.replace(
        cfg.data,
        path=os.fspath(root / "simulations" / f"pairs_{r}.npz"),
        key="theta",
        context_key="x",
        bounds=bounds,
    )
    train = dataclasses.replace(cfg.train, time_limit=minutes)
    simulation = type(cfg.simulation)()  # a round trains on the pairs in a file: no simulator in it
    round_dir = os.fspath(root / f"round_{r}")
    return dataclasses.replace(cfg, data=data, train=train, simulation=simulation, run_dir=round_dir).validate()


def _shares(total: int, rounds: int) -> list[int]:
    """Equal shares of the simulations, the remainder to round 0."""
    each = total // rounds
    return [total - each * (rounds - 1)] + [each] * (rounds - 1)


def _check_x(x_obs: torch.Tensor | None, x_shape: tuple[int, ...]) -> torch.Tensor | None:
    """One observation as a row of the flattened context (any shape with the simulator's number of values)."""
    if x_obs is None:
        return None
    if x_obs.numel() == int(np.prod(x_shape)):
        return x_obs.reshape(1, -1)
    raise FlowsError(
        f"x_obs has shape {tuple(x_obs.shape)} but the simulator returns x of shape {x_shape}: give one observation "
        f"of the simulator's shape"
    )


def run_inference(
    cfg: Config,
    simulator: Callable[[torch.Tensor], Any],
    prior: Any,
    resume: bool = False,
    executor: Executor | None = None,
) -> Path:
    """The loop of :func:`infer` for a validated config with ``simulation.simulator``; returns the run directory
    (locked meanwhile: one writer at a time). ``executor``: where the simulator's batches run (default: as
    ``simulation.workers`` and ``simulation.scheduler`` say)."""
    from flows.training.lock import run_lock

    with run_lock(cfg.run_dir):
        return _loop(cfg, simulator, prior, resume, executor)


def _cluster(address: str) -> Executor:
    """A Dask cluster's ``concurrent.futures`` executor, from its scheduler's address."""
    try:
        from distributed import Client
    except ImportError:
        raise ConfigError(
            f"simulation.scheduler={address!r} runs the simulations on a Dask cluster: install the extra, "
            'pip install -e ".[dask]"'
        ) from None
    return Client(address).get_executor()


def _await(marker: Path, poll: float = 1.0) -> None:
    """Wait for the main process to write ``marker`` (no collective: a barrier would time out behind a slow
    simulator; if the main process fails, the launcher ends this one)."""
    while not marker.exists():
        time.sleep(poll)


def _loop(
    cfg: Config, simulator: Callable[[torch.Tensor], Any], prior: Any, resume: bool, executor: Executor | None
) -> Path:
    from accelerate import PartialState

    state = PartialState()
    root, d = Path(cfg.run_dir), cfg.simulation
    if d.rounds > 1 and state.num_processes > 1:  # each round's training ends the process group the next one needs
        raise ConfigError(
            f"simulation.rounds={d.rounds} with {state.num_processes} training processes is not supported yet: run the "
            "rounds in one process (simulation.workers=N puts the simulator on every core)"
        )
    if executor is None and d.scheduler and state.is_main_process:
        executor = _cluster(d.scheduler)
    check_prior(prior)
    if state.is_main_process:
        _start(root, resume)
        if not (root / "config.yaml").exists():
            _write(root / "config.yaml", _yaml(cfg))
    state.wait_for_everyone()
    dim = draw(prior, 1, 0).shape[1]
    box = prior_box(prior, dim)
    bounds = (
        cfg.data.bounds
        if cfg.data.bounds is not None
        else ([[float(a), float(b)] for a, b in zip(*box, strict=True)] if box else None)
    )
    x_obs = _x_obs(cfg)
    store, shares = SimulationStore(root / "simulations"), _shares(d.simulations, d.rounds)
    total = cfg.train.time_limit
    weights = np.cumsum(shares) / np.cumsum(shares).sum()
    report: dict[str, Any] = {"rounds": []}
    flow: Flow | None = None
    for r, n in enumerate(shares):
        start = time.perf_counter()
        info: dict[str, Any] = {"round": r, "proposal": "prior" if r == 0 else "truncated prior"}
        done = store.folder / f"round_{r}" / DONE
        if state.is_main_process:
            propose = _proposal(r, prior, flow, x_obs, store, cfg.train.seed, info, bounds)
            x_obs = _simulate(cfg, store, r, n, propose, simulator, executor, x_obs, info)
            atomic_write(done, json.dumps(info))
        else:
            _await(done)
        state.wait_for_everyone()
        info["simulation_seconds"] = time.perf_counter() - start
        minutes = None if total is None else float(total * weights[r])
        flow = _train(_round_config(cfg, r, root, bounds, minutes), state.is_main_process, state.wait_for_everyone)
        info["train_minutes"] = minutes
        report["rounds"].append(info)
    if state.is_main_process:
        _finish(cfg, root, len(shares) - 1, report | {"bounds": bounds})
    else:  # training ended the process group (flows.training.accelerator.end): wait on the file, not a collective
        _await(root / "inference.json")
    return root


def _simulate(
    cfg: Config,
    store: SimulationStore,
    r: int,
    n: int,
    propose: Callable[[int, int], torch.Tensor],
    simulator: Callable[[torch.Tensor], Any],
    executor: Executor | None,
    x_obs: torch.Tensor | None,
    info: dict[str, Any],
) -> torch.Tensor | None:
    """Round ``r``'s ``n`` simulations (main process) and the pairs of rounds 0..r in one file; ``info`` gains the
    counts. Returns ``x_obs`` checked against the simulator's x."""
    d = cfg.simulation
    log = store.folder / "progress.log"
    options = {"workers": d.workers, "executor": executor, "timeout": d.timeout, "log": log}
    info |= store.run(r, n, propose, simulator, d.batch, cfg.train.seed, **options)
    pairs, x_shape = store.write_pairs(store.folder / f"pairs_{r}.npz", range(r + 1))
    info["pairs"] = pairs
    print(
        f"round {r}: {info['simulated']:,} simulations from the {info['proposal']} ({info['dropped']:,} "
        f"dropped: NaN or Inf), {pairs:,} pairs to train on",
        file=sys.stderr,
    )
    return _check_x(x_obs, x_shape)


def _train(rcfg: Config, main: bool, barrier: Callable[[], None]) -> Flow:
    """Train a round's posterior (resumed from its checkpoint if one exists; from scratch if it was killed before
    its first) unless it is done; the posterior."""
    from flows.training.fit import fit

    run_dir = Path(rcfg.run_dir)
    if not (run_dir / "eval.json").exists():
        saved = (run_dir / "config.yaml").exists()
        again = saved and (rcfg.train.members > 1 or latest_checkpoint(run_dir) is not None)
        if not again and run_dir.exists() and main:  # killed before its first checkpoint
            shutil.rmtree(run_dir)
        barrier()
        fit(load_config(run_dir / "config.yaml") if again else rcfg, resume=again)
    return load(run_dir)


def _finish(cfg: Config, root: Path, last: int, report: dict[str, Any]) -> None:
    """The last round's posterior, evaluation and pairs at the top of the run, the calibration check of an amortized
    run, and ``inference.json`` (main process)."""
    copies = {name: root / f"round_{last}" / name for name in ("model.safetensors", "eval.json")}
    copies["simulations.npz"] = root / "simulations" / f"pairs_{last}.npz"
    for name, source in copies.items():
        with atomic_path(root / name) as tmp:
            shutil.copyfile(source, tmp)
    report["simulations"] = sum(i["simulated"] for i in report["rounds"])
    d = cfg.simulation
    if d.rounds == 1 and d.calibration > 0:
        report["calibration"] = check_calibration(root, d.calibration, cfg.train.seed)
    atomic_write(root / "inference.json", json.dumps(report, indent=2))


def check_calibration(root: Path, pairs: int, seed: int = 0) -> dict[str, Any]:
    """The calibration checks of the run's posterior on up to ``pairs`` of its held-out pairs (drawn from the prior):
    ``calibration.json`` and ``calibration.png`` in ``root``; the summary, also printed in one line."""
    from flows.calibration import calibrate
    from flows.data import build_data
    from flows.posterior_plots import save_calibration

    flow = load(root)
    data = build_data(flow.config.data)
    n = min(pairs, len(data.test))
    cal = calibrate(flow, data.test[:n], data.test_context[:n], seed=seed)
    summary = save_calibration(root / "calibration.json", cal, data="the run's test split")
    print(
        f"calibration on {n:,} held-out pairs: {summary['verdict']}, largest coverage error "
        f"{summary['coverage_error_max']:.3f} (95% band {summary['coverage_band_95']:.3f}); {root / 'calibration.png'}",
        file=sys.stderr,
    )
    return summary


def inside(theta: torch.Tensor, bounds: list | None) -> torch.Tensor:
    """``theta`` with values on a bound (a float32 draw can land exactly on a box's edge, where the bounded flow's
    logit is infinite) moved to the nearest value strictly inside; None pairs are unbounded."""
    if not bounds:
        return theta
    low = torch.tensor([b[0] if b else -math.inf for b in bounds], dtype=theta.dtype, device="cpu")
    high = torch.tensor([b[1] if b else math.inf for b in bounds], dtype=theta.dtype, device="cpu")
    inf = torch.full_like(low, math.inf)
    return torch.maximum(torch.minimum(theta, torch.nextafter(high, -inf)), torch.nextafter(low, inf))


def _proposal(
    r: int,
    prior: Any,
    flow: Flow | None,
    x_obs: torch.Tensor | None,
    store: SimulationStore,
    seed: int,
    info: dict[str, Any],
    box: list | None,
) -> Callable[[int, int], torch.Tensor]:
    """How round ``r`` draws its parameters: the prior, or the prior truncated by the last round's posterior (its
    region saved in ``proposal.json``, so a resumed round draws from the same one)."""
    if r == 0:
        return lambda m, s: inside(draw(prior, m, s), box)
    assert flow is not None and x_obs is not None
    path = store.folder / f"round_{r}" / "proposal.json"
    saved = json.loads(path.read_text()) if path.exists() else None
    truncated = TruncatedPrior(prior, flow, x_obs, seed=seed + r, state=saved)
    if saved is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(path, json.dumps(truncated.state()))
    info["region"] = truncated.state()
    stats: list[float] = []

    def propose(m: int, s: int) -> torch.Tensor:
        theta, got = truncated.sample(m, s)
        theta = inside(theta, box)
        stats.append(got["acceptance"])
        info["acceptance"] = float(np.mean(stats))
        return theta

    return propose


def _yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
