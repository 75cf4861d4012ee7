"""``python sample.py RUN_OR_CHECKPOINT -n N [--out DIR] [--seed S] [solver options]``

Conditional runs: ``--label 3`` (or ``--label all``: N per class, a grid with one row per class) and
``--guidance W`` for label-conditional runs; ``--context FILE`` (.npy/.npz: one context, or K rows for
(K, N, ...) samples) for runs with a context vector. ``accelerate launch sample.py ...`` splits the samples
over processes.
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
    p.add_argument(
        "--compile", action="store_true", help="with --steps: compile the fixed step (torch.compile; a GPU's friend)"
    )
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--trajectories", type=int, default=0, metavar="K", help="also save K sample paths (and a picture)")
    p.add_argument(
        "--encode", action="store_true", help="reverse mode: map data (the run's test split, or --data) to noise"
    )
    p.add_argument("--data", help="with --encode: .npy/.npz of raw points")
    p.add_argument(
        "--batch-size",
        "--chunk",  # its former name
        dest="chunk",
        type=int,
        help="points per solve (bounds memory); default: what fits in free memory (at most 10,000 on a CPU)",
    )
    cond = p.add_argument_group("conditional runs")
    cond.add_argument("--label", help="a class label, or 'all' (-n per class; a grid with one row per class)")
    cond.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight (0: none)")
    cond.add_argument("--context", help=".npy/.npz of contexts: one row (N samples) or K rows (K x N samples)")
    return p.parse_args(argv)


def load_context(path: str):
    """A context file (.npy, or the first array of a .npz) as a tensor, nothing unpickled."""
    import numpy as np
    import torch

    from flows.errors import DataError

    try:
        loaded = np.load(path, allow_pickle=False)
        array = loaded[loaded.files[0]] if isinstance(loaded, np.lib.npyio.NpzFile) else loaded
    except (ValueError, OSError, IndexError) as e:
        raise DataError(f"cannot read context file '{path}': {e}") from None
    return torch.as_tensor(np.asarray(array), device="cpu")


def context_of(args: argparse.Namespace, model):
    """The context the command line gives (--label / --context), checked against the model; None if none."""
    import torch

    from flows.errors import FlowsError

    if args.label is not None and args.context is not None:
        raise FlowsError("give --label (label-conditional runs) or --context (runs with a context vector), not both")
    given = args.label if args.label is not None else args.context
    if given is None:
        return None
    ctx = model.context
    if ctx is None:
        raise FlowsError(f"'{model.path}' is an unconditional flow: it takes no --label or --context")
    if args.label is not None:
        if ctx.kind != "labels":
            raise FlowsError(f"'{model.path}' is conditional on {ctx.describe()}: pass --context FILE, not --label")
        if args.label == "all":
            return torch.arange(ctx.classes, device="cpu")
        try:
            return ctx.check(int(args.label), torch.device("cpu"), "--label")
        except ValueError:
            raise FlowsError(f"--label must be an integer or 'all' (got {args.label!r})") from None
    return ctx.check(load_context(args.context), torch.device("cpu"), f"--context {args.context}")


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)

    def go() -> None:
        import numpy as np
        import torch
        from accelerate import Accelerator
        from accelerate.utils import gather_object

        from flows.api import load
        from flows.errors import FlowsError

        if args.n <= 0 or (args.chunk is not None and args.chunk <= 0):
            raise FlowsError(f"-n and --batch-size must be positive (got {args.n}, {args.chunk})")
        acc = Accelerator()
        model = load(args.checkpoint, args.weights, acc.device)
        solve = dict(method=args.method, atol=args.atol, rtol=args.rtol, steps=args.steps, compile=args.compile or None)
        model._solve_options(**solve)  # bad values: an error before any work
        args.given = context_of(args, model)  # bad labels or contexts: an error before any work
        model._check_guidance(args.guidance)
        out = Path(args.out) if args.out else model.path.parent / ("codes" if args.encode else "samples")
        x, start, info = (encode_share if args.encode else sample_share)(args, model, acc, solve)
        straightness_sum = info["straightness"] * len(x)  # this process's mean, weighted to combine them
        parts = gather_object(
            [(x.cpu(), start.cpu(), info["kinetic"].cpu(), info["nfe"], info["seconds"], straightness_sum)]
        )
        if not acc.is_main_process:
            return
        # K contexts: (K, share, ...) per process, joined along the samples
        axis = 1 if parts[0][0].ndim == len(model.shape) + 2 else 0
        x, start = (torch.cat([p[i] for p in parts], axis) for i in range(2))
        kinetic = torch.cat([p[2] for p in parts])
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
        if args.given is not None:
            summary |= {"context": args.given.tolist(), "guidance": args.guidance, "shape": list(x.shape)}
        written = []
        if args.encode:
            np.savez(out / "codes.npz", codes=x.numpy(), data=start.numpy())
            summary |= {"code_mean": x.mean().item(), "code_std": x.std().item()}
            written.append(out / "codes.npz")
        else:
            given = {"context": args.given.numpy()} if args.given is not None else {}
            np.savez(out / "samples.npz", samples=x.numpy(), noise=start.numpy(), **given)
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
    if args.data:
        raw, context = load_array(args.data, ndim=None), args.given
    else:
        data = build_data(model.config.data)
        raw, context = data.test, data.test_context
    check_shape(raw, model.shape, args.data or "test split")
    if model.context is not None and context is None:
        raise FlowsError("a conditional flow encodes with a context: pass --context FILE or --label (one per point)")
    rows = slice(acc.process_index, None, acc.num_processes)
    mine = raw[: args.n][rows]
    if context is not None and len(context) > 1:
        context = context[: args.n][rows]
    x, info = model.encode(
        mine, context=context, batch_size=args.chunk, return_info=True, progress=acc.is_local_main_process, **solve
    )
    return x, mine, info


def sample_share(args: argparse.Namespace, model, acc, solve: dict):
    """This process's share of the samples, from its own seed."""
    import torch

    share = args.n // acc.num_processes + int(acc.process_index < args.n % acc.num_processes)
    gen = torch.Generator(acc.device).manual_seed(args.seed + 1_000_003 * acc.process_index)
    x, info = model.sample(
        share,
        context=args.given,
        guidance=args.guidance,
        generator=gen,
        batch_size=args.chunk,
        return_info=True,
        progress=acc.is_local_main_process,
        **solve,
    )
    return x, info["noise"], info


