"""Simulations kept in a run directory: the simulator called in batches, each batch's pairs written at once.

``folder/round_R/batch_KKKKK.npz`` holds one batch: ``theta`` and ``x`` of the simulations that returned finite
values, and ``dropped``, how many returned NaN or Inf (dropped and counted, as sbi does). A batch's parameters
and the simulator's random state are seeded by (seed, round, batch), so a killed run that resumes reads the
batches on disk and simulates only the missing ones: it ends with the same pairs as a run never killed.

:meth:`SimulationStore.run` calls the simulator in this process, in worker processes of its own (``workers=N``:
this process and N - 1 others, ``spawn``-started with one thread each), or on any ``concurrent.futures.Executor``
(a Dask cluster's ``Client.get_executor()``, Ray's, mpi4py's ``MPIPoolExecutor``). Parameters are drawn here;
only the simulator calls go out, each batch seeded as above, so the pairs are the same bit for bit whatever runs
them (for a simulator whose results do not depend on its number of threads). Batches are written as they finish,
at most a few per worker in flight; a batch that raises, hangs past ``timeout`` or loses its worker twice stops
the run with the batches done kept on disk.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, BrokenExecutor, Executor, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from flows.errors import ConfigError, SimulationError
from flows.files import atomic_path

__all__ = ["resolve", "batch_seed", "simulate", "check_picklable", "SimulationStore"]


def resolve(spec: str, what: str) -> Any:
    """The object ``module:name`` (dots in the name reach attributes), imported; a clear error otherwise."""
    module, _, name = spec.partition(":")
    if module == "python":
        raise ConfigError(
            f"{what}='{spec}' was given as a Python object to flows.infer: resume it with flows.infer(..., "
            "resume=True) and the same objects, or name an importable one (module:function)."
        )
    try:
        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{what}='{spec}': cannot import it ({e}); is the module on PYTHONPATH?") from None
    return obj


def batch_seed(seed: int, round_: int, batch: int) -> int:
    return int(np.random.SeedSequence([seed, round_, batch]).generate_state(1)[0])


def simulate(simulator: Callable[[Tensor], Any], theta: Tensor, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(x of the finite simulations, a mask of them) for parameters ``theta`` (n, D); torch's and numpy's global
    random states are seeded by ``seed`` for the call and restored after it."""
    state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):  # the caller's states come back
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            x = simulator(theta)
    except Exception as e:  # the user's code: any failure stops the run with what was simulated kept
        raise SimulationError(f"the simulator raised {type(e).__name__}: {e}") from e
    finally:
        np.random.set_state(state)
    x = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if x.ndim == 1:  # one number per simulation
        x = x[:, None]
    if x.ndim == 0 or len(x) != len(theta):
        raise SimulationError(
            f"the simulator returned x of shape {tuple(x.shape)} for {len(theta)} parameters: it must return one "
            f"row per parameter, (n, ...) for theta of shape (n, D)"
        )
    if not np.issubdtype(x.dtype, np.number):
        raise SimulationError(f"the simulator returned {x.dtype} values, not numbers")
    x = x.astype(np.float32)
    finite = np.isfinite(x.reshape(len(x), -1)).all(1)
    return x, finite


LOG_EVERY = 5.0  # seconds between two lines of the progress log (and one at the end)
_TICK = 0.25  # seconds between two looks at the batches in flight
_ONE_THREAD = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_PICKLE_HINT = (
    "the simulator must be importable or picklable to run in worker processes (a lambda is not): define it in a "
    "module, or use workers=1"
)


# ------------------------------------------------------------------ on a worker
_ONE_AT_A_TIME = threading.Lock()  # the random states a batch seeds are the process's: threads would share them


