"""The GPU benchmark of issue 19: one command, no download, every figure in bench/out/gpu/gpu.json.

On the H200 (estimated 6-8 minutes, half of it torch.compile warm-ups; rows not started after ``--budget`` = 6.5
minutes are skipped and say so). First, here: copy the MNIST t10k IDX folder to ``data/mnist-t10k`` (untracked, so it
travels; do not commit it) and, for the peer rows, wheels of torchcfm, flow_matching and POT in an ignored ``.whl``
folder (the device README's pip download line). Then one device run, from the repository root (timeout ~590 s):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site;
    PYTHONUNBUFFERED=1 python3 bench/gpu.py 2>&1 | tee $OUT/gpu.log; cp bench/out/gpu/gpu.json $OUT/

Elsewhere:

    python bench/gpu.py --tables 4 5                 # some tables only (numbers below)
    python bench/gpu.py --data DIR                   # IDX images (MNIST t10k); else data/mnist-t10k, else synthetic
    python bench/gpu.py --minutes 5 --tables 6       # bits/dim after 5 min of flow matching (needs real images)
    OMP_NUM_THREADS=1 python bench/gpu.py --quick    # the smoke run on a CPU (~40 s): tiny sizes, no compiled rows
    OMP_NUM_THREADS=1 python bench/gpu.py --quick --compile --tables 2   # the compiled rows on a CPU too (minutes)

Tables (issue 19's targets in brackets). Table 3 runs first when selected: tables 1 and 2 then use its trained
checkerboard field (else random weights, for throughput only, as they say).

1. Batches from memory [exact 2-D log-density of 200k points >= 1M points/s with default arguments; evaluate.py's
   path on 10k points < 0.5 s]: ``Flow.log_prob(x)`` with the batch it chooses from free memory vs
   ``batch_size=1000`` (the old default), and ``gathered_log_prob`` (evaluate.py, the trainer's evaluations) on
   10k held-out points; exact trace, dopri5 1e-5.
2. Training step of the embedded default [toy2d MLE step at batch 256 >= 4x today's steps/s]: steps/s through the
   real trainer (``Trainer.step`` between logging steps) for the CPU recipe as before (dopri5 1e-4, direct backprop,
   a host read every step), dopri5 reading the host every 8 steps, and rk4 at the GPU section's step: eager (flows'
   sync-free loop), compiled, and compiled with ``reduce-overhead`` (CUDA graphs); at batch 256 and 1024, ratios
   against the first row at the same batch. The held-out NLL at equal steps is bench/fixed_step.py's (the command
   is printed).
3. The embedded default for 1 minute [held-out NLL <= 3.55 nats]: ``flows.train("configs/toy2d_mle.yaml",
   train.time_limit=1)``, its ``devices`` section applied for the device; GPU only (``--quick``: 0.05 min on CPU).
4. Flow matching at the shipped image recipe [>= 1.5x the best peer's loop at the same batch and precision;
   >= 15% model FLOPs utilization]: configs/mnist_fm.yaml with its devices section (on a GPU: batch 1024, bf16,
   compiled) through our trainer, the same without compile, and the peers' loops as they ship them (torchcfm,
   flow_matching, bare PyTorch; eager, bf16 autocast) on the same U-Net, batch and data. MFU = img/s x model FLOPs
   per image (torch.utils.flop_counter, one forward and backward) / the card's bf16 matrix rate measured here
   (8192^3 products; a CPU: float32, 1024^3).
5. Maximum likelihood on images [>= 3x today's img/s at batch 256]: configs/mnist_mle.yaml (its U-Net) at batch
   256: today's recipe (Hutchinson, adjoint, dopri5 1e-5), training tolerance 1e-3, rk4 8 steps with the adjoint,
   rk4 8 steps without it, each step's graph recomputed in the backward (solver.checkpoint: forward-mode
   Hutchinson), eager and compiled; img/s, NFE, peak memory; then where a step's time goes
   (one field forward, one reverse-mode (VJP) and one forward-mode (JVP) evaluation of the augmented dynamics, the
   adjoint's double backward) and the train.py commands for bits/dim after 5 minutes per variant.
6. Bits/dim on held-out images after ``--minutes`` of flow matching (shipped recipe, OT coupling); off by default.

Timing: every row of a table is built and warmed up with the same number of steps (compilation happens there and
its seconds are reported), then timed in rounds, synchronized around each row's block, the order of rows reversed
every other round; the best round is reported, ratios are against a row of the same run. A row that fails (out of
memory, a compile error) is reported as failed and the others still run; past ``--budget`` minutes the remaining
rows are skipped (and say so). gpu.json is rewritten after every table.

Peers: ``pip install .[bench]`` (or the wheels above); a missing peer is a row that says "not installed".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # flows from this checkout, installed or not

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from common import ROOT, table  # noqa: E402
from gpu_rows import (  # noqa: E402
    QUICK_UNET,
    Row,
    clean,
    config,
    evaluation_seconds,
    find_data,
    flops_per_item,
    fmt,
    installed,
    integrals_named,
    matmul_rate,
    measure,
    nfe_text,
    peer_step,
    ratio,
    release,
    stepper,
    synthetic_idx,
    trainer,
)

import flows  # noqa: E402
from flows.build import make_flow  # noqa: E402
from flows.data import build_data  # noqa: E402
from flows.evaluation import gathered_log_prob  # noqa: E402
from flows.nn import build_field  # noqa: E402
from flows.training.accelerator import new_accelerator, run_device  # noqa: E402

ORDER = (3, 1, 2, 4, 5, 6)  # table 3 first: tables 1 and 2 use its trained field
PEERS = {"bare PyTorch loop": "bare", "torchcfm": "torchcfm", "flow_matching": "flow_matching"}


@dataclass
class Bench:
    """What every table needs: the options, the device, the output folder, the clock and the report."""

    args: argparse.Namespace
    out: Path
    kind: str  # the device type the runs use: cuda, cpu
    device: torch.device
    report: dict[str, Any]
    start: float = field(default_factory=time.perf_counter)
    toy_run: Path | None = None  # table 3's run, once it has run
    images: Path | None = None

    @property
    def quick(self) -> bool:
        return self.args.quick

    def compiled(self) -> bool:
        """Whether compiled rows run: on a GPU, or with --compile."""
        return self.kind == "cuda" or self.args.compile

    def out_of_time(self) -> bool:
        return self.args.budget > 0 and time.perf_counter() - self.start > 60 * self.args.budget

    def save(self, number: int, result: dict[str, Any]) -> None:
        self.report["tables"][str(number)] = result
        (self.out / "gpu.json").write_text(json.dumps(clean(self.report), indent=2, default=str))

    def image_overrides(self, name: str) -> list[str]:
        """A trainer's keys for the benchmark's images: the IDX folder, no evaluation or checkpoint while timed."""
        quick = [*QUICK_UNET, "train.batch_size=8"] if self.quick else []
        return [
            f"run_dir={self.out / name}",
            "data.name=idx",
            f"data.path={self.images}",
            "data.test_fraction=0.1",
            "train.eval_every=0",
            "train.save_every=1000000",
            "eval.plot=false",
            *quick,
        ]


# ------------------------------------------------------------------ table 3: the embedded default for 1 minute
def table_minute(b: Bench) -> dict[str, Any]:
    if b.kind != "cuda" and not b.quick:
        print("skipped on a CPU (the README has the CPU's 9 minutes); --quick runs it for 0.05 min")
        return {"ran": False, "note": "CPU"}
    minutes = 0.05 if b.quick else b.args.toy_minutes
    run_dir = b.out / "toy2d_minute"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"train.time_limit={minutes}", f"run_dir={run_dir}", "eval.plot=false"]
    if b.quick:
        overrides += ["data.train_size=20000", "data.test_size=2000"]
    start = time.perf_counter()
    run = flows.train(str(ROOT / "configs/toy2d_mle.yaml"), overrides=overrides)
    wall = time.perf_counter() - start
    res = json.loads((run.path / "eval.json").read_text())
    s, tc = run.config.solver, run.config.train
    solve = f"{s.method} {'step ' + str(s.step_size) if s.step_size else f'tol {s.atol:g}'}"
    recipe = f"batch {tc.batch_size}, lr {tc.lr:g}, {solve}, compile={s.compile}, adjoint={s.adjoint}"
    b.toy_run = run.path
    print(f"\n## 3. configs/toy2d_mle.yaml, train.time_limit={minutes:g} ({b.kind} section: {recipe})\n")
    rows = [
        [
            res["step"],
            fmt(res["train_time"]),
            f"{res['nll']:.4f} ± {res['nll_se']:.4f} ({res['n']:,} points)",
            fmt(wall),
        ]
    ]
    print(table(["steps", "train s", "held-out NLL (nats)", "wall s (with evaluation)"], rows))
    print("target on an H200: <= 3.55 nats after 1 minute (before: 271 steps, 3.814; a 2-core CPU: 3.54 in 9 min)")
    return {"ran": True, "minutes": minutes, "recipe": recipe, "wall_s": wall, **res}


# ------------------------------------------------------------------ table 1: batches from memory
def table_memory(b: Bench) -> dict[str, Any]:
    n, n_small, n_eval = (3_000, 2_000, 2_000) if b.quick else (200_000, 10_000, 10_000)
    cfg = config(
        "toy2d_mle.yaml",
        b.kind,
        [f"run_dir={b.out / 'memory'}", f"data.train_size={n}", f"data.test_size={n_eval}"],
    )
    data = build_data(cfg.data)
    if b.toy_run is not None:
        flow, weights = flows.load(b.toy_run, device=b.device), "trained weights (table 3's run)"
    else:
        torch.manual_seed(0)
        field_ = build_field(cfg.model, data.shape)
        flow = make_flow(cfg, field_, data.preprocess, data.shape).to(b.device)
        weights = "random weights (throughput only: a trained field takes more NFE)"
    x, xe = data.train[:n].to(b.device), data.test[:n_eval]
    acc = new_accelerator(cfg)
    generator = torch.Generator(b.device).manual_seed(0)
    nfe: dict[str, float] = {}
    chosen: dict[str, int] = {}  # the points per solve each call used (its info's batch_size)

    def solve(name: str, points: torch.Tensor, batch: int | None) -> Callable[[], Callable[[], object]]:
        def step() -> None:
            info = flow.log_prob(points, batch_size=batch, return_info=True)[1]
            nfe[name], chosen[name] = info["nfe"], info["batch_size"]

        return lambda: step

    def evaluate() -> None:
        info = gathered_log_prob(acc, flow, xe, None, generator, trace=cfg.eval.trace)[2]
        nfe[rows[2].name], chosen[rows[2].name] = info["nfe"], info["batch_size"]

    names = [
        "log_prob(x), default arguments",
        "log_prob(x, batch_size=1000), the old default",
        "gathered_log_prob (evaluate.py), default batch",
    ]
    rows = [
        Row(names[0], solve(names[0], x, None), n),
        Row(names[1], solve(names[1], x[:n_small], 1000), n_small),
        Row(names[2], lambda: evaluate, n_eval),
    ]
    measure(rows, calls=1, warmup=1, out_of_time=b.out_of_time)
    base = rows[1].rate
    print(f"\n## 1. Exact 2-D log-density (dopri5 1e-5), MLP 3x64 tanh, {weights}, {b.kind}\n")
    body = [
        [r.name, f"{r.items:,}", f"{chosen.get(r.name, 0):,}", fmt(r.rate, 0), fmt(r.items / r.rate, 3)]
        + [fmt(nfe.get(r.name, math.nan), 0), ratio(r.rate, base), r.status()]
        for r in rows
    ]
    heads = ["call", "points", "batch", "points/s", "s per call", "NFE per solve", "vs batch 1000", "row"]
    print(table(heads, body))
    print("targets on an H200: default arguments >= 1M points/s on 200k points; evaluate.py's path on 10k < 0.5 s")
    if b.kind == "cpu":
        print("(on a CPU the default batch stays 1,000 / 2,000 unless memory is short: the rows solve alike)")
    return {
        "weights": weights,
        "batch_chosen": chosen.get(names[0]),
        "eval_batch_chosen": chosen.get(names[2]),
        "rows": {r.name: r.json() | {"points": r.items, "nfe": nfe.get(r.name)} for r in rows},
    }


# ------------------------------------------------------------------ table 2: the toy MLE step
def toy_recipes(step: float) -> dict[str, list[str]]:
    """Table 2's training solves; ``step``: the rk4 step of the toy config's GPU section."""
    rk4 = ["solver.method=rk4", f"solver.step_size={step}"]
    dopri5 = ["solver.method=dopri5", "solver.atol=1e-4", "solver.rtol=1e-4", "solver.step_size=null"]
    return {
        "dopri5 1e-4, host read every step (before)": [*dopri5, "solver.sync_every=1", "solver.compile=false"],
        "dopri5 1e-4, host read every 8 steps": [*dopri5, "solver.sync_every=8", "solver.compile=false"],
        f"rk4 {step}, eager (sync-free loop)": [*rk4, "solver.compile=false"],
        f"rk4 {step}, compiled": [*rk4, "solver.compile=true"],
        f"rk4 {step}, compiled reduce-overhead": [*rk4, "solver.compile=reduce-overhead"],
    }


def table_toy_step(b: Bench) -> dict[str, Any]:
    batches = (64, 256) if b.quick else (256, 1024)
    start = f"train.init_from={b.toy_run}" if b.toy_run is not None else None
    weights = "from table 3's trained weights" if start else "from random weights (NFE of dopri5 grows with training)"
    step = config("toy2d_mle.yaml", "cuda", []).solver.step_size or 0.05  # the GPU section's rk4 step
    result: dict[str, Any] = {"start": weights, "rk4_step": step}
    body = []
    trainers: dict[str, Any] = {}  # this batch's, by row: one logging step more after the timing

    def make(name: str, overrides: list[str]) -> Callable[[], Callable[[], object]]:
        def build() -> Callable[[], object]:
            trainers[name] = tr = trainer(config("toy2d_mle.yaml", b.kind, overrides))
            return stepper(tr)

        return build

    for batch in batches:
        rows = []
        for i, (name, recipe) in enumerate(toy_recipes(step).items()):
            overrides = [
                *recipe,
                "solver.adjoint=false",
                f"run_dir={b.out / f'toy_{batch}_{i}'}",
                f"train.batch_size={batch}",
                "train.eval_every=0",
                "train.save_every=1000000",
                "eval.plot=false",
                "data.train_size=200000",
                *([start] if start else []),
            ]
            skip = not recipe[-1].endswith("=false") and not b.compiled()  # a compiled recipe
            rows.append(Row(name, None if skip else make(name, overrides), 1, "skipped: --compile" if skip else ""))
        measure(rows, calls=3 if b.quick else 10, warmup=2 if b.quick else 3, out_of_time=b.out_of_time)
        for row in rows:  # one logging step more: the NFE of the recipe
            if row.name in trainers and row.ran:
                tr = trainers[row.name]
                rec = tr.step(next(tr.batches()), full_record=True) or {}
                row.extra = {"nfe_forward": rec.get("nfe_forward"), "nfe_backward": rec.get("nfe_backward")}
        base = rows[0].rate
        for row in rows:
            nfe = nfe_text(row.extra.get("nfe_forward"), row.extra.get("nfe_backward"))
            body.append(
                [batch, row.name, fmt(row.rate, 2), fmt(1e3 / row.rate, 1), nfe, ratio(row.rate, base)]
                + [fmt(row.peak, 0), fmt(row.warm_s), row.status()]
            )
        result[str(batch)] = {r.name: r.json() for r in rows}
        trainers.clear()
        release(rows)
    print(f"\n## 2. Toy MLE training step (checkerboard, MLP 3x64, exact trace), {weights}, {b.kind}\n")
    heads = ["batch", "training solve", "steps/s", "ms/step", "NFE fwd / bwd", "vs before", "peak MiB", "warm-up s"]
    print(table([*heads, "row"], body))
    print("target on an H200: batch 256 >= 4x today's steps/s (before: 7.8 steps/s at 256, 7.2 at 4,096)")
    print(
        "held-out NLL at equal steps (1,500 per row): python bench/fixed_step.py --batch 256 [--mode reduce-overhead]"
    )
    return result


# ------------------------------------------------------------------ table 4: flow matching at the shipped recipe
def table_fm(b: Bench) -> dict[str, Any]:
    extra = [f"train.compile={str(b.compiled()).lower()}"] if b.kind != "cuda" else []
    if b.quick:  # the GPU section's precision, so that the smoke run takes the same paths
        extra.append("train.mixed_precision=bf16")
    cfg = config("mnist_fm.yaml", b.kind, [*b.image_overrides("fm"), *extra])
    batch, bf16, compiled = cfg.train.batch_size, cfg.train.mixed_precision == "bf16", cfg.train.compile
    precision = "bf16" if bf16 else "fp32"
    eager = config("mnist_fm.yaml", b.kind, [*b.image_overrides("fm_eager"), *extra, "train.compile=false"])
    rows = [
        Row(f"flows, shipped ({precision}, compile={compiled})", lambda: stepper(trainer(cfg)), batch),
        Row(f"flows, shipped without compile ({precision})", lambda: stepper(trainer(eager)), batch),
    ]
    if not compiled:
        rows[1] = Row(rows[1].name, None, batch, "same as the shipped row here")
    for name, kind in PEERS.items():
        module = None if kind == "bare" else kind
        missing = module is not None and not installed(module)

        def make(kind: str = kind) -> Callable[[], object]:
            return peer_step(kind, eager, bf16)

        rows.append(Row(f"{name} ({precision} autocast, eager)", None if missing else make, batch))
        if missing:
            rows[-1].note = f"not installed ({module})"
    measure(rows, calls=3 if b.quick else 20, warmup=2 if b.quick else 5, out_of_time=b.out_of_time)
    release(rows)
    net = build_field(cfg.model, (1, 28, 28)).to(b.device)
    per_image = flops_per_item(net, (1, 28, 28), batch, bf16)
    del net
    if b.kind == "cuda":
        peak, peak_what = matmul_rate(b.device, torch.bfloat16, 8192, 20), "bf16 8192^3 products"
    else:
        size = 512 if b.quick else 1024
        peak, peak_what = matmul_rate(b.device, torch.float32, size, 3), f"float32 {size}^3 products (a CPU)"
    peers = [r.rate for r in rows[2:] if r.ran]
    best_peer = max(peers) if peers else math.nan
    body = [
        [r.name, fmt(r.rate, 0), ratio(r.rate, best_peer), fmt(100 * r.rate * per_image / peak, 1)]
        + [fmt(r.peak, 0), fmt(r.warm_s), r.status()]
        for r in rows
    ]
    print(f"\n## 4. Flow matching, configs/mnist_fm.yaml ({b.kind} section), U-Net 1x28x28, batch {batch:,}\n")
    print(table(["step", "img/s", "vs best peer", "MFU %", "peak MiB", "warm-up s", "row"], body))
    print(
        f"model FLOPs per image (forward + backward, flop_counter): {per_image / 1e9:.3f} GFLOP; "
        f"measured matrix rate: {peak / 1e12:.1f} TFLOP/s ({peak_what})"
    )
    print(
        f"flows shipped / best peer: {ratio(rows[0].rate, best_peer)} (target >= 1.5x); "
        f"MFU {fmt(100 * rows[0].rate * per_image / peak, 1)}% (target >= 15%)"
    )
    return {
        "batch": batch,
        "precision": precision,
        "compile": compiled,
        "flops_per_image": per_image,
        "matrix_flops_per_s": peak,
        "matrix_what": peak_what,
        "rows": {r.name: r.json() | {"mfu": r.rate * per_image / peak} for r in rows},
    }


# ------------------------------------------------------------------ table 5: maximum likelihood on images
MLE_VARIANTS = {
    "today: dopri5 1e-5, adjoint": [],
    "training tolerance 1e-3": ["solver.atol=1e-3", "solver.rtol=1e-3"],
    "rk4 8 steps, adjoint": ["solver.method=rk4", "solver.step_size=0.125"],
    "rk4 8 steps, checkpointed, no adjoint": [
        "solver.method=rk4",
        "solver.step_size=0.125",
        "solver.adjoint=false",
        "solver.checkpoint=true",
    ],
    "rk4 8 steps, compiled + checkpointed": [
        "solver.method=rk4",
        "solver.step_size=0.125",
        "solver.adjoint=false",
        "solver.compile=true",
        "solver.checkpoint=true",
    ],
}


def table_mle(b: Bench) -> dict[str, Any]:
    batch = 8 if b.quick else 256
    base = [*b.image_overrides("mle"), f"train.batch_size={batch}"]
    cfg = config("mnist_mle.yaml", b.kind, base)
    try:  # first: a failed compile below can leave forward-mode AD unusable in this process
        evals = evaluation_seconds(cfg, b.device, batch)
    except Exception as e:  # noqa: BLE001 - the step rows still run
        print(f"  evaluation timings failed: {type(e).__name__}: {e}")
        evals = {}
    records: dict[str, dict[str, Any]] = {}
    rows = []
    for i, (name, change) in enumerate(MLE_VARIANTS.items()):
        variant = config("mnist_mle.yaml", b.kind, [*base, f"run_dir={b.out / f'mle_{i}'}", *change])
        records[name] = {}
        skip = variant.solver.compile and not b.compiled()

        def make(variant: Any = variant, keep: dict[str, Any] = records[name]) -> Callable[[], object]:
            return stepper(trainer(variant), keep)

        rows.append(Row(name, None if skip else make, batch, "skipped: --compile" if skip else ""))
    measure(rows, calls=1, warmup=1, out_of_time=b.out_of_time)
    release(rows)
    today = rows[0].rate
    body, where = [], []
    for row in rows:
        rec = records[row.name]
        f, bwd = rec.get("nfe_forward", math.nan), rec.get("nfe_backward", math.nan)
        body.append(
            [row.name, fmt(row.rate, 1), ratio(row.rate, today), nfe_text(f, bwd), fmt(row.peak, 0)]
            + [fmt(row.warm_s), row.status()]
        )
        row.extra = {"nfe_forward": f, "nfe_backward": bwd}
        if row.ran and evals:
            if "checkpointed" in row.name:  # forward-mode evaluations with their backward (eager times)
                est = f * evals["forward mode + backward"]
            else:  # the adjoint: VJP evaluations forward, double-backward evaluations backward
                est = f * evals["reverse (VJP)"] + bwd * evals["reverse + double backward"]
            step = batch / row.rate
            where.append([row.name, fmt(step, 3), fmt(est, 3), fmt(100 * (1 - est / step), 0)])
    print(f"\n## 5. Maximum likelihood on images, configs/mnist_mle.yaml's U-Net, batch {batch}, {b.kind}\n")
    print(table(["training solve", "img/s", "vs today", "NFE fwd / bwd", "peak MiB", "warm-up s", "row"], body))
    print("target on an H200: >= 3x today's img/s at batch 256 (before: 18 img/s, NFE 50 / 62, 17 GB)")
    if evals:
        print(f"\none evaluation of the dynamics (Hutchinson, {', '.join(integrals_named(cfg))}), batch {batch}:\n")
        print(table(["evaluation", "ms"], [[k, fmt(1e3 * v, 2)] for k, v in evals.items()]))
        print("\nwhere a step's time goes: NFE x evaluation times (eager) against the measured step\n")
        heads = ["training solve", "measured s/step", "NFE x evaluations s", "% elsewhere (syncs, solver, optimizer)"]
        print(table(heads, where))
    images = b.images if b.report["real_images"] else "DIR"  # an IDX folder of MNIST (t10k: 1,000 held out)
    print("\nheld-out bits/dim after 5 minutes per variant, one command each (DIR: an IDX folder such as MNIST t10k):")
    for i, (name, change) in enumerate(MLE_VARIANTS.items()):
        print(
            f"  python train.py --config configs/mnist_mle.yaml data.name=idx data.path={images} "
            f"data.test_fraction=0.1 train.batch_size=256 train.time_limit=5 run_dir=runs/mle5_{i} "
            f"{' '.join(change)}   # {name}"
        )
    return {"batch": batch, "rows": {r.name: r.json() for r in rows}, "evaluation_s": evals}


# ------------------------------------------------------------------ table 6: bits/dim after minutes
def table_bpd(b: Bench) -> dict[str, Any]:
    if b.args.minutes <= 0:
        print("skipped (--minutes 0)")
        return {"ran": False}
    minutes = min(b.args.minutes, 0.05) if b.quick else b.args.minutes
    extra = ["train.mixed_precision=bf16"] if b.quick else []
    overrides = [*b.image_overrides("bpd"), *extra, "objective.coupling=ot", "train.steps=1000000"]
    cfg = config("mnist_fm.yaml", b.kind, [*overrides, f"train.time_limit={minutes}", "train.log_every=100"])
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    start = time.perf_counter()
    result = flows.train(cfg).result or {}
    what = "held-out images" if b.report["real_images"] else "synthetic images (not a benchmark figure)"
    print(
        f"\n## 6. Bits/dim after {minutes:g} min of flow matching (shipped {b.kind} recipe, OT coupling): "
        f"{result.get('bpd', math.nan):.4f} ± {result.get('bpd_se', math.nan):.4f} on {result.get('n', 0)} {what}, "
        f"{time.perf_counter() - start:.0f} s with evaluation"
    )
    return {"ran": True, "minutes": minutes, **result}


TABLES: dict[int, Callable[[Bench], dict[str, Any]]] = {
    1: table_memory,
    2: table_toy_step,
    3: table_minute,
    4: table_fm,
    5: table_mle,
    6: table_bpd,
}


# ------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", type=int, nargs="+", choices=sorted(TABLES), default=[1, 2, 3, 4, 5, 6])
    p.add_argument("--data", help="a folder of IDX image files (default: MNIST t10k if found, else synthetic)")
    p.add_argument("--minutes", type=float, default=0.0, help="table 6: minutes of flow matching (0: skip)")
    p.add_argument("--toy-minutes", type=float, default=1.0, help="table 3: minutes of training")
    p.add_argument("--budget", type=float, default=6.5, help="minutes after which rows not yet started are skipped")
    p.add_argument("--quick", action="store_true", help="tiny sizes and synthetic images: a smoke run on any machine")
    p.add_argument("--compile", action="store_true", help="the compiled rows on a CPU too (inductor takes minutes)")
    p.add_argument("--out", default=str(ROOT / "bench/out/gpu"))
    args = p.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kind, _ = run_device()
    device = torch.device(kind)
    name = torch.cuda.get_device_name() if kind == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    folder = None if args.quick else find_data(args.data)
    real = folder is not None
    folder = folder or synthetic_idx(out / "synthetic", 120 if args.quick else 10_000)
    peers = {m: installed(m) for m in ("torchcfm", "flow_matching")}
    report = {
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "quick": args.quick,
        "data": str(folder),
        "real_images": real,
        "peers_installed": peers,
        "tables": {},
    }
    b = Bench(args, out, kind, device, report, images=folder)
    print(f"# flows GPU benchmark (issue 19) on {name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"# images: {folder} ({'real' if real else 'synthetic'}); peers installed: {peers}", flush=True)
    timings: dict[int, float] = {}
    for number in [n for n in ORDER if n in args.tables]:
        print(f"\n# table {number} at {time.perf_counter() - b.start:.0f} s ...", flush=True)
        start = time.perf_counter()
        if b.out_of_time():
            print(f"table {number} skipped: past the --budget of {args.budget:g} min")
            result: dict[str, Any] = {"ran": False, "note": "past the time budget"}
        else:
            try:
                result = TABLES[number](b)
            except Exception as e:  # noqa: BLE001 - the other tables still run
                traceback.print_exc()
                print(f"table {number} failed: {type(e).__name__}: {e}")
                result = {"ran": False, "note": f"failed: {type(e).__name__}: {e}"}
        timings[number] = time.perf_counter() - start
        b.save(number, result | {"seconds": timings[number]})
    total = time.perf_counter() - b.start
    print(f"\n# seconds per table: {', '.join(f'{n}: {s:.0f}' for n, s in timings.items())}; total {total:.0f} s")
    print(f"# wrote {out / 'gpu.json'}")


if __name__ == "__main__":
    main()
