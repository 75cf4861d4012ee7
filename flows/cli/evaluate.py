"""``accelerate launch evaluate.py RUN_OR_CHECKPOINT [--split test | --data FILE] [options]``

``--calibration`` checks a posterior (a run with a context vector) on held-out simulated pairs instead: SBC ranks
and the expected coverage of HPD regions (:mod:`flows.calibration`), ``calibration.json`` and ``calibration.png``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from flows.cli import run_cli
from flows.ode import SOLVER_METHODS


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Exact likelihood of held-out data under a trained flow: NLL (nats), bits/dim for "
        "discrete data, standard errors, NFE, and a tolerance self-check.",
    )
    p.add_argument("checkpoint", help="run directory or model.safetensors")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--split", choices=["test", "train"], default="test", help="split of the run's data")
    src.add_argument("--data", help=".npy/.npz file of raw points (data units) instead of a split")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument(
        "--trace",
        choices=["auto", "exact", "hutchinson"],
        default="auto",
        help="auto: exact for an MLP of dimension <= 64, else hutchinson (--probes K)",
    )
    p.add_argument("--probes", type=int, default=1, help="Hutchinson probes per point")
    p.add_argument("--deq-samples", type=int, default=1, help="dequantization samples per point (discrete data)")
    p.add_argument(
        "--augment-samples",
        type=int,
        help="an augmented flow (model.augment > 0): augmentations per point, K of the importance-weighted lower "
        "bound (default: the run's eval.augment_samples: 8 with the exact trace, 1 with Hutchinson's)",
    )
    p.add_argument(
        "--gap-points",
        type=int,
        default=2000,
        help="an augmented flow: points whose bound is also computed with 4K augmentations, to report how tight "
        "the bound is (0 disables)",
    )
    p.add_argument(
        "--method", choices=SOLVER_METHODS, help="torchdiffeq method (default: the run's eval.solver, dopri5)"
    )
    p.add_argument("--atol", type=float, help="default: the run's eval.solver.atol (1e-5)")
    p.add_argument("--rtol", type=float, help="default: the run's eval.solver.rtol (1e-5)")
    p.add_argument(
        "--batch-size",
        type=int,
        help="points per solve (bounds memory); default: what fits in free memory (at most 2,000 on a CPU)",
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N points")
    p.add_argument(
        "--check",
        type=int,
        default=200,
        help="points re-solved at 100x tighter tolerances, or with dopri5 at 1e-7 after a fixed-step "
        "solve (0 disables the self-check)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--context", help="with --data, a conditional run: .npy/.npz of contexts (one row for all, or one per point)"
    )
    p.add_argument("--marginal", action="store_true", help="label-conditional runs: log p(x) = log Σ_y p(y) p(x | y)")
    p.add_argument("--json", help="write the result here (default: eval_<split>.json next to the checkpoint)")
    p.add_argument(
        "--calibration",
        action="store_true",
        help="a posterior p(theta | x): SBC ranks and expected coverage of HPD regions on held-out pairs (the test "
        "split, or --data with --context, theta drawn from the prior); writes calibration.json and calibration.png",
    )
    p.add_argument("--samples", type=int, default=100, help="--calibration: posterior samples per pair")
    p.add_argument(
        "--per-point",
        nargs="?",
        const="",
        metavar="FILE",
        help="also write log p of every row, in input order, to FILE.npy (default: next to the JSON): anomaly scores",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)

    def go() -> None:
        import torch
        from accelerate import Accelerator

        from flows.api import load
        from flows.errors import FlowsError
        from flows.evaluation import evaluate, tolerance_check

        for name in ("probes", "deq_samples", "batch_size", "augment_samples"):
            if getattr(args, name) is not None and getattr(args, name) <= 0:
                raise FlowsError(f"--{name.replace('_', '-')} must be positive")
        if (args.atol is not None and args.atol <= 0) or (args.rtol is not None and args.rtol <= 0):
            raise FlowsError("--atol and --rtol must be positive")
        acc = Accelerator()
        model = load(args.checkpoint, args.weights, acc.device)
        raw, source, context = points(args, model)
        if args.calibration:
            if acc.is_main_process:
                calibration(args, model, raw, context, source)
            acc.wait_for_everyone()
            acc.end_training()
            return
        gen = torch.Generator(acc.device).manual_seed(args.seed + acc.process_index)
        options = dict(trace=args.trace, probes=args.probes, deq_samples=args.deq_samples)
        run_k = model.config.eval.augment_samples if model.config is not None else None
        options["augment_samples"] = args.augment_samples or run_k  # K: the run's eval.augment_samples by default
        marginal = model.context is not None and context is None  # a label-conditional run without labels
        options |= dict(method=args.method, atol=args.atol, rtol=args.rtol)
        # the same code path as model.log_prob(raw, generator=..., batch_size=...), split over processes; an
        # augmented flow: what its likelihood is, and how tight (K against 4K on --gap-points points)
        result, lp, info = evaluate(
            acc,
            model,
            raw,
            args.batch_size,
            generator=gen,
            context=context,
            progress=True,
            gap_points=args.gap_points,
            **options,
        )
        result |= {
            "nfe_per_solve": info["nfe"],
            "seconds": info["seconds"],
            "points_per_second": len(raw) / info["seconds"],
            "processes": acc.num_processes,
            "device": str(acc.device),
            "data": source,
            "checkpoint": str(model.path),
            "step": model.step,
            "weights": args.weights,
            "trace": info["trace"],
            "probes": info["probes"],
            "deq_samples": info["deq_samples"],
            "solver": info["solver"],
        }
        if model.context is not None:  # what the density is of
            result["density"] = "p(x) = Σ_y p(y) p(x | y)" if marginal else "p(x | c)"
        if args.check and acc.is_main_process:
            gen = torch.Generator("cpu").manual_seed(args.seed)
            pick = torch.randperm(len(raw), generator=gen, device="cpu")[: args.check]
            picked = {"context": context[pick].to(acc.device)} if context is not None else {}  # one per point
            check = tolerance_check(model, raw[pick].to(acc.device), 100.0, args.seed, **options, **picked)
            check["warning"] = bool(check["max_abs_change"] > result["nll_se"])
            result["tolerance_check"] = check
        if acc.is_main_process:
            report(result)
            write(args, model.path.parent, result, lp)
        acc.wait_for_everyone()  # the main process wrote its files: end the processes together
        acc.end_training()

    run_cli(go)


def calibration(args: argparse.Namespace, model, theta, x, source: str) -> None:
    """``--calibration``: the checks of :func:`flows.calibration.calibrate` on up to ``--limit`` pairs (1,000 by
    default), printed and written next to the checkpoint."""
    from flows.calibration import calibrate
    from flows.errors import FlowsError
    from flows.posterior_plots import save_calibration

    if x is None or model.context is None or model.context.kind != "vector":
        raise FlowsError("--calibration checks a posterior: a run with a context vector (and its pairs)")
    if not args.data and _rounds(model.config) > 1:
        raise FlowsError(
            f"'{model.path}' was trained in rounds: its held-out pairs are not all drawn from the prior, so SBC and "
            "coverage would not test the posterior. Pass prior pairs with --data theta.npy --context x.npy (e.g. "
            "round 0's: the 'round' array of simulations.npz is 0)."
        )
    n = min(len(theta), args.limit or 1000)
    solve = {k: getattr(args, k) for k in ("method", "atol", "rtol") if getattr(args, k) is not None}
    cal = calibrate(model, theta[:n], x[:n], samples=args.samples, seed=args.seed, **solve)
    out = Path(args.json) if args.json else model.path.parent / "calibration.json"
    summary = save_calibration(out, cal, data=source, checkpoint=str(model.path), step=model.step)
    picture = out.with_suffix(".png")
    cover = "  ".join(f"{k}:{v:.3f}" for k, v in summary["coverage"].items() if k not in ("0.00", "1.00"))
    rows = [
        ("data", f"{source} ({n:,} pairs, {args.samples} posterior samples each)"),
        ("verdict", summary["verdict"]),
        (
            "coverage error",
            f"largest {summary['coverage_error_max']:.3f} at level {summary['coverage_error_at']:.2f} (95% band for "
            f"{n:,} calibrated pairs: {summary['coverage_band_95']:.3f}); mean {summary['coverage_error_mean']:+.3f}",
        ),
        ("coverage", cover),
        ("SBC p-values", " ".join(f"{p:.3f}" for p in summary["sbc_p_values"])),
        ("test", summary["test"]),
    ]
    for name, value in rows:
        print(f"{name:<16} {value}")
    print(f"wrote {out} and {picture}")


def _rounds(config) -> int:
    """How many rounds of simulations a run's pairs come from (the ``round`` array a simulator run writes)."""
    import numpy as np

    path = getattr(config.data, "path", None) if config is not None else None
    if not path or not str(path).endswith(".npz") or not Path(path).is_file():
        return 1
    with np.load(path, allow_pickle=False) as f:
        return len(np.unique(f["round"])) if "round" in f.files else 1


