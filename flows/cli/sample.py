"""``python sample.py RUN_OR_CHECKPOINT -n N [--out DIR] [--seed S] [solver options]``

``accelerate launch sample.py ...`` splits the samples over processes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flows.cli import run_cli
from flows.ode import SOLVER_METHODS


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sample.py", description="Draw samples from (or encode data with) a trained flow.")
    p.add_argument("checkpoint", help="run directory or model.safetensors")
    p.add_argument("-n", type=int, default=10_000, help="number of samples (default 10000)")
    p.add_argument("--out", help="output directory (default: <run>/samples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--method", choices=SOLVER_METHODS, help="torchdiffeq method (default: the run's evaluation solver, dopri5)"
    )
    p.add_argument("--atol", type=float)
    p.add_argument("--rtol", type=float)
    p.add_argument("--steps", type=int, help="fixed-step methods (euler, midpoint, rk4): number of steps")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--trajectories", type=int, default=0, metavar="K", help="also save K sample paths (and a picture)")
    p.add_argument(
        "--encode", action="store_true", help="reverse mode: map data (the run's test split, or --data) to noise"
    )
    p.add_argument("--data", help="with --encode: .npy/.npz of raw points")
    p.add_argument("--chunk", type=int, default=10_000, help="points per solve (bounds memory)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)

    def go() -> None:
        import numpy as np
        import torch
        from accelerate import Accelerator
        from accelerate.utils import gather_object

        from flows.api import load
        from flows.errors import FlowsError

        if args.n <= 0 or args.chunk <= 0:
            raise FlowsError(f"-n and --chunk must be positive (got {args.n}, {args.chunk})")
        acc = Accelerator()
        model = load(args.checkpoint, args.weights, acc.device)
        solve = dict(method=args.method, atol=args.atol, rtol=args.rtol, steps=args.steps)
        model.solve_options(**solve)  # bad values: an error before any work
        out = Path(args.out) if args.out else model.path.parent / ("codes" if args.encode else "samples")
        x, start, info = (encode_share if args.encode else sample_share)(args, model, acc, solve)
        straightness_sum = info["straightness"] * len(x)  # this process's mean, weighted to combine them
        parts = gather_object(
            [(x.cpu(), start.cpu(), info["kinetic"].cpu(), info["nfe"], info["seconds"], straightness_sum)]
        )
        if not acc.is_main_process:
            return
        x, start, kinetic = (torch.cat([p[i] for p in parts]) for i in range(3))
        out.mkdir(parents=True, exist_ok=True)
        summary = {
            "mode": "encode" if args.encode else "sample",
            "n": len(x),
            "nfe": sum(p[3] for p in parts),
            "seconds": max(p[4] for p in parts),
            "kinetic_energy": kinetic.mean().item(),
            "straightness": sum(p[5] for p in parts) / len(x),
            "processes": acc.num_processes,
            "device": str(acc.device),
            "solver": info["solver"],
            "checkpoint": str(model.path),
            "step": model.step,
            "weights": args.weights,
        }
        written = []
        if args.encode:
            np.savez(out / "codes.npz", codes=x.numpy(), data=start.numpy())
            summary |= {"code_mean": x.mean().item(), "code_std": x.std().item()}
            written.append(out / "codes.npz")
        else:
            np.savez(out / "samples.npz", samples=x.numpy(), noise=start.numpy())
            written.append(out / "samples.npz")
            written += pictures(model, x, out, args, summary)
        (out / "info.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2))
        print("wrote " + ", ".join(str(w) for w in [*written, out / "info.json"]))

    run_cli(go)


def encode_share(args: argparse.Namespace, model, acc, solve: dict):
    """This process's share of the points (the run's test split, or --data) mapped to noise."""
    from flows.data import build_data, check_shape, load_array
    from flows.errors import FlowsError

    if not args.data and model.config is None:
        raise FlowsError(f"'{model.path}' carries no run config, so no test split to encode: pass --data FILE.")
    raw = load_array(args.data, ndim=None) if args.data else build_data(model.config.data).test
    check_shape(raw, model.shape, args.data or "test split")
    mine = raw[: args.n][acc.process_index :: acc.num_processes]
    x, info = model.encode(mine, chunk=args.chunk, return_info=True, progress=acc.is_local_main_process, **solve)
    return x, mine, info


def sample_share(args: argparse.Namespace, model, acc, solve: dict):
    """This process's share of the samples, from its own seed."""
    import torch

    share = args.n // acc.num_processes + int(acc.process_index < args.n % acc.num_processes)
    gen = torch.Generator(acc.device).manual_seed(args.seed + 1_000_003 * acc.process_index)
    x, info = model.sample(
        share, generator=gen, chunk=args.chunk, return_info=True, progress=acc.is_local_main_process, **solve
    )
    return x, info["noise"], info


def pictures(model, data, out: Path, args, summary: dict) -> list[Path]:
    """A grid of image samples; for 2D data, samples beside the density (and ``--trajectories`` paths)."""
    import numpy as np
    import torch

    from flows.data import DATASETS, build_data
    from flows.ode import solve_path
    from flows.plotting import plot_2d, plot_paths
    from flows.report import grid_log_density, save_grid

    written = []
    kind = DATASETS.get(model.config.data.name) if model.config is not None else None
    picture = model.shape if len(model.shape) == 3 else kind.image_shape if kind else None
    if picture:  # images, or vectors that are pictures (digits as 64-D vectors)
        images = data[:64].reshape(-1, *picture)
        written.append(save_grid(images / (model.levels - 1), out / "samples_grid.png"))  # levels → [0, 1]
    if model.dim != 2 or model.config is None:  # the density picture needs the run's data as reference
        return written
    solve = dict(method=args.method, atol=args.atol, rtol=args.rtol, steps=args.steps)
    reference = build_data(model.config.data).test.numpy()
    lp, extent = grid_log_density(model, reference, args.chunk, **solve)
    title = f"{len(data):,} samples, NFE {summary['nfe']}, straightness {summary['straightness']:.3f}"
    written.append(plot_2d(out / "samples.png", reference, data.numpy(), lp, extent, title))
    if args.trajectories:
        device = model.device
        gen = torch.Generator(device).manual_seed(args.seed + 7)
        z = torch.randn(args.trajectories, 2, generator=gen, device=device)
        times = torch.linspace(0, 1, 60, device=device)
        path, _ = solve_path(model.field, z, times, **model.solve_options(**solve))
        path = model.preprocess.inverse(path).cpu()
        np.save(out / "trajectories.npy", path.numpy())
        written += [out / "trajectories.npy", plot_paths(out / "trajectories.png", path.numpy(), lp, extent)]
    return written


if __name__ == "__main__":
    main()
