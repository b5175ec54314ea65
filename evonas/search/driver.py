"""The search driver: the loop that connects controller, checks, workers, ledger, run
folder and tracker. The only process that writes the run folder and the MLflow store.

One turn of the loop:
1. while a worker slot is free and the budget allows, ask the controller for a candidate
   and run the cheap checks here (static, numeric, duplicate: milliseconds); a candidate
   they settle is finished at once, the rest is submitted to a worker;
2. wait briefly for workers; each finished evaluation is *finished*: told to the
   controller, charged to the ledger and appended to the run folder's journal.
After each step, one state.json (state.py) commits the journal lines the step appended,
and only then are their candidates handed to the background writer (writer.py) for
MLflow. In that order: the run folder is the truth, MLflow is reconciled with it on
resume, so a kill at any moment loses only what was in flight and what the step had not
committed yet (evaluations returned by the same wait, and proposals the checks settled in
milliseconds; a resume proposes afresh from the last commit).

The driver's own time per candidate bounds how many workers it feeds
(benchmarks/driver_throughput.py): recording a candidate costs the same at any length of
the search (a journal line, and a share of a bounded state.json fsynced once a second),
and MLflow's child runs, graph pictures and exported code are written off the loop. The
more candidates finish per step, the more share one state.json: the commit costs least
per candidate when the driver is busiest.

A duplicate whose equivalent is still being evaluated waits for it and takes its verdict.

The fidelity ladder (SearchConfig.rungs, e.g. 300,1200,4800; empty: none). A survivor's
proxy fitness is its score at rung 0. When a candidate's score at rung k arrives and the
rung holds at least rung_min_population scores, it is promoted if its mean fitness is
among the best promote_fraction of the rung's scores so far (state.clears_hurdle, ties
toward the lower id); the scores that arrived before the rung filled are judged, in the
order they arrived, when it fills. Each score is judged once, when it arrives, so a
resume decides nothing again. A promotion is a journal line {"promote"} written in the
step that judged it, and a worker task ("<id>@r<steps>") that trains the candidate again
from scratch for the next rung's steps under the same common seed (the top rung on
top_rung_seeds seeds), without the gates it passed; its result is a {"rung"} line, told
to the controller (update), charged to stage "rung<steps>", and logged to the
candidate's MLflow run as fitness.<arch>.r<steps>. Promotions go to workers before new
proposals, under the budget as evaluations are (an evaluation-count budget counts
candidates: their promotions still train); a resume trains the promotions decided but
not finished. Duplicates share their original's ladder and do not climb one of their own.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path

from evonas.layers import zoo
from evonas.layers.fingerprint import functional_fingerprint
from evonas.layers.genome import Genome
from evonas.layers.mutation import mutate, random_genome
from evonas.layers.space import SearchSpace, load_space
from evonas.search import state as records
from evonas.search.budget import Ledger, parse_budget
from evonas.search.config import SearchConfig
from evonas.search.evolution import (EvolutionConfig, GenomeOps, RandomSearch, RegularizedEvolution,
                                     load_controller)
from evonas.search.progress import Progress
from evonas.search.records import (DUPLICATE, FAILED, REJECTED, SURVIVOR, Candidate, Evaluation,
                                   RungResult)
from evonas.search.rejection import numeric_check, static_check
from evonas.search.runfolder import RunFolder
from evonas.search.state import LEGACY_FORMAT, Journal, SearchState, outcome

# Seconds a worker may overrun the evaluation's own time limit before the engine kills it:
# the worker's soft limit reports a clean "failed" record first.
KILL_GRACE_S = 60.0
# Seconds between fsyncs of the journal and state.json. Each write reaches the kernel at
# once, which is what survives a kill of the driver; an fsync (milliseconds on a disk,
# more than the driver's whole budget per candidate) is what survives a power loss, so it
# is paid once a second: a power cut loses at most the last second's evaluations.
SYNC_EVERY_S = 1.0


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
    from evonas.search.budget import cluster_check, parse_budget

    if config.workers == 0:
        return InlineBackend()
    # A cluster's GPUs are known once connected: a gpu-h budget refuses one without GPUs.
    return RayBackend(address=config.ray_address, workers=config.workers,
                      cpus_per_eval=config.cpus_per_eval, gpus_per_eval=config.gpus_per_eval,
                      time_limit_s=config.eval_time_limit_s + KILL_GRACE_S,
                      admit=cluster_check(parse_budget(config.budget), config.gpus_per_eval))


class Search:
    """One search over a run folder: new (`create`) or resumed (`resume`)."""

    def __init__(self, folder: RunFolder, config: SearchConfig, controller, ledger: Ledger,
                 state: SearchState, *, journal_bytes: int = 0, progress: Progress | None = None,
                 backend=None, tracker=None):
        self.folder, self.config, self.controller = folder, config, controller
        self.ledger, self.state = ledger, state
        self.space = load_space(config.space)
        self._config_dict = config.to_dict()  # what every worker gets; the config is frozen
        self.progress = progress or Progress()
        self.backend = backend
        self.tracker = tracker
        self.writer = None  # the MLflow writer (writer.py), while the search runs
        self.journal = Journal(folder.journal_path, journal_bytes)
        self.in_flight: dict[str, Candidate] = {}
        # Fingerprint -> the candidate of that behaviour submitted or ready to be: equals
        # proposed meanwhile park behind it instead of training a second time.
        self.evaluating: dict[str, str] = {}
        self.waiting: dict[str, list[Candidate]] = {}  # fingerprint -> parked duplicates
        self.pre_seconds: dict[str, dict[str, float]] = {}  # driver stages' cost per candidate
        self.ready: list[Candidate] = []  # checked, waiting for a worker slot
        # Finished this step, in the journal, not yet committed by state.json nor logged.
        self._uncommitted: list[tuple[Candidate, Evaluation]] = []
        # The ladder: rung tasks in flight (task id -> (candidate id, steps)), promotions
        # decided and not yet submitted, rung results not yet committed, and each rung's
        # scores so far (candidate id -> mean fitness), rung 0 the survivors' proxy scores.
        self.rung_tasks: dict[str, tuple[str, int]] = {}
        self._uncommitted_rungs: list[RungResult] = []
        self.rung_scores: list[dict[str, float]] = [{} for _ in config.rungs]
        if config.ladder:
            for ev in state.evaluations.values():
                if ev.status == SURVIVOR and ev.duplicate_of is None:
                    self.rung_scores[0][ev.candidate_id] = records.mean_fitness(ev)
            for cid, results in state.rungs.items():
                for steps, result in results.items():
                    if result.fitness and steps in config.rungs:
                        self.rung_scores[config.rungs.index(steps)][cid] = _mean(result.fitness)
        self.promoting: list[tuple[str, int]] = sorted(
            (cid, steps) for cid, steps in state.promoted
            if steps not in state.rungs.get(cid, {}))
        self.counts = Counter(outcome(e) for e in state.evaluations.values())
        self.best = state.best()
        self._stop = False
        self._reported_at = time.monotonic()
        self._synced_at = -math.inf

    # --- construction ---------------------------------------------------------------

    @classmethod
    def create(cls, out: str | Path, config: SearchConfig, **kw) -> "Search":
        """Check every named part, the data and the controller's settings before the run
        folder is written."""
        from evonas.proxy.data import ensure_dataset

        config.validate_parts()
        ensure_dataset(config.dataset, config.data_dir)
        controller = new_controller(config, load_space(config.space))
        folder = RunFolder.create(out, config.to_dict())
        search = cls(folder, config, controller, Ledger(search_budget(config, config.budget)),
                     SearchState(), **kw)
        search.save()
        return search

    @classmethod
    def resume(cls, out: str | Path, budget: str | None = None, **kw) -> "Search":
        folder = RunFolder.open(out)
        config = SearchConfig.from_dict(folder.read_config())
        if budget is not None:  # a new budget this machine cannot spend fails before any write
            config.check_budget(budget)
        space = load_space(config.space)
        loaded = records.read(folder)
        if loaded is None:  # killed between creating the folder and the first save
            search = cls(folder, config, new_controller(config, space),
                         Ledger(search_budget(config, config.budget)), SearchState(), **kw)
        else:
            raw, state = loaded
            controller_state = raw["controller"]
            legacy = raw["format"] == LEGACY_FORMAT
            if not legacy:  # the history is the journal's, not state.json's
                controller_state = {**controller_state,
                                    "history": state.history(list(config.archs))}
            search = cls(folder, config, load_controller(controller_state, genome_ops(space)),
                         Ledger.from_state(raw["ledger"]), state,
                         journal_bytes=0 if legacy else int(raw["journal_bytes"]), **kw)
            if legacy:  # the first format's records move to the journal once
                for cid, ev in state.evaluations.items():
                    search.journal.append(state.candidates[cid], ev)
                search.save()
        if budget is not None:
            search.ledger.budget = search_budget(config, budget)
        return search

    # --- persistence ----------------------------------------------------------------

    def save(self) -> None:
        """Commit the journal's lines so far with the controller and the ledger."""
        durable = time.monotonic() - self._synced_at >= SYNC_EVERY_S
        if durable:
            self.journal.sync()
            self._synced_at = time.monotonic()
        records.write(self.folder, self.state, journal_bytes=self.journal.size,
                      controller=self.controller.to_state(history=False),
                      ledger=self.ledger.to_state(), durable=durable)

    def _commit(self, cand: Candidate, ev: Evaluation) -> None:
        """The candidate's journal line; the step's _flush commits it."""
        self.journal.append(cand, ev)
        self._uncommitted.append((cand, ev))

    def _flush(self) -> None:
        """Commit the step's journal lines by one state.json, then queue their MLflow
        runs and the search's progress after them."""
        if not self._uncommitted and not self._uncommitted_rungs:
            return
        done, self._uncommitted = self._uncommitted, []
        rungs, self._uncommitted_rungs = self._uncommitted_rungs, []
        self.save()
        for cand, ev in done:
            self._log(cand, ev)
        for result in rungs:  # after the candidates' runs, which they are logged to
            if result.fitness:
                self.writer.put(_log_rung, self.state.parent_run_id, result.candidate_id,
                                result.steps, result.fitness)
        self._log_progress()

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
                self._flush()
                self.state.driver_seconds += time.perf_counter() - start
                if (not self.in_flight and not self.ready and not self.rung_tasks
                        and not (self.promoting and self._can_promote())
                        and (self._stop or not self.ledger.can_start())):
                    break
                if self.ledger.budget.kind == "wall" and self.ledger.exhausted():
                    # A wall-time budget is a deadline: evaluations still running are
                    # cancelled (lost as in a kill; a resume proposes afresh) rather than
                    # overrunning it by a whole proxy training.
                    break
                outcomes = self.backend.wait(timeout=1.0)
                start = time.perf_counter()
                for result in outcomes:
                    self._finished_outcome(result)
                self._flush()
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
            self._synced_at = -math.inf  # the last save is durable
            self.save()
            self.journal.close()
            if self.writer is not None:  # an error's way out: a resume logs what was queued
                self.writer.close(drain=False)
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

    def _can_promote(self) -> bool:
        """Whether a decided promotion may train now: under the budget as any new work,
        except that an evaluation-count budget counts candidates, not their rungs."""
        return not self._stop and (self.ledger.budget.kind == "evals" or self.ledger.can_start())

    def _fill(self) -> None:
        while self.promoting and self.backend.free_slots() > 0 and self._can_promote():
            self._submit_rung(*self.promoting.pop(0))
        while self.ready and self.backend.free_slots() > 0:
            self._submit(self.ready.pop(0))
        parked = sum(len(v) for v in self.waiting.values())
        while (not self._stop and self.backend.free_slots() > 0 and self.ledger.can_start()
               and parked <= 4 * max(1, self.config.workers)):
            proposal = self.controller.ask()
            genome = proposal.genome
            self._admit(Candidate(proposal.candidate_id, genome.to_dict(), proposal.parent_id,
                                  proposal.mutation, structural_hash=genome.structural_hash),
                        genome)
            parked = sum(len(v) for v in self.waiting.values())

    def _admit(self, cand: Candidate, genome: Genome) -> None:
        """Check a proposal; submit it when it needs a worker (it is then the one being
        evaluated for its behaviour: equals proposed meanwhile park behind it)."""
        if self._precheck(cand, genome):
            self.evaluating[cand.fingerprint] = cand.candidate_id
            self._submit(cand)

    def _submit(self, cand: Candidate) -> None:
        self.in_flight[cand.candidate_id] = cand
        self.backend.submit(cand.candidate_id, _evaluate_entry,
                            {"candidate": cand.to_dict(), "config": self._config_dict})

    def _submit_rung(self, cid: str, steps: int) -> None:
        task_id = f"{cid}@r{steps}"
        self.rung_tasks[task_id] = (cid, steps)
        seeds = self.config.top_rung_seeds if steps == self.config.rungs[-1] else 1
        self.backend.submit(task_id, _evaluate_rung_entry,
                            {"candidate": self.state.candidates[cid].to_dict(),
                             "config": self._config_dict, "steps": steps, "seeds": seeds})

    def _rung_outcome(self, result) -> None:
        cid, steps = self.rung_tasks.pop(result.task_id)
        if result.ok:
            rung = RungResult.from_dict(result.value)
            if rung.fitness is not None and not all(math.isfinite(v)
                                                    for v in rung.fitness.values()):
                rung.reason, rung.fitness = f"non-finite fitness {rung.fitness}", None
        else:
            gpu = self.config.gpus_per_eval > 0
            rung = RungResult(cid, steps, None, seconds=result.seconds,
                              device="gpu" if gpu else "cpu",
                              share=self.config.gpus_per_eval if gpu else self.config.cpus_per_eval,
                              worker=result.worker or "", reason=result.error)
        self._finish_rung(rung)

    def _finish_rung(self, rung: RungResult) -> None:
        """Charge, record, tell and judge a rung's result (the step's _flush commits it)."""
        self.ledger.charge(rung.stage, rung.seconds, rung.share, device=rung.device)
        self.state.add_rung(rung)
        self.journal.append_entry({"rung": rung.to_dict()})
        self._uncommitted_rungs.append(rung)
        if rung.fitness:
            level = self.config.rungs.index(rung.steps)
            self.controller.update(rung.candidate_id, level,
                                   tuple(rung.fitness[a] for a in self.config.archs))
            self._scored(level, rung.candidate_id, _mean(rung.fitness))
            self.best = self.state.best()

    def _scored(self, level: int, cid: str, score: float) -> None:
        """A score at rung `level` arrived: judge it, or, when it fills the rung to its
        minimum population, every score the rung holds, in the order they came."""
        scores = self.rung_scores[level]
        scores[cid] = score
        if level + 1 >= len(self.config.rungs):
            return  # the top rung: nothing above it
        need = self.config.rung_min_population
        judged = list(scores) if len(scores) == need else [cid] if len(scores) > need else []
        for other in judged:
            if records.clears_hurdle(other, scores, self.config.promote_fraction, need):
                self._promote(other, self.config.rungs[level + 1])

    def _promote(self, cid: str, steps: int) -> None:
        if (cid, steps) in self.state.promoted:
            return
        self.state.promoted.add((cid, steps))
        self.journal.append_entry({"promote": {"candidate_id": cid, "steps": steps}})
        self.promoting.append((cid, steps))

    def _precheck(self, cand: Candidate, genome: Genome) -> bool:
        """Static, numeric, causal and duplicate checks; True if the candidate needs a
        worker. The causal check runs where layers must not see later tokens: in a causal
        space, and wherever a proxy is a causal LM (there a leaking layer would score on
        the characters it is asked to predict)."""
        from evonas.search.rejection import causal_check

        seconds = self.pre_seconds.setdefault(cand.candidate_id, {})
        verdicts = [lambda: static_check(genome, self.space),
                    lambda: numeric_check(genome, self.config.stages.numeric_scales,
                                          self.space.groups)]
        if self.space.causal or self.config.causal_proxy:
            verdicts.append(lambda: causal_check(genome, self.space))
        for verdict in verdicts:
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
        if cand.fingerprint in self.evaluating:
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

    def _finished_outcome(self, result) -> None:
        if result.task_id in self.rung_tasks:
            self._rung_outcome(result)
            return
        cand = self.in_flight.pop(result.task_id)
        if result.ok:
            ev = Evaluation.from_dict(result.value)
            if ev.fitness is not None and not all(math.isfinite(v) for v in ev.fitness.values()):
                ev = Evaluation(cand.candidate_id, FAILED, reject_stage="proxy",
                                reject_reason=f"non-finite fitness {ev.fitness}",
                                stage_seconds=ev.stage_seconds, device=ev.device,
                                share=ev.share, worker=ev.worker)
        else:
            share = (self.config.gpus_per_eval if self.config.gpus_per_eval > 0
                     else self.config.cpus_per_eval)
            ev = Evaluation(cand.candidate_id, FAILED, reject_reason=result.error,
                            stage_seconds={"failed": result.seconds},
                            device="gpu" if self.config.gpus_per_eval > 0 else "cpu",
                            share=share, worker=result.worker or "")
        self._finish(cand, ev)
        self._release(cand.fingerprint, ev)

    def _release(self, fingerprint: str, ev: Evaluation) -> None:
        """Settle the duplicates parked behind a finished evaluation of their behaviour."""
        del self.evaluating[fingerprint]
        parked = self.waiting.pop(fingerprint, [])
        if ev.status != FAILED:
            for waiting in parked:
                self._finish(waiting, self._duplicate(waiting, ev))
        elif parked:
            # A failure says nothing of the layer: one equivalent is evaluated anew, the
            # others wait for it as they waited for the first.
            first, *rest = parked
            self.evaluating[fingerprint] = first.candidate_id
            self.ready.append(first)
            if rest:
                self.waiting[fingerprint] = rest

    def _finish(self, cand: Candidate, ev: Evaluation) -> None:
        """Tell, charge, record: the one path every candidate ends through (the step's
        _flush commits and logs it)."""
        ev.stage_seconds = {**self.pre_seconds.pop(cand.candidate_id, {}), **ev.stage_seconds}
        self.controller.tell(cand.candidate_id, ev.objectives(list(self.config.archs)),
                             records.told_status(ev), behaviour=cand.fingerprint)
        for stage, seconds, share, device in records.charges(ev):
            self.ledger.charge(stage, seconds, share, device=device)
        self.ledger.count_evaluation(_stopped_at(ev))
        self.state.add(cand, ev)
        self.counts[outcome(ev)] += 1
        rank = self.state.rank_key
        if ev.status == SURVIVOR and (self.best is None or rank(ev) < rank(self.best)):
            self.best = ev
        self._commit(cand, ev)
        if self.config.ladder and ev.status == SURVIVOR and ev.duplicate_of is None:
            self._scored(0, cand.candidate_id, records.mean_fitness(ev))

    # --- tracking -------------------------------------------------------------------

    def _start_tracking(self) -> None:
        from evonas.search.writer import WriterProcess, WriterThread

        if self.tracker is None:
            uri = self.config.tracking_uri or self.folder.tracking_uri
            location = (None if self.config.tracking_uri
                        else str(self.folder.artifacts_dir / "mlflow"))
            self.tracker = _new_tracker(uri, location)
            self.writer = WriterProcess(partial(_new_tracker, uri, location))
        else:  # a tracker built by the caller lives in this process
            self.writer = WriterThread(self.tracker)
        if (self.state.parent_run_id is not None
                and not self.tracker.has_search(self.state.parent_run_id)):
            # The store was made anew (a run folder copied without mlflow.db, as git keeps
            # a committed run, or another --tracking-uri): the run folder holds every
            # finished candidate, so the record is rebuilt under a new search run.
            print(f"search: MLflow run {self.state.parent_run_id} is not in "
                  f"{self.tracker.tracking_uri}; logging every finished candidate again "
                  f"under a new run", file=sys.stderr)
            self.state.parent_run_id = None
        if self.state.parent_run_id is None:
            name = Path(self.folder.path).name
            self.state.parent_run_id = self.tracker.start_search(
                name, self.config.to_dict(), {"evonas.run_folder": str(Path(self.folder.path).resolve())})
            self.save()
            if not self.state.evaluations:  # a new search: nothing to log again
                return
        else:
            self.tracker.resume_search(self.state.parent_run_id)
        logged = self.tracker.reconcile(self.state.parent_run_id, set(self.state.evaluations))
        missing = sorted(set(self.state.evaluations) - logged)
        for cid in missing:
            self._log(self.state.candidates[cid], self.state.evaluations[cid])
        self._reconcile_rungs(set(missing))
        if missing:
            self._log_progress()

    def _reconcile_rungs(self, relogged: set[str]) -> None:
        """Log the rung scores MLflow lacks: every rung of a candidate whose run is logged
        again, and of the others those whose metric its run does not hold (a rung's
        metrics are queued only after its line is committed, so the run folder has every
        score MLflow has; none is logged twice)."""
        reached = {cid: [r for r in results.values() if r.fitness]
                   for cid, results in self.state.rungs.items()}
        reached = {cid: rs for cid, rs in reached.items() if rs}
        if not reached:
            return
        held = {run["candidate_id"]: run["metrics"]
                for run in self.tracker.candidates(self.state.parent_run_id)}
        for cid, results in reached.items():
            metrics = {} if cid in relogged else held.get(cid, {})
            for r in sorted(results, key=lambda r: r.steps):
                arch = next(iter(r.fitness))
                if f"fitness.{arch}.r{r.steps}" not in metrics:
                    self.writer.put(_log_rung, self.state.parent_run_id, cid, r.steps,
                                    r.fitness)

    def _log(self, cand: Candidate, ev: Evaluation) -> None:
        """Queue the candidate's MLflow run (with its proxy score as rung 0's, on a ladder)."""
        self.writer.put(_log_candidate, self.state.parent_run_id, cand, ev,
                        self.config.rungs[0] if self.config.ladder else None)

    def _log_progress(self) -> None:
        """Queue the search's progress, at the step of the candidates finished so far."""
        summary = {"evaluated": float(len(self.state.evaluations)),
                   "budget_spent_fraction": float(self.ledger.fraction_spent)}
        if self.best is not None:
            summary["best_mean_fitness"] = records.mean_fitness(self.best)
        self.writer.put(_log_summary, self.state.parent_run_id, summary,
                        len(self.state.evaluations))

    def _report(self, force: bool = False) -> None:
        """Rewrite report.html (and its copy in MLflow) every report_every_s seconds."""
        if force or time.monotonic() - self._reported_at >= self.config.report_every_s:
            from evonas.search.report import refresh

            refresh(self.folder.path, _Queued(self.writer), self.state.parent_run_id)
            self._reported_at = time.monotonic()

    def _end_tracking(self, status: str) -> None:
        """Close the search's MLflow run: after every queued call when the search ended,
        at once when it was interrupted (a resume logs what the queue held)."""
        if self.writer is None:
            return
        if status == "FINISHED":
            self._flush()  # what a caller finished outside run()'s steps
        writer, self.writer = self.writer, None
        writer.close(drain=status == "FINISHED")
        if self.state.parent_run_id is not None:
            self.tracker.log_artifact_text(self.state.parent_run_id, "budget.txt",
                                           self.ledger.format_summary())
            self.tracker.end_search(self.state.parent_run_id, status)

    # --- display --------------------------------------------------------------------

    def _show(self, force: bool = False) -> None:
        budget = self.ledger.budget
        self.progress.show(self.progress.line(
            evaluated=len(self.state.evaluations), outcomes=self.counts,
            best=records.mean_fitness(self.best) if self.best else None,
            spent=budget.format_amount(self.ledger.spent),
            left=budget.format_amount(self.ledger.remaining),
            in_flight=len(self.in_flight) + len(self.rung_tasks)), force=force)


