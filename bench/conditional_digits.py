"""Class-conditional digits: guided per-class samples, p(x | y) and its marginal against the unconditional flow.

    python bench/conditional_digits.py                  # the protocol: 4000 steps each (~20 min on one thread)
    python bench/conditional_digits.py --steps 2000     # shorter training, same protocol
    python bench/conditional_digits.py --quick          # smoke run (~2 min): 300 steps, rk4 16 steps
    python bench/conditional_digits.py --reuse          # evaluate the runs already in OUT (training is deterministic)

What. scikit-learn's 8x8 digits as (1, 8, 8) images (levels 0..16), the 1,438/359 split of the configs.
- conditional: configs/digits_cond.yaml, p(x | y) by flow matching with a label embedding and 10% label dropout
  (so classifier-free guidance works);
- unconditional: configs/digits_fm.yaml, its twin without labels.
Both are trained for the same number of steps (the configs' 4000 unless --steps), one thread, periodic
evaluations off and no time limit (so both run exactly that many steps); wall times are reported.

Sample quality. A classifier trained here on the real training images (an RBF SVM on pixels / 16; its accuracy on
the real test images is printed: the figure below means something only if it is high) labels the samples drawn
for each class y at guidance w in (0, 1, 3) (100 per class, dopri5 atol=rtol=1e-5). Reported: the share of the
samples of class y labelled y, per class and overall. Per-class grids (one row per class) go to OUT.

Bits/dim. On the held-out split (all 359 images unless --subset N: the first N), Hutchinson trace averaged over
4 probes per image (as bench/digits.py), one dequantization per image, dopri5 atol=rtol=1e-5. Every model sees the
same dequantization noise and probes (a generator seeded 0 for each solve), so differences are paired. The
conditional model is solved once per class for every image: log p(x | y) for y = 0..9 gives
- the conditional bits/dim of p(x | y), y the true label;
- the marginal log p(x) = log sum_y p(y) p(x | y) (p(y): the training labels' frequencies), the same sum that
  ``Flow.log_prob(x)`` computes without labels (checked against it on a few images);
- the model's own Bayes classifier argmax_y p(y) p(x | y) (its accuracy, a by-product).
Bits/dim = (-log p / 64 + log 17) / log 2 of the dequantized data in [0, 1)^64; mean ± SE over images.

Targets (the issue): (a) at some guidance >= 95% of the samples of class y are labelled y; (b) the bits/dim of
p(x | y) is no worse than the unconditional model's minus log2(10)/64. Why log2(10)/64: for the true densities
log p(x | y) = log p(x) + log p(y | x) - log p(y) <= log p(x) + log(1 / p(y)), so knowing the label can save at
most H(Y) ~ log2(10) bits per image, log2(10)/64 = 0.052 bits/dim, and saves all of it exactly when the image
determines its label. Meeting (b) means the conditional flow models the images as well as the unconditional one
and turns the whole label information into likelihood.
The estimator's own noise is of the size of the margin: with 1 probe, the conditional mean over the 359 images
moved by ~0.01 bits/dim (sd) from one noise seed to another and the paired gain by ~0.004; 4 probes halve that.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import ROOT, setup_threads, table, train_run
from sklearn.svm import SVC

import flows
from flows.config import load_config
from flows.data import build_data
from flows.flow import Flow
from flows.report import save_grid

CONDITIONAL, UNCONDITIONAL = "configs/digits_cond.yaml", "configs/digits_fm.yaml"
GUIDANCES = (0.0, 1.0, 3.0)
DIM, LEVELS = 64, 17
TARGET_SHARE = 0.95
TARGET_GAIN = math.log2(10) / DIM  # bits/dim that knowing the label can save at most (uniform p(y))
QUICK_SOLVER: dict[str, Any] = {"steps": 16}  # rk4, 16 steps
QUICK_STEPS, QUICK_PER_CLASS, QUICK_SUBSET = 300, 20, 60
CHECK_IMAGES = 4  # images on which the bench's marginal is checked against Flow.log_prob(x)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="training steps of each model (default: the configs')")
    p.add_argument("--quick", action="store_true", help="smoke run: 300 steps, 20 samples a class, rk4 16 steps")
    p.add_argument("--per-class", type=int, default=None, help="samples per class and guidance (default 100)")
    p.add_argument("--subset", type=int, default=None, help="bits/dim on the first N test images (default: all)")
    p.add_argument("--probes", type=int, default=4, help="Hutchinson probes per image")
    p.add_argument("--reuse", action="store_true", help="keep finished runs in OUT (same steps) instead of retraining")
    p.add_argument("--out", default=str(ROOT / "bench/out/conditional_digits"))
    return p.parse_args()


# ---------------------------------------------------------------------------------------------- training
def train(config: str, steps: int | None, out: Path, quick: bool, reuse: bool) -> tuple[Path, float, bool]:
    """Train ``config`` from scratch into out/<stem> for exactly ``steps`` steps; (run dir, wall seconds, reused).
    With ``reuse``, a finished run of that many steps already there is kept (its recorded training wall time)."""
    run = out / Path(config).stem
    record = run / "bench_train.json"
    want = steps if steps is not None else load_config(ROOT / config).train.steps
    if reuse and record.exists() and json.loads(record.read_text())["steps"] == want:
        return run, json.loads(record.read_text())["seconds"], True
    shutil.rmtree(run, ignore_errors=True)
    overrides = [f"run_dir={run}", "eval.plot=false", "train.eval_every=0", "train.time_limit=null"]
    overrides += [f"train.steps={steps}"] if steps is not None else []
    if quick:
        overrides += ["eval.solver.method=rk4", f"eval.solver.step_size={1 / QUICK_SOLVER['steps']}"]
    run, seconds = train_run(str(ROOT / config), overrides)
    record.write_text(json.dumps({"steps": want, "seconds": seconds}))
    return run, seconds, False


def trainer_eval(run: Path) -> dict[str, Any]:
    """The trainer's own final held-out evaluation (eval.json), for reference."""
    final = json.loads((run / "eval.json").read_text())
    return {k: final[k] for k in ("bpd", "nll", "nll_se", "trace") if k in final}