def points(args: argparse.Namespace, model):
    """The raw points to evaluate (a file, or a split of the run's data), a name for them, and their contexts
    (conditional runs: the split's, or --context; None: unconditional, or a labelled run's marginal)."""
    import torch

    from flows.cli.sample import load_context
    from flows.data import build_data, check_shape, load_array
    from flows.errors import FlowsError

    context = None
    if args.context and model.context is None:
        raise FlowsError(f"'{model.path}' is an unconditional flow: it takes no --context")
    if args.context and not args.data:
        raise FlowsError("--context goes with --data (the run's splits carry their own contexts)")
    if args.data:
        raw, source = load_array(args.data, ndim=None), args.data
        if args.context:
            context = model.context.check(load_context(args.context), torch.device("cpu"), f"--context {args.context}")
        elif model.context is not None and model.context.kind == "vector":
            raise FlowsError(f"'{model.path}' is conditional on {model.context.describe()}: pass --context FILE")
    elif model.config is None:
        raise FlowsError(f"'{model.path}' carries no run config, so no split to evaluate: pass --data FILE.")
    else:
        data = build_data(model.config.data)
        raw, context = (data.test, data.test_context) if args.split == "test" else (data.train, data.train_context)
        source = f"{model.config.data.name}:{args.split}"
    if args.marginal:
        if model.context is None or model.context.kind != "labels":
            raise FlowsError("--marginal is for label-conditional runs (log Σ_y p(y) p(x | y))")
        context = None
    check_shape(raw, model.shape, args.data or source)
    if context is not None and len(context) not in (1, len(raw)):
        raise FlowsError(f"{len(context)} contexts for {len(raw)} points: give one context, or one per point")
    if args.limit:
        raw = raw[: args.limit]
        context = context[: args.limit] if context is not None and len(context) > 1 else context
    if context is not None and len(context) == 1:
        context = context.expand(len(raw), *context.shape[1:])
    return raw, source, context


