"""The layers the CIFAR-10 searches found, trained fully beside the baselines at batch 128
and batch 8, with the reference panel's plan (benchmarks/panel_train.py: ResNet-20 and
MobileNetV2 at width 8, two seeds, two epochs, SGD lr 0.1 and weight decay 5e-4 at batch
128, scaled linearly with the batch).

    python benchmarks/found_vs_baselines.py pick --searches benchmarks/runs/ladder-s,benchmarks/runs/ladder-f
    python benchmarks/found_vs_baselines.py train --part b8-base --data-dir /tmp/cifar10
    python benchmarks/found_vs_baselines.py train --part b8-found --data-dir /tmp/cifar10
    python benchmarks/found_vs_baselines.py train --part b128-found --data-dir /tmp/cifar10
    python benchmarks/found_vs_baselines.py table

`pick` reads every search run under the --searches folders (search_ablation.py's, both
controllers) and writes genome files to benchmarks/found/cifar10/layers/: the best layer
overall, the best batch-independent one (no statistic over the batch axes) and the best
one with batch statistics (BN's kind), ranked as a search ranks (the highest rung
reached, then the mean fitness there); the best overall is one of the other two and is
written once, under that one's name. `train`
runs one part as panel_train.py runs one: `evonas train` on a host run with the part's
layers as --baselines, resumable by the same command, its defining files copied to
benchmarks/found/cifar10/runs/<part>/ when done. The baselines at batch 128 are the
panel's part 1, trained with this plan. `table` prints, per batch size, each layer's
score per seed (the mean test accuracy over the two networks) and their range, and writes
benchmarks/found/cifar10/table.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from panel_train import PANEL, TRAIN, train_on_host
from search_ablation import uses_batch_axes

HERE = Path(__file__).resolve().parent
FOUND = HERE / "found" / "cifar10"
LAYERS = FOUND / "layers"
BASELINES = ["bn_relu", "gn_relu", "evonorm_b0", "evonorm_s0"]
FOUND_LAYERS = ["found_batch_independent.json", "found_batch_dependent.json"]
PARTS = {
    "b128-found": (128, FOUND_LAYERS),
    "b8-base": (8, BASELINES),
    "b8-found": (8, FOUND_LAYERS),
}
# Where each batch size's rows come from: the panel's part 1 holds the baselines at 128.
SOURCES = {128: [PANEL / "runs" / "part1", FOUND / "runs" / "b128-found"],
           8: [FOUND / "runs" / "b8-base", FOUND / "runs" / "b8-found"]}


def _plan(batch: int) -> list[str]:
    plan = list(TRAIN)
    plan[plan.index("--batch-sizes") + 1] = str(batch)
    return plan


def phase_pick(args) -> None:
    from evonas.layers import symbolic
    from evonas.search.results import load_run

    best: dict[str, tuple] = {}
    for folder in args.searches.split(","):
        for path in sorted(p for p in Path(folder).iterdir() if (p / "state.json").exists()):
            run = load_run(path)
            for ev in run.state.leaderboard():
                key = run.state.rank_key(ev)
                genome = run.genome(ev.candidate_id)
                independent = not uses_batch_axes(genome)
                kind = "found_batch_independent" if independent else "found_batch_dependent"
                if kind not in best or key[:2] < best[kind][0][:2]:
                    best[kind] = (key, run, ev.candidate_id, genome)
    overall = min(best, key=lambda kind: best[kind][0][:2])
    LAYERS.mkdir(parents=True, exist_ok=True)
    for kind, (key, run, cid, genome) in best.items():
        steps, fitness = run.state.score(run.state.evaluations[cid])
        data = {**genome.to_dict(), "name": kind}
        (LAYERS / f"{kind}.json").write_text(json.dumps(data, indent=1) + "\n")
        source = {"run": str(run.path), "candidate_id": cid, "formula": symbolic.formula(genome),
                  "rung_steps": steps, "fitness": fitness, "best_overall": kind == overall}
        (LAYERS / f"{kind}.source.json").write_text(json.dumps(source, indent=1) + "\n")
        print(f"{kind}: {source['formula']}  ({run.path.name} {cid}, "
              f"{statistics.mean(fitness.values()):.4f} at {steps or 'proxy'} steps)"
              + ("  best overall" if kind == overall else ""))


def phase_train(args) -> None:
    batch, layers = PARTS[args.part]
    names = ",".join(str(LAYERS / n) if n.endswith(".json") else n for n in layers
                     if not n.endswith(".json") or (LAYERS / n).exists())
    train_on_host(Path(args.runs) / args.part, names, args.data_dir, args.workers,
                  FOUND / "runs" / args.part, plan=_plan(batch))


def phase_table(args) -> None:
    """Per seed, the mean over the networks of the test accuracy, scored as `evonas train`
    scores (leaderboard.py): the best trial of the seed, 0 for a seed that diverged."""
    from evonas.fulltrain.leaderboard import best_per_seed, diverged_seeds

    table = {}
    for batch, sources in SOURCES.items():
        records = []
        for source in sources:
            trials = source / "fulltrain" / "trials.json"
            if trials.exists():
                records += [t for t in json.loads(trials.read_text()) if t["batch_size"] == batch]
            else:
                print(f"batch {batch}: {source} is not trained yet", file=sys.stderr)
        accuracy = {key: r["test_accuracy"] for key, r in best_per_seed(records).items()}
        accuracy.update({key: 0.0 for key in diverged_seeds(records)})
        per_seed: dict[str, dict[int, list[float]]] = {}
        for (layer, _arch, _batch, _opt, seed), acc in accuracy.items():
            per_seed.setdefault(layer, {}).setdefault(seed, []).append(acc)
        rows = {}
        for layer, seeds in per_seed.items():
            scores = [statistics.mean(accs) for _, accs in sorted(seeds.items())]
            rows[layer] = {"seeds": scores, "mean": statistics.mean(scores),
                           "range": [min(scores), max(scores)],
                           "networks": sorted({len(a) for a in seeds.values()})}
        table[batch] = dict(sorted(rows.items(), key=lambda kv: -kv[1]["mean"]))
        print(f"batch {batch}")
        for layer, r in table[batch].items():
            print(f"  {layer:<24} {r['mean']:.4f}  seeds "
                  + " ".join(f"{s:.4f}" for s in r["seeds"]) + f"  networks {r['networks']}")
    FOUND.mkdir(parents=True, exist_ok=True)
    (FOUND / "table.json").write_text(json.dumps(table, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("phase", choices=("pick", "train", "table"))
    p.add_argument("--searches", help="search_ablation.py --out-dir folders, comma-separated")
    p.add_argument("--part", choices=sorted(PARTS))
    p.add_argument("--data-dir")
    p.add_argument("--runs", default="runs/found")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    {"pick": phase_pick, "train": phase_train, "table": phase_table}[args.phase](args)


if __name__ == "__main__":
    main()