# ---------------------------------------------------------------------------------------------- classifier
def pixels(images: torch.Tensor) -> np.ndarray:
    """(N, 1, 8, 8) levels 0..16 → (N, 64) features in [0, 1]."""
    return (images.reshape(len(images), -1).double() / (LEVELS - 1)).cpu().numpy()


def fit_classifier(data: Any) -> tuple[SVC, float]:
    """An RBF SVM on the real training images; (classifier, accuracy on the real test images)."""
    clf = SVC(gamma="scale").fit(pixels(data.train), data.train_context.numpy())
    accuracy = float((clf.predict(pixels(data.test)) == data.test_context.numpy()).mean())
    return clf, accuracy


# ---------------------------------------------------------------------------------------------- samples
def guided_samples(
    model: Flow, clf: SVC, guidance: float, per_class: int, solver: dict[str, Any], out: Path
) -> dict[str, Any]:
    """``per_class`` samples of every class at ``guidance``: a grid PNG (one row per class) and the share of the
    samples of class y that ``clf`` labels y."""
    classes = model.context.classes
    gen = torch.Generator().manual_seed(0)
    images, info = model.sample(
        per_class, context=torch.arange(classes), guidance=guidance, generator=gen, return_info=True, **solver
    )  # (classes, per_class, 1, 8, 8)
    flat = images.reshape(-1, *model.shape)
    png = save_grid(flat / (LEVELS - 1), out / f"samples_w{guidance:g}.png", nrow=per_class)
    labels = clf.predict(pixels(flat)).reshape(classes, per_class)
    per = (labels == np.arange(classes)[:, None]).mean(1)
    return {
        "guidance": guidance,
        "share": float(per.mean()),
        "per_class": [float(s) for s in per],
        "nfe": info["nfe"],
        "seconds": info["seconds"],
        "png": str(png),
    }


# ---------------------------------------------------------------------------------------------- bits/dim
def log_probs(model: Flow, x: torch.Tensor, solver: dict[str, Any], probes: int, context: Any = None) -> torch.Tensor:
    """log p (N,) in nats with the bench's fixed noise: a generator seeded 0, all images in one batch."""
    gen = torch.Generator().manual_seed(0)
    return model.log_prob(
        x, context=context, trace="hutchinson", probes=probes, generator=gen, batch_size=len(x), **solver
    )


def per_class_log_probs(model: Flow, x: torch.Tensor, solver: dict[str, Any], probes: int) -> torch.Tensor:
    """log p(x | y) (K, N) for every class y, each solve with the same dequantization noise and probes."""
    return torch.stack(
        [log_probs(model, x, solver, probes, torch.full((len(x),), y)) for y in range(model.context.classes)]
    )


