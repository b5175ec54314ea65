"""The search on CIFAR-10: evolution against random search at equal budget, the rejection
funnel, throughput, driver overhead, and the best found layer against the baselines.

Three phases, each reading what the previous one left in --out-dir:

    python ../shared/data/prepare_cifar10.py /tmp/cifar10
    python benchmarks/search_ablation.py search  --data-dir /tmp/cifar10 --out-dir runs/ablation
    python benchmarks/search_ablation.py analyse --out-dir runs/ablation
    python benchmarks/search_ablation.py compare --data-dir /tmp/cifar10 --out-dir runs/ablation

`search` runs `evonas search` once per (controller, seed), --parallel at a time, each on
one CPU thread in-process (--workers 0), evolution and random search of one seed side by
side, so that both see the same load on the machine, with the same CPU-hour budget (an
evaluation count, `--budget 100evals`, works too); --proxy-config and --rungs give every
search a calibration's proxy and a fidelity ladder. `analyse` writes results.json and
best_so_far.png: the best mean fitness at the top rung (the proxy's, without a ladder)
against evaluations and against CPU-seconds (the ladder's trainings included), read off at
the same CPU spend and evaluation count for every run, each run's best ranked as the
search ranks it (the highest rung reached, then the mean fitness there), and per seed
whether evolution is ahead of random search at equal CPU. `compare` trains the
best layer found by evolution beside bn_relu, gn_relu, evonorm_b0 and evonorm_s0 at
batch 128 and batch 8.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CONTROLLERS = ("evolution", "random")


# Proxy flags of the CIFAR-10 ablation (BENCHMARKS.md's runs); None: the task's defaults
# (search/config.py TASK_DEFAULTS), as for --dataset shakespeare.
PROXY_FLAGS = {"archs": "--archs", "proxy_steps": "--proxy-steps",
               "quality_steps": "--quality-steps", "quality_threshold": "--quality-threshold",
               "batch": "--proxy-batch", "width": "--proxy-width",
               "stability_steps": "--stability-steps"}
# Passed to every search when given: a calibration's settings and the fidelity ladder.
SEARCH_FLAGS = {"proxy_config": "--proxy-config", "rungs": "--rungs",
                "top_rung_seeds": "--top-rung-seeds"}


def search_args(args, controller: str, seed: int, out: Path) -> list[str]:
    proxy = [x for field, flag in {**PROXY_FLAGS, **SEARCH_FLAGS}.items()
             if getattr(args, field) is not None for x in (flag, str(getattr(args, field)))]
    return [sys.executable, "-m", "evonas", "search", "--space", args.space,
            "--budget", args.budget, "--dataset", args.dataset, "--data-dir", args.data_dir,
            "--out", str(out), "--workers", "0", "--controller", controller,
            "--seed", str(seed), *proxy,
            "--population", str(args.population), "--tournament", str(args.tournament),
            "--random-fraction", str(args.random_fraction)]


def phase_search(args) -> None:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one core per search, no thread fights
    jobs = [(c, s) for s in args.seeds for c in CONTROLLERS]

    def one(job):
        controller, seed = job
        out = out_dir / f"{controller}-{seed}"
        cmd = search_args(args, controller, seed, out) if not out.exists() else \
            [sys.executable, "-m", "evonas", "search", "--resume", str(out)]
        start = time.monotonic()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        print(f"{out.name}: exit {done.returncode} in {time.monotonic() - start:.0f}s", flush=True)
        if done.returncode:
            print(done.stderr[-2000:], file=sys.stderr)

    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(one, jobs))


def _load(run: Path) -> dict:
    """state.json with the journal's evaluations (search/state.py), and the timeline of
    the search's best layer (_curve)."""
    from evonas.search.runfolder import RunFolder
    from evonas.search.state import read

    raw, finished = read(RunFolder.open(run, lock=False))
    reached = Counter(f"rung{steps}" for by_steps in finished.rungs.values()
                      for steps, result in by_steps.items() if result.fitness)
    return {**raw, "evaluations": {k: e.to_dict() for k, e in finished.evaluations.items()},
            "reached": dict(sorted(reached.items())), "curve": _curve(run, raw)}


