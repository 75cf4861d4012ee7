"""Bits/dim on scikit-learn's digits (held-out 20%, 359 images) at equal training wall time.

    python bench/digits.py --minutes 15        # the protocol: 15 min per contestant (~1 h + evaluation)
    python bench/digits.py --minutes 5 --only flows-fm,flow_matching

Contestants, each trained for the same wall time on the same training split, one thread each:
- flows-fm: configs/digits_fm.yaml (U-Net on 1x8x8 images, flow matching, minibatch OT coupling);
- flows-mle: configs/digits_mle.yaml (MLP 3x256 on 64-D vectors, FFJORD + RNODE, Hutchinson, direct backprop);
- flow_matching: its AffineProbPath + CondOTScheduler training the same U-Net in a plain Adam loop
  (same batch size and learning rate, no EMA), evaluated by our exact-likelihood code;
- zuko: its CNF (MLP 3x256, ELU) trained by maximum likelihood with the Hutchinson trace, same data
  preprocessing, evaluated with its own exact-trace ``log_prob``.
All bits/dim are of the dequantized data in [0, 1)^64 with 17 grey levels (one dequantization per
image, dopri5 atol=rtol=1e-5; the exact trace for MLPs, 4 Hutchinson probes per image for U-Nets),
so they are directly comparable.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch
from common import ROOT, setup_threads, table, train_run, train_zuko_for

import flows
from flows.config import load_config
from flows.data import bits_per_dim, build_data
from flows.flow import Flow
from flows.likelihood import auto_trace
from flows.nn import build_field

EVAL = dict(method="dopri5", atol=1e-5, rtol=1e-5, adjoint=False)


def bpd_of(field, data, shape, trace: str, probes: int = 4) -> tuple[float, float]:
    """Bits/dim of the held-out split under ``field`` (one dequantization per image, seeded): the exact
    trace for MLPs, the mean of 4 Hutchinson probes per image for U-Nets (an unbiased estimate)."""
    raw = data.test.reshape(-1, *shape)
    flow = Flow(field, data.preprocess, tuple(shape), EVAL)
    gen = torch.Generator().manual_seed(0)
    lp = flow.log_prob(raw, trace=trace, probes=probes if trace == "hutchinson" else 1, generator=gen, batch_size=500)
    nll = -lp.mean().item()
    se = (lp.std() / math.sqrt(len(lp))).item()
    return bits_per_dim(nll, data.dim, data.preprocess.levels), se / (data.dim * math.log(2))


def ours(config: str, minutes: float, out: Path, overrides: tuple[str, ...] = (), probes: int = 4) -> list:
    shutil.rmtree(out / Path(config).stem, ignore_errors=True)
    run, _ = train_run(
        str(ROOT / config),
        [f"run_dir={out}/{Path(config).stem}", f"train.time_limit={minutes}", "eval.plot=false", *overrides],
    )
    loaded = flows.load(run)
    data = build_data(loaded.config.data)
    steps = loaded.step
    trace = auto_trace("auto", loaded.field, loaded.shape)
    final = json.loads((run / "eval.json").read_text())
    if probes == 1 and final["trace"] == trace:  # the trainer's final evaluation is this one: reuse it
        return [f"flows ({Path(config).name})", steps, trace, final["bpd"], final["nll_se"] / (data.dim * math.log(2))]
    return [f"flows ({Path(config).name})", steps, trace, *bpd_of(loaded.field, data, loaded.shape, trace, probes)]


def flow_matching_peer(
    minutes: float, config: str = "configs/digits_fm.yaml", overrides: tuple[str, ...] = (), probes: int = 4
) -> tuple[list, torch.nn.Module]:
    from flow_matching.path import AffineProbPath
    from flow_matching.path.scheduler import CondOTScheduler

    cfg = load_config(ROOT / config, overrides)
    data = build_data(cfg.data)
    torch.manual_seed(0)
    net = build_field(cfg.model, data.shape)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.train.lr)
    path = AffineProbPath(scheduler=CondOTScheduler())
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 60 * minutes:
        idx = torch.randint(0, len(data.train), (cfg.train.batch_size,))
        x1 = data.preprocess(data.train[idx])
        t = torch.rand(len(x1))
        s = path.sample(t=t, x_0=torch.randn_like(x1), x_1=x1)
        loss = (net(s.x_t, t) - s.dx_t).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    field = net.eval().requires_grad_(False)
    row = ["flow_matching (same U-Net)", steps, "hutchinson", *bpd_of(field, data, data.shape, "hutchinson", probes)]
    return row, field


def zuko_peer(minutes: float) -> list:
    import zuko

    cfg = load_config(ROOT / "configs/digits_mle.yaml")
    data = build_data(cfg.data)
    torch.manual_seed(0)
    flow = zuko.flows.CNF(64, 0, hidden_features=[256] * 3, exact=False, atol=1e-4, rtol=1e-4)
    batch = lambda: data.preprocess(data.train[torch.randint(0, len(data.train), (cfg.train.batch_size,))])  # noqa: E731
    steps = train_zuko_for(flow, batch, cfg.train.lr, minutes)
    pre = data.preprocess
    x = pre(data.test, noise=torch.rand(data.test.shape, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        lp = flow().log_prob(x).double() + pre.log_det(x)
    nll, se = -lp.mean().item(), (lp.std() / math.sqrt(len(lp))).item()
    return ["zuko CNF (MLP 3x256)", steps, "exact (zuko)", bits_per_dim(nll, 64, 17), se / (64 * math.log(2))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=15.0, help="training wall time per contestant")
    p.add_argument("--only", default="flows-fm,flows-mle,flow_matching,zuko")
    p.add_argument("--out", default=str(ROOT / "bench/out/digits"))
    args = p.parse_args()
    setup_threads(1)
    out = Path(args.out)
    contestants = {
        "flows-fm": lambda: ours("configs/digits_fm.yaml", args.minutes, out),
        "flows-mle": lambda: ours("configs/digits_mle.yaml", args.minutes, out),
        "flow_matching": lambda: flow_matching_peer(args.minutes)[0],
        "zuko": lambda: zuko_peer(args.minutes),
    }
    rows = []
    for name in args.only.split(","):
        try:
            rows.append(contestants[name]())
        except ImportError as e:
            rows.append([name, f"not installed ({e.name})", "", "", ""])
    print(f"\n## digits, held-out 359 images, {args.minutes:g} min of training each (1 thread)\n")
    print(table(["contestant", "steps", "trace", "bits/dim", "± SE"], rows))


if __name__ == "__main__":
    main()
