"""Flow matching on checkerboard: our trainer against a bare loop, torchcfm and flow_matching.

    python bench/toy_fm.py                    # all parts (~15 min on 2 cores)
    python bench/toy_fm.py --parts steps      # only the step-time race (~2 min)

1. steps: MLP 3x64 (our TimeMLP, tanh), batch 256, 5,000 steps, conditional-OT path, Adam with the
   same learning-rate schedule for every contestant, the same initial weights and the same data
   batches, one after the other in this process. Our contestant is the full trainer (Accelerate,
   EMA, gradient clipping, logging, checkpoint at the end excluded); the bare loop is plain PyTorch;
   torchcfm's ``ConditionalFlowMatcher`` (sigma=0) and flow_matching's ``AffineProbPath`` +
   ``CondOTScheduler`` build the regression targets in theirs. Each model's held-out NLL (10k
   points, exact trace, dopri5 1e-5) and sampling NFE are measured with the same evaluator.
2. coupling: the same recipe with independent vs minibatch-OT coupling: sampling NFE at dopri5
   1e-5 (10k samples) and held-out NLL.
3. recipe: configs/toy2d_fm.yaml, our tuned default, trained within its time limit: held-out NLL.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from common import ROOT, records, setup_threads, table, train_run

import flows
from flows.config import load_config
from flows.data import build_data
from flows.flow import Flow
from flows.preprocess import Preprocess
from flows.sampling import sample
from flows.training import Trainer, lr_lambda

STEPS_RACE = [
    "data.name=checkerboard",
    "objective.name=fm",
    "model.hidden=[64,64,64]",
    "model.activation=tanh",
    "train.batch_size=256",
    "train.lr=1e-2",
    "train.warmup_steps=100",
    "train.schedule=cosine",
    "train.eval_every=0",
    "train.log_every=100",
    "eval.plot=false",
]
EVAL = dict(method="dopri5", atol=1e-5, rtol=1e-5, adjoint=False)


def held_out(field: torch.nn.Module, test: torch.Tensor) -> tuple[float, int]:
    """(NLL over the held-out points, NFE to sample 10k points), dopri5 1e-5, exact trace: ``Flow.log_prob``
    (checkerboard's preprocessing is the identity) for every contestant's field."""
    identity = Preprocess(torch.tensor(0.0, device="cpu"), torch.tensor(1.0, device="cpu"))
    lp = Flow(field, identity, (2,), EVAL).log_prob(test, trace="exact", batch_size=10_000)
    res = sample(field, 10_000, (2,), generator=torch.Generator().manual_seed(0), **EVAL)
    return -lp.double().mean().item(), res.nfe


def peer_loop(name: str, net: torch.nn.Module, batches: list[torch.Tensor], cfg) -> float:
    """Seconds per step of a plain training loop whose targets come from ``name``'s library."""
    opt = torch.optim.Adam(net.parameters(), lr=cfg.train.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    if name == "torchcfm":
        from torchcfm.conditional_flow_matching import ConditionalFlowMatcher

        fm = ConditionalFlowMatcher(sigma=0.0)
    elif name == "flow_matching":
        from flow_matching.path import AffineProbPath
        from flow_matching.path.scheduler import CondOTScheduler

        path = AffineProbPath(scheduler=CondOTScheduler())
    start = time.perf_counter()
    for x1 in batches:
        x0 = torch.randn_like(x1)
        if name == "torchcfm":
            t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
        elif name == "flow_matching":
            t = torch.rand(len(x1))
            sample_ = path.sample(t=t, x_0=x0, x_1=x1)
            xt, ut = sample_.x_t, sample_.dx_t
        else:  # bare
            t = torch.rand(len(x1))
            xt, ut = t[:, None] * x1 + (1 - t[:, None]) * x0, x1 - x0
        loss = (net(xt, t) - ut).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return (time.perf_counter() - start) / len(batches)


def race(steps: int, out: Path, peers: list[str]) -> list[list]:
    cfg = load_config(None, [*STEPS_RACE, f"train.steps={steps}", f"train.save_every={steps}", f"run_dir={out}/ours"])
    trainer = Trainer(cfg)
    init = copy.deepcopy(trainer.field)
    # the exact batches the trainer will draw (its seeded sampler), for every contestant
    batches = [b.clone() for b, _ in zip(trainer.batches(), range(steps), strict=False)]
    test = build_data(cfg.data).test
    # the bare loop runs first and last: machine drift over the race shows as a difference between the two
    bare_first = copy.deepcopy(init)
    first = peer_loop("bare", bare_first, batches, cfg)
    trainer.run()
    _, evals = records(Path(cfg.run_dir))
    ours = evals[-1]["train_time"] / steps
    nll, nfe = held_out(flows.load(cfg.run_dir).field, test)
    rows = [["flows (trainer, EMA)", ours * 1e3, 1.0, nll, nfe]]
    nll, nfe = held_out(bare_first.eval().requires_grad_(False), test)
    rows.append(["bare (run first)", first * 1e3, ours / first, nll, nfe])
    for name in [*peers, "bare"]:
        net = copy.deepcopy(init)
        try:
            per_step = peer_loop(name, net, batches, cfg)
        except ImportError as e:
            rows.append([name, f"not installed ({e.name})", "", "", ""])
            continue
        nll, nfe = held_out(net.eval().requires_grad_(False), test)
        rows.append([name if name != "bare" else "bare (run last)", per_step * 1e3, ours / per_step, nll, nfe])
    return rows


def coupling(steps: int, out: Path) -> list[list]:
    rows = []
    test = build_data(load_config(None, STEPS_RACE).data).test
    for kind in ("independent", "ot"):
        run = out / f"coupling_{kind}"
        train_run(None, [*STEPS_RACE, f"train.steps={steps}", f"run_dir={run}", f"objective.coupling={kind}"])
        steps_rec, _ = records(run)
        nll, nfe = held_out(flows.load(run).field, test)
        rows.append([kind, steps_rec[-1]["train_time"] / steps * 1e3, nll, nfe])
    rows.append(["ratio ot / independent", rows[1][1] / rows[0][1], "", rows[1][3] / rows[0][3]])
    return rows


def recipe(out: Path) -> list[list]:
    run, seconds = train_run(str(ROOT / "configs/toy2d_fm.yaml"), [f"run_dir={out}/recipe", "eval.plot=false"])
    result = json.loads((run / "eval.json").read_text())
    _, evals = records(run)
    _, nfe = held_out(flows.load(run).field, build_data(load_config(None, STEPS_RACE).data).test)
    row = [
        "configs/toy2d_fm.yaml",
        result["step"],
        evals[-1]["train_time"],
        seconds,
        result["nll"],
        result["nll_se"],
        nfe,
    ]
    return [row]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--threads", type=int, default=1, help="torch threads (one process)")
    p.add_argument("--parts", default="steps,coupling,recipe")
    p.add_argument("--peers", default="torchcfm,flow_matching")
    p.add_argument("--out", default=str(ROOT / "bench/out/toy_fm"))
    args = p.parse_args()
    setup_threads(args.threads)
    out = Path(args.out)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    parts = args.parts.split(",")
    if "steps" in parts:
        print(f"\n## Step time, MLP 3x64, batch 256, {args.steps} steps ({args.threads} thread)\n")
        rows = race(args.steps, out, [p for p in args.peers.split(",") if p])
        head = ["contestant", "ms/step", "ours / theirs", "held-out NLL", "sampling NFE"]
        print(table(head, rows))
    if "coupling" in parts:
        print(f"\n## Coupling, same recipe, {args.steps} steps: sampling NFE at dopri5 1e-5 (10k samples)\n")
        print(table(["coupling", "ms/step", "held-out NLL", "sampling NFE"], coupling(args.steps, out)))
    if "recipe" in parts:
        print("\n## The tuned default (configs/toy2d_fm.yaml)\n")
        head = ["config", "steps", "train s", "wall s (with evals)", "held-out NLL", "± SE", "sampling NFE"]
        print(table(head, recipe(out)))


if __name__ == "__main__":
    main()