def _simulate_array(simulator: Callable[[Tensor], Any], theta: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`simulate` in a worker, one batch at a time per process (a Dask worker may have several threads); theta
    travels as a numpy array (no torch shared memory between processes)."""
    with _ONE_AT_A_TIME:
        return simulate(simulator, torch.from_numpy(theta), seed)


_CLAIMS: Any = None  # in a worker of our own: when each batch was taken (time.time(); 0: not yet; -1: by the caller)


def _claimed(simulator: Callable[[Tensor], Any], theta: np.ndarray, seed: int, k: int) -> Any:
    """Batch k in a worker of our own, unless the calling process took it first (then None): its start is written to
    the shared claims, which the caller reads for its timeout."""
    with _CLAIMS.get_lock():
        if _CLAIMS[k]:
            return None
        _CLAIMS[k] = time.time()
    return _simulate_array(simulator, theta, seed)


def _ready() -> int:
    return os.getpid()


def _start_worker(parent: int, claims: Any) -> None:
    """A worker process of our own: one torch thread, Ctrl-C left to ``parent`` (which ends it), and its own exit
    once ``parent`` is gone (a kill -9)."""
    global _CLAIMS
    _CLAIMS = claims
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


# ------------------------------------------------------------------ on the calling process
def check_picklable(simulator: Callable[[Tensor], Any]) -> None:
    """Raise a SimulationError unless ``simulator`` can travel to a ``spawn``-started worker process."""
    try:
        payload = pickle.dumps(simulator)
    except Exception as e:
        raise SimulationError(f"{_PICKLE_HINT} ({type(e).__name__}: {e})") from None
    main = sys.modules.get("__main__")
    if b"__main__" in payload and not getattr(main, "__file__", None):
        raise SimulationError(
            f"{_PICKLE_HINT}: it is defined in the __main__ of an interactive session or a notebook, which worker "
            "processes cannot import"
        )


def _first(theta: Tensor) -> str:
    values = theta[0].flatten().tolist() if len(theta) else []
    shown = ", ".join(f"{v:.4g}" for v in values[:8])
    return f"[{shown}{', ...' if len(values) > 8 else ''}]"


def _pickling(e: BaseException) -> bool:
    """Whether ``e``, raised around a worker rather than by the simulator, says it could not carry the call."""
    text = f"{type(e).__name__} {e}".lower()
    return isinstance(e, pickle.PicklingError | pickle.UnpicklingError | ImportError) or any(
        word in text for word in ("pickl", "serializ", "can't get attribute")
    )


def _capacity(executor: Executor, workers: int) -> int:
    """How many batches ``executor`` runs at once: ``workers`` when given, else its size when it says."""
    if workers > 1:
        return workers
    size = getattr(executor, "_max_workers", None)  # concurrent.futures, loky
    if isinstance(size, int) and size > 0:
        return size
    client = getattr(executor, "_client", None)  # distributed's ClientExecutor: one batch at a time per worker
    if client is not None:
        with contextlib.suppress(Exception):
            if workers := len(client.nthreads()):
                return workers
    return os.cpu_count() or 4


@contextmanager
def _one_thread() -> Iterator[None]:
    """OMP, MKL and OpenBLAS at one thread in the processes started meanwhile (they read it as they load)."""
    saved = {name: os.environ.get(name) for name in _ONE_THREAD}
    os.environ.update(dict.fromkeys(_ONE_THREAD, "1"))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _Progress:
    """Simulations done of ``total``: a tqdm bar on stderr (when ``show``) and lines appended to ``log``, at most
    every LOG_EVERY seconds and at the end; the batches found on disk count as done."""

    def __init__(self, round_: int, total: int, done: int, dropped: int, show: bool, log: Path | None):
        self.round, self.total, self.done, self.dropped, self.log = round_, total, done, dropped, log
        self.first = done
        self.start = self.logged = time.monotonic()
        self.bar = tqdm(
            total=total, initial=done, unit="sim", desc=f"round {round_} simulations", disable=not show, file=sys.stderr
        )
        self.bar.set_postfix(dropped=dropped)

    def begin(self, where: str) -> None:
        rest = f"; the rest {where}" if where else ""
        self._write(f"round {self.round}: {self.done:,}/{self.total:,} simulations on disk{rest}")

    def add(self, simulated: int, dropped: int) -> None:
        self.done += simulated
        self.bar.update(simulated)
        if dropped:
            self.dropped += dropped
            self.bar.set_postfix(dropped=self.dropped)
        self.tick()

    def tick(self) -> None:
        if time.monotonic() - self.logged >= LOG_EVERY:
            self._write(self.line())

    def close(self, finished: bool) -> None:
        self.bar.close()
        self._write(self.line() if finished else f"{self.line()}: stopped")

    def line(self) -> str:
        """``round R: done/total simulations, rate sims/s, ETA h:mm:ss, K dropped`` (``in`` the time taken at the
        end)."""
        elapsed = time.monotonic() - self.start
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = (
            f"in {tqdm.format_interval(elapsed)}"
            if not left
            else "ETA " + (tqdm.format_interval(left / rate) if rate > 0 else "?")
        )
        return (
            f"round {self.round}: {self.done:,}/{self.total:,} simulations, {rate:,.1f} sims/s, {eta}, "
            f"{self.dropped:,} dropped"
        )

    def _write(self, line: str) -> None:
        self.logged = time.monotonic()
        if self.log is None:
            return
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


class _Workers:
    """Where batches go: a ``spawn`` process pool of our own (started, restarted, ended by us) or the user's
    executor (left running). ``limit`` batches at most are in flight. Our pool's workers claim a batch before they
    run it, in ``claims`` (shared memory): the calling process, idle, runs a batch no worker has claimed, and the
    timeout counts from the claim."""

    def __init__(self, executor: Executor | None, processes: int, limit: int, batches: int):
        self.own, self.processes, self.limit, self.batches = executor is None, processes, limit, batches
        self.restarts = 0
        self.claims: Any = None
        self.executor = executor if executor is not None else self._start()

    def _start(self) -> ProcessPoolExecutor:
        context = mp.get_context("spawn")
        self.claims = context.Array("d", self.batches)
        pool = ProcessPoolExecutor(
            self.processes, mp_context=context, initializer=_start_worker, initargs=(os.getpid(), self.claims)
        )
        with _one_thread():
            pool.submit(_ready)  # starts the processes now, while the environment says one thread
        return pool

    def submit(self, simulator: Callable[[Tensor], Any], theta: np.ndarray, seed: int, k: int) -> Future:
        if self.own:
            return self.executor.submit(_claimed, simulator, theta, seed, k)
        return self.executor.submit(_simulate_array, simulator, theta, seed)

    def started(self, batch: _Batch) -> float:
        """When batch's simulation started (time.time()), as far as we know; 0: not yet."""
        return max(self.claims[batch.k], 0.0) if self.own else batch.sent

    def claim(self, k: int) -> bool:
        """Take batch k from our pool's workers (False: one has it, or the claims are busy)."""
        lock = self.claims.get_lock()
        if not lock.acquire(timeout=1):
            return False
        try:
            if self.claims[k]:
                return False
            self.claims[k] = -1.0
            return True
        finally:
            lock.release()

    def restart(self) -> None:
        self.end(futures=[])
        self.restarts += 1
        self.executor = self._start()

    def end(self, futures: Iterable[Future]) -> None:
        """Cancel ``futures``; our pool's processes are killed: every batch that ended well is on disk, and what they
        run then is a batch given up, or one that hangs."""
        for future in futures:
            future.cancel()
        if not self.own:
            return
        assert isinstance(self.executor, ProcessPoolExecutor)
        processes = list((getattr(self.executor, "_processes", None) or {}).values())
        for process in processes:
            process.kill()
        self.executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.join(5)


@dataclass
class _Batch:
    k: int
    theta: Tensor
    sent: float = 0.0  # time.time() when handed to a worker


class _Round:
    """One call of :meth:`SimulationStore.run`: the batches left, run here (``local``) and/or on ``workers``."""

    def __init__(
        self,
        store: SimulationStore,
        round_: int,
        n: int,
        propose: Callable[[int, int], Tensor],
        simulator: Callable[[Tensor], Any],
        batch: int,
        seed: int,
        timeout: float | None,
    ):
        self.store, self.round, self.n, self.size, self.seed, self.timeout = store, round_, n, batch, seed, timeout
        self.propose, self.simulator = propose, simulator
        self.todo = deque(k for k in range(self._batch_count()) if not store.path(round_, k).exists())
        self.drawn: dict[int, Tensor] = {}  # parameters drawn for batches sent back to the queue
        self.inflight: dict[Future, _Batch] = {}
        self.local, self.workers = True, None
        self.progress: _Progress | None = None

    def plan(self, workers: int, executor: Executor | None) -> str:
        """Where the batches run (a sentence for the log): with a timeout, never here (it could not be ended)."""
        if not self.todo:
            return ""
        if executor is not None:
            self.local = False
            capacity = _capacity(executor, workers)
            limit = capacity if self.timeout else 2 * capacity  # a timeout counts from the send: none may queue
            self.workers = _Workers(executor, capacity, limit, self._batch_count())
            return f"on {type(executor).__name__} ({capacity} at once)"
        if self.timeout is None and (workers == 1 or len(self.todo) <= 1):
            return "in this process"
        check_picklable(self.simulator)
        self.local = self.timeout is None
        processes = workers - 1 if self.local else workers
        self.workers = _Workers(None, processes, 2 * processes, self._batch_count())
        here = "this process and " if self.local else ""
        return f"in {here}{processes} worker process{'es' if processes > 1 else ''}"

    def run(self, workers: int, executor: Executor | None, show: bool, log: Path | None) -> None:
        size = sum(self._size(k) for k in self.todo)
        self.progress = _Progress(
            self.round, self.n, self.n - size, self.store.counts(self.round)["dropped"], show, log
        )
        try:
            self.progress.begin(self.plan(workers, executor))
            while self.todo or self.inflight:
                self._collect(0)
                self._send()
                if self.local and self.todo:
                    k = self.todo.popleft()
                    self._here(_Batch(k, self._theta(k)))
                elif self.local and (spare := self._spare()) is not None:
                    self._here(self.inflight.pop(spare))
                else:
                    self._collect(_TICK)
                    self._check_timeouts()
                self.progress.tick()
        except BaseException:
            if self.workers is not None:
                self.workers.end(self.inflight)
            self.progress.close(finished=False)
            raise
        if self.workers is not None:
            self.workers.end([])
        self.progress.close(finished=True)

    # -------------------------------------------------------------- one batch
    def _batch_count(self) -> int:
        return -(-self.n // self.size)

    def _size(self, k: int) -> int:
        return min(self.size, self.n - k * self.size)

    def _theta(self, k: int) -> Tensor:
        theta = self.drawn.pop(k, None)
        return theta if theta is not None else self.propose(self._size(k), batch_seed(self.seed, self.round, 2 * k))

    def _here(self, batch: _Batch) -> None:
        try:
            x, finite = simulate(self.simulator, batch.theta, batch_seed(self.seed, self.round, 2 * batch.k + 1))
        except SimulationError as e:
            raise SimulationError(self._stopped(batch, str(e), "fix the simulator")) from e.__cause__
        self._write(batch, x, finite)

    def _write(self, batch: _Batch, x: np.ndarray, finite: np.ndarray) -> None:
        theta = batch.theta.detach().cpu().numpy()
        self.store._write(self.store.path(self.round, batch.k), theta, x, finite)
        assert self.progress is not None
        self.progress.add(len(theta), int((~finite).sum()))

    def _stopped(self, batch: _Batch | None, what: str, advice: str) -> str:
        kept = self.store.counts(self.round)["kept"]
        where = f"round {self.round}, batch {batch.k}" if batch else f"round {self.round}"
        first = f" The first theta of batch {batch.k}: {_first(batch.theta)}." if batch else ""
        return (
            f"{what} ({where}). The {kept:,} pairs simulated so far are kept in {self.store.folder}; {advice} and "
            f"resume the run to continue from there.{first}"
        )

    # -------------------------------------------------------------- batches on workers
    def _send(self) -> None:
        if self.workers is None:
            return
        while self.todo and len(self.inflight) < self.workers.limit:
            k = self.todo.popleft()
            batch = _Batch(k, self._theta(k))
            seed = batch_seed(self.seed, self.round, 2 * batch.k + 1)
            theta = batch.theta.detach().cpu().numpy()
            try:
                future = self.workers.submit(self.simulator, theta, seed, k)
            except BrokenExecutor:
                self.drawn[batch.k] = batch.theta
                self.todo.appendleft(batch.k)
                self._broken([])
                return
            except Exception as e:  # the executor could not take the call (pickling it, most often)
                self._failed(batch, e)
            batch.sent = time.time()
            self.inflight[future] = batch

    def _spare(self) -> Future | None:
        """The newest batch sent to our pool that no worker has taken yet, now taken by this process (idle)."""
        if self.workers is None or not self.workers.own:
            return None
        for future, batch in reversed(self.inflight.items()):
            if self.workers.claim(batch.k):
                future.cancel()
                return future
        return None

    def _collect(self, timeout: float) -> None:
        """Write the batches finished within ``timeout`` seconds; stop at the first that failed."""
        futures = list(self.inflight)
        if not futures:
            return
        done, _ = wait(futures, timeout=timeout, return_when=FIRST_COMPLETED)
        failed: list[tuple[_Batch, BaseException]] = []
        for batch, future in sorted(((self.inflight[f], f) for f in done if f in self.inflight), key=lambda b: b[0].k):
            del self.inflight[future]
            error = future.exception()
            if error is None:
                self._write(batch, *future.result())  # never None: a batch this process took left the futures
            else:
                failed.append((batch, error))
        for batch, error in failed:
            if not isinstance(error, BrokenExecutor):
                self._failed(batch, error)
        if failed:
            self._broken([batch for batch, _ in failed])

    def _failed(self, batch: _Batch, error: BaseException) -> NoReturn:
        if isinstance(error, SimulationError):  # the simulator raised, or returned something unusable
            raise SimulationError(self._stopped(batch, str(error), "fix the simulator")) from error.__cause__
        what = f"batch {batch.k} could not run on the workers ({type(error).__name__}: {error})"
        if _pickling(error):
            what = f"{_PICKLE_HINT}; {what}"
        raise SimulationError(self._stopped(batch, what, "fix it")) from error

    def _broken(self, lost: list[_Batch]) -> None:
        """A worker died: the batches it took down go back to the queue, run once more by a fresh pool of ours."""
        assert self.workers is not None
        for future, batch in list(self.inflight.items()):
            if future.done() and not future.cancelled() and future.exception() is None:
                self._write(batch, *future.result())
            else:
                lost.append(batch)
        self.inflight.clear()
        lost.sort(key=lambda b: b.k)
        if not self.workers.own or self.workers.restarts >= 1:
            running = f"running batches {', '.join(str(b.k) for b in lost)}" if lost else "starting"
            what = (
                f"worker processes died {'twice ' if self.workers.own else ''}{running} (killed: out of memory, a "
                "signal, or os._exit in the simulator; a script that starts workers must guard its code with "
                "if __name__ == '__main__')"
            )
            raise SimulationError(self._stopped(lost[0] if lost else None, what, "fix it"))
        for batch in reversed(lost):
            self.drawn[batch.k] = batch.theta
            self.todo.appendleft(batch.k)
        self.workers.restart()

    def _check_timeouts(self) -> None:
        """A batch's clock starts when a worker of ours takes it, or when it is sent to the user's executor."""
        if self.timeout is None or self.workers is None:
            return
        now = time.time()
        for future, batch in self.inflight.items():
            started = self.workers.started(batch)
            if started and not future.done() and now - started > self.timeout:
                ended = (
                    "its worker processes were ended"
                    if self.workers.own
                    else "it may still run on the executor: restart its workers (Dask: client.restart())"
                )
                what = f"batch {batch.k} ran longer than simulation.timeout={self.timeout:g} s ({ended})"
                raise SimulationError(self._stopped(batch, what, "fix the simulator or raise simulation.timeout"))


class SimulationStore:
    """The batches of simulations of one run, under ``folder``."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def path(self, round_: int, batch: int) -> Path:
        return self.folder / f"round_{round_}" / f"batch_{batch:05d}.npz"

    def run(
        self,
        round_: int,
        n: int,
        propose: Callable[[int, int], Tensor],
        simulator: Callable[[Tensor], Any],
        batch: int,
        seed: int,
        *,
        workers: int = 1,
        executor: Executor | None = None,
        timeout: float | None = None,
        progress: bool = True,
        log: Path | None = None,
    ) -> dict[str, int]:
        """Simulate ``n`` parameters of round ``round_`` in batches of ``batch``, skipping the batches on disk;
        returns the round's counts (simulated, kept, dropped).

        Batch k's parameters are ``propose(m, batch_seed(seed, round_, 2k))``, drawn here; its simulator call is
        seeded by ``batch_seed(seed, round_, 2k + 1)``, so the pairs are the same whatever runs it. ``workers=N``
        runs batches in this process and N - 1 worker processes (``spawn``, one thread each); ``executor`` sends
        them all to a ``concurrent.futures.Executor`` of the user's (not shut down here; ``workers`` then says how
        many batches it runs at once when it cannot tell). Either way the simulator must be importable or
        picklable. ``timeout`` (seconds) ends a batch that runs longer, with the run; then no batch runs here
        (``workers`` worker processes, killed at the end of a batch's time). A worker that dies is replaced once
        and its batches rerun. Progress: a tqdm bar on stderr (``progress``) and lines in the text file ``log``."""
        if workers < 1:
            raise ConfigError(f"workers must be >= 1, not {workers}")
        if timeout is not None and timeout <= 0:
            raise ConfigError(f"timeout must be > 0 seconds (or None: no limit), not {timeout}")
        _Round(self, round_, n, propose, simulator, batch, seed, timeout).run(workers, executor, progress, log)
        return self.counts(round_)

    def _write(self, path: Path, theta: np.ndarray, x: np.ndarray, finite: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, tmp.open("wb") as f:  # a kill leaves a whole batch or none
            np.savez(f, theta=theta[finite].astype(np.float32), x=x[finite], dropped=np.int64((~finite).sum()))

    def batches(self, round_: int) -> list[Path]:
        return sorted((self.folder / f"round_{round_}").glob("batch_*[0-9].npz"))

    def counts(self, round_: int) -> dict[str, int]:
        kept = dropped = 0
        for path in self.batches(round_):
            with np.load(path, allow_pickle=False) as f:
                kept, dropped = kept + len(f["theta"]), dropped + int(f["dropped"])
        return {"simulated": kept + dropped, "kept": kept, "dropped": dropped}

    def pairs(self, rounds: range) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(theta, x, the round of each pair) of the kept simulations of ``rounds``, in order."""
        thetas, xs, which = [], [], []
        for r in rounds:
            for path in self.batches(r):
                with np.load(path, allow_pickle=False) as f:
                    thetas.append(f["theta"])
                    xs.append(f["x"])
                    which.append(np.full(len(f["theta"]), r, dtype=np.int64))
        if not thetas:
            raise SimulationError(f"no simulations in {self.folder}")
        shapes = {x.shape[1:] for x in xs}
        if len(shapes) > 1:
            raise SimulationError(f"the simulator returned x of different shapes across batches: {sorted(shapes)}")
        return np.concatenate(thetas), np.concatenate(xs), np.concatenate(which)

    def write_pairs(self, path: Path, rounds: range) -> tuple[int, tuple[int, ...]]:
        """Every kept pair of ``rounds`` in one ``.npz`` (``theta``, ``x``, ``round``): a ``configs/posterior.yaml``
        file (``data.key=theta data.context_key=x``); returns how many, and the shape of one x."""
        theta, x, which = self.pairs(rounds)
        if not len(theta):
            raise SimulationError(
                f"every simulation of rounds {list(rounds)} returned NaN or Inf: nothing to train on ({self.folder})"
            )
        with atomic_path(path) as tmp, tmp.open("wb") as f:
            np.savez(f, theta=theta, x=x, round=which)
        return len(theta), tuple(x.shape[1:])
