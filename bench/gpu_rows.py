"""The parts of bench/gpu.py that are not tables: data, rows measured in alternating rounds, trainers, the peers'
flow-matching loops, FLOP counting and the card's matrix rate."""

from __future__ import annotations

import gc
import gzip
import math
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import ROOT

from flows.config import Config, load_config
from flows.data import build_data
from flows.nn import build_field
from flows.ode import Dynamics
from flows.training import Trainer

QUICK_UNET = (  # --quick: a U-Net a CPU steps through in well under a second at batch 8
    "model.name=unet",
    "model.channels=8",
    "model.channel_mult=[1,2]",
    "model.num_res_blocks=1",
    "model.attention_resolutions=[]",
    "model.groups=4",
)


# ------------------------------------------------------------------ data
def find_data(given: str | None) -> Path | None:
    """``--data``, else the MNIST test split in the checkout or beside it, else None (synthetic images)."""
    if given:
        return Path(given)
    for candidate in (
        ROOT / "data/mnist-t10k",
        ROOT.parent / "shared/data/mnist-t10k",
        ROOT / "shared/data/mnist-t10k",
    ):
        if candidate.is_dir():
            return candidate
    return None


def synthetic_idx(folder: Path, n: int) -> Path:
    """Blurry random blobs as uint8 1x28x28 images, written as an IDX file (the loader's own format)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:28, :28]
    centres = rng.uniform(6, 22, size=(n, 2, 1, 1))
    images = 255 * np.exp(-((yy - centres[:, 0]) ** 2 + (xx - centres[:, 1]) ** 2) / 30)
    header = b"".join(v.to_bytes(4, "big") for v in (2051, n, 28, 28))
    path = folder / "synthetic-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(header + images.astype(np.uint8).tobytes()))
    return folder


# ------------------------------------------------------------------ device
def cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def reset_peak() -> None:
    """Start a new peak-memory reading (the cache is kept: emptying it would put allocations in the timed block)."""
    if cuda():
        torch.cuda.reset_peak_memory_stats()


def free_cache() -> None:
    if cuda():
        torch.cuda.empty_cache()


def peak_mib() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if cuda() else math.nan


def seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of one call of ``fn`` (synchronized around each call) after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """FLOP/s of n x n x n matrix products in ``dtype`` on ``device``: the best of three timed blocks of ``repeats``
    products (random data), after three warm-up products."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(3):
        for _ in range(3):
            a @ b
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync()
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start))
    return best


def flops_per_item(net: torch.nn.Module, shape: tuple[int, ...], batch: int, bf16: bool) -> float:
    """Model FLOPs of one forward and backward of ``net(x, t)`` per item, counted by torch.utils.flop_counter at
    ``batch`` (a mean-square loss; the optimizer's update is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(net.parameters()).device
    x = torch.randn(batch, *shape, device=device)
    t = torch.rand(batch, device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            loss = net(x, t).float().pow(2).mean()
        loss.backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


# ------------------------------------------------------------------ numbers
def clean(value: Any) -> Any:
    """``value`` with NaN floats as None (strict JSON)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def nfe_text(forward: float | None, backward: float | None) -> str:
    return f"{fmt(forward, 0)} / {fmt(backward, 0)}"


def ratio(a: float, b: float) -> str:
    return "-" if math.isnan(a) or math.isnan(b) or b == 0 else f"{a / b:.2f}x"


# ------------------------------------------------------------------ rows in alternating rounds
@dataclass
class Row:
    """One row of a timing table: ``make()`` builds its step (a callable doing ``items`` units of work: images,
    points, one training step); ``rates`` holds items/s of each round."""

    name: str
    make: Callable[[], Callable[[], object]] | None
    items: int = 1
    note: str = ""
    step: Callable[[], object] | None = None
    rates: list[float] = field(default_factory=list)
    peak: float = math.nan
    warm_s: float = math.nan
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """The best round's items/s (nan if the row did not run)."""
        return max(self.rates) if self.rates else math.nan

    @property
    def ran(self) -> bool:
        return bool(self.rates)

    def status(self) -> str:
        return "ran" if self.ran else (self.error or self.note or "not run")

    def fail(self, e: BaseException) -> None:
        text = str(e).strip().splitlines()
        self.error = f"failed: {type(e).__name__}: {text[0][:160] if text else ''}"
        self.step = None
        print(f"  {self.name}: {self.error}", flush=True)
        if not isinstance(e, torch.cuda.OutOfMemoryError):
            traceback.print_exc(limit=4)
        free_cache()

    def json(self) -> dict[str, Any]:
        return {
            "ran": self.ran,
            "items_per_s": self.rate,
            "rounds": self.rates,
            "peak_mib": self.peak,
            "warmup_s": self.warm_s,
            "note": self.error or self.note,
            **self.extra,
        }


def measure(rows: list[Row], calls: int, warmup: int, rounds: int = 2, out_of_time: Callable[[], bool] | None = None):
    """Build and warm every row up with the same ``warmup`` calls (compilation happens here; its seconds are kept),
    then time ``calls`` calls of each row per round, synchronized around each row's block, the order reversed
    every other round. A row that raises (out of memory, a compile failure) is marked failed and left out."""
    for row in rows:
        if row.make is None or row.error:
            continue
        if out_of_time is not None and out_of_time():
            row.error = "skipped: past the time budget"
            continue
        print(f"  warming up {row.name} ...", flush=True)
        try:
            start = time.perf_counter()
            row.step = row.make()
            for _ in range(warmup):
                row.step()
            sync()
            row.warm_s = time.perf_counter() - start
        except Exception as e:  # noqa: BLE001 - a failed row is reported, the others still run
            row.fail(e)
    for k in range(rounds):
        for row in rows if k % 2 == 0 else rows[::-1]:
            if row.step is None:
                continue
            try:
                sync()
                reset_peak()
                start = time.perf_counter()
                for _ in range(calls):
                    row.step()
                sync()
                row.rates.append(row.items * calls / (time.perf_counter() - start))
                row.peak = max(peak_mib(), row.peak) if not math.isnan(row.peak) else peak_mib()
            except Exception as e:  # noqa: BLE001
                row.fail(e)
                row.rates.clear()
    for row in rows:
        if row.ran:
            print(f"  {row.name}: {row.rate:,.1f} /s (rounds {', '.join(f'{r:,.1f}' for r in row.rates)})", flush=True)


