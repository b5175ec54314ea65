"""The CIFAR-10 reference panel, trained fully in parts that each fit one stretch of a
2-core machine, with one set of settings so their scores compare (evonas calibrate
--panel-from part1,part2,... refuses parts trained otherwise).

    python ../shared/data/prepare_cifar10.py /tmp/cifar10
    python benchmarks/panel_train.py --part 1 --data-dir /tmp/cifar10   # then 2 to 5
    python benchmarks/panel_train.py --build                            # panel.json

A part is `evonas train` on a host run folder (a one-candidate search on CIFAR-10 whose
only use is to hold the stage; --top 0) with the part's layers as --baselines: zoo layers
by name, the panel's random and found layers as genome files in
benchmarks/panel/cifar10/layers/. Killed, the same command resumes the part (Tune). Done,
the files that define it (the host run's config, state and journal; the stage's config,
summary, leaderboard and trials) are copied to benchmarks/panel/cifar10/runs/part<k>/, to
be committed: the panel is data every calibration reuses.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PANEL = HERE / "panel" / "cifar10"
LAYERS = PANEL / "layers"

# Every zoo layer of the nchw spaces, and layers of no zoo spanning bad to good: found
# by earlier searches, normalization-free ones proxies have scored well, random ones.
PARTS = {
    1: ["bn_relu", "gn_relu", "evonorm_b0", "evonorm_s0"],
    2: ["found_gn_weighted.json", "neg.json", "in_relu", "ln_relu"],
    3: ["bn_silu", "evonorm_b1", "evonorm_b2", "evonorm_s1"],
    4: ["evonorm_s2", "found_neg_bn_nocentre.json", "found_ssqrt_neg.json", "swish.json"],
    5: ["random_1.json", "random_2.json", "random_3.json"],
}
# Two networks of two families, two seeds, two epochs at batch 128, each layer with the
# standard SGD recipe (the first point of its one-trial study: lr 0.1, weight decay 5e-4),
# the paper's protocol. Width 8: on a CPU core a ResNet-20 epoch takes 2-3 minutes.
TRAIN = ["--top", "0", "--archs", "resnet20,mobilenetv2", "--batch-sizes", "128",
         "--seeds", "2", "--epochs", "2", "--width", "8", "--trials-per-layer", "1"]
# The host search: one candidate at the smallest sizes (its proxies also score the
# baselines for the stage's own tau, which the panel does not use).
HOST = ["--space", "norm_act", "--dataset", "cifar10", "--budget", "1evals", "--workers", "0",
        "--archs", "resnet", "--proxy-steps", "20", "--quality-steps", "10",
        "--quality-threshold", "0.05", "--proxy-width", "8", "--stability-steps", "2"]
KEEP = ["config.json", "state.json", "journal.jsonl", "fulltrain/config.json",
        "fulltrain/summary.json", "fulltrain/leaderboard.json", "fulltrain/trials.json"]


def evonas(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "evonas", *args], env=env)
    if done.returncode:
        sys.exit(done.returncode)


def baselines(part: int) -> str:
    return ",".join(str(LAYERS / n) if n.endswith(".json") else n for n in PARTS[part])


def train_on_host(run: Path, layers: str, data_dir: str, workers: int, kept: Path,
                  plan: list[str] = TRAIN) -> None:
    """`evonas train` of `layers` (--baselines) on a host run made on first use, then the
    files that define the stage copied to `kept`, to be committed."""
    if not (run / "config.json").exists():
        evonas("search", *HOST, "--data-dir", data_dir, "--out", str(run))
    evonas("train", str(run), *plan, "--baselines", layers, "--data-dir", data_dir,
           "--workers", str(workers))
    for name in KEEP:
        (kept / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(run / name, kept / name)
    print(f"{run.name} kept in {kept}")


def train_part(part: int, data_dir: str, runs: Path, workers: int) -> None:
    train_on_host(runs / f"part{part}", baselines(part), data_dir, workers,
                  PANEL / "runs" / f"part{part}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", type=int, choices=sorted(PARTS))
    p.add_argument("--build", action="store_true", help="panel.json from the kept parts")
    p.add_argument("--data-dir")
    p.add_argument("--runs", type=Path, default=Path("runs/panel"))
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    if args.part:
        train_part(args.part, args.data_dir, args.runs, args.workers)
    if args.build:
        parts = sorted((PANEL / "runs").glob("part*"))
        evonas("calibrate", "--panel", str(PANEL), "--panel-from", ",".join(map(str, parts)))


if __name__ == "__main__":
    main()
