"""How many candidates per second the search driver sustains, and how many workers it feeds.

The driver runs a real Search: a real run folder, the real controller, the real static,
numeric and duplicate checks, the real MLflow tracker. Only the workers' side is
replaced, by a Backend whose evaluations return at once (a survivor whose fitness is
derived from the genome's hash): with nothing to wait for, what remains is the driver's
own time per candidate, the bound on how many workers one driver keeps busy.

Each part of the driver's critical path is timed by wrapping the function the driver
calls (controller ask/tell, static, numeric, fingerprint, state write, tracker calls);
the rest of its loop is reported as "other".

    python benchmarks/driver_throughput.py --candidates 2000 \
        --out benchmarks/results/driver_throughput.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from evonas.runtime.backends import Backend, Outcome
from evonas.search import driver
from evonas.search.config import SearchConfig, StageConfig
from evonas.search.driver import Search
from evonas.search.records import SURVIVOR, Candidate, Evaluation

# Worker seconds per candidate today (BENCHMARKS.md, "Throughput and overhead": 1,398
# candidates per CPU-hour on the CIFAR-10 ablation's proxies, every stage of every
# candidate counted). The default proxies are larger, so the workers fed there are more.
WORKER_SECONDS_PER_CANDIDATE = 3600 / 1398
ARCHS = ("resnet", "mobilenetv2", "efficientnet")
# What this benchmark measured before the driver's checks, random genomes, state commits
# and MLflow writer were made cheaper (the git history's driver_throughput.json; the
# first driver, before any of it, is driver_throughput_before.json).
PREVIOUS = {
    "norm_act": {"candidates_per_s": 156.1, "driver_ms_per_candidate": 6.39,
                 "mlflow_candidates_per_s": 8.58,
                 "ms": {"controller": 1.26, "numeric": 2.49, "fingerprint": 1.11,
                        "state_write": 1.25}},
    "norm_act_s": {"candidates_per_s": 164.8, "driver_ms_per_candidate": 6.05,
                   "mlflow_candidates_per_s": 8.39,
                   "ms": {"controller": 1.07, "numeric": 2.45, "fingerprint": 1.07,
                          "state_write": 1.21}},
}


class InstantBackend(Backend):
    """`slots` workers whose evaluations finish as soon as they are submitted."""

    def __init__(self, slots: int):
        self.slots = slots
        self.pending: list[dict] = []

    def start(self) -> None:
        pass

    def free_slots(self) -> int:
        return self.slots - len(self.pending)

    def submit(self, task_id, fn, payload) -> None:
        self.pending.append(payload["candidate"])

    def wait(self, timeout=None) -> list[Outcome]:
        done, self.pending = self.pending, []
        return [Outcome(c["candidate_id"], True, _survivor(c).to_dict(), None, 0.0, "bench:0")
                for c in done]

    def shutdown(self) -> None:
        self.pending.clear()

    def resources_summary(self) -> dict[str, float]:
        return {"cpus_total": float(self.slots), "cpus_available": float(self.slots),
                "gpus_total": 0.0, "gpus_available": 0.0}


def _survivor(cand: dict) -> Evaluation:
    # A fitness per architecture from the genome's hash: equal layers score alike, as
    # under the real proxies' common random numbers.
    digest = hashlib.sha256(Candidate.from_dict(cand).structural_hash.encode()).digest()
    fitness = {a: digest[k] / 255 for k, a in enumerate(ARCHS)}
    return Evaluation(cand["candidate_id"], SURVIVOR, fitness=fitness,
                      stage_seconds={"proxy": 0.0})


class Timers:
    """Wall and CPU seconds per part, accumulated by wrapping what the driver calls. The
    CPU time is the driver thread's own (time.thread_time): what the driver costs where
    nothing else competes for its core, as the MLflow writer and other jobs do here."""

    def __init__(self):
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    def wrap(self, part: str, fn):
        def timed(*args, **kw):
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kw)
            finally:
                self.wall[part] += time.perf_counter() - wall
                self.cpu[part] += time.thread_time() - cpu
        return timed


def _instrument(search: Search, timers: Timers) -> None:
    for name, part in (("static_check", "static"), ("numeric_check", "numeric"),
                       ("functional_fingerprint", "fingerprint")):
        setattr(driver, name, timers.wrap(part, getattr(driver, name)))
    # The loop's own turns (checks, submissions, finished outcomes, progress line): the
    # driver's whole time per candidate, the parts above included.
    for name in ("_fill", "_finished_outcome", "_flush", "_show"):
        setattr(search, name, timers.wrap("loop", getattr(search, name)))
    search.controller.ask = timers.wrap("controller", search.controller.ask)
    search.controller.tell = timers.wrap("controller", search.controller.tell)
    # A finished candidate's journal line, and the state.json that commits a step's lines
    search._commit = timers.wrap("state_write", search._commit)
    start_tracking = timers.wrap("start_tracking", search._start_tracking)

    def start_and_wrap():
        start_tracking()
        # Wrapped after the start's own save, which is no candidate's.
        search.save = timers.wrap("state_write", search.save)
        search.writer.put = timers.wrap("tracker_enqueue", search.writer.put)
    search._start_tracking = start_and_wrap
    end_tracking = search._end_tracking

    def end_and_time(status):
        start = time.perf_counter()
        end_tracking(status)
        search.tracker_drain_seconds = time.perf_counter() - start
    search._end_tracking = end_and_time


def measure(space: str, n: int, slots: int, folder: Path) -> dict:
    config = SearchConfig(space=space, budget=f"{n}evals", dataset="synthetic", seed=0,
                          archs=ARCHS, workers=slots, report_every_s=1e9,
                          stages=StageConfig())
    search = Search.create(folder, config, backend=InstantBackend(slots))
    search._report = lambda force=False: None  # the HTML report is not per candidate
    timers = Timers()
    _instrument(search, timers)
    start = time.perf_counter()
    state = search.run()
    wall = time.perf_counter() - start
    done = len(state.evaluations)
    drain = getattr(search, "tracker_drain_seconds", 0.0)
    statuses = defaultdict(int)
    for ev in state.evaluations.values():
        statuses[ev.status if ev.status != "rejected" else f"rejected:{ev.reject_stage}"] += 1
    return {"space": space, "candidates": done, "statuses": dict(statuses),
            "wall_s": wall, "mlflow_drain_s": drain,
            # Sustained: from the first proposal to the last candidate recorded.
            "candidates_per_s": done / (wall - drain - timers.wall["start_tracking"]),
            # How fast MLflow took them: the writer starts with the first one, ends
            # with the drain.
            "mlflow_candidates_per_s": done / (wall - timers.wall["start_tracking"]),
            "driver_ms_per_candidate": _per_candidate(timers.wall, done),
            "driver_cpu_ms_per_candidate": _per_candidate(timers.cpu, done),
            # Workers whose candidates the MLflow writer logs as fast as they finish
            # (with this run's funnel: most survive here, so most get a picture).
            "mlflow_workers_kept_up": (WORKER_SECONDS_PER_CANDIDATE * done
                                       / (wall - timers.wall["start_tracking"])),
            "workers_fed": WORKER_SECONDS_PER_CANDIDATE / (timers.wall["loop"] / done),
            "workers_fed_cpu": WORKER_SECONDS_PER_CANDIDATE / (timers.cpu["loop"] / done)}


def _per_candidate(seconds: dict[str, float], done: int) -> dict[str, float]:
    parts = {p: 1e3 * s / done for p, s in sorted(seconds.items()) if p != "start_tracking"}
    parts["other"] = parts.pop("loop") - sum(parts.values())
    parts["total"] = 1e3 * seconds["loop"] / done
    return parts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidates", type=int, default=2000)
    p.add_argument("--slots", type=int, default=64, help="workers the driver feeds")
    p.add_argument("--spaces", default="norm_act,norm_act_s")
    p.add_argument("--out", default="benchmarks/results/driver_throughput.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory(prefix="evonas-driver-bench-") as tmp:
        for space in args.spaces.split(","):
            r = measure(space, args.candidates, args.slots, Path(tmp) / space)
            print(json.dumps(r, indent=1), file=sys.stderr)
            results.append(r)
    out = {"worker_seconds_per_candidate": WORKER_SECONDS_PER_CANDIDATE,
           "slots": args.slots, "torch_threads": 1, "runs": results,
           "previous": PREVIOUS}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
