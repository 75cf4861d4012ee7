"""Peak memory of one maximum-likelihood training step: adjoint vs direct backprop, at 1x and 8x the NFE.

    python bench/adjoint_memory.py                      # 64-D, MLP 3x256, batch 256, rk4 8 and 64 steps
    python bench/adjoint_memory.py --batch 512 --factor 4

The workload is a digits-sized step of ``MaximumLikelihood`` (Hutchinson trace, RNODE kinetic and
Jacobian terms on) with a fixed-step rk4 solver, so the NFE is exactly 4 per step and grows by
exactly ``--factor``. Each configuration runs in its own process: one warm-up step, then three
measured steps, each after handing freed heap back (``malloc_trim``) and resetting the peak
resident memory (``/proc/self/clear_refs``); the table shows the median peak above the memory held
just before the step. The adjoint should stay flat as the NFE grows (target: <= 1.2x at 8x the
NFE); direct backprop stores every evaluation's graph and grows with it. The last column compares
each gradient with direct backprop's at the same steps.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import ROOT, setup_threads, table

from flows.nn import MLPSettings, build_field
from flows.objectives import MaximumLikelihood, MLESettings


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def child(adjoint: bool, steps: int, dim: int, batch: int, width: int, grads_to: str, repeats: int = 3) -> dict:
    setup_threads(1)
    torch.manual_seed(0)
    field = build_field(MLPSettings(hidden=[width] * 3, time_features=16), dim)
    solver = dict(method="rk4", step_size=1.0 / steps, adjoint=adjoint)
    objective = MaximumLikelihood(field, MLESettings(trace="hutchinson", kinetic=0.01, jacobian=0.01), solver)
    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(1))

    def step() -> dict:
        field.zero_grad(set_to_none=True)
        torch.manual_seed(2)  # the same Hutchinson probe in every configuration
        loss, stats = objective(x)
        loss.backward()
        return stats

    step()  # warm-up: lazy initialization
    peaks, times = [], []
    for _ in range(repeats):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the step's own peak shows
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        before = _status_kib("VmRSS")
        start = time.perf_counter()
        stats = step()
        times.append(time.perf_counter() - start)
        peaks.append((_status_kib("VmHWM") - before) / 1024)
    torch.save({n: p.grad for n, p in field.named_parameters()}, grads_to)
    nfe = stats["nfe"]
    return {
        "peak_mib": statistics.median(peaks),
        "seconds": statistics.median(times),
        "nfe_forward": nfe.forward,
        "nfe_backward": nfe.backward,
    }


def run_child(adjoint: bool, steps: int, args, grads_to: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", "adjoint" if adjoint else "direct", str(steps), str(grads_to)]
    cmd += ["--dim", str(args.dim), "--batch", str(args.batch), "--width", str(args.width)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rel_diff(a: dict, b: dict) -> float:
    num = sum((a[k] - b[k]).pow(2).sum() for k in a).sqrt()
    den = sum(b[k].pow(2).sum() for k in b).sqrt()
    return (num / den).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="rk4 steps at 1x (4 NFE each)")
    p.add_argument("--factor", type=int, default=8, help="NFE multiplier")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--out", default=str(ROOT / "bench/out/adjoint_memory"))
    p.add_argument("--child", nargs=3, metavar=("MODE", "STEPS", "GRADS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        mode, steps, grads_to = args.child
        res = child(mode == "adjoint", int(steps), args.dim, args.batch, args.width, grads_to)
        print(json.dumps(res))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for steps in (args.steps, args.steps * args.factor):
        for adjoint in (False, True):
            grads = out / f"{'adjoint' if adjoint else 'direct'}_{steps}.pt"
            results[adjoint, steps] = run_child(adjoint, steps, args, grads), torch.load(grads)
    rows = []
    for adjoint in (False, True):
        base = results[adjoint, args.steps][0]["peak_mib"]
        for steps in (args.steps, args.steps * args.factor):
            res, grads = results[adjoint, steps]
            rows.append(
                [
                    "adjoint" if adjoint else "direct backprop",
                    steps,
                    f"{res['nfe_forward']} / {res['nfe_backward'] if adjoint else '- (graph)'}",
                    f"{res['peak_mib']:.0f}",
                    f"{res['peak_mib'] / base:.2f}x",
                    f"{res['seconds']:.2f}",
                    f"{rel_diff(grads, results[False, steps][1]):.1e}",
                ]
            )
    print(
        f"\n## one MLE step, {args.dim}-D, MLP 3x{args.width}, batch {args.batch}, Hutchinson + RNODE, rk4 (1 thread)\n"
    )
    headers = ["gradients", "rk4 steps", "NFE fwd / bwd", "peak MiB", "vs 1x NFE", "s/step", "grad vs direct"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