def _curve(run: Path, raw: dict) -> dict[str, list]:
    """One point per finished evaluation or rung training, in the order the journal holds
    them: the search's best layer so far, ranked as the search ranks (SearchState.rank_key:
    the highest rung reached, then the mean fitness there), as its mean fitness ("best";
    -inf before the first survivor; an LM's fitness, -bits per character, is negative) and
    the rung it is from ("best_steps", the proxy's steps without a ladder); the
    device-seconds spent, the ladder's trainings included; and the evaluations finished.

    Scores of different rungs are not comparable (a longer training scores higher), so a
    run's best is a pair, and a run whose promotions all failed at the top rung is ranked
    by its best score below it, under every run that has one there."""
    from evonas.search.state import journal_entries

    config = json.loads((run / "config.json").read_text())
    proxy = (config.get("rungs") or [config["proxy_steps"]])[0]  # rung 0 is the proxy
    best = (0, -float("inf"))  # (rung steps, mean fitness): steps grow with the rung
    spent, evaluations = 0.0, 0
    curve: dict[str, list] = {"best": [], "best_steps": [], "spent_s": [], "evaluations": []}
    for entry in journal_entries(run / "journal.jsonl", int(raw["journal_bytes"])):
        if "evaluation" in entry:
            ev = entry["evaluation"]
            spent += sum(ev["stage_seconds"].values())
            evaluations += 1
            if ev["status"] == "survivor":
                best = max(best, (proxy, statistics.mean(ev["fitness"].values())))
        elif "rung" in entry:
            rung = entry["rung"]
            spent += rung["seconds"]
            if rung["fitness"]:
                best = max(best, (rung["steps"], statistics.mean(rung["fitness"].values())))
        else:  # a promotion: decided, not yet trained
            continue
        curve["best"].append(best[1])
        curve["best_steps"].append(best[0] or None)
        curve["spent_s"].append(spent)
        curve["evaluations"].append(evaluations)
    return curve


def _best_until(r: dict, axis: str, limit: float) -> tuple:
    """The run's best (rung steps, mean fitness) at the last point with axis <= limit."""
    points = [i for i, v in enumerate(r[axis]) if v <= limit]
    if not points:
        return None, -float("inf")
    return r["curve_best_steps"][points[-1]], r["curve_best"][points[-1]]