def pictures(model, data, out: Path, args, summary: dict) -> list[Path]:
    """A grid of image samples; for 2D data, samples beside the density (and ``--trajectories`` paths); for a
    posterior (a context vector), a pair plot of the first context's samples (``corner.png``)."""
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
        if data.ndim == len(model.shape) + 2:  # K contexts (a class grid): one row each, 16 samples a row
            per_row = min(data.shape[1], 16)
            images, nrow = data[:, :per_row].reshape(-1, *picture), per_row
        else:
            images, nrow = data[:64].reshape(-1, *picture), None
        written.append(save_grid(images / (model.levels - 1), out / "samples_grid.png", nrow))  # levels → [0, 1]
    if model.context is not None and model.context.kind == "vector" and not picture:  # a posterior: a pair plot
        from flows.posterior_plots import plot_corner

        first = data[0] if data.ndim == len(model.shape) + 2 else data
        title = f"{len(first):,} samples given the first context"
        written.append(plot_corner(out / "corner.png", first.reshape(len(first), -1).numpy(), title=title))
    if model.dim != 2 or model.config is None or model.context is not None:  # needs the run's data as reference
        return written
    solve = dict(method=args.method, atol=args.atol, rtol=args.rtol, steps=args.steps)
    reference = build_data(model.config.data).test.numpy()
    lp, extent = grid_log_density(model, reference, args.chunk, **solve)
    title = f"{len(data):,} samples, NFE {summary['nfe']}, straightness {summary['straightness']:.3f}"
    written.append(plot_2d(out / "samples.png", reference, data.numpy(), lp, extent, title))
    if args.trajectories:
        device = model.device
        gen = torch.Generator(device).manual_seed(args.seed + 7)
        z = torch.randn(args.trajectories, *model.state_shape, generator=gen, device=device)
        times = torch.linspace(0, 1, 60, device=device)
        one = getattr(model, "members", [model])[0]  # a mixture's paths: its first member's (each has its own field)
        path, _ = solve_path(one.field, z, times, **one._solve_options(**solve))
        path = path[..., :2]  # an augmented flow's paths: their data coordinates
        path = model.preprocess.inverse(path).cpu()
        np.save(out / "trajectories.npy", path.numpy())
        written += [out / "trajectories.npy", plot_paths(out / "trajectories.png", path.numpy(), lp, extent)]
    return written


if __name__ == "__main__":
    main()
