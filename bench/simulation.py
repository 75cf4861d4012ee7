"""Simulations on every core and on a Dask cluster: SimulationStore.run with 1 worker, 2 workers, and a Dask
``LocalCluster`` of 2 single-threaded worker processes.

    python bench/simulation.py [--repeats 3] [--fast-repeats 7] [--parts slow fast]

Two workloads, each timed end to end (``SimulationStore.run`` from the call to the last batch on disk, its worker
processes' start included; a Dask cluster is started before its run, as a cluster is, and closed after it: its
start is reported apart), the median of ``--repeats`` runs into fresh folders, the configurations alternating; the
speed is workers=1's median seconds over the row's:

- slow: 2,000 simulations of an ODE-like simulator of about 20 ms per θ (an Euler-Maruyama loop over 400 particles
  in numpy, no sleep), batches of 1,000 (``simulation.batch``'s default: two batches) and of 100.
- fast: 100,000 simulations of a vectorized simulator of about 10 µs per θ, batches of 1,000: here the cost of the
  worker processes (their start: a Python that imports torch, about 1-2 s) is larger than the work they could
  take, and workers=2 must not be slower than 1 worker by more than 10%.

Worker processes started by ``spawn`` import the calling script again (as ``__mp_main__``, to find what it
defines): this one keeps its top level to what the simulators need, as a script with workers should (``common``,
which imports flows' trainer, is imported in ``main``: at the top it would add 0.7 s to a worker's start).

Each row says whether its pairs equal workers=1's bit for bit. Targets (issue 35): slow, 2 workers >= 1.8x and the
Dask cluster >= 1.7x the speed of 1 worker; fast, 2 workers >= 0.9x. Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flows.simulation import SimulationStore

PARTICLES, STEPS = 400, 820  # the slow simulator's work per θ: about 20 ms here
GRID = np.linspace(0.0, 4.0, 256)


def slow(theta: torch.Tensor) -> np.ndarray:
    """A stochastic predator-prey model per θ (rates θ ∈ (0, 1)³), Euler-Maruyama over PARTICLES paths: the mean
    and standard deviation of both populations at the end (4 numbers)."""
    x = np.empty((len(theta), 4))
    for i, (a, b, c) in enumerate(theta.double().numpy()):
        prey, pred = np.full(PARTICLES, 1.0), np.full(PARTICLES, 0.5)
        for _ in range(STEPS):
            noise = np.random.standard_normal((2, PARTICLES))
            prey = np.abs(prey + 0.01 * (a * prey - b * prey * pred) + 0.01 * noise[0] * prey)
            pred = np.abs(pred + 0.01 * (b * prey * pred - c * pred) + 0.01 * noise[1] * pred)
        x[i] = prey.mean(), prey.std(), pred.mean(), pred.std()
    return x


def fast(theta: torch.Tensor) -> np.ndarray:
    """A damped oscillation per θ read on GRID, with noise, summarized by 8 numbers: vectorized over the batch."""
    t = theta.double().numpy()
    wave = np.exp(-t[:, :1] * GRID) * np.cos(3 * t[:, 1:2] * GRID + t[:, 2:3])
    wave += 0.05 * np.random.standard_normal(wave.shape)
    return wave.reshape(len(t), 8, -1).mean(2)


def propose(m: int, seed: int) -> torch.Tensor:
    return torch.rand(m, 3, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


def timed_run(folder: Path, simulator: Callable, n: int, batch: int, how: dict[str, Any]) -> float:
    start = time.perf_counter()
    SimulationStore(folder).run(0, n, propose, simulator, batch, 0, progress=False, **how)
    return time.perf_counter() - start


def per_theta(simulator: Callable, m: int) -> float:
    theta = propose(m, 1)
    start = time.perf_counter()
    simulator(theta)
    return (time.perf_counter() - start) / m


def dask_executor() -> tuple[Any, float]:
    """A Dask LocalCluster of 2 single-threaded worker processes, its client's executor, and its start in seconds."""
    from distributed import Client, LocalCluster

    start = time.perf_counter()
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    return client, time.perf_counter() - start


def measure(part: str, n: int, batch: int, names: list[str], repeats: int, tmp: Path) -> list[list]:
    """Rows of ``part`` for each way to run it in ``names``: the median of ``repeats`` runs, the ways alternating
    (the Dask cluster is started for its row and closed after it: no client thread in this process meanwhile)."""
    simulator = {"slow": slow, "fast": fast}[part]
    seconds: dict[str, list[float]] = {name: [] for name in names}
    same: dict[str, bool] = dict.fromkeys(names, True)
    starts: list[float] = []
    for r in range(repeats):
        for name in names:
            folder = tmp / f"{part}_{batch}_{name.replace(' ', '_').replace(',', '')}_{r}"
            if name.startswith("Dask"):
                client, started = dask_executor()
                starts.append(started)
                seconds[name].append(timed_run(folder, simulator, n, batch, {"executor": client.get_executor()}))
                client.close()
                client.cluster.close()
            else:
                seconds[name].append(timed_run(folder, simulator, n, batch, {"workers": int(name[-1])}))
            base = SimulationStore(tmp / f"{part}_{batch}_workers=1_{r}").pairs(range(1))
            pairs = SimulationStore(folder).pairs(range(1))
            same[name] &= all(np.array_equal(a, b) for a, b in zip(base, pairs, strict=True))
            print(f"  {part} batch {batch} {name}: {seconds[name][-1]:.2f} s", file=sys.stderr)
    if starts:
        print(f"  Dask LocalCluster starts (not timed): {', '.join(f'{s:.1f}' for s in starts)} s", file=sys.stderr)
    one = statistics.median(seconds["workers=1"])
    rows = []
    for name in names:
        s = statistics.median(seconds[name])
        spread = f"{min(seconds[name]):.2f}-{max(seconds[name]):.2f}"
        speed = f"{one / s:.2f}x"
        rows.append(
            [part, name, batch, f"{n:,}", f"{s:.2f}", spread, f"{n / s:,.0f}", speed, "yes" if same[name] else "NO"]
        )
    return rows


def main() -> None:
    from common import setup_threads, table  # here: spawned workers import this script again, and need none of it

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fast-repeats", type=int, default=7)
    p.add_argument("--parts", nargs="+", default=["slow", "fast"], choices=["slow", "fast"])
    p.add_argument("--slow-n", type=int, default=2000)
    p.add_argument("--fast-n", type=int, default=100_000)
    args = p.parse_args()
    setup_threads(1)  # the simulators are single-threaded numpy; workers run one thread each
    print(f"slow simulator: {1e3 * per_theta(slow, 20):.1f} ms per theta; fast: {1e6 * per_theta(fast, 1000):.1f} µs")
    names = ["workers=1", "workers=2", "Dask, 2 workers"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if "slow" in args.parts:
            for batch in (1000, 100):
                rows += measure("slow", args.slow_n, batch, names, args.repeats, Path(tmp))
        if "fast" in args.parts:
            rows += measure("fast", args.fast_n, 1000, names[:2], args.fast_repeats, Path(tmp))
    headers = ["simulator", "run on", "batch (θ)", "simulations", "seconds", "min-max", "sims/s", "speed", "same pairs"]
    print(table(headers, rows))
    print(
        "workers=N: this process and N - 1 spawn-started worker processes (one thread each); the batches go out as "
        "they are drawn, and this process, once it has none left to draw, runs those no worker has taken yet (a "
        "worker still starting takes none): the same pairs (a batch's seeds are its own), and no minimum amount of "
        "work is needed before workers are used."
    )


if __name__ == "__main__":
    main()
