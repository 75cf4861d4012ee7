"""Simulations on several processes and on a Dask cluster (flows.simulation.SimulationStore.run): the same pairs
bit for bit whatever runs them, faults (a simulator that raises, hangs or kills its worker; kill -9 of the run)
that keep what was simulated, and the progress a user sees.

The simulators live in tests/sim_models.py: worker processes import them (spawn children and Dask workers get this
process's sys.path, tests/ included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import sim_models
from helpers import ROOT, TESTS

import flows.simulation
from flows.errors import SimulationError
from flows.simulation import SimulationStore

N, BATCH = 600, 50  # 12 batches


def run(folder: Path, simulator=sim_models.noisy, n: int = N, **kwargs) -> dict[str, int]:
    store = SimulationStore(folder)
    return store.run(0, n, sim_models.propose, simulator, BATCH, sim_models.SEED, progress=False, **kwargs)


def pairs(folder: Path) -> tuple[np.ndarray, ...]:
    return SimulationStore(folder).pairs(range(1))


def assert_same(a: Path, b: Path) -> None:
    for left, right in zip(pairs(a), pairs(b), strict=True):
        assert left.dtype == right.dtype and np.array_equal(left, right)


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in SimulationStore(folder).batches(0)}


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """The pairs of a run in this process, as every other run must end with them."""
    folder = tmp_path_factory.mktemp("clean")
    assert run(folder) == {"simulated": 600, "kept": 567, "dropped": 33}
    return folder


def test_this_process_and_a_worker_process_give_the_same_pairs(tmp_path, clean):
    sim = sim_models.Recorded(str(tmp_path / "calls.txt"), handoff=True)
    run(tmp_path / "run", sim, workers=2, log=tmp_path / "progress.log")
    assert_same(clean, tmp_path / "run")
    calls = sim.calls()
    assert sorted(k for k, _ in calls) == list(range(12))  # each batch once
    assert sim.worker_pids() and os.getpid() in {pid for _, pid in calls}  # both took part
    assert "in this process and 1 worker process" in (tmp_path / "progress.log").read_text()


def test_a_dask_cluster_gives_the_same_pairs(tmp_path, clean):
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        executor = client.get_executor()
        sim = sim_models.Recorded(str(tmp_path / "calls.txt"))
        run(tmp_path / "run", sim, executor=executor, log=tmp_path / "progress.log")
        assert len(sim.worker_pids()) == 2 and os.getpid() not in {pid for _, pid in sim.calls()}
        assert "on ClientExecutor (2 at once)" in (tmp_path / "progress.log").read_text()
        assert_same(clean, tmp_path / "run")
        with pytest.raises(SimulationError, match=r"diverged \(round 0, batch 4\)"):  # the user's executor goes on
            run(tmp_path / "fails", sim_models.FailAt(4), executor=executor)
        with pytest.raises(SimulationError, match="must be importable or picklable"):  # Dask's own pickling error
            run(tmp_path / "lock", Locked(), executor=executor)
        assert client.submit(sum, [1, 2]).result() == 3


class Locked:
    """A simulator that holds a lock: no pickler carries it."""

    def __init__(self):
        self.lock = threading.Lock()

    def __call__(self, theta):
        return sim_models.noisy(theta)


def test_a_simulator_that_cannot_reach_a_worker_says_so(tmp_path, monkeypatch):
    with pytest.raises(SimulationError, match=r"must be importable or picklable .* \(a lambda is not\)"):
        run(tmp_path, lambda theta: theta, workers=2)
    assert not list(tmp_path.rglob("*.npz"))
    run(tmp_path, lambda theta: theta[:, 1:])  # one process: anything callable

    def cell(theta):  # a function of a notebook cell: in a __main__ that has no file
        return theta

    main = sys.modules["__main__"]
    cell.__module__, cell.__qualname__ = "__main__", "cell"
    monkeypatch.setattr(main, "cell", cell, raising=False)
    monkeypatch.delattr(main, "__file__", raising=False)
    with pytest.raises(SimulationError, match="interactive session or a notebook"):
        run(tmp_path / "cell", cell, workers=2)


def test_a_batch_that_raises_on_a_worker_stops_the_run_and_a_second_run_continues(tmp_path, clean):
    with pytest.raises(SimulationError) as error:
        run(tmp_path, sim_models.FailAt(5), workers=2, timeout=60)  # a timeout: every batch on a worker
    message = str(error.value)
    assert "the simulator raised RuntimeError: the solver of the simulator diverged (round 0, batch 5)" in message
    assert "first theta of batch 5: [5, " in message and "resume the run to continue from there" in message
    assert "batch_00005.npz" not in mtimes(tmp_path)
    kept = mtimes(tmp_path)
    assert f"The {SimulationStore(tmp_path).counts(0)['kept']:,} pairs simulated so far are kept" in message
    sim = sim_models.Recorded(str(tmp_path / "calls.txt"))
    run(tmp_path, sim)
    assert {f"batch_{k:05d}.npz" for k, _ in sim.calls()}.isdisjoint(kept)  # nothing simulated twice
    assert all(mtimes(tmp_path)[name] == t for name, t in kept.items())
    assert_same(clean, tmp_path)


def test_a_batch_that_hangs_ends_at_the_timeout(tmp_path):
    start = time.monotonic()
    with pytest.raises(SimulationError, match=r"batch 1 ran longer than simulation.timeout=1 s .*\(round 0, batch 1\)"):
        run(tmp_path, sim_models.HangAt(1), timeout=1)  # one worker process, ended
    assert time.monotonic() - start < 20  # the pool's start (a few seconds on a busy machine) and the 1 s
    assert "batch_00000.npz" in mtimes(tmp_path) and "batch_00001.npz" not in mtimes(tmp_path)


def test_a_worker_that_dies_has_its_batches_rerun_once(tmp_path, clean):
    flag = tmp_path / "died"
    run(tmp_path / "run", sim_models.DieAt(3, str(flag)), workers=2, timeout=60)
    assert flag.exists()
    assert_same(clean, tmp_path / "run")


@pytest.mark.slow
def test_a_worker_that_dies_again_stops_the_run(tmp_path):
    with pytest.raises(SimulationError, match=r"worker processes died twice running batches .*3.*\(round 0, batch"):
        run(tmp_path, sim_models.DieAt(3), workers=2, timeout=60)


KILLED = """
import sys, sim_models
from flows.simulation import SimulationStore
if __name__ == "__main__":
    sim = sim_models.Recorded(sys.argv[2], delay=0.3, handoff=True)
    SimulationStore(sys.argv[1]).run(0, {n}, sim_models.propose, sim, {batch}, sim_models.SEED, workers=2)
