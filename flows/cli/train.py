"""``accelerate launch train.py [--config FILE] [--resume [RUN_DIR]] [key=value ...]``"""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.cli import run_cli

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "toy2d_mle.yaml"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train a continuous normalizing flow. Without --config: the embedded default "
        "(checkerboard, maximum likelihood, a few minutes on a CPU; its devices.cuda settings on a GPU).",
        epilog="Overrides are dotted keys, e.g. train.steps=500 objective.kinetic=0.01 run_dir=runs/x; they win over "
        "the recipe's devices section for this run's device (devices=null turns it off).",
    )
    p.add_argument("--config", help="YAML recipe (default: configs/toy2d_mle.yaml, else built-in defaults)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="RUN_DIR",
        help="continue the latest checkpoint of RUN_DIR (its config.yaml, plus overrides)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)

    def go() -> None:
        from flows.api import train

        if args.resume and args.config:
            raise SystemExit("give either --config or --resume RUN_DIR (the run keeps its own config)")
        path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
        if args.resume:  # the run keeps its own config.yaml
            train(run_dir=args.resume, resume=True, overrides=args.overrides)
        else:  # a new run, or (--resume without a directory) the run of the default or given recipe
            train(path, resume=args.resume is not None, overrides=args.overrides)

    run_cli(go)


if __name__ == "__main__":
    main()
