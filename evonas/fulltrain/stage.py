"""The full-training stage: from a search's run folder to a tuned, seeded leaderboard.

Flow of run_full_training(run_path, config, ledger=None), the one entry point (`evonas
train RUN` and `evonas search --full-train-top N` both call it):

1. plan, in the driver, before anything is written: the search's top `config.top`
   survivors and the zoo baselines; one group per (layer, arch, batch size, seed); the
   Tune experiment's name, a hash of what is trained, so a re-run with the same
   settings resumes the same experiment;
2. connect to Ray (runtime/cluster.py, the search's own connection code: an embedded
   loopback-only Ray or a cluster), then take the stage's lock in <run>/fulltrain/;
3. proxy fitness for the baselines the search never scored (its own evaluation, through
   the search's RayBackend, once: kept in the stage's state), so the rank correlation
   covers every layer;
4. Tune: one Tuner over all groups with a GroupedSearch (a TPE study per group, the same
   number of trials each) and a GroupedASHA (tuning.py), trials from trainable.py, each
   retried `max_retries` times after an error or a dead worker before it counts as
   failed; after a killed driver, Tuner.restore of the same experiment: finished trials
   stay finished, interrupted ones go on from their last checkpoint;
5. one record per trial, the leaderboard and Kendall tau (leaderboard.py), the files
   below, and MLflow (tracking.py).

Budget rule: one budget covers search and full training, in device-hours or wall time,
in one ledger (budget.py). The search may spend at most `--search-share` (80%) of it
(Budget.split: `--full-train-top` runs the search on that share); full training may
spend whatever the whole budget has left when it starts, so at least the other 20%. The
stage's ledger is the search's (copied from its state.json, with every search charge,
then kept in fulltrain/state.json across resumes), its budget the whole one
(config.budget); or a live ledger the caller passes. Each report of a trial charges its
seconds times the device share the trial holds (0.25 of a GPU, or its CPUs) to the
"fulltrain" stage, the baselines' proxy runs to "fulltrain_proxy"; once the budget is
spent no new trial starts, and each running trial stops at its report that spends it
(BudgetStopper: the stage overruns by at most one report per running trial; such a trial
is recorded "stopped" with that reason). Without a budget nothing is gated, and the
ledger still records what full training cost.

<run>/fulltrain/ holds: config.json (this stage's settings), state.json (ledger, retry
counts, errors, baseline proxy scores, rewritten atomically after every trial event),
trials.json (one record per trial), leaderboard.json and .csv, summary.json, lock, and
tune/ (the Tune experiments, unless --storage puts them elsewhere, e.g. a bucket).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from evonas.search.budget import Ledger, cluster_check, parse_budget
from evonas.errors import EvonasError
from evonas.fulltrain.config import LR_REFERENCE_BATCH, FullTrainConfig, check_stage_budget
from evonas.fulltrain.leaderboard import leaderboard, proxy_correlation, table_rows, to_csv
from evonas.fulltrain.trainable import train_layer, train_size
from evonas.fulltrain.tuning import (LIVE, METRIC, MODE, BudgetStopper, Group, GroupedASHA,
                                     GroupedSearch, StageCallback, StageHooks,
                                     make_optuna_factory)
from evonas.runtime.backends import Outcome, RayBackend, run_all
from evonas.runtime.cluster import TaskShape, connected, fitting, remote_address
from evonas.search.runfolder import RunFolder, atomic_write_json, atomic_write_text
from evonas.search.results import Run, load_run

STATE_FORMAT = "evonas.fulltrain-state/1"
FOLDER = "fulltrain"
TRIAL_STAGE = "fulltrain"  # ledger stage of the trials
PROXY_STAGE = "fulltrain_proxy"  # ledger stage of the baselines' proxy runs
# "interrupted": the stage stopped (Ctrl-C, a killed driver) while the trial ran; a
# re-run resumes it, so it is not final and not logged to MLflow.
STATUSES = ("completed", "stopped", "diverged", "failed", "interrupted")
_TUNE_OUTPUT_VAR = "RAY_AIR_NEW_OUTPUT"


@dataclass(frozen=True)
class Layer:
    """A layer the stage trains: a search candidate or a zoo baseline."""

    name: str  # the candidate id, or the zoo name
    candidate_id: str  # the candidate id, or "zoo:<name>"
    genome: dict
    zoo: str | None = None
    proxy_fitness: float | None = None  # the search's mean proxy accuracy, when known

    def spec(self, groups: int) -> dict:
        return {"genome": self.genome, "zoo": self.zoo, "groups": groups}


# --- 1. the plan ------------------------------------------------------------------------


def plan_layers(run: Run, config: FullTrainConfig) -> list[Layer]:
    """The top survivors (best mean proxy fitness first), then the baselines."""
    from evonas.search.state import mean_fitness

    layers = [Layer(c.candidate_id, c.candidate_id, c.genome, None, mean_fitness(ev))
              for c, ev in run.leaderboard(config.top)]
    layers += [_baseline(run, name) for name in config.baselines]
    seen = [layer.name for layer in layers]
    twice = sorted({n for n in seen if seen.count(n) > 1})
    if twice:  # a genome file named like a zoo layer or a candidate id
        raise EvonasError(f"two layers to train are named {twice[0]!r}; rename the genome "
                          f"file ({twice[0]}.json) so each layer has a name of its own")
    if not layers:
        raise EvonasError(f"{run.path}: no survivor to train yet and no --baselines; wait "
                          f"for the search, or name zoo layers with --baselines")
    return layers


def _baseline(run: Run, name: str) -> Layer:
    """A zoo layer or a genome file's layer (named by the file's stem), with the proxy
    fitness of an equivalent layer the search scored."""
    from evonas.fulltrain.config import baseline_genome, is_genome_file
    from evonas.layers.fingerprint import functional_fingerprint
    from evonas.search.records import SURVIVOR

    genome = baseline_genome(name)
    scored = run.state.fingerprints.get(functional_fingerprint(genome))
    ev = run.state.evaluations.get(scored) if scored else None
    fitness = (sum(ev.fitness.values()) / len(ev.fitness)
               if ev is not None and ev.status == SURVIVOR and ev.fitness else None)
    if is_genome_file(name):
        return Layer(Path(name).stem, f"file:{name}", genome.to_dict(), None, fitness)
    return Layer(name, f"zoo:{name}", genome.to_dict(), name, fitness)


def plan_groups(layers: list[Layer], config: FullTrainConfig) -> list[Group]:
    """Seed-major order: if the budget runs out, seed 0 of every setting is furthest."""
    return [Group(layer.name, arch, bs, seed, opt) for seed in config.seeds
            for arch in config.archs for bs in config.batch_sizes
            for opt in config.optimizers for layer in layers]


def experiment_name(layers: list[Layer], config: FullTrainConfig, groups: int) -> str:
    plan = config.plan_fields()
    if tuple(plan["optimizers"]) == ("sgd",):
        # Written as before optimizers were a setting, so that a stage begun then resumes
        # its own experiment: the one optimizer left out, its ranges spelt out.
        del plan["optimizers"]
        plan["lr_range"], plan["wd_range"], _ = config.ranges("sgd")
    if plan["placement"] == "pre":
        del plan["placement"]  # the one placement there was before it was a setting
    what = {"plan": plan, "groups": groups,
            "layers": [[layer.name, layer.genome] for layer in layers]}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]
    return f"fulltrain-{digest}"


# --- 2. the stage's folder and state ----------------------------------------------------


class StageFolder:
    """<run>/fulltrain/: its lock (one stage per run folder at a time) and its files."""

    def __init__(self, run_path: Path):
        self.path = Path(run_path).absolute() / FOLDER
        self._lock: RunFolder | None = None

    def lock(self) -> None:
        self.path.mkdir(exist_ok=True)
        folder = RunFolder(self.path)
        try:
            folder.lock()
        except EvonasError:
            holder = (self.path / "lock").read_text().strip() or "unknown"
            raise EvonasError(f"{self.path.parent}: full training already runs there (pid "
                              f"{holder}); wait for it to end or stop it, then re-run") from None
        self._lock = folder

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def read_state(self) -> dict | None:
        path = self.path / "state.json"
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        if state.get("format") != STATE_FORMAT:
            raise EvonasError(f"{path} is not a full-training state; move it away to start over")
        return state

    def write(self, name: str, obj) -> None:
        atomic_write_json(self.path / name, obj)


def _default_ledger(run_path: Path, config: FullTrainConfig,
                    saved: dict | None) -> tuple[Ledger, bool]:
    """The ledger to charge when the caller passes none, and whether it gates trials:
    the stage's own (a resume), else a copy of the search's; --budget replaces its budget."""
    if saved is not None and saved.get("ledger"):
        ledger = Ledger.from_state(saved["ledger"])
    else:
        raw = RunFolder(run_path).read_state()
        ledger = Ledger.from_state(raw["ledger"])
    if config.budget is not None:
        ledger.budget = parse_budget(config.budget)  # FullTrainConfig checked it
        return ledger, True
    return ledger, bool(saved and saved.get("gated"))


def _check_ledger(ledger: Ledger, config: FullTrainConfig) -> None:
    # The ledger's budget may be the search's: the same rule as a --budget given here.
    check_stage_budget(ledger.budget, config.gpus_per_trial, remote=config.ray_address)


def trial_shape(config: FullTrainConfig) -> TaskShape:
    """What one trial (or one baseline's proxy run) holds, named as trials in messages."""
    return TaskShape(config.cpus_per_trial, config.gpus_per_trial, "trial", "trial")


# --- the live stage ---------------------------------------------------------------------


class Stage(StageHooks):
    """The stage while it runs: ledger, state and progress, fed by Tune's callbacks."""

    def __init__(self, run: Run, config: FullTrainConfig, layers: list[Layer], groups: list[Group],
                 name: str, folder: StageFolder, ledger: Ledger, gated: bool, state: dict,
                 progress: Callable[[str], None]):
        self.run, self.config, self.layers, self.groups = run, config, layers, groups
        self.name, self.folder, self.ledger, self.gated = name, folder, ledger, gated
        self.state, self.progress = state, progress
        self.ended: Counter = Counter()

    @property
    def planned(self) -> int:
        return len(self.groups) * self.config.trials_per_layer

    def save(self) -> None:
        self.state["ledger"] = self.ledger.to_state()
        self.state["gated"] = self.gated
        self.folder.write("state.json", self.state)

    # --- hooks (tuning.StageHooks) --------------------------------------------------

    def can_start(self) -> bool:
        return not self.gated or self.ledger.can_start()

    def should_stop(self, trial_id: str, result: dict) -> bool:
        """Whether this report, not yet charged, spends the budget: the trial stops there."""
        if not self.gated or result.get("done") or result.get("completed"):
            return False
        budget = self.ledger.budget
        cost = (_report_seconds(result) * self.config.device_share
                if budget.kind == "device" and budget.device == self.config.device_kind else 0.0)
        if self.ledger.remaining > cost:
            return False
        stopped = self.state.setdefault("budget_stopped", [])
        if trial_id not in stopped:
            stopped.append(trial_id)
        return True

    def on_result(self, trial_id: str, result: dict) -> None:
        self.ledger.charge(TRIAL_STAGE, _report_seconds(result), self.config.device_share,
                           device=self.config.device_kind)
        self.save()

    def on_recover(self, trial_id: str) -> None:
        retries = self.state.setdefault("retries", {})
        retries[trial_id] = retries.get(trial_id, 0) + 1
        self.save()

    def on_end(self, trial_id: str, error: str | None) -> None:
        # Not ledger.count_evaluation: a trial is no candidate evaluation, and counting
        # it would spend an evaluation-count budget of a search resumed later.
        if error is not None:
            self.state.setdefault("errors", {})[trial_id] = error
        ended = self.state.setdefault("ended", [])
        if trial_id not in ended:
            ended.append(trial_id)
        self.ended["failed" if error else "ended"] += 1
        self.save()
        self.progress(self._progress_line())

    def _progress_line(self) -> str:
        ended = sum(self.ended.values())
        spent = self.ledger.device_seconds(self.config.device_kind) / 3600.0
        budget = f" of {self.ledger.budget}" if self.gated else ""
        return (f"fulltrain: {ended} trials ended this run, {self.ended['failed']} failed; "
                f"planned {self.planned}; ledger {spent:.3g} {self.config.device_kind}-h{budget}")

    # --- 3. baselines' proxy fitness --------------------------------------------------

    def score_baselines(self) -> None:
        """Run the search's own evaluation on every baseline it has no proxy fitness for,
        through the search's backend, on the stage's Ray connection and resources."""
        from evonas.search.records import Candidate

        scores = self.state.setdefault("proxy", {})
        todo = [layer for layer in self.layers
                if layer.candidate_id.startswith(("zoo:", "file:"))
                and layer.proxy_fitness is None and layer.name not in scores]
        if not todo:
            return
        search = self.run.config.to_dict()
        # The search's protocol on the stage's resources (a CPU-only stage has no GPU).
        search.update(cpus_per_eval=self.config.cpus_per_trial,
                      gpus_per_eval=self.config.gpus_per_trial)
        tasks = {layer.name: (_evaluate_candidate, {
            "candidate": Candidate(f"zoo_{layer.name}", layer.genome, None,
                                   layer.candidate_id).to_dict(), "config": search})
            for layer in todo}
        shape = trial_shape(self.config)
        workers = min(len(tasks), self.config.workers or fitting(shape))
        self.progress(f"fulltrain: proxy runs for {len(tasks)} baselines the search never scored")
        with RayBackend(self.config.ray_address, workers, shape.cpus, shape.gpus,
                        noun=shape.noun, flag=shape.flag) as backend:
            for outcome in run_all(backend, tasks):
                scores[outcome.task_id] = self._proxy_score(outcome)
        self.save()

    def _proxy_score(self, outcome: Outcome) -> dict:
        from evonas.search.records import SURVIVOR, Evaluation

        if not outcome.ok:
            self.ledger.charge(PROXY_STAGE, outcome.seconds, self.config.device_share,
                               device=self.config.device_kind)
            return {"fitness": None, "status": "failed", "reason": outcome.error}
        ev = Evaluation.from_dict(outcome.value)
        # The seconds of its stages, as the search charges its own evaluations: a fresh
        # worker's imports and dataset load are not the layer's cost.
        self.ledger.charge(PROXY_STAGE, sum(ev.stage_seconds.values()),
                           self.config.device_share, device=self.config.device_kind)
        if ev.status != SURVIVOR or not ev.fitness:
            return {"fitness": None, "status": ev.status,
                    "reason": f"{ev.reject_stage}: {ev.reject_reason}"}
        return {"fitness": sum(ev.fitness.values()) / len(ev.fitness), "status": ev.status,
                "per_arch": ev.fitness}

    def proxy_fitness(self) -> dict[str, float | None]:
        scores = self.state.get("proxy", {})
        return {layer.name: layer.proxy_fitness if layer.proxy_fitness is not None
                else scores.get(layer.name, {}).get("fitness") for layer in self.layers}

    # --- 4. Tune ----------------------------------------------------------------------

    def experiment_path(self) -> str:
        storage = self.config.storage or str(self.folder.path / "tune")
        if "://" not in storage:
            storage = str(Path(storage).expanduser().absolute())
        return f"{storage.rstrip('/')}/{self.name}"

    def tune(self):
        from ray import tune

        trainable = tune.with_resources(train_layer, {"cpu": self.config.cpus_per_trial,
                                                      "gpu": self.config.gpus_per_trial})
        path = self.experiment_path()
        LIVE[self.name] = self
        try:
            if tune.Tuner.can_restore(path):
                self.progress(f"fulltrain: resuming {path}")
                tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                           resume_errored=False)
            else:
                tuner = self._new_tuner(trainable, path)
            with _quiet_tune():
                return tuner.fit()
        finally:
            LIVE.pop(self.name, None)
            self.save()

    def _new_tuner(self, trainable, path: str):
        from ray import tune

        cfg = self.config
        space_groups = self.state["groups"]
        search = GroupedSearch(
            self.groups, cfg.trials_per_layer,
            make_optuna_factory(cfg.ranges, cfg.trials_per_layer, cfg.seeds[0]),
            layer_specs={layer.name: layer.spec(space_groups) for layer in self.layers},
            experiment=self.name, max_concurrent_per_group=max(1, cfg.trials_per_layer // 4))
        storage, name = path.rsplit("/", 1)
        return tune.Tuner(
            trainable, param_space={"settings": cfg.to_dict()},
            tune_config=tune.TuneConfig(
                metric=METRIC, mode=MODE, search_alg=search,
                scheduler=GroupedASHA(cfg.num_reports, cfg.grace_period, cfg.asha_reduction),
                num_samples=self.planned, max_concurrent_trials=cfg.workers,
                # One worker process goes from trial to trial: no process start, torch
                # import and dataset load per trial (all trials hold the same resources).
                reuse_actors=True,
                trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(
                name=name, storage_path=storage, verbose=0, callbacks=[StageCallback(self.name)],
                stop=BudgetStopper(self.name),
                failure_config=tune.FailureConfig(max_failures=cfg.max_retries),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))

    # --- 5. records -------------------------------------------------------------------

    def records(self, grid) -> list[dict]:
        layers = {layer.name: layer for layer in self.layers}
        out = [trial_record(result, layers, self.state) for result in grid]
        return sorted((r for r in out if r is not None),
                      key=lambda r: (r["layer"], r["arch"], r["batch_size"], r["optimizer"],
                                     r["seed"],
                                     r["trial_id"]))


def _report_seconds(result: dict) -> float:
    """Seconds of training since the trial's previous report."""
    return float(result.get("time_this_iter_s") or 0.0)


def trial_name(trial) -> str:
    """Trial and folder name: the trial id first (records read it back), then the group."""
    c = trial.config
    return (f"{trial.trial_id}-{c.get('layer')}-{c.get('arch')}-b{c.get('batch_size')}"
            f"-s{c.get('seed')}")


def trial_record(result, layers: dict[str, Layer], state: dict) -> dict | None:
    """One trial's record from its Tune result: settings, status, scores, curve."""
    from evonas.runtime.reasons import reason

    cfg = result.config or {}
    if cfg.get("layer") not in layers:
        return None
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id") or Path(result.path).name.split("-", 1)[0]
    curve = _curve(result)
    stopped_by = None  # a stopped trial: "budget" or "asha" (leaderboard.diverged_seeds)
    if result.error is not None:
        status = "failed"
        why = state.get("errors", {}).get(trial_id) or reason(getattr(result.error, "cause", None)
                                                              or result.error)
    elif trial_id not in state.get("ended", ()):
        status, why = "interrupted", "the stage stopped while it ran; re-run to resume it"
    elif metrics.get("diverged"):
        status, why = "diverged", "non-finite training loss or network output"
    elif metrics.get("completed"):
        status, why = "completed", None
    elif trial_id in state.get("budget_stopped", ()):
        status, why, stopped_by = "stopped", (f"the budget was spent: stopped after step "
                                              f"{metrics.get('step', 0)}"), "budget"
    else:
        status, why, stopped_by = "stopped", "stopped early by ASHA (below its rung's cut)", "asha"
    layer = layers[cfg["layer"]]
    return {"trial_id": trial_id, "layer": layer.name, "candidate_id": layer.candidate_id,
            "arch": cfg["arch"], "batch_size": cfg["batch_size"], "seed": cfg["seed"],
            "optimizer": cfg.get("optimizer", "sgd"),
            "lr": cfg["lr"], "lr_effective": cfg["lr"] * cfg["batch_size"] / LR_REFERENCE_BATCH,
            "weight_decay": cfg["weight_decay"], "status": status, "reason": why,
            "stopped_by": stopped_by,
            "attempts": 1 + state.get("retries", {}).get(trial_id, 0),
            "steps_done": metrics.get("step", 0), "val_accuracy": metrics.get("val_accuracy"),
            "test_accuracy": metrics.get("test_accuracy") if status == "completed" else None,
            "test_bpc": metrics.get("test_bpc") if status == "completed" else None,
            "seconds": metrics.get("time_total_s"), "curve": curve, "path": str(result.path),
            "settings": _trial_settings(cfg.get("settings", {}))}


def _curve(result) -> list[dict]:
    """One point per reported step; a step reported twice (a retry re-ran it) keeps the last."""
    df = result.metrics_dataframe
    if df is None or "step" not in df:
        return []
    points: dict[int, dict] = {}
    for row in df.to_dict("records"):
        step = row.get("step")
        if step is None or step != step:  # NaN: a row without the trial's own metrics
            continue
        points[int(step)] = {"step": int(step), **{k: _plain(row.get(k)) for k in
                                                  ("val_accuracy", "val_loss", "train_loss", "lr")}}
    return [points[s] for s in sorted(points)]


def _plain(value):
    return None if value is None or value != value else float(value)


def _trial_settings(settings: dict) -> dict:
    keys = ("dataset", "epochs", "steps", "width", "groups", "momentum", "warmup_fraction",
            "device", "bf16", "channels_last", "cpus_per_trial", "gpus_per_trial")
    return {k: settings.get(k) for k in keys}


@contextmanager
def _quiet_tune() -> Iterator[None]:
    """Tune logs every trial error with its traceback and a results table; the stage
    prints its own line per trial and keeps the reasons in its records."""
    loggers = [logging.getLogger(n) for n in ("ray.tune", "ray.train", "ray.air")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    # Tune's newer console output prints its experiment table at every verbosity; the
    # classic reporter is silent at verbose=0. Read when fit() starts.
    saved = os.environ.get(_TUNE_OUTPUT_VAR)
    os.environ[_TUNE_OUTPUT_VAR] = "0"
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if saved is None:
            os.environ.pop(_TUNE_OUTPUT_VAR, None)
        else:
            os.environ[_TUNE_OUTPUT_VAR] = saved


def _evaluate_candidate(payload: dict) -> dict:
    from evonas.search.evaluate import evaluate_candidate

    return evaluate_candidate(payload)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --- the entry point ---------------------------------------------------------------------


def run_full_training(run_path: str, config: FullTrainConfig, ledger: Ledger | None = None, *,
                      progress: Callable[[str], None] | None = None) -> dict:
    """Train the search's best layers and the baselines fully; returns the stage summary.

    ledger: a live ledger to charge, its budget the whole budget of search plus full
    training (see the module docstring); None: the stage keeps its own, a copy of the
    search's, with config.budget as the whole budget. progress: where progress lines go
    (stderr). Raises EvonasError for bad input before anything is written.
    """
    progress = progress or _stderr
    run_path = Path(run_path)
    run = load_run(run_path)
    check_task_fits(run.config.space, config)
    _check_batch_sizes(config)
    layers = plan_layers(run, config)
    groups = plan_groups(layers, config)
    space_groups = config.groups or _space_groups(run)
    name = experiment_name(layers, config, space_groups)
    folder = StageFolder(run_path)
    saved = folder.read_state()
    if ledger is None:
        ledger, gated = _default_ledger(run_path, config, saved)
    else:
        gated = True
    if gated:
        _check_ledger(ledger, config)
    _check_startable(ledger, gated, saved, name)
    if remote_address(config.ray_address) is None:
        from evonas.proxy.data import ensure_dataset

        ensure_dataset(config.dataset, config.data_dir)
    admit = (cluster_check(ledger.budget, config.gpus_per_trial, flag="--gpus-per-trial",
                           tasks="trials") if gated else None)
    with connected(config.ray_address, trial_shape(config), workers=config.workers,
                   admit=admit):
        folder.lock()
        try:
            return _run_locked(run, config, layers, groups, name, folder, ledger, gated,
                               saved, space_groups, progress)
        finally:
            folder.release()


def check_task_fits(space_name: str, config: FullTrainConfig) -> None:
    """The architectures take the layers of the search's space and read the dataset, and
    the baselines are layers of its layout: a conv layer in a transformer (or the other
    way round) fails here, in one line, before anything is written."""
    from evonas.fulltrain.config import baseline_genome
    from evonas.layers import zoo
    from evonas.layers.space import load_space
    from evonas.search.config import check_task

    space = load_space(space_name)
    check_task(space, config.archs, config.dataset, search=False)
    for name in config.baselines:
        layout = baseline_genome(name).layout
        if layout != space.layout:
            fit = ", ".join(zoo.names(space.layout))
            raise EvonasError(f"--baselines {name} is a layer for {layout} activations, but "
                              f"the search's layers (space {space.name}) are {space.layout}: "
                              f"use {space.layout} layers ({fit})")


def _check_batch_sizes(config: FullTrainConfig) -> None:
    from evonas.proxy.text import TEXT_DATASETS

    if config.dataset in TEXT_DATASETS:
        return  # windows are drawn at random offsets: any batch size has enough of them
    n = train_size(config.dataset)
    too_big = [b for b in config.batch_sizes if b > n]
    if too_big:
        raise EvonasError(f"--batch-sizes {too_big[0]} exceeds the {n} training images of "
                          f"{config.dataset}; use at most {n}")


def _space_groups(run: Run) -> int:
    from evonas.layers.space import load_space

    return load_space(run.config.space).groups


def _check_startable(ledger: Ledger, gated: bool, saved: dict | None, name: str) -> None:
    resuming = saved is not None and saved.get("experiment") == name
    if gated and not ledger.can_start() and not resuming:
        b = ledger.budget
        raise EvonasError(f"budget {b} is already spent ({b.format_amount(ledger.spent)} so far, "
                          f"search included); give a larger --budget")


def _run_locked(run, config, layers, groups, name, folder, ledger, gated, saved, space_groups,
                progress) -> dict:
    state = saved if saved is not None and saved.get("experiment") == name else {
        "format": STATE_FORMAT, "experiment": name}
    # A new plan starts a new state (its own retries, errors and baseline scores); the
    # ledger, read by _default_ledger, carries over: one budget covers every stage.
    state.setdefault("proxy", {})
    state["groups"] = space_groups
    folder.write("config.json", config.to_dict())
    stage = Stage(run, config, layers, groups, name, folder, ledger, gated, state, progress)
    ledger.start()  # a wall-time budget counts the stage's whole run
    try:
        stage.save()
        stage.score_baselines()
        grid = stage.tune()
    finally:
        ledger.stop()
        stage.save()
    records = stage.records(grid)
    summary = _summarize(stage, records)
    _write_outputs(folder, records, summary)
    _log_mlflow(run, config, records, summary, progress)
    return summary


def _summarize(stage: Stage, records: list[dict]) -> dict:
    cfg = stage.config
    names = [layer.name for layer in stage.layers]
    rows = leaderboard(records, names, cfg.archs, cfg.batch_sizes, cfg.optimizers)
    fitness = stage.proxy_fitness()
    counts = Counter(r["status"] for r in records)
    return {
        "experiment": stage.experiment_path(),
        # Each layer's genome, so the summary stands alone (a calibration panel built from
        # it needs neither the search's state nor a genome file's path).
        "layers": [{"layer": layer.name, "candidate_id": layer.candidate_id,
                    "proxy_fitness": fitness[layer.name], "genome": layer.genome}
                   for layer in stage.layers],
        "trials": {"planned": stage.planned, "started": len(records),
                   **{s: counts.get(s, 0) for s in STATUSES},
                   "stopped_by_budget": len(stage.state.get("budget_stopped", ()))},
        "trials_per_layer": dict(Counter(r["layer"] for r in records)),
        "leaderboard": rows,
        "kendall_tau": proxy_correlation(rows, fitness, unscored=[
            name for name, got in stage.state.get("proxy", {}).items() if got["status"] == "failed"]),
        "budget": {"gated": stage.gated, **stage.ledger.summary(),
                   "text": _budget_text(stage)},
    }


def _budget_text(stage: Stage) -> str:
    """The ledger's table; its budget line only where the budget gates full training."""
    lines = stage.ledger.format_summary().splitlines()
    if stage.gated:
        return "\n".join(lines)
    return "\n".join(lines[:-1] + ["full training had no budget (--budget sets one for "
                                    "search plus full training)"])


def _write_outputs(folder: StageFolder, records: list[dict], summary: dict) -> None:
    folder.write("trials.json", records)
    folder.write("leaderboard.json", table_rows(summary["leaderboard"]))
    atomic_write_text(folder.path / "leaderboard.csv", to_csv(summary["leaderboard"]))
    folder.write("summary.json", summary)


def _log_mlflow(run: Run, config: FullTrainConfig, records: list[dict], summary: dict,
                progress: Callable[[str], None]) -> None:
    from evonas.fulltrain.tracking import log_stage
    from evonas.runtime.tracking import Tracker

    parent = run.state.parent_run_id
    if parent is None:
        progress("fulltrain: the search has no MLflow parent run; nothing logged to MLflow")
        return
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # The search's store: a SQLite store keeps its artifacts beside it, in the run folder.
    uri = config.tracking_uri or run.config.tracking_uri or RunFolder(run.path).tracking_uri
    tracker = Tracker(uri)
    if not tracker.exists(parent):
        # A store made anew (a run folder copied without mlflow.db): the stage's results
        # are in fulltrain/ all the same; the search's resume rebuilds its record.
        progress(f"fulltrain: the search's MLflow run {parent} is not in {uri}; nothing "
                 f"logged to MLflow (`evonas search --resume {run.path}` logs the search "
                 f"again, then re-run this command to log the stage)")
        return
    log_stage(tracker, parent, records, summary["leaderboard"], summary)


__all__ = ["run_full_training", "check_task_fits", "Layer", "plan_layers", "plan_groups", "experiment_name",
           "trial_record", "STATE_FORMAT"]
