"""Maximum likelihood on checkerboard: our trainer against a bare PyTorch + torchdiffeq loop.

    python bench/toy_mle.py                 # full protocol (~35 min on 2 cores)
    python bench/toy_mle.py --minutes 2     # shorter NLL-vs-time runs

1. Overhead at FFJORD's toy settings (MLP 3x64 tanh concat-squash, batch 100, dopri5
   atol=rtol=1e-5, exact trace, adjoint, Adam 1e-3): the full trainer (Accelerate, EMA, clipping
   off, logging) and a bare loop train the same network from the same initial weights on the same
   batches in this process; both NFE and seconds per iteration are reported, and the ratio of
   seconds per function evaluation (equal NFE).
2. Held-out NLL (10k points, seed 1, exact trace, dopri5 1e-5) against training wall time for the
   default recipe (configs/toy2d_mle.yaml, RNODE kinetic + Jacobian 0.01 each) and the same recipe
   without the regularizers, and the NFE of each model at equal NLL.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from common import ROOT, median, records, setup_threads, table, train_run
from torchdiffeq import odeint_adjoint

from flows.config import load_config
from flows.training import Trainer

FFJORD = [
    "data.name=checkerboard",
    "model.hidden=[64,64,64]",
    "model.activation=tanh",
    "train.batch_size=100",
    "train.lr=1e-3",
    "train.warmup_steps=0",
    "train.grad_clip=0",
    "solver.method=dopri5",
    "solver.atol=1e-5",
    "solver.rtol=1e-5",
    "solver.adjoint=true",
    "objective.trace=exact",
]


class BareODE(torch.nn.Module):
    """FFJORD-style dynamics written plainly: [x, logp] with the exact 2D trace (no graph when not needed)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.nfe = net, 0

    def forward(self, t, state):
        self.nfe += 1
        x = state[0]
        create_graph = torch.is_grad_enabled()  # off in the adjoint's forward pass: the true floor
        with torch.enable_grad():
            x = x if x.requires_grad else x.detach().requires_grad_(True)
            v = self.net(x, t.expand(x.shape[0]))
            div = sum(
                torch.autograd.grad(v[:, i].sum(), x, create_graph=create_graph, retain_graph=True)[0][:, i]
                for i in range(x.shape[1])
            )
        return v, -div


