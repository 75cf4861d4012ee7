"""``python sample.py RUN_OR_CHECKPOINT -n N [--out DIR] [--seed S] [solver options]``"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from flows.cli import run_cli


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sample.py", description="Draw samples from a trained flow.")
    p.add_argument("checkpoint", help="run directory or model.safetensors")
    p.add_argument("-n", type=int, default=10_000, help="number of samples (default 10000)")
    p.add_argument("--out", help="output directory (default: the run directory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", help="torchdiffeq method (default: the run's eval solver)")
    p.add_argument("--atol", type=float)
    p.add_argument("--rtol", type=float)
    p.add_argument("--steps", type=int, help="fixed-step methods: number of steps")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)

    def go() -> None:
        import numpy as np
        import torch

        from flows import checkpoint
        from flows.data import build_data
        from flows.errors import FlowsError
        from flows.plotting import plot_2d
        from flows.sampling import sample

        if args.n <= 0:
            raise FlowsError(f"-n must be positive, got {args.n}")
        loaded = checkpoint.load(args.checkpoint, args.weights)
        solver = loaded.config.eval.solver
        changes = {k: v for k, v in (("method", args.method), ("atol", args.atol), ("rtol", args.rtol)) if v}
        if args.steps:
            changes["step_size"] = 1.0 / args.steps
        solver = dataclasses.replace(solver, **changes)
        out = Path(args.out) if args.out else loaded.path.parent
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        x, nfe = sample(loaded.field, args.n, (loaded.dim,), solver, generator=torch.Generator().manual_seed(args.seed))
        seconds = time.perf_counter() - start
        data = loaded.preprocess.inverse(x).numpy()
        np.savez(out / "samples.npz", samples=data)
        info = {
            "n": args.n,
            "nfe": nfe,
            "seconds": seconds,
            "solver": dataclasses.asdict(solver),
            "checkpoint": str(loaded.path),
            "step": loaded.step,
            "weights": args.weights,
        }
        written = [out / "samples.npz"]
        if loaded.dim == 2:
            reference = build_data(loaded.config.data).test.numpy()
            written.append(
                plot_2d(out / "samples_scatter.png", reference, data, title=f"{args.n:,} samples, NFE {nfe}")
            )
        print(json.dumps(info, indent=2))
        print("wrote " + ", ".join(str(w) for w in written))

    run_cli(go)


if __name__ == "__main__":
    main()
