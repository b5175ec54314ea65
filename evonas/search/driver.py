"""The search driver: the loop that connects controller, checks, workers, ledger, run
folder and tracker. The only process that writes the run folder and the MLflow store.

One turn of the loop:
1. while a worker slot is free and the budget allows, ask the controller for a candidate
   and run the cheap checks here (static, numeric, duplicate: milliseconds); a candidate
   they settle is finished at once, the rest is submitted to a worker;
2. wait briefly for workers; each finished evaluation is *finished*: told to the
   controller, charged to the ledger, written to the run folder's state atomically, then
   logged to MLflow (in that order: the state is the truth, MLflow is reconciled with it on
   resume, so a kill at any moment loses only what was in flight).

A duplicate whose equivalent is still being evaluated waits for it and takes its verdict.
"""

from __future__ import annotations

import math
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from evonas.layers import zoo
from evonas.search.budget import Ledger, parse_budget
from evonas.errors import EvonasError
from evonas.search.evolution import (EvolutionConfig, GenomeOps, RandomSearch, RegularizedEvolution,
                              load_controller)
from evonas.layers.fingerprint import functional_fingerprint
from evonas.layers.genome import Genome
from evonas.layers.mutation import mutate, random_genome
from evonas.search.records import DUPLICATE, FAILED, REJECTED, SURVIVOR, Candidate, Evaluation
from evonas.search.runfolder import RunFolder
from evonas.search.config import SearchConfig
from evonas.search.progress import Progress
from evonas.search.rejection import numeric_check, static_check
from evonas.layers.space import SearchSpace, load_space

STATE_FORMAT = "evonas.search-state/1"
# Stages run by the driver itself, on its CPU, before a candidate costs a worker anything.
DRIVER_STAGES = ("static", "numeric", "duplicate")
# Seconds a worker may overrun the evaluation's own time limit before the engine kills it:
# the worker's soft limit reports a clean "failed" record first.
KILL_GRACE_S = 60.0


@dataclass
class SearchState:
    """Everything finished so far; what state.json holds besides controller and ledger."""

    candidates: dict[str, Candidate] = field(default_factory=dict)
    evaluations: dict[str, Evaluation] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)  # fingerprint -> evaluated id
    parent_run_id: str | None = None
    # Seconds the driver itself spent (checks, controller, state, MLflow), not waiting for
    # workers: what bounds how many workers one driver can feed.
    driver_seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"candidates": {k: c.to_dict() for k, c in self.candidates.items()},
                "evaluations": {k: e.to_dict() for k, e in self.evaluations.items()},
                "fingerprints": self.fingerprints, "parent_run_id": self.parent_run_id,
                "driver_seconds": self.driver_seconds}

    @classmethod
    def from_dict(cls, raw: dict) -> "SearchState":
        return cls(candidates={k: Candidate.from_dict(v) for k, v in raw["candidates"].items()},
                   evaluations={k: Evaluation.from_dict(v) for k, v in raw["evaluations"].items()},
                   fingerprints=dict(raw["fingerprints"]), parent_run_id=raw.get("parent_run_id"),
                   driver_seconds=raw.get("driver_seconds", 0.0))

    def survivors(self) -> list[Evaluation]:
        return [e for e in self.evaluations.values() if e.fitness is not None]

    def best(self) -> Evaluation | None:
        """The survivor with the best mean proxy accuracy (the scalar `RUN:best` uses)."""
        scored = [e for e in self.survivors() if e.status == SURVIVOR]
        return max(scored, key=lambda e: (mean_fitness(e), e.candidate_id), default=None)


def mean_fitness(ev: Evaluation) -> float:
    return sum(ev.fitness.values()) / len(ev.fitness)


def genome_ops(space: SearchSpace) -> GenomeOps:
    return GenomeOps(random_genome=partial(random_genome, space),
                     mutate=lambda g, rng: mutate(g, space, rng),
                     encode=Genome.to_dict, decode=Genome.from_dict)


def new_controller(config: SearchConfig, space: SearchSpace):
    seeds = zoo.seeds(space) if config.seed_zoo else None
    ops = genome_ops(space)
    if config.controller == "random":
        return RandomSearch(ops, num_objectives=len(config.archs), seed=config.seed, seeds=seeds)
    evo = EvolutionConfig(population_size=config.population_size,
                          tournament_size=config.tournament_size,
                          num_objectives=len(config.archs),
                          initial="zoo" if config.seed_zoo else "random",
                          random_fraction=config.random_fraction)
    return RegularizedEvolution(ops, evo, seed=config.seed, seeds=seeds)