"""


@pytest.mark.slow
def test_kill_9_during_parallel_simulation_then_a_second_run(tmp_path, clean):
    script, calls, folder = tmp_path / "simulate.py", tmp_path / "calls.txt", tmp_path / "run"
    script.write_text(KILLED.format(n=N, batch=BATCH))
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    proc = subprocess.Popen([sys.executable, str(script), str(folder), str(calls)], env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while len(mtimes(folder) if folder.exists() else {}) < 4 and proc.poll() is None:
            assert time.monotonic() < deadline, "no batches after 2 minutes"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    done = mtimes(folder)
    assert 4 <= len(done) < 12
    sim = sim_models.Recorded(str(calls))
    workers = sim.worker_pids()
    deadline = time.monotonic() + 10  # the worker processes notice the run is gone, and exit
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)
    before = len(sim.calls())
    run(folder, sim, workers=2)
    again = {k for k, _ in sim.calls()[before:]}
    assert again.isdisjoint(int(name[6:11]) for name in done)  # no finished batch simulated again
    assert all(mtimes(folder)[name] == t for name, t in done.items())
    assert_same(clean, folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/status").exists() or "zombie" not in Path(f"/proc/{pid}/status").read_text()


def test_progress_is_a_bar_and_lines_in_the_log(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(flows.simulation, "LOG_EVERY", 0.0)  # a line per batch
    log = tmp_path / "progress.log"
    store = SimulationStore(tmp_path)
    store.run(0, 300, sim_models.propose, sim_models.noisy, BATCH, sim_models.SEED, log=log)
    counts = store.run(0, N, sim_models.propose, sim_models.noisy, BATCH, sim_models.SEED, log=log)  # resumed
    lines = log.read_text().splitlines()
    assert "round 0: 0/300 simulations on disk; the rest in this process" in lines[0]
    resumed = next(i for i, line in enumerate(lines) if "300/600 simulations on disk" in line)  # its true progress
    assert "round 0: 350/600 simulations, " in lines[resumed + 1] and " sims/s, ETA " in lines[resumed + 1]
    assert " round 0: 300/300 simulations, " in lines[resumed - 1]  # the first run's last line
    assert lines[-1].endswith(" sims/s, in 00:00, 33 dropped") and " round 0: 600/600 simulations, " in lines[-1]
    assert counts["dropped"] == 33
    err = capsys.readouterr().err
    assert "round 0 simulations" in err and "600/600" in err and "dropped=33" in err
    store.run(0, N, sim_models.propose, sim_models.noisy, BATCH, sim_models.SEED, log=log)  # nothing left
    assert log.read_text().splitlines()[-2].endswith(" round 0: 600/600 simulations on disk")