def release(rows: list[Row]) -> None:
    """Drop the rows' steps (their trainers, models and optimizer states)."""
    for row in rows:
        row.step = None
    gc.collect()
    free_cache()


# ------------------------------------------------------------------ trainers
def config(path: str, device: str, overrides: list[str]) -> Config:
    """``configs/<path>`` with its devices section for ``device`` applied, then ``overrides``."""
    return load_config(ROOT / "configs" / path, overrides, device=device)


def trainer(cfg: Config) -> Trainer:
    """A fresh trainer for ``cfg`` (its run directory emptied first; it resets Accelerate's process-wide state
    itself, so each trainer keeps its own mixed precision)."""
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    return Trainer(cfg)


def stepper(tr: Trainer, keep: dict[str, Any] | None = None) -> Callable[[], object]:
    """A training step through the real trainer as between logging steps (no metrics record, no host read); with
    ``keep``, a logging step whose record (loss, NFE forward and backward) updates ``keep``."""
    batches = tr.batches()
    if keep is None:
        return lambda: tr.step(next(batches), full_record=False)
    return lambda: keep.update(tr.step(next(batches), full_record=True) or {})


# ------------------------------------------------------------------ peers' loops
def peer_step(kind: str, cfg: Config, bf16: bool) -> Callable[[], None]:
    """A flow-matching step written the way each library's README writes it (torchcfm's ``ConditionalFlowMatcher``,
    flow_matching's ``AffineProbPath``, or bare PyTorch) on the config's U-Net, batch, Adam and data, eager, with
    bf16 autocast when ``bf16``. ImportError where the peer is not installed."""
    if kind == "torchcfm":
        from torchcfm.conditional_flow_matching import ConditionalFlowMatcher

        matcher = ConditionalFlowMatcher(sigma=0.0)
    elif kind == "flow_matching":
        from flow_matching.path import AffineProbPath
        from flow_matching.path.scheduler import CondOTScheduler

        path = AffineProbPath(scheduler=CondOTScheduler())
    data = build_data(cfg.data)
    device = torch.device("cuda" if cuda() else "cpu")
    torch.manual_seed(0)
    net = build_field(cfg.model, data.shape).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.train.lr)
    train_raw, pre = data.train.to(device), data.preprocess.to(device)
    batch = cfg.train.batch_size

    def step() -> None:
        x1 = pre(train_raw[torch.randint(0, len(train_raw), (batch,), device=device)])
        x0 = torch.randn_like(x1)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            if kind == "torchcfm":
                t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)
            elif kind == "flow_matching":
                t = torch.rand(batch, device=device)
                s = path.sample(t=t, x_0=x0, x_1=x1)
                t, xt, ut = s.t, s.x_t, s.dx_t
            else:
                t = torch.rand(batch, device=device)
                tt = t.view(-1, 1, 1, 1)
                xt, ut = tt * x1 + (1 - tt) * x0, x1 - x0
            loss = (net(xt, t).float() - ut).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------ maximum likelihood
def evaluation_seconds(cfg: Any, device: torch.device, batch: int) -> dict[str, float]:
    """Seconds of one evaluation of the MLE dynamics (Hutchinson trace and the recipe's regularizers) on a U-Net of
    the config at ``batch``: the field alone, reverse mode (a VJP; the adjoint's forward solve), its double backward
    (the adjoint's backward solve), forward mode (a JVP; the compiled solve), and forward mode with its backward."""
    torch.manual_seed(0)
    shape = (1, 28, 28)
    net = build_field(cfg.model, shape).to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    x = torch.randn(batch, *shape, device=device)
    t = torch.full((batch,), 0.5, device=device)
    probe = torch.randint(0, 2, x.shape, device=device).to(x.dtype) * 2 - 1
    obj = cfg.objective
    integrals = ("divergence", *(["kinetic"] if obj.kinetic else []), *(["jacobian"] if obj.jacobian else []))
    zeros = (x.new_zeros(batch),) * len(integrals)

    def dynamics(mode: str, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return Dynamics(net, integrals, "hutchinson", probe, derivatives=mode).rates(0.5, (y, *zeros))

    def backward(mode: str) -> None:
        with torch.enable_grad():
            y = x.detach().requires_grad_(True)
            out = dynamics(mode, y)
            torch.autograd.grad([o.sum() for o in out], [y, *params], allow_unused=True)

    with torch.no_grad():
        result = {
            "field forward": seconds(lambda: net(x, t)),
            "reverse (VJP)": seconds(lambda: dynamics("reverse", x)),
            "forward mode (JVP)": seconds(lambda: dynamics("forward", x)),
        }
    result["reverse + double backward"] = seconds(lambda: backward("reverse"))
    result["forward mode + backward"] = seconds(lambda: backward("forward"))
    return result


def integrals_named(cfg: Any) -> list[str]:
    """What the MLE dynamics of ``cfg`` integrate, in words."""
    obj = cfg.objective
    return ["trace", *(["kinetic"] if obj.kinetic else []), *(["Jacobian"] if obj.jacobian else [])]
