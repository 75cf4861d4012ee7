"""The GPU benchmark: one command, no download.

    python bench/gpu.py                              # on a GPU machine: every table, about 8-10 minutes
    python bench/gpu.py --data DIR --minutes 5       # an IDX folder (e.g. MNIST t10k), 5 min for bits/dim
    python bench/gpu.py --quick                      # a smoke run on any machine, CPU included (seconds)

Data: ``--data DIR`` (IDX files, gzip or not), else the MNIST test split at ``data/mnist-t10k`` in the
checkout or ``../shared/data/mnist-t10k`` beside it, else synthetic 1x28x28 images (throughput only:
their bits/dim mean nothing). One U-Net for every row (``configs/mnist_fm.yaml``: 64 channels,
multipliers 1-2-2, 2 residual blocks, attention at 7x7), batch 256.

1. Images/s of a training step through our real trainer (``Trainer.step`` between logging steps):
   maximum likelihood (Hutchinson, adjoint, dopri5 1e-5 as in configs/mnist_mle.yaml) and flow
   matching with bf16 autocast off and on; peak GPU memory of each.
2. The same flow-matching step in the peers' own loops as their READMEs show them (torchcfm's
   ``ConditionalFlowMatcher``, flow_matching's ``AffineProbPath``; ``pip install .[bench]``) and in a
   bare PyTorch loop, same U-Net, batch, Adam and data; fp32 as they ship, and with bf16 autocast
   added. Ratios are against the best peer row measured in the same run.
3. The minibatch-OT coupling's host round trip (the one deliberate CPU step): its share of a step.
4. The adjoint's memory at growing NFE (solver tolerance 1e-3 → 1e-5): peak memory should stay flat.
5. Bits/dim on the held-out images after ``--minutes`` of flow matching (bf16, OT coupling).

``train.compile=true`` adds a compiled flow-matching row (on a GPU, or with ``--compile`` on a CPU,
where inductor's first steps take minutes); its compile time is in the warm-up, not in images/s.

Writes every figure to bench/out/gpu/gpu.json as well.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import ROOT, table

import flows
from flows.config import load_config
from flows.data import build_data
from flows.nn import build_field
from flows.training import Trainer

UNET = (
    "model.name=unet",
    "model.channels=64",
    "model.channel_mult=[1,2,2]",
    "model.num_res_blocks=2",
    "model.attention_resolutions=[7]",
    "model.groups=32",
)
QUICK_UNET = (
    "model.name=unet",
    "model.channels=8",
    "model.channel_mult=[1,2]",
    "model.num_res_blocks=1",
    "model.attention_resolutions=[]",
    "model.groups=4",
)


# ------------------------------------------------------------------ data
def find_data(given: str | None) -> Path | None:
    if given:
        return Path(given)
    for candidate in (ROOT / "data/mnist-t10k", ROOT.parent / "shared/data/mnist-t10k"):
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


# ------------------------------------------------------------------ timing
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mib() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")


def images_per_second(step: Callable[[], object], batch: int, warmup: int, steps: int) -> tuple[float, float]:
    """(images/s, peak MiB) of ``steps`` calls after ``warmup`` calls, synchronized at both ends only."""
    for _ in range(warmup):
        step()
    sync()
    reset_peak()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return batch * steps / (time.perf_counter() - start), peak_mib()


def trainer_for(out: Path, name: str, overrides: list[str]) -> Trainer:
    """A trainer for one row; it resets Accelerate's process-wide state itself (``flows.training.new_accelerator``),
    so each row sets its own mixed precision."""
    run = out / name
    shutil.rmtree(run, ignore_errors=True)
    return Trainer(load_config(ROOT / "configs/mnist_fm.yaml", [f"run_dir={run}", *overrides]))


def ours(trainer: Trainer) -> Callable[[], object]:
    batches = trainer.batches()
    return lambda: trainer.step(next(batches), full_record=False)


# ------------------------------------------------------------------ peers' loops
def peer_step(kind: str, overrides: list[str], bf16: bool) -> tuple[Callable[[], object], int]:
    """A flow-matching step written the way each library's README writes it, on our U-Net."""
    cfg = load_config(ROOT / "configs/mnist_fm.yaml", overrides)
    data = build_data(cfg.data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    net = build_field(cfg.model, data.shape).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.train.lr)
    train_raw, pre = data.train.to(device), data.preprocess.to(device)
    batch = cfg.train.batch_size
    if kind == "torchcfm":
        from torchcfm.conditional_flow_matching import ConditionalFlowMatcher

        matcher = ConditionalFlowMatcher(sigma=0.0)
    elif kind == "flow_matching":
        from flow_matching.path import AffineProbPath
        from flow_matching.path.scheduler import CondOTScheduler

        path = AffineProbPath(scheduler=CondOTScheduler())

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
            else:  # bare PyTorch
                t = torch.rand(batch, device=device)
                tt = t.view(-1, 1, 1, 1)
                xt, ut = tt * x1 + (1 - tt) * x0, x1 - x0
            loss = (net(xt, t).float() - ut).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, batch