def search_budget(config: SearchConfig, text: str):
    """The search's share of --budget: all of it, or config.search_share (80%) when full
    training follows."""
    budget = parse_budget(text)
    return budget.split(config.search_share)[0] if config.full_train_top else budget


def make_backend(config: SearchConfig):
    from evonas.runtime.backends import InlineBackend, RayBackend

    if config.workers == 0:
        return InlineBackend()
    return RayBackend(address=config.ray_address, workers=config.workers,
                      cpus_per_eval=config.cpus_per_eval, gpus_per_eval=config.gpus_per_eval,
                      time_limit_s=config.eval_time_limit_s + KILL_GRACE_S)


class Search:
    """One search over a run folder: new (`create`) or resumed (`resume`)."""

    def __init__(self, folder: RunFolder, config: SearchConfig, controller, ledger: Ledger,
                 state: SearchState, *, progress: Progress | None = None, backend=None,
                 tracker=None):
        self.folder, self.config, self.controller = folder, config, controller
        self.ledger, self.state = ledger, state
        self.space = load_space(config.space)
        self.progress = progress or Progress()
        self.backend = backend
        self.tracker = tracker
        self.in_flight: dict[str, Candidate] = {}
        self.waiting: dict[str, list[Candidate]] = {}  # fingerprint -> parked duplicates
        self.pre_seconds: dict[str, dict[str, float]] = {}  # driver stages' cost per candidate
        self.ready: list[Candidate] = []  # checked, waiting for a worker slot
        self._stop = False
        self._reported_at = time.monotonic()

    # --- construction ---------------------------------------------------------------

    @classmethod
    def create(cls, out: str | Path, config: SearchConfig, **kw) -> "Search":
        """Check every named part and the data before the run folder is written."""
        from evonas.proxy.data import ensure_dataset

        config.validate_parts()
        ensure_dataset(config.dataset, config.data_dir)
        space = load_space(config.space)
        folder = RunFolder.create(out, config.to_dict())
        search = cls(folder, config, new_controller(config, space),
                     Ledger(search_budget(config, config.budget)), SearchState(), **kw)
        search.save()
        return search

    @classmethod
    def resume(cls, out: str | Path, budget: str | None = None, **kw) -> "Search":
        folder = RunFolder.open(out)
        config = SearchConfig.from_dict(folder.read_config())
        raw = folder.read_state()
        space = load_space(config.space)
        if raw is None:  # killed between creating the folder and the first save
            controller, ledger, state = (new_controller(config, space),
                                         Ledger(search_budget(config, config.budget)), SearchState())
        elif raw.get("format") != STATE_FORMAT:
            raise EvonasError(f"{out}: state.json is not a search state ({raw.get('format')!r}); "
                              "start a new search in another folder")
        else:
            controller = load_controller(raw["controller"], genome_ops(space))
            ledger, state = Ledger.from_state(raw["ledger"]), SearchState.from_dict(raw)
        if budget is not None:
            ledger.budget = search_budget(config, budget)
        return cls(folder, config, controller, ledger, state, **kw)

    # --- persistence ----------------------------------------------------------------

    def save(self) -> None:
        self.folder.write_state({"format": STATE_FORMAT, "controller": self.controller.to_state(),
                                 "ledger": self.ledger.to_state(), **self.state.to_dict()})

    # --- the loop -------------------------------------------------------------------

    def run(self) -> SearchState:
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        self.ledger.start()
        try:
            self._start_tracking()
            if self.backend is None:
                self.backend = make_backend(self.config)
            self.backend.start()
            while True:
                start = time.perf_counter()
                self._fill()
                self.state.driver_seconds += time.perf_counter() - start
                if not self.in_flight and not self.ready and (self._stop or not self.ledger.can_start()):
                    break
                if self.ledger.budget.kind == "wall" and self.ledger.exhausted():
                    # A wall-time budget is a deadline: evaluations still running are
                    # cancelled (lost as in a kill; a resume proposes afresh) rather than
                    # overrunning it by a whole proxy training.
                    break
                outcomes = self.backend.wait(timeout=1.0)
                start = time.perf_counter()
                for outcome in outcomes:
                    self._finished_outcome(outcome)
                self._show()
                self._report()
                self.state.driver_seconds += time.perf_counter() - start
            self._report(force=True)
            self._end_tracking("FINISHED")
        except KeyboardInterrupt:
            self._end_tracking("KILLED")
            raise
        finally:
            self.ledger.stop()
            self.save()
            if self.backend is not None:
                self.backend.shutdown()
            signal.signal(signal.SIGTERM, previous)
            self._show(force=True)
            self.progress.close()
        return self.state

    def _on_sigterm(self, signum, frame) -> None:
        raise KeyboardInterrupt

    def stop(self) -> None:
        """Start no new evaluation; the loop ends when those in flight are done."""
        self._stop = True

    def _fill(self) -> None:
        while self.ready and self.backend.free_slots() > 0:
            self._submit(self.ready.pop(0))
        parked = sum(len(v) for v in self.waiting.values())
        while (not self._stop and self.backend.free_slots() > 0 and self.ledger.can_start()
               and parked <= 4 * max(1, self.config.workers)):
            proposal = self.controller.ask()
            genome = proposal.genome
            cand = Candidate(proposal.candidate_id, genome.to_dict(), proposal.parent_id,
                             proposal.mutation, structural_hash=genome.structural_hash)
            if self._precheck(cand, genome):
                self._submit(cand)
            parked = sum(len(v) for v in self.waiting.values())

    def _submit(self, cand: Candidate) -> None:
        self.in_flight[cand.candidate_id] = cand
        self.backend.submit(cand.candidate_id, _evaluate_entry,
                            {"candidate": cand.to_dict(), "config": self.config.to_dict()})

    def _precheck(self, cand: Candidate, genome: Genome) -> bool:
        """Static, numeric and duplicate checks; True if the candidate needs a worker."""
        seconds = self.pre_seconds.setdefault(cand.candidate_id, {})
        for verdict in (lambda: static_check(genome, self.space),
                        lambda: numeric_check(genome, self.config.stages.numeric_scales,
                                              self.space.groups)):
            v = verdict()
            seconds[v.stage] = v.seconds
            if not v.passed:
                self._finish(cand, Evaluation(cand.candidate_id, REJECTED, reject_stage=v.stage,
                                              reject_reason=v.reason))
                return False
        start = time.perf_counter()
        cand.fingerprint = functional_fingerprint(genome)
        seconds["duplicate"] = time.perf_counter() - start
        original = self.state.fingerprints.get(cand.fingerprint)
        if original is not None:
            self._finish(cand, self._duplicate(cand, self.state.evaluations[original]))
            return False
        if any(c.fingerprint == cand.fingerprint for c in self.in_flight.values()):
            self.waiting.setdefault(cand.fingerprint, []).append(cand)
            return False
        return True

    def _duplicate(self, cand: Candidate, original: Evaluation) -> Evaluation:
        if original.fitness is not None:
            return Evaluation(cand.candidate_id, DUPLICATE, fitness=dict(original.fitness),
                              duplicate_of=original.candidate_id)
        return Evaluation(cand.candidate_id, REJECTED, reject_stage="duplicate",
                          reject_reason=(f"equivalent to {original.candidate_id}, rejected at "
                                         f"{original.reject_stage}: {original.reject_reason}"),
                          duplicate_of=original.candidate_id)

    def _finished_outcome(self, outcome) -> None:
        cand = self.in_flight.pop(outcome.task_id)
        if outcome.ok:
            ev = Evaluation.from_dict(outcome.value)
            if ev.fitness is not None and not all(math.isfinite(v) for v in ev.fitness.values()):
                ev = Evaluation(cand.candidate_id, FAILED, reject_stage="proxy",
                                reject_reason=f"non-finite fitness {ev.fitness}",
                                stage_seconds=ev.stage_seconds, device=ev.device,
                                share=ev.share, worker=ev.worker)
        else:
            share = (self.config.gpus_per_eval if self.config.gpus_per_eval > 0
                     else self.config.cpus_per_eval)
            ev = Evaluation(cand.candidate_id, FAILED, reject_reason=outcome.error,
                            stage_seconds={"failed": outcome.seconds},
                            device="gpu" if self.config.gpus_per_eval > 0 else "cpu",
                            share=share, worker=outcome.worker or "")
        self._finish(cand, ev)
        for waiting in self.waiting.pop(cand.fingerprint, []):
            if ev.status != FAILED:
                self._finish(waiting, self._duplicate(waiting, ev))
            else:  # a failure says nothing of the layer: evaluate the equivalent anew
                self.ready.append(waiting)

    def _finish(self, cand: Candidate, ev: Evaluation) -> None:
        """Tell, charge, save, log: the one path every candidate ends through."""
        ev.stage_seconds = {**self.pre_seconds.pop(cand.candidate_id, {}), **ev.stage_seconds}
        fitness = ev.objectives(list(self.config.archs))
        status = ev.status if ev.status != REJECTED else f"rejected:{ev.reject_stage}"
        self.controller.tell(cand.candidate_id, fitness, status, behaviour=cand.fingerprint)
        for stage, seconds in ev.stage_seconds.items():
            on_driver = stage in DRIVER_STAGES
            self.ledger.charge(stage, seconds, 1.0 if on_driver else ev.share,
                               device="cpu" if on_driver else ev.device)
        self.ledger.count_evaluation(_stopped_at(ev))
        if ev.status in (SURVIVOR, REJECTED) and cand.fingerprint and ev.duplicate_of is None:
            self.state.fingerprints.setdefault(cand.fingerprint, cand.candidate_id)
        self.state.candidates[cand.candidate_id] = cand
        self.state.evaluations[cand.candidate_id] = ev
        self.save()
        self._log(cand, ev)

    # --- tracking -------------------------------------------------------------------

    def _start_tracking(self) -> None:
        if self.tracker is None:
            import logging

            from evonas.runtime.tracking import Tracker

            # MLflow announces its schema migrations at INFO; the progress line says enough.
            logging.getLogger("mlflow").setLevel(logging.WARNING)

            uri = self.config.tracking_uri or self.folder.tracking_uri
            self.tracker = Tracker(uri, artifact_location=None if self.config.tracking_uri
                                   else str(self.folder.artifacts_dir / "mlflow"))
        if self.state.parent_run_id is None:
            name = Path(self.folder.path).name
            self.state.parent_run_id = self.tracker.start_search(
                name, self.config.to_dict(), {"evonas.run_folder": str(Path(self.folder.path).resolve())})
            self.save()
            return
        self.tracker.resume_search(self.state.parent_run_id)
        logged = self.tracker.reconcile(self.state.parent_run_id, set(self.state.evaluations))
        for cid in sorted(set(self.state.evaluations) - logged):
            self._log(self.state.candidates[cid], self.state.evaluations[cid])

    def _log(self, cand: Candidate, ev: Evaluation) -> None:
        from evonas.layers import symbolic
        from evonas.layers.export import export_source

        genome = Genome.from_dict(cand.genome)
        self.tracker.log_candidate(self.state.parent_run_id, cand, ev, genome=genome,
                                   formula=symbolic.equation(genome),
                                   latex=symbolic.latex(genome),
                                   source=export_source(genome, "EvolvedNormAct"))
        best = self.state.best()
        summary = {"evaluated": float(len(self.state.evaluations)),
                   "budget_spent_fraction": float(self.ledger.fraction_spent)}
        if best is not None:
            summary["best_mean_fitness"] = mean_fitness(best)
        self.tracker.log_summary(self.state.parent_run_id, summary, step=len(self.state.evaluations))

    def _report(self, force: bool = False) -> None:
        """Rewrite report.html (and its copy in MLflow) every report_every_s seconds."""
        if force or time.monotonic() - self._reported_at >= self.config.report_every_s:
            from evonas.search.report import refresh

            refresh(self.folder.path, self.tracker, self.state.parent_run_id)
            self._reported_at = time.monotonic()

    def _end_tracking(self, status: str) -> None:
        if self.tracker is not None and self.state.parent_run_id is not None:
            self.tracker.log_artifact_text(self.state.parent_run_id, "budget.txt",
                                           self.ledger.format_summary())
            self.tracker.end_search(self.state.parent_run_id, status)

    # --- display --------------------------------------------------------------------

    def _show(self, force: bool = False) -> None:
        evs = self.state.evaluations.values()
        best = self.state.best()
        budget = self.ledger.budget
        self.progress.show(self.progress.line(
            evaluated=len(self.state.evaluations),
            statuses=Counter(e.status for e in evs),
            stages=Counter(e.reject_stage for e in evs if e.status == REJECTED),
            best=mean_fitness(best) if best else None,
            spent=budget.format_amount(self.ledger.spent),
            left=budget.format_amount(self.ledger.remaining),
            in_flight=len(self.in_flight)), force=force)


def _stopped_at(ev: Evaluation) -> str:
    if ev.status == SURVIVOR:
        return "proxy"
    if ev.status == DUPLICATE:
        return "duplicate"
    if ev.status == FAILED:
        return "failed"
    return ev.reject_stage or "rejected"


def _evaluate_entry(payload: dict) -> dict:
    from evonas.search.evaluate import evaluate_candidate

    return evaluate_candidate(payload)


__all__ = ["Search", "SearchState", "mean_fitness"]