def marginal(per_class: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """log Σ_y p(y) p(x | y) (N,) from log p(x | y) (K, N)."""
    return torch.logsumexp(per_class + prior.double().log()[:, None], 0)


def bpd(lp: torch.Tensor) -> tuple[float, float]:
    """(mean, SE) bits/dim of per-image log-densities in nats."""
    per = (-lp / DIM + math.log(LEVELS)) / math.log(2)
    return per.mean().item(), (per.std() / math.sqrt(len(per))).item()


def paired(lp_a: torch.Tensor, lp_b: torch.Tensor) -> tuple[float, float]:
    """(mean, SE) of bpd(a) − bpd(b) over the same images."""
    diff = (lp_b - lp_a) / (DIM * math.log(2))
    return diff.mean().item(), (diff.std() / math.sqrt(len(diff))).item()


def likelihoods(
    cond: Flow, uncond: Flow, x: torch.Tensor, y: torch.Tensor, solver: dict[str, Any], probes: int
) -> dict[str, Any]:
    """Every bits/dim figure on the images ``x`` (labels ``y``), with timings."""
    start = time.perf_counter()
    per_class = per_class_log_probs(cond, x, solver, probes)  # (K, N)
    cond_seconds = time.perf_counter() - start
    start = time.perf_counter()
    lp_u = log_probs(uncond, x, solver, probes)
    uncond_seconds = time.perf_counter() - start
    prior = cond.context.prior
    lp_c = per_class[y, torch.arange(len(x))]
    lp_m = marginal(per_class, prior)
    bayes = (per_class + prior.double().log()[:, None]).argmax(0)
    return {
        "images": len(x),
        "conditional": bpd(lp_c),
        "marginal": bpd(lp_m),
        "unconditional": bpd(lp_u),
        "cond_minus_uncond": paired(lp_c, lp_u),
        "marg_minus_uncond": paired(lp_m, lp_u),
        "label_bits": ((lp_c - lp_m) / math.log(2)).mean().item(),  # mean log2 p(y|x)/p(y) ...
        "label_bits_max": (-prior.double().log2()[y]).mean().item(),  # ... <= mean log2 1/p(y): p(y|x) = 1
        "bayes_accuracy": (bayes == y).double().mean().item(),
        "seconds": {"conditional (10 solves)": cond_seconds, "unconditional": uncond_seconds},
    }


def check_marginal(model: Flow, x: torch.Tensor, solver: dict[str, Any], probes: int) -> float:
    """Largest |Flow.log_prob(x) − log Σ_y p(y) p(x | y)| (nats) over a few images: the library's marginal and
    the bench's sum agree (same noise: the library replays the generator for each class)."""
    library = log_probs(model, x, solver, probes)
    ours = marginal(per_class_log_probs(model, x, solver, probes), model.context.prior)
    return (library - ours).abs().max().item()


# ---------------------------------------------------------------------------------------------- report
def report(res: dict[str, Any]) -> None:
    steps, trained = res["steps"], res["training"]
    print(f"\n## conditional digits: {steps} training steps each (1 thread)\n")
    rows = [
        [name, t["steps"], t["seconds"], "yes" if t["reused"] else "no", t["trainer_bpd"]]
        for name, t in trained.items()
    ]
    heads = ["model", "steps", "train s", "reused (--reuse)", "trainer's final bits/dim (all test, 1 probe, unseeded)"]
    print(table(heads, rows))

    print(f"\n## sample quality: real-image classifier (RBF SVM), test accuracy {res['classifier_accuracy']:.4f}\n")
    heads = ["guidance", "labelled y (all)", *(str(k) for k in range(10)), "NFE", "sample s"]
    rows = [[s["guidance"], s["share"], *s["per_class"], s["nfe"], s["seconds"]] for s in res["samples"]]
    print(table(heads, rows))
    print("(share of the samples of class y that the classifier labels y; grids: " + res["out"] + "/samples_w*.png)")

    lik = res["likelihood"]
    what = "all" if lik["images"] == res["test_images"] else f"the first {lik['images']} of {res['test_images']}"
    print(f"\n## bits/dim on {what} held-out images (Hutchinson, {res['probes']} probes, paired noise)\n")
    rows = [
        ["conditional p(x|y)", *lik["conditional"], *lik["cond_minus_uncond"]],
        ["conditional, marginal Σ_y p(y)p(x|y)", *lik["marginal"], *lik["marg_minus_uncond"]],
        ["unconditional p(x)", *lik["unconditional"], 0.0, 0.0],
    ]
    print(table(["model", "bits/dim", "± SE", "minus uncond", "± SE (paired)"], rows))
    print(
        f"label information: mean log2 p(y|x)/p(y) = {lik['label_bits']:.3f} bits/image "
        f"(at most mean log2 1/p(y) = {lik['label_bits_max']:.3f}, when p(y|x) = 1); "
        f"the conditional model's Bayes classifier: {lik['bayes_accuracy']:.4f} accuracy; "
        f"library marginal vs bench sum: max |Δ| = {res['marginal_check']:.2e} nats"
    )

    print("\n## targets\n")
    for line in res["targets"]["lines"]:
        print(line)
    print(f"\nwall time: {res['seconds']['total']:.0f} s ({json.dumps(res['seconds'], default=round)})")


def targets(res: dict[str, Any]) -> dict[str, Any]:
    best = max(res["samples"], key=lambda s: s["share"])
    share_met = best["share"] >= TARGET_SHARE
    lik = res["likelihood"]
    cond, uncond = lik["conditional"][0], lik["unconditional"][0]
    bound = uncond - TARGET_GAIN
    bpd_met = cond <= bound
    gain, gain_se = lik["cond_minus_uncond"]
    return {
        "share": {"met": share_met, "best": best["share"], "guidance": best["guidance"]},
        "bpd": {"met": bpd_met, "conditional": cond, "bound": bound, "gain": -gain, "gain_se": gain_se},
        "lines": [
            f"[{'met' if share_met else 'MISSED'}] samples labelled as their class >= {TARGET_SHARE:.0%} at some "
            f"guidance: best {best['share']:.1%} at w={best['guidance']:g} ("
            + ", ".join(f"w={s['guidance']:g}: {s['share']:.1%}" for s in res["samples"])
            + ")",
            f"[{'met' if bpd_met else 'MISSED'}] bits/dim of p(x|y) <= unconditional - log2(10)/64: "
            f"{cond:.4f} vs {uncond:.4f} - {TARGET_GAIN:.4f} = {bound:.4f} "
            f"(gain {-gain:.4f} ± {gain_se:.4f} bits/dim, paired SE; needed {TARGET_GAIN:.4f})",
        ],
    }


def main() -> None:
    args = parse()
    setup_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = QUICK_STEPS if args.quick and args.steps is None else args.steps
    per_class = args.per_class or (QUICK_PER_CLASS if args.quick else 100)
    solver = dict(QUICK_SOLVER) if args.quick else {}  # {}: the runs' eval solver, dopri5 atol=rtol=1e-5
    seconds: dict[str, float] = {}
    start = time.perf_counter()

    trained, models = {}, {}
    for name, config in (("conditional", CONDITIONAL), ("unconditional", UNCONDITIONAL)):
        run, seconds[f"train {name}"], reused = train(config, steps, out, args.quick, args.reuse)
        models[name] = flows.load(run)
        trained[name] = {"steps": models[name].step, "seconds": seconds[f"train {name}"], "run": str(run)}
        trained[name] |= {"reused": reused}
        trained[name]["trainer_bpd"] = trainer_eval(run).get("bpd", float("nan"))
    cond, uncond = models["conditional"], models["unconditional"]
    data = build_data(load_config(ROOT / CONDITIONAL).data)

    clf, accuracy = fit_classifier(data)
    samples = [guided_samples(cond, clf, w, per_class, solver, out) for w in GUIDANCES]
    seconds["samples"] = sum(s["seconds"] for s in samples)

    n = args.subset or (QUICK_SUBSET if args.quick else len(data.test))
    x, y = data.test[:n], data.test_context[:n]
    lik = likelihoods(cond, uncond, x, y, solver, args.probes)
    seconds |= {f"bits/dim {k}": v for k, v in lik["seconds"].items()}
    t0 = time.perf_counter()
    check = check_marginal(cond, x[:CHECK_IMAGES], solver, args.probes)
    seconds["marginal check"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - start

    res: dict[str, Any] = {
        "steps": trained["conditional"]["steps"],
        "quick": args.quick,
        "solver": solver or cond.solver,
        "probes": args.probes,
        "training": trained,
        "classifier_accuracy": accuracy,
        "samples": samples,
        "test_images": len(data.test),
        "likelihood": lik,
        "marginal_check": check,
        "out": str(out),
        "seconds": seconds,
    }
    res["targets"] = targets(res)
    report(res)
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
