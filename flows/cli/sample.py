"""``python sample.py RUN_OR_CHECKPOINT -n N [--out DIR] [--seed S] [solver options]``

``accelerate launch sample.py ...`` splits the samples over processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from flows.cli import run_cli
from flows.config import FIXED_STEP_METHODS, SOLVER_METHODS


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

        from flows import checkpoint
        from flows.data import build_data, check_shape, load_array
        from flows.errors import FlowsError
        from flows.sampling import encode, sample, transport_summary

        if args.n <= 0 or args.chunk <= 0:
            raise FlowsError(f"-n and --chunk must be positive (got {args.n}, {args.chunk})")
        if args.steps is not None and args.steps <= 0:
            raise FlowsError("--steps must be positive")
        acc = Accelerator()
        loaded = checkpoint.load(args.checkpoint, args.weights).to(acc.device)
        solver = loaded.config.eval.solver
        changes = {k: v for k, v in (("method", args.method), ("atol", args.atol), ("rtol", args.rtol)) if v}
        if args.steps:
            changes["step_size"] = 1.0 / args.steps
            changes.setdefault("method", solver.method if solver.method in FIXED_STEP_METHODS else "rk4")
        solver = dataclasses.replace(solver, **changes, adjoint=False)
        out = Path(args.out) if args.out else loaded.path.parent / ("codes" if args.encode else "samples")
        pre, shape = loaded.preprocess, loaded.shape
        start = time.perf_counter()
        if args.encode:
            raw = load_array(args.data, ndim=None) if args.data else build_data(loaded.config.data).test
            check_shape(raw, shape, args.data or "test split")
            raw = raw[: args.n]
            mine = raw[acc.process_index :: acc.num_processes].to(acc.device)
            res = encode(
                loaded.field,
                pre(mine, dequantize=pre.levels is not None),
                solver,
                args.chunk,
                acc.is_local_main_process,
            )
        else:
            share = args.n // acc.num_processes + int(acc.process_index < args.n % acc.num_processes)
            gen = torch.Generator(acc.device).manual_seed(args.seed + 1_000_003 * acc.process_index)
            res = sample(loaded.field, share, shape, solver, args.chunk, gen, acc.is_local_main_process)
        seconds = time.perf_counter() - start
        parts = gather_object([(res.x.cpu(), res.z.cpu(), res.kinetic.cpu(), res.nfe)])
        if not acc.is_main_process:
            return
        x, z, kinetic = (torch.cat([p[i] for p in parts]) for i in range(3))
        res = type(res)(x, z, sum(p[3] for p in parts), kinetic)
        out.mkdir(parents=True, exist_ok=True)
        info = {
            "mode": "encode" if args.encode else "sample",
            "n": len(x),
            "nfe": res.nfe,
            "seconds": seconds,
            **transport_summary(res),
            "processes": acc.num_processes,
            "device": str(acc.device),
            "solver": dataclasses.asdict(solver),
            "checkpoint": str(loaded.path),
            "step": loaded.step,
            "weights": args.weights,
        }
        written = []
        if args.encode:
            np.savez(out / "codes.npz", codes=x.numpy(), data=pre.inverse(z).numpy())
            info |= {"code_mean": x.mean().item(), "code_std": x.std().item()}
            written.append(out / "codes.npz")
        else:
            data = pre.inverse(x)
            np.savez(out / "samples.npz", samples=data.numpy(), noise=z.numpy())
            written.append(out / "samples.npz")
            written += pictures(loaded, data, out, args, solver, info)
        (out / "info.json").write_text(json.dumps(info, indent=2))
        print(json.dumps(info, indent=2))
        print("wrote " + ", ".join(str(w) for w in [*written, out / "info.json"]))

    run_cli(go)


def pictures(loaded, data, out: Path, args, solver, info: dict) -> list[Path]:
    import numpy as np
    import torch

    from flows.data import build_data
    from flows.ode import solve_path
    from flows.plotting import plot_2d, plot_paths
    from flows.report import grid_log_density, save_grid

    written = []
    images = data[:64].reshape(-1, 1, 8, 8) if loaded.config.data.name == "digits" else data[:64]
    if images.ndim == 4:
        written.append(save_grid(images, out / "samples_grid.png"))
    if loaded.dim != 2:
        return written
    pre = loaded.preprocess
    reference = build_data(loaded.config.data).test.numpy()
    lp, extent = grid_log_density(loaded, reference, solver, args.chunk)
    title = f"{len(data):,} samples, NFE {info['nfe']}, straightness {info['straightness']:.3f}"
    written.append(plot_2d(out / "samples.png", reference, data.numpy(), lp, extent, title))
    if args.trajectories:
        device = loaded.device
        gen = torch.Generator(device).manual_seed(args.seed + 7)
        z = torch.randn(args.trajectories, 2, generator=gen, device=device)
        path, _ = solve_path(loaded.field, z, torch.linspace(0, 1, 60, device=device), solver)
        path = pre.inverse(path).cpu()
        np.save(out / "trajectories.npy", path.numpy())
        written += [out / "trajectories.npy", plot_paths(out / "trajectories.png", path.numpy(), lp, extent)]
    return written


if __name__ == "__main__":
    main()
