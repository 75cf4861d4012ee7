"""``accelerate launch evaluate.py RUN_OR_CHECKPOINT [--split test | --data FILE] [options]``"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

from flows.cli import run_cli
from flows.config import SOLVER_METHODS


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
    p.add_argument("--method", default="dopri5", choices=SOLVER_METHODS, help="torchdiffeq method")
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=1000, help="points per solve (bounds memory)")
    p.add_argument("--limit", type=int, help="evaluate only the first N points")
    p.add_argument(
        "--check", type=int, default=200, help="points re-solved at 100x tighter tolerances (0 disables the self-check)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result here (default: eval_<split>.json next to the checkpoint)")
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
        import numpy as np
        import torch
        from accelerate import Accelerator
        from torch.utils.data import DataLoader, TensorDataset
        from tqdm.auto import tqdm

        from flows import checkpoint
        from flows.config import SolverConfig
        from flows.data import build_data, check_shape, load_array
        from flows.errors import FlowsError
        from flows.evaluation import EvalOptions, point_log_likelihood, summarize, tolerance_check
        from flows.likelihood import auto_trace

        for name in ("probes", "deq_samples", "batch_size"):
            if getattr(args, name) <= 0:
                raise FlowsError(f"--{name.replace('_', '-')} must be positive")
        if args.atol <= 0 or args.rtol <= 0:
            raise FlowsError("--atol and --rtol must be positive")
        acc = Accelerator()
        loaded = checkpoint.load(args.checkpoint, args.weights).to(acc.device)
        pre, dim, shape = loaded.preprocess, loaded.dim, loaded.shape
        if args.data:
            raw = load_array(args.data, ndim=None)
            source = args.data
        else:
            data = build_data(loaded.config.data)
            raw = data.test if args.split == "test" else data.train
            source = f"{loaded.config.data.name}:{args.split}"
        check_shape(raw, shape, args.data or source)
        if args.limit:
            raw = raw[: args.limit]
        trace = auto_trace(args.trace, dim, loaded.config.model.name)
        solver = SolverConfig(method=args.method, atol=args.atol, rtol=args.rtol, adjoint=False)
        opts = EvalOptions(
            solver,
            trace,
            args.probes if trace == "hutchinson" else 1,
            "rademacher",
            args.deq_samples if pre.levels is not None else 1,
        )
        index = torch.arange(len(raw), device="cpu")
        # the prepared loader splits the points over processes and puts each batch on acc.device
        loader = acc.prepare_data_loader(DataLoader(TensorDataset(raw, index), batch_size=args.batch_size))
        gen = torch.Generator(acc.device).manual_seed(args.seed + acc.process_index)
        lps, vars_, idx, nfe = [], [], [], []
        start = time.perf_counter()
        for xb, ib in tqdm(loader, desc="evaluate", disable=not acc.is_local_main_process):
            lp, var, n = point_log_likelihood(loaded.field, xb, pre, opts, gen)
            lps.append(acc.gather_for_metrics(lp))
            vars_.append(acc.gather_for_metrics(var))
            idx.append(acc.gather_for_metrics(ib))
            nfe.append(n)
        seconds = time.perf_counter() - start
        lp, var, idx = torch.cat(lps), torch.cat(vars_), torch.cat(idx)
        if sorted(idx.tolist()) != list(range(len(raw))):
            raise FlowsError("internal error: the gathered points do not cover the data exactly once")
        order = idx.argsort()
        lp, var = lp[order], var[order]  # input order
        result = summarize(lp, var, opts.probes, dim, pre.levels)
        result |= {
            "nfe_per_solve": sum(nfe) / len(nfe),
            "seconds": seconds,
            "points_per_second": len(raw) / seconds,
            "processes": acc.num_processes,
            "device": str(acc.device),
            "data": source,
            "checkpoint": str(loaded.path),
            "step": loaded.step,
            "weights": args.weights,
            "trace": trace,
            "probes": opts.probes,
            "deq_samples": opts.deq_samples,
            "solver": dataclasses.asdict(solver),
        }
        if args.check and acc.is_main_process:
            gen = torch.Generator("cpu").manual_seed(args.seed)
            pick = torch.randperm(len(raw), generator=gen, device="cpu")[: args.check]
            check = tolerance_check(loaded.field, raw[pick].to(acc.device), pre, opts, 100.0, args.seed)
            check["warning"] = bool(check["max_abs_change"] > result["nll_se"])
            result["tolerance_check"] = check
        if acc.is_main_process:
            report(result)
            default = loaded.path.parent / f"eval_{'data' if args.data else args.split}.json"
            out = Path(args.json) if args.json else default
            out.parent.mkdir(parents=True, exist_ok=True)
            if args.per_point is not None:
                points = Path(args.per_point) if args.per_point else out.with_name(out.stem + "_points.npy")
                np.save(points, lp.double().cpu().numpy())
                lowest = lp.argsort()[:5].tolist()
                print("lowest log p (row: nats): " + ", ".join(f"{i}: {lp[i].item():.3f}" for i in lowest))
                print(f"wrote {points} (log p of each of the {len(lp):,} rows, input order)")
                result["per_point"] = str(points)
            out.write_text(json.dumps(result, indent=2))
            print(f"wrote {out}")
        acc.end_training()

    run_cli(go)


def report(r: dict) -> None:
    rows = [
        ("data", f"{r['data']} ({r['n']:,} points)"),
        ("checkpoint", f"{r['checkpoint']} (step {r['step']}, {r['weights']} weights)"),
        ("NLL", f"{r['nll']:.4f} ± {r['nll_se']:.4f} nats (standard error over points)"),
    ]
    if r["probes"] > 1:
        rows.append(("  of which probes", f"± {r['nll_se_probes']:.4f} nats"))
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
                f"{c['n']} points at atol={c['atol']:g}: largest |Δ log p| "
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
