"""Flow matching, then maximum likelihood (``train.init_from``): what it does to held-out NLL.

    python bench/init_from.py --dataset checkerboard --fm-minutes 4 --mle-minutes 3
    python bench/init_from.py --dataset digits --fm-minutes 4 --mle-minutes 3

Four runs of the same network (checkerboard: MLP 3x128 tanh; digits: MLP 3x256 tanh on 64-D
vectors), one thread each:
1. flow matching for F minutes;
2. maximum likelihood (FFJORD + RNODE) from scratch for M minutes;
3. maximum likelihood for M minutes starting from run 1 (``train.init_from``);
4. flow matching for F + M minutes (the control: is the gain of 3 just more training?).
Held-out NLL (and bits/dim for digits) with the exact trace, dopri5 1e-5, and sampling NFE.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from common import ROOT, table, train_run

import flows
from flows.sampling import sample

SETUPS = {
    "checkerboard": {
        "fm": ("configs/toy2d_fm.yaml", ["train.eval_every=0"]),
        "mle": ("configs/toy2d_mle.yaml", ["model.hidden=[128,128,128]", "train.eval_every=0"]),
        "finetune": ["train.lr=1e-3", "train.warmup_steps=20"],
    },
    "digits": {
        "fm": (
            "configs/digits_mle.yaml",
            ["objective.name=fm", "train.lr=2e-3", "train.batch_size=256", "train.eval_every=0"],
        ),
        "mle": ("configs/digits_mle.yaml", ["train.eval_every=0"]),
        "finetune": ["train.lr=3e-4", "train.warmup_steps=20"],
    },
}


def rate(config: str, overrides: list[str], out: Path) -> float:
    """Steps per minute of a config on this machine (a 20-second calibration run), so that each run's
    cosine schedule ends when its time budget does."""
    run, _ = train_run(
        str(ROOT / config), [*overrides, f"run_dir={out}", "train.time_limit=0.33", "train.steps=10000000"]
    )
    steps = json.loads((run / "eval.json").read_text())["step"]
    return steps / 0.33


def result(run: Path, label: str) -> list:
    ev = json.loads((run / "eval.json").read_text())
    loaded = flows.load(run)
    res = sample(loaded.field, 2000, loaded.shape, method="dopri5", atol=1e-5, rtol=1e-5, adjoint=False)
    return [label, ev["step"], ev["nll"], ev["nll_se"], ev.get("bpd", ""), res.nfe]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(SETUPS), default="checkerboard")
    p.add_argument("--fm-minutes", type=float, default=4.0)
    p.add_argument("--mle-minutes", type=float, default=3.0)
    p.add_argument("--out", default=str(ROOT / "bench/out/init_from"))
    args = p.parse_args()
    setup = SETUPS[args.dataset]
    out = Path(args.out) / args.dataset
    shutil.rmtree(out, ignore_errors=True)
    common = ["eval.plot=false"]
    fm_cfg, fm_over = setup["fm"]
    mle_cfg, mle_over = setup["mle"]
    common += ["eval.periodic_size=10", "train.save_every=1000000"]
    fm_rate = rate(fm_cfg, [*fm_over, *common], out / "rate_fm")
    mle_rate = rate(mle_cfg, [*mle_over, *common], out / "rate_mle")

    def budget(minutes: float, per_minute: float) -> list[str]:
        return [f"train.time_limit={minutes}", f"train.steps={int(minutes * per_minute)}"]

    fm, _ = train_run(str(ROOT / fm_cfg), [*fm_over, *common, f"run_dir={out}/fm", *budget(args.fm_minutes, fm_rate)])
    rows = [result(fm, f"1. flow matching, {args.fm_minutes:g} min")]
    mle_args = [*mle_over, *common, *budget(args.mle_minutes, mle_rate)]
    scratch, _ = train_run(str(ROOT / mle_cfg), [*mle_args, f"run_dir={out}/mle"])
    rows.append(result(scratch, f"2. max. likelihood from scratch, {args.mle_minutes:g} min"))
    tuned, _ = train_run(
        str(ROOT / mle_cfg), [*mle_args, *setup["finetune"], f"train.init_from={fm}", f"run_dir={out}/fm_then_mle"]
    )
    rows.append(result(tuned, f"3. = 1, then max. likelihood {args.mle_minutes:g} min"))
    total = args.fm_minutes + args.mle_minutes
    longer, _ = train_run(str(ROOT / fm_cfg), [*fm_over, *common, f"run_dir={out}/fm_long", *budget(total, fm_rate)])
    rows.append(result(longer, f"4. flow matching, {total:g} min"))
    print(f"\n## {args.dataset}: flow matching, then maximum likelihood (held-out, exact trace, dopri5 1e-5)\n")
    print(table(["run", "steps", "NLL (nats)", "± SE", "bits/dim", "sampling NFE (2k)"], rows))


if __name__ == "__main__":
    main()
