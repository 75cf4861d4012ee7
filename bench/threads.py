"""OpenMP's wait policy: the default recipe's step rate on a quiet machine and beside one busy process.

    python bench/threads.py [--steps 40] [--threads 2]

Each row trains ``configs/toy2d_mle.yaml`` for ``--steps`` steps (no time limit, no evaluation) in a fresh
``train.py`` process with ``--threads`` torch threads and ``OMP_WAIT_POLICY`` set explicitly (ACTIVE: threads
spin while they wait, which an unset variable gave before flows chose a policy; PASSIVE: they sleep). The busy
neighbour is one single-threaded pure-Python loop, as a user's other program, at normal priority or at the lowest
(nice 19). Settings: ``OMP_WAIT_POLICY`` PASSIVE (threads sleep while they wait), ACTIVE (they spin), libgomp's
default (no policy), and a short spin (``GOMP_SPINCOUNT``). Reported: training seconds (the run's own
``train_time``: start-up and final evaluation excluded), the median of ``--repeats`` runs (the settings alternate),
and the ratio to the first row. Rows run one after another; nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# what each row sets (an empty OMP_WAIT_POLICY is libgomp's default: ignored by it, and kept by flows' setdefault)
SETTINGS = {
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
    "libgomp default": {"OMP_WAIT_POLICY": ""},
    "GOMP_SPINCOUNT=10000": {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "10000"},
}


def train_seconds(steps: int, threads: int, setting: str, run_dir: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env |= {"OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1", **SETTINGS[setting]}
    args = [f"train.steps={steps}", "train.time_limit=null", "train.eval_every=0", f"train.save_every={steps}"]
    args += ["eval.plot=false", "data.test_size=100", f"run_dir={run_dir}"]
    subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, check=True, capture_output=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max(r.get("train_time", 0.0) for r in records)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = p.parse_args()
    rows = []
    machines = {"quiet": None, "one busy process (nice 19)": 19, "one busy process (nice 0)": 0}
    with tempfile.TemporaryDirectory() as tmp:
        for machine, nice in machines.items():
            neighbour = None
            if nice is not None:
                loop = [sys.executable, "-c", "while True: pass"]
                neighbour = subprocess.Popen(["nice", "-n", str(nice), *loop])
            try:
                times: dict[str, list[float]] = {name: [] for name in args.settings}
                for i in range(args.repeats):
                    for policy in args.settings if i % 2 == 0 else args.settings[::-1]:
                        run_dir = Path(tmp) / f"{policy}_{nice}_{i}"
                        times[policy].append(train_seconds(args.steps, args.threads, policy, run_dir))
                        print(machine, policy, f"{times[policy][-1]:.2f} s", flush=True)
                rows += [(machine, policy, statistics.median(t)) for policy, t in times.items()]
            finally:
                if neighbour is not None:
                    neighbour.kill()
    base = rows[0][2]
    print(f"\n{args.steps} steps of configs/toy2d_mle.yaml, {args.threads} torch threads, one process, ", end="")
    print(f"median of {args.repeats}\n")
    print("| machine | OpenMP setting | training s | vs the first row |")
    print("|---|---|---|---|")
    for machine, policy, seconds in rows:
        print(f"| {machine} | {policy} | {seconds:.1f} | {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
