"""Bits/dim on the real MNIST test split, an IDX folder (--data; 9,000 train / 1,000 test).

    python bench/mnist_t10k.py --minutes 30                 # the protocol: 30 min of CPU per method
    python bench/mnist_t10k.py --minutes 10 --only flows-fm,flow_matching

A small U-Net (16 channels, multipliers 1-2-2, attention at 7x7) on 1x28x28 images scaled to [-1, 1):
- flows-fm: our trainer, flow matching (conditional-OT path, minibatch OT coupling, EMA, cosine);
- flows-mle: our trainer, maximum likelihood with RNODE (kinetic + Jacobian 0.01, Hutchinson, adjoint);
- flow_matching: its AffineProbPath + CondOTScheduler training the same U-Net in a plain Adam loop.
Bits/dim of the 1,000 held-out images (one dequantization and one Hutchinson probe per image,
dopri5 1e-5, the same evaluator for all), and a sample grid of each model in bench/out/mnist_t10k/.
Figures here are not comparable to published MNIST bits/dim (those train on 60,000 images).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import ROOT, setup_threads, table
from digits import flow_matching_peer, ours
from torchvision.utils import save_image

import flows
from flows.report import image_grid
from flows.sampling import sample

DATA = ROOT.parent / "shared/data/mnist-t10k"  # an optional location; --data FOLDER otherwise
SMALL = (
    "model.channels=16",
    "model.channel_mult=[1,2,2]",
    "model.num_res_blocks=1",
    "model.attention_resolutions=[7]",
    "model.groups=8",
    "train.batch_size=64",
    "train.eval_every=0",
    "eval.batch_size=500",
)
FM = (
    "data.name=idx",
    "data.test_fraction=0.1",
    "data.logit_alpha=0",
    "objective.coupling=ot",
    "train.lr=1e-3",
    "train.ema_decay=0.999",
)
MLE = ("data.name=idx", "data.test_fraction=0.1", "solver.atol=1e-4", "solver.rtol=1e-4")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="training wall time per method")
    p.add_argument("--only", default="flows-fm,flows-mle,flow_matching")
    p.add_argument("--steps-per-minute", type=float, default=230, help="sets train.steps for the budget")
    p.add_argument("--out", default=str(ROOT / "bench/out/mnist_t10k"))
    p.add_argument("--data", default=str(DATA), help="a folder of MNIST t10k IDX files")
    args = p.parse_args()
    if not Path(args.data).is_dir():
        raise SystemExit(f"{args.data} not found: pass --data FOLDER holding t10k-images-idx3-ubyte[.gz]")
    small = (f"data.path={args.data}", *SMALL)
    setup_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the cosine schedule should end with the budget: ~4 steps/s for flow matching on this machine's CPU
    budget = (f"train.steps={int(args.steps_per_minute * args.minutes)}",)
    rows = []
    for name in args.only.split(","):
        if name == "flows-fm":
            rows.append(ours("configs/mnist_fm.yaml", args.minutes, out, (*small, *FM, *budget), probes=1))
            image_grid(flows.load(out / "mnist_fm"), out / "mnist_fm" / "samples_grid.png")
        elif name == "flows-mle":
            rows.append(ours("configs/mnist_mle.yaml", args.minutes, out, (*small, *MLE, *budget), probes=1))
            image_grid(flows.load(out / "mnist_mle"), out / "mnist_mle" / "samples_grid.png")
        elif name == "flow_matching":
            try:
                row, field = flow_matching_peer(args.minutes, "configs/mnist_fm.yaml", (*small, *FM), probes=1)
            except ImportError as e:
                rows.append([name, f"not installed ({e.name})", "", "", ""])
                continue
            rows.append(row)
            # the flows-fm run's eval.solver if it ran, else the defaults (dopri5 1e-5)
            solver = flows.load(out / "mnist_fm").solver if (out / "mnist_fm").is_dir() else {}
            res = sample(field, 64, (1, 28, 28), **{**solver, "adjoint": False})
            save_image((res.x * 0.5 + 0.5).clamp(0, 1), out / "flow_matching_samples.png", nrow=8, padding=1)
        print(table(["method", "steps", "trace", "bits/dim", "± SE"], rows[-1:]), flush=True)
    print(f"\n## mnist-t10k, 1,000 held-out images, {args.minutes:g} min of training each (1 thread)\n")
    print(table(["method", "steps", "trace", "bits/dim", "± SE"], rows))


if __name__ == "__main__":
    main()