def bare_loop(net, batches, iters):
    func = BareODE(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    times, nfes = [], []
    t = torch.tensor([1.0, 0.0])
    for i in range(iters):
        x = batches[i]
        start = time.perf_counter()
        func.nfe = 0
        z, dlogp = odeint_adjoint(
            func,
            (x, torch.zeros(len(x))),
            t,
            atol=1e-5,
            rtol=1e-5,
            method="dopri5",
            adjoint_params=tuple(net.parameters()),
        )
        fwd = func.nfe
        logp = -0.5 * (z[-1].pow(2).sum(1) + 2 * math.log(2 * math.pi)) - dlogp[-1]
        loss = -logp.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
        nfes.append((fwd, func.nfe - fwd))
    return times, nfes


def overhead(iters: int, out: Path) -> list[list]:
    cfg = load_config(
        None,
        [
            *FFJORD,
            f"run_dir={out}/overhead",
            f"train.steps={iters}",
            "train.log_every=1",
            "train.eval_every=0",
            f"train.save_every={10 * iters}",
            "eval.plot=false",
            "data.train_size=100000",
            "data.test_size=100",
        ],
    )
    trainer = Trainer(cfg)
    init = copy.deepcopy(trainer.field)
    # the exact batches the trainer will draw: one raw tensor per step (checkerboard's preprocessing is the identity)
    batches = [raw for raw, _ in zip(trainer.batches(), range(iters), strict=False)]
    start = time.perf_counter()
    trainer.run()
    trainer.accelerator.end_training()
    ours_total = time.perf_counter() - start
    steps, _ = records(Path(f"{out}/overhead"))
    ours_t = [r["step_time"] for r in steps]
    ours_nfe = [(r["nfe_forward"], r["nfe_backward"]) for r in steps]
    bare_net = copy.deepcopy(init)
    bare_t, bare_nfe = bare_loop(bare_net, batches, iters)

    def per_nfe(ts, nfes):
        return sum(ts[5:]) / sum(f + b for f, b in nfes[5:])

    ratio = per_nfe(ours_t, ours_nfe) / per_nfe(bare_t, bare_nfe)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return [
        [
            "flows trainer",
            median(ours_t[5:]),
            mean([f for f, _ in ours_nfe]),
            mean([b for _, b in ours_nfe]),
            per_nfe(ours_t, ours_nfe) * 1e3,
            ratio,
            ours_total / iters,
        ],
        [
            "bare torchdiffeq loop",
            median(bare_t[5:]),
            mean([f for f, _ in bare_nfe]),
            mean([b for _, b in bare_nfe]),
            per_nfe(bare_t, bare_nfe) * 1e3,
            1.0,
            sum(bare_t) / iters,
        ],
    ]


def nll_vs_time(name: str, overrides: list[str], minutes: float, out: Path) -> dict:
    run_dir, wall = train_run(
        str(ROOT / "configs/toy2d_mle.yaml"),
        [
            f"run_dir={out}/{name.split()[0]}",
            f"train.time_limit={minutes}",
            "eval.periodic_size=10000",
            "eval.plot=false",
            *overrides,
        ],
    )
    steps, evals = records(run_dir)
    return {"name": name, "steps": steps, "evals": evals, "wall": wall}


def first_time_below(evals, level):
    hits = [e for e in evals if e["nll"] <= level]
    return (hits[0]["train_time"], hits[0]["step"]) if hits else (float("nan"), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="training minutes per NLL-vs-time run")
    p.add_argument("--overhead-iters", type=int, default=60)
    p.add_argument("--out", default=str(ROOT / "bench/out/toy_mle"))
    p.add_argument(
        "--parts",
        default="overhead,early,long",
        help="comma-separated: overhead, early (first minute, evaluated every 25 steps), long",
    )
    args = p.parse_args()
    setup_threads(2)
    out = Path(args.out)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    parts = set(args.parts.split(","))
    if "overhead" in parts:
        rows = overhead(args.overhead_iters, out)
        print(
            f"\n## Overhead at FFJORD's toy settings ({args.overhead_iters} iterations each, same init, same batches)"
        )
        print(
            table(
                [
                    "loop",
                    "s/iter median",
                    "NFE fwd",
                    "NFE bwd",
                    "ms per NFE",
                    "ratio per NFE",
                    "s/iter incl. all",
                ],
                rows,
            )
        )

    if "early" in parts:
        early = nll_vs_time("early", ["train.eval_every=25", "eval.periodic_size=10000"], 1.0, out)
        t389, s389 = first_time_below(early["evals"], 3.89)
        print("\n## Default recipe, first minute, held-out NLL (10k points) every 25 steps (target: 3.89 in <= 23 s)")
        print(
            table(
                ["step", "train s", "NLL", "eval NFE"],
                [[e["step"], round(e["train_time"], 1), round(e["nll"], 4), e["nfe"]] for e in early["evals"]],
            )
        )
        print(f"first evaluation at or below 3.89 nats: step {s389}, {t389:.1f} s of training")
    if "long" not in parts:
        return
    runs = [
        nll_vs_time("no regularization", ["objective.kinetic=0", "objective.jacobian=0"], args.minutes, out),
        nll_vs_time("default (RNODE 0.01/0.01)", [], args.minutes, out),
    ]
    print(f"\n## Held-out NLL (10k points, exact trace, dopri5 1e-5) vs training time, {args.minutes} min budget")
    rows = []
    for r in runs:
        for e in r["evals"]:
            rows.append(
                [
                    r["name"],
                    e["step"],
                    round(e["train_time"], 1),
                    round(e["nll"], 4),
                    round(e["nll_se"], 4),
                    e["nfe"],
                ]
            )
    print(table(["run", "step", "train s", "NLL", "± se", "eval NFE"], rows))
    rows = []
    for r in runs:
        steps, final = r["steps"], r["evals"][-1]
        t389, s389 = first_time_below(r["evals"], 3.89)
        t360, _ = first_time_below(r["evals"], 3.60)
        late = steps[len(steps) // 2 :]
        rows.append(
            [
                r["name"],
                final["nll"],
                final["nfe"],
                t389,
                t360,
                median([s["step_time"] for s in steps]),
                median([s["nfe_forward"] for s in late]),
                median([s.get("nfe_backward", 0) for s in late]),
            ]
        )
    print("\n## Summary (targets: 3.89 nats in <= 23 s; <= 3.60 nats within 10 min)")
    print(
        table(
            [
                "run",
                "final NLL",
                "eval NFE",
                "s to 3.89",
                "s to 3.60",
                "s/iter median",
                "train NFE fwd (2nd half)",
                "NFE bwd",
            ],
            rows,
        )
    )
    reg, plain = runs[1]["evals"][-1], runs[0]["evals"]
    match = [e for e in plain if e["nll"] <= reg["nll"]]
    if match:
        print(
            f"\nregularized: NLL {reg['nll']:.4f} at eval NFE {reg['nfe']:.0f}; unregularized first reaches it at "
            f"step {match[0]['step']} with eval NFE {match[0]['nfe']:.0f}: ratio {reg['nfe'] / match[0]['nfe']:.2f}x"
            " (target <= 0.6x)"
        )
    else:
        print(
            f"\nregularized final NLL {reg['nll']:.4f} is below every unregularized evaluation "
            f"(best {min(e['nll'] for e in plain):.4f}); NFE {reg['nfe']:.0f} vs {plain[-1]['nfe']:.0f}"
        )


if __name__ == "__main__":
    main()
