"""Helpers shared by the benchmarks: thread setup, runs through the real trainer, tables."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("TQDM_DISABLE", "1")  # tables only; progress bars would drown them

import flows  # noqa: E402
from flows.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def setup_threads(n: int = 2) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    torch.set_num_threads(n)


def records(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training-step records, evaluation records) of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval" in r]


def train_run(config: str | None, overrides: list[str]) -> tuple[Path, float]:
    cfg = load_config(config, overrides)
    start = time.perf_counter()
    flows.train(cfg)
    return Path(cfg.run_dir), time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    return "\n".join([line, sep, *body])


class Counted(torch.nn.Module):
    """Counts network evaluations of a field (for peers that report no NFE)."""

    def __init__(self, field: torch.nn.Module):
        super().__init__()
        self.field, self.calls = field, 0

    def forward(self, x, t):
        self.calls += 1
        return self.field(x, t)


def train_zuko_for(flow, batch_fn, lr: float, minutes: float) -> int:
    """zuko's CNF trained by Adam on −log p of ``batch_fn()`` batches for ``minutes`` of wall time, then set to
    the exact trace at dopri5 1e-5 for evaluation. Returns the number of steps."""
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 60 * minutes:
        loss = -flow().log_prob(batch_fn()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    transform = flow.transform
    transform.exact, transform.atol, transform.rtol = True, 1e-5, 1e-5
    return steps


def timed(fn, repeats: int = 3):
    """(median seconds, last result) over ``repeats`` calls after one warm-up call."""
    fn()
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return median(times), out


def trained_run(path: str | None, config: str, overrides: list[str], out: Path) -> Path:
    """A run directory to benchmark: the given one, or a short training of ``config`` (cached in out)."""
    if path:
        return Path(path)
    run = out / Path(config).stem
    if not (run / "model.safetensors").exists():
        train_run(str(ROOT / config), [f"run_dir={run}", "eval.plot=false", *overrides])
    return run