def write(args: argparse.Namespace, run_dir: Path, result: dict, lp) -> None:
    """The JSON result (and with ``--per-point`` log p of every row, in input order)."""
    import numpy as np

    from flows.files import atomic_write

    out = Path(args.json) if args.json else run_dir / f"eval_{'data' if args.data else args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.per_point is not None:
        rows = Path(args.per_point) if args.per_point else out.with_name(out.stem + "_points.npy")
        np.save(rows, lp.double().cpu().numpy())
        lowest = lp.argsort()[:5].tolist()
        print("lowest log p (row: nats): " + ", ".join(f"{i}: {lp[i].item():.3f}" for i in lowest))
        print(f"wrote {rows} (log p of each of the {len(lp):,} rows, input order)")
        result["per_point"] = str(rows)
    atomic_write(out, json.dumps(result, indent=2))
    print(f"wrote {out}")


def report(r: dict) -> None:
    rows = [
        ("data", f"{r['data']} ({r['n']:,} points)"),
        ("checkpoint", f"{r['checkpoint']} (step {r['step']}, {r['weights']} weights)"),
        ("NLL", f"{r['nll']:.4f} ± {r['nll_se']:.4f} nats (standard error over points)"),
    ]
    if r["probes"] > 1:
        rows.append(("  of which probes", f"± {r['nll_se_probes']:.4f} nats"))
    if "augment_samples" in r:
        k = r["augment_samples"]
        rows.append(
            (
                "likelihood",
                f"{r['likelihood']} on log p (importance-weighted over K={k} augmentations): "
                + (
                    "the NLL above is an upper bound"
                    if r["likelihood"] == "lower bound"
                    else "Hutchinson's noise biases it upward, so it may overstate log p; K=1 (the ELBO) is a bound"
                ),
            )
        )
    if "bound_gap" in r:
        g = r["bound_gap"]
        rows.append(
            (
                "K -> 4K",
                f"NLL {g['nll_k']:.4f} -> {g['nll_4k']:.4f} on {g['n']:,} points: the bound tightens "
                f"by {g['gap']:.4f} ± {g['gap_se']:.4f} nats",
            )
        )
    if "bpd" in r:
        rows.append(("bits/dim", f"{r['bpd']:.4f} ± {r['bpd_se']:.4f}"))
    s = r["solver"]
    rows += [
        ("trace", f"{r['trace']} (probes {r['probes']}, dequantization samples {r['deq_samples']})"),
        ("solver", f"{s['method']} atol={s['atol']:g} rtol={s['rtol']:g}"),
        ("NFE per solve", f"{r['nfe_per_solve']:.1f}"),
        (
            "time",
            f"{r['seconds']:.2f} s, {r['points_per_second']:,.0f} points/s, "
            f"{r['processes']} process(es) on {r['device']}",
        ),
    ]
    if "tolerance_check" in r:
        c = r["tolerance_check"]
        rows.append(
            (
                "tolerance check",
                f"{c['n']} points, {c['method']} at atol={c['atol']:g}: largest |Δ log p| "
                f"{c['max_abs_change']:.2e}, change of the mean {c['mean_change']:+.2e}",
            )
        )
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    if r.get("tolerance_check", {}).get("warning"):
        print(
            f"WARNING: tightening the tolerances changed log p by up to "
            f"{r['tolerance_check']['max_abs_change']:.2e}, more than the standard error "
            f"{r['nll_se']:.2e}: the reported NLL is limited by solver error; use smaller --atol/--rtol."
        )
    if not math.isfinite(r["nll"]):
        print("WARNING: the NLL is not finite.")


if __name__ == "__main__":
    main()
