"""Full training on CIFAR-10: the best layers a search found against the four baselines,
and how the stage scales with local workers.

    python ../shared/data/prepare_cifar10.py /tmp/cifar10
    python benchmarks/full_training.py compare --run runs/ablation/evolution-0 \
        --data-dir /tmp/cifar10 --out-dir runs/fulltrain-bench
    python benchmarks/full_training.py scaling --run runs/ablation/evolution-0 \
        --data-dir /tmp/cifar10 --out-dir runs/fulltrain-bench

Both phases run `evonas train` as a user does, on a copy of the search's run folder (the
stage writes into <run>/fulltrain/, and a copy per measurement keeps every stage a fresh
Tune experiment rather than a resume of the last one). `compare` trains the search's top
survivors beside bn_relu, gn_relu, evonorm_b0 and evonorm_s0, each with the same number of
Optuna trials (--trials; the first trial of every group is the standard recipe, lr 0.1 and
weight decay 5e-4, so --trials 1 gives every layer the BN baselines' hyperparameters, the
paper's protocol), at --batch-sizes (128 and 8), over two seeds, and writes the stage's summary
(leaderboard, Kendall tau, ledger) to --out-dir/compare.json. `scaling` runs one small
plan with 1 and with 2 trials at once, in alternating order, --rounds times, and reports
the median wall time of each and their ratio (scaling.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _fresh_copy(run: Path, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("lock", "fulltrain"))
    return dest


def _train(run: Path, args, extra: list[str]) -> float:
    """Run `evonas train` on run; the wall seconds it took."""
    cmd = [sys.executable, "-m", "evonas", "train", str(run), "--data-dir", args.data_dir,
           "--cpus-per-trial", "1", *extra]
    # Each trial holds one CPU and sets its own torch threads to it; the driver stays at one.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    if done.returncode:
        sys.exit(f"evonas train failed ({done.returncode}):\n{done.stderr[-3000:]}")
    print(done.stdout, flush=True)
    return seconds


def phase_compare(args) -> None:
    out = Path(args.out_dir)
    run = _fresh_copy(Path(args.run), out / "compare-run")
    seconds = _train(run, args, [
        "--top", str(args.top), "--archs", "resnet20", "--batch-sizes", args.batch_sizes,
        "--seeds", str(args.seeds), "--trials-per-layer", str(args.trials),
        *(["--steps", str(args.steps)] if args.steps else ["--epochs", str(args.epochs)]),
        "--width", str(args.width), "--workers", "2"])
    summary = json.loads((run / "fulltrain" / "summary.json").read_text())
    summary["wall_seconds"] = seconds
    summary["settings"] = {"run": str(args.run), "top": args.top, "seeds": args.seeds,
                           "trials_per_layer": args.trials,
                           "epochs": None if args.steps else args.epochs, "steps": args.steps,
                           "width": args.width, "arch": "resnet20",
                           "batch_sizes": args.batch_sizes}
    (out / "compare.json").write_text(json.dumps(summary, indent=1))


def phase_scaling(args) -> None:
    out = Path(args.out_dir)
    plan = ["--top", "0", "--baselines", "bn_relu,gn_relu", "--archs", "resnet20",
            "--batch-sizes", "128", "--seeds", "1", "--trials-per-layer", "2", "--steps",
            str(args.scaling_steps), "--reports", "2", "--width", str(args.width)]
    walls: dict[int, list[float]] = {1: [], 2: []}
    trial_seconds: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.rounds):
        for workers in ((1, 2) if r % 2 == 0 else (2, 1)):
            run = _fresh_copy(Path(args.run), out / f"scaling-run-{workers}")
            walls[workers].append(_train(run, args, [*plan, "--workers", str(workers)]))
            trials = json.loads((run / "fulltrain" / "trials.json").read_text())
            trial_seconds[workers].append(statistics.mean(t["seconds"] for t in trials))
            print(f"round {r}: {workers} worker(s) {walls[workers][-1]:.0f}s", flush=True)
    result = {"trials": 4, "steps_per_trial": args.scaling_steps, "rounds": args.rounds,
              "wall_s": walls, "mean_trial_s": trial_seconds,
              "median_wall_s": {w: statistics.median(v) for w, v in walls.items()},
              "median_trial_s": {w: statistics.median(v) for w, v in trial_seconds.items()}}
    result["speedup_2_over_1"] = result["median_wall_s"][1] / result["median_wall_s"][2]
    result["trial_slowdown_2_over_1"] = (result["median_trial_s"][2]
                                         / result["median_trial_s"][1])
    (out / "scaling.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("wall_s", "mean_trial_s")},
                     indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=("compare", "scaling"))
    p.add_argument("--run", required=True, help="a search's run folder")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out-dir", default="runs/fulltrain-bench")
    p.add_argument("--top", type=int, default=2)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--trials", type=int, default=1, help="Optuna trials per layer and group")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int,
                   help="training length in SGD steps instead of --epochs (the same count at "
                        "every batch size)")
    p.add_argument("--batch-sizes", default="128,8",
                   help="an epoch at batch 8 took 1.25x the time of one at batch 128 here")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--scaling-steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    {"compare": phase_compare, "scaling": phase_scaling}[args.phase](args)


if __name__ == "__main__":
    main()