def phase_analyse(args) -> dict:
    out_dir = Path(args.out_dir)
    runs = {p.name: _load(p) for p in sorted(out_dir.iterdir()) if (p / "state.json").exists()}
    result: dict = {"runs": {}, "funnel": {}, "cost_per_stage_s": {}}
    stopped, stage_cost, stage_n = Counter(), Counter(), Counter()
    total_evals, total_seconds, driver_seconds = 0, 0.0, 0.0
    for name, state in runs.items():
        best, steps, spent, counted = (state["curve"][k] for k in
                                       ("best", "best_steps", "spent_s", "evaluations"))
        evs = list(state["evaluations"].values())
        result["runs"][name] = {
            "evaluations": len(evs), "best": best[-1] if best else 0.0,
            "best_steps": steps[-1] if steps else None,
            "best_at_half": best[len(best) // 2 - 1] if best else 0.0,
            "best_at_half_steps": steps[len(steps) // 2 - 1] if steps else None,
            "device_seconds": spent[-1] if spent else 0.0,
            "statuses": dict(Counter(e["status"] for e in evs)),
            "reached": state["reached"],  # candidates trained at each rung above the proxy
            "curve_best": best, "curve_best_steps": steps, "curve_spent_s": spent,
            "curve_evaluations": counted}
        for e in evs:
            stage = {"survivor": "survived", "duplicate": "duplicate",
                     "failed": "failed"}.get(e["status"], e["reject_stage"])
            stopped[stage] += 1
            for st, sec in e["stage_seconds"].items():
                stage_cost[st] += sec
                stage_n[st] += 1
        total_evals += len(evs)
        total_seconds += spent[-1] if spent else 0.0
        driver_seconds += state.get("driver_seconds", 0.0)
    result["funnel"] = {k: v / total_evals for k, v in stopped.most_common()}
    result["cost_per_stage_s"] = {k: stage_cost[k] / stage_n[k] for k in stage_cost}
    result["candidates_per_cpu_hour"] = total_evals / (total_seconds / 3600)
    result["driver_seconds_per_candidate"] = driver_seconds / total_evals
    worker_s = (total_seconds - sum(stage_cost[s] for s in ("static", "numeric", "duplicate"))) \
        / total_evals
    result["workers_one_driver_feeds"] = worker_s / result["driver_seconds_per_candidate"]
    # Equal budget: every run read off at the smallest CPU spend and evaluation count that
    # all runs reached, so neither controller is credited with work the other never did.
    curves = result["runs"].values()
    equal_s = min(r["curve_spent_s"][-1] for r in curves) if result["runs"] else 0.0
    equal_n = min(r["evaluations"] for r in curves) if result["runs"] else 0
    result["equal_cpu_seconds"], result["equal_evaluations"] = equal_s, equal_n
    for r in curves:
        r["best_at_equal_cpu_steps"], r["best_at_equal_cpu"] = _best_until(
            r, "curve_spent_s", equal_s)
        r["best_at_equal_evals_steps"], r["best_at_equal_evals"] = _best_until(
            r, "curve_evaluations", equal_n)
    # Mean and spread over the seeds whose best is at the top rung (the others' scores are
    # from a shorter training and would not compare); how many that is is said beside.
    top = result["top_rung_steps"] = max(
        (s for r in curves for s in r["curve_best_steps"] if s is not None), default=None)
    for c in CONTROLLERS:
        mine = [r for n, r in result["runs"].items() if n.startswith(c)]
        if mine:
            result[c] = {"seeds": len(mine),
                         "evaluations_mean": statistics.mean(r["evaluations"] for r in mine)}
            for key in ("best", "best_at_half", "best_at_equal_cpu", "best_at_equal_evals"):
                values = [r[key] for r in mine if r[key + "_steps"] == top]
                result[c][key + "_at_top_rung"] = len(values)
                result[c][key + "_mean"] = statistics.mean(values) if values else None
                result[c][key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    # Per seed, evolution against random search at equal CPU, ranked as a search ranks.
    result["evolution_ahead_at_equal_cpu"] = {}
    for name, r in result["runs"].items():
        if name.startswith("evolution-") and f"random-{name[10:]}" in result["runs"]:
            other = result["runs"][f"random-{name[10:]}"]
            result["evolution_ahead_at_equal_cpu"][name[10:]] = _equal_cpu_rank(r) > \
                _equal_cpu_rank(other)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    _plot(result, out_dir / "best_so_far.png")
    summary = {k: v for k, v in result.items() if k != "runs"}
    summary["runs"] = {n: {k: v for k, v in r.items() if not k.startswith("curve")}
                       for n, r in result["runs"].items()}
    print(json.dumps(summary, indent=1))
    return result


def _equal_cpu_rank(r: dict) -> tuple:
    """A run's best at equal CPU as a search ranks it: a longer rung first (steps grow with
    the rung), then the mean fitness there."""
    return r["best_at_equal_cpu_steps"] or 0, r["best_at_equal_cpu"]


def _plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    colours = {"evolution": "tab:red", "random": "tab:blue"}
    top = result["top_rung_steps"]
    for name, r in result["runs"].items():
        c = colours[name.split("-")[0]]
        # Only the top rung's scores are drawn: a shorter rung's do not compare with them.
        best = [b if s == top else float("nan")
                for b, s in zip(r["curve_best"], r["curve_best_steps"])]
        ax1.plot(r["curve_evaluations"], best, color=c, alpha=0.8, label=name)
        ax2.plot([t / 3600 for t in r["curve_spent_s"]], best, color=c, alpha=0.8)
    # Fitness is accuracy for the classifiers, -(bits per character) for the LM.
    ylabel = "best mean fitness at the top rung"
    ax1.set(xlabel="evaluations", ylabel=ylabel)
    ax2.set(xlabel="CPU-hours spent", ylabel=ylabel)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def phase_compare(args) -> None:
    """Train the best layer found by evolution beside the baselines at two batch sizes."""
    import torch

    from evonas.layers import symbolic, zoo
    from evonas.layers.export import export_file
    from evonas.proxy.data import load_dataset
    from evonas.proxy.train import ProxyConfig, train_proxy
    from evonas.search.results import load_run

    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    # The best layer evolution found, and the best batch-independent one (no statistic
    # over the batch axes), which is what must hold up at batch 8.
    best = {"found": None, "found_s": None}
    for p in sorted(out_dir.glob("evolution-*")):
        run = load_run(p)
        for cand, ev in run.leaderboard(10**9):
            score = statistics.mean(ev.fitness.values())
            kinds = ["found"] + ([] if uses_batch_axes(run.genome(cand.candidate_id))
                                 else ["found_s"])
            for kind in kinds:
                if best[kind] is None or score > best[kind][2]:
                    best[kind] = (run, cand.candidate_id, score)
    if best["found_s"] is not None and best["found_s"][:2] == best["found"][:2]:
        del best["found"]  # the best layer is batch-independent already
    layers, found = {}, {}
    for kind, (run, cid, score) in ((k, v) for k, v in best.items() if v is not None):
        genome = run.genome(cid)
        path = out_dir / f"{kind}_layer.py"
        export_file(genome, path, class_name="FoundNormAct")
        spec = importlib.util.spec_from_file_location(f"{kind}_layer", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        layers[kind] = functools.partial(module.FoundNormAct, groups=8)
        found[kind] = {"run": run.path.name, "id": cid, "formula": symbolic.formula(genome),
                       "proxy_fitness": score, "export": str(path)}
    layers.update({n: zoo.factory(n, groups=8) for n in ("bn_relu", "gn_relu", "evonorm_b0",
                                                         "evonorm_s0")})
    data = load_dataset("cifar10", args.data_dir)
    out = out_dir / "compare.json"
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    rows = [r for r in rows if r["batch"] not in args.compare_batches]
    for batch in args.compare_batches:
        # Linear scaling: the same images seen and the learning rate scaled with the batch.
        steps = args.compare_steps * 128 // batch
        lr = 0.1 * batch / 128
        for name, factory in layers.items():
            accs = []
            for seed in range(args.compare_seeds):
                cfg = ProxyConfig(arch="resnet", width=16, steps=steps, batch_size=batch, lr=lr,
                                  eval_size=5000)
                accs.append(train_proxy(factory, cfg, data, seed=seed).accuracy)
            rows.append({"layer": name, "batch": batch, "steps": steps, "accs": accs,
                         "mean": statistics.mean(accs)})
            print(f"batch {batch:>3} {name:<11} " + " ".join(f"{a:.4f}" for a in accs), flush=True)
    result = {"found": found, "rows": rows}
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["found"], indent=1))


def uses_batch_axes(genome) -> bool:
    from evonas.layers.ops import op

    return any(op(name).axes == "NHW" for name in genome.ops_used)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=("search", "analyse", "compare"))
    p.add_argument("--data-dir")
    p.add_argument("--out-dir", default="runs/ablation")
    p.add_argument("--space", default="norm_act")
    p.add_argument("--budget", default="0.2cpu-h")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--dataset", default="cifar10")
    # The CIFAR-10 ablation's proxy; --task-defaults leaves every proxy flag to the task.
    p.add_argument("--task-defaults", action="store_true")
    p.add_argument("--archs", default="resnet,mobilenetv2")
    p.add_argument("--proxy-steps", type=int, default=100)
    p.add_argument("--quality-steps", type=int, default=50)
    p.add_argument("--quality-threshold", type=float, default=0.15)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--stability-steps", type=int, default=5)
    p.add_argument("--proxy-config", help="evonas calibrate's proxy_config.json (with "
                   "--task-defaults: its settings, not this script's proxy)")
    p.add_argument("--rungs", help="the fidelity ladder, e.g. 300,1200,4800")
    p.add_argument("--top-rung-seeds", type=int)
    p.add_argument("--population", type=int, default=20)
    p.add_argument("--tournament", type=int, default=5)
    p.add_argument("--random-fraction", type=float, default=0.5)
    p.add_argument("--compare-steps", type=int, default=300)
    p.add_argument("--compare-seeds", type=int, default=2)
    p.add_argument("--compare-batches", type=int, nargs="*", default=[128, 8])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.task_defaults:
        for field in PROXY_FLAGS:
            setattr(args, field, None)
    {"search": phase_search, "analyse": phase_analyse, "compare": phase_compare}[args.phase](args)


if __name__ == "__main__":
    main()