# ------------------------------------------------------------------ the benchmark
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a folder of IDX image files (default: MNIST t10k if found, else synthetic)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed flow-matching steps per row")
    p.add_argument("--mle-steps", type=int, default=3, help="timed maximum-likelihood steps")
    p.add_argument("--minutes", type=float, default=4.0, help="flow-matching training for the bits/dim row")
    p.add_argument("--quick", action="store_true", help="tiny U-Net, batch 8, synthetic data: a smoke run")
    p.add_argument("--compile", action="store_true", help="the train.compile row on a CPU too")
    p.add_argument("--out", default=str(ROOT / "bench/out/gpu"))
    args = p.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.batch, args.steps, args.mle_steps, args.minutes = 8, 2, 1, min(args.minutes, 0.05)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    bf16 = not cuda or torch.cuda.is_bf16_supported()
    folder = None if args.quick else find_data(args.data)
    real = folder is not None
    folder = folder or synthetic_idx(out / "synthetic", 120 if args.quick else 10_000)
    unet = QUICK_UNET if args.quick else UNET
    base = [
        "data.name=idx",
        f"data.path={folder}",
        "data.test_fraction=0.1",
        "data.logit_alpha=0",
        *unet,
        f"train.batch_size={args.batch}",
        "train.warmup_steps=10",
        "train.eval_every=0",
        "train.save_every=1000000",
        "eval.batch_size=250",
        "eval.plot=false",
    ]
    mle = [
        *base,
        "objective.name=mle",
        "objective.trace=hutchinson",
        "objective.kinetic=0.01",
        "objective.jacobian=0.01",
        "data.logit_alpha=1e-6",
        "solver.adjoint=true",
    ]
    fm = [*base, "objective.name=fm"]
    report: dict = {"device": device, "torch": torch.__version__, "data": str(folder), "real_data": real}
    print(f"# flows GPU benchmark on {device}, torch {torch.__version__}, data {folder}\n", flush=True)

    # 1-2. images/s ------------------------------------------------------
    rows: list[list] = []
    results: dict[str, float] = {}

    def add(name: str, step, batch: int, steps: int, warmup: int = 3) -> None:
        ips, mem = images_per_second(step, batch, warmup, steps)
        results[name] = ips
        rows.append([name, ips, mem])
        print(f"{name}: {ips:.1f} images/s, peak {mem:.0f} MiB", flush=True)

    trainer = trainer_for(out, "mle", mle)
    add("flows MLE (Hutchinson, adjoint, dopri5 1e-5)", ours(trainer), args.batch, args.mle_steps, warmup=1)
    del trainer
    precisions = ["no", "bf16"] if bf16 else ["no"]
    for mp in precisions:
        trainer = trainer_for(out, f"fm_{mp}", [*fm, f"train.mixed_precision={mp}"])
        add(f"flows FM ({'bf16' if mp == 'bf16' else 'fp32'})", ours(trainer), args.batch, args.steps)
        del trainer
    if cuda or args.compile:
        trainer = trainer_for(out, "fm_compile", [*fm, f"train.mixed_precision={precisions[-1]}", "train.compile=true"])
        add(f"flows FM ({'bf16' if bf16 else 'fp32'}, compile)", ours(trainer), args.batch, args.steps, warmup=5)
        del trainer
    for kind in ("bare", "torchcfm", "flow_matching"):
        for on in [False, True] if bf16 else [False]:
            name = f"{'bare PyTorch' if kind == 'bare' else kind} FM ({'bf16 autocast' if on else 'fp32'})"
            try:
                step, batch = peer_step(kind, [f"run_dir={out / 'peer'}", *fm], on)
            except ImportError as e:
                rows.append([name, f"not installed ({e.name})", ""])
                continue
            add(name, step, batch, args.steps)
    peers = [v for k, v in results.items() if k.startswith(("torchcfm", "flow_matching"))]
    best_fm = max(v for k, v in results.items() if k.startswith("flows FM"))
    print(f"\n## Training steps, U-Net 1x28x28, batch {args.batch}, {device}\n")
    print(table(["step", "images/s", "peak MiB"], rows))
    if peers:
        print(f"\nflows FM (best) / best peer row: {best_fm / max(peers):.2f}x (target >= 1.5x)")
    report["steps"] = {r[0]: {"images_per_s": r[1], "peak_mib": r[2]} for r in rows}

    # 3. OT coupling share ------------------------------------------------
    mp = "bf16" if bf16 else "no"
    timings = {}
    for coupling in ("independent", "ot"):
        trainer = trainer_for(
            out, f"fm_{coupling}", [*fm, f"train.mixed_precision={mp}", f"objective.coupling={coupling}"]
        )
        timings[coupling], _ = images_per_second(ours(trainer), args.batch, 3, args.steps)
        del trainer
    share = 1 - timings["ot"] / timings["independent"]
    print(
        f"\n## Minibatch OT coupling (host round trip, scipy): {timings['ot']:.1f} vs "
        f"{timings['independent']:.1f} images/s independent: {100 * share:.1f}% of an OT step"
    )
    report["ot_share_of_step"] = share

    # 4. adjoint memory vs NFE ----------------------------------------------
    mem_rows = []
    for tol in ("1e-3", "1e-4", "1e-5"):
        trainer = trainer_for(out, f"mle_{tol}", [*mle, f"solver.atol={tol}", f"solver.rtol={tol}"])
        batches = trainer.batches()
        trainer.step(next(batches), full_record=False)
        sync()
        reset_peak()
        record = trainer.step(next(batches), full_record=True) or {}
        sync()
        mem_rows.append(
            [tol, record.get("nfe_forward", float("nan")), record.get("nfe_backward", float("nan")), peak_mib()]
        )
        del trainer
    print("\n## Adjoint memory of one MLE step as the NFE grows (peak should stay flat)\n")
    print(table(["tolerance", "NFE fwd", "NFE bwd", "peak MiB"], mem_rows))
    report["adjoint_memory"] = mem_rows

    # 5. bits/dim after a fixed time -------------------------------------
    run = out / "bpd_fm"
    shutil.rmtree(run, ignore_errors=True)
    cfg = load_config(
        ROOT / "configs/mnist_fm.yaml",
        [
            f"run_dir={run}",
            *fm,
            f"train.mixed_precision={mp}",
            "objective.coupling=ot",
            "train.steps=1000000",
            f"train.time_limit={args.minutes}",
            "train.log_every=100",
        ],
    )
    start = time.perf_counter()
    result = flows.train(cfg).result or {}  # its Trainer resets Accelerate's state (new_accelerator)
    what = "held-out images" if real else "synthetic images (not a benchmark figure)"
    print(
        f"\n## Bits/dim after {args.minutes:g} min of flow matching ({mp}, OT coupling): "
        f"{result.get('bpd', float('nan')):.4f} on {result.get('n', 0)} {what}, "
        f"{time.perf_counter() - start:.0f} s with evaluation"
    )
    report["bpd"] = {"minutes": args.minutes, **result}
    (out / "gpu.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out / 'gpu.json'}")


if __name__ == "__main__":
    main()