class _Queued:
    """A tracker's log_artifact_text, written by the writer in its turn."""

    def __init__(self, writer):
        self.writer = writer

    def log_artifact_text(self, parent_run_id: str, name: str, text: str) -> None:
        self.writer.put(_log_text, parent_run_id, name, text)


# --- the writes the writer runs (writer.py), off the driver's loop ------------------------


def _new_tracker(uri: str, artifact_location: str | None):
    import logging

    from evonas.search.tracking import SearchTracker

    # MLflow announces its schema migrations at INFO; the progress line says enough.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    return SearchTracker(uri, artifact_location=artifact_location)


def _log_candidate(tracker, parent_run_id: str, cand: Candidate, ev: Evaluation,
                   rung_steps: int | None = None) -> None:
    """One candidate's MLflow run; its formula, LaTeX and exported code are derived here."""
    from evonas.layers import symbolic
    from evonas.layers.export import export_source

    genome = Genome.from_dict(cand.genome)
    tracker.log_candidate(parent_run_id, cand, ev, genome=genome,
                          formula=symbolic.equation(genome), latex=symbolic.latex(genome),
                          source=export_source(genome, "EvolvedNormAct"), rung_steps=rung_steps)


def _log_rung(tracker, parent_run_id: str, cid: str, steps: int, fitness: dict) -> None:
    tracker.log_rung(parent_run_id, cid, steps, fitness)


def _mean(fitness: dict[str, float]) -> float:
    return sum(fitness.values()) / len(fitness)


def _log_summary(tracker, parent_run_id: str, summary: dict, step: int) -> None:
    tracker.log_summary(parent_run_id, summary, step=step)


def _log_text(tracker, parent_run_id: str, name: str, text: str) -> None:
    tracker.log_artifact_text(parent_run_id, name, text)


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


def _evaluate_rung_entry(payload: dict) -> dict:
    from evonas.search.evaluate import evaluate_rung

    return evaluate_rung(payload)


__all__ = ["Search", "new_controller", "search_budget"]
