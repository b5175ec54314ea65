"""The Tune plug-ins of the full-training stage: one Optuna study and one ASHA per group.

Where it sits: stage.py builds one Tuner for the whole stage and gives it a GroupedSearch
(the search algorithm), a GroupedASHA (the scheduler) and a StageCallback. A *group* is
one (layer, architecture, batch size, seed, optimizer); each trial belongs to one group.

Why not one Tuner per group: a cluster would then run one group's handful of trials at a
time and wait for each group's slowest trial. Why not one OptunaSearch and one ASHA over
everything: TPE would chase the layers that train best, so the layers would not get the
same number of tuning trials, and ASHA would stop the trials of a weak layer, or of
batch size 8, for being worse than other layers' trials. So every group keeps its own TPE
study and its own ASHA rungs, and GroupedSearch hands out trials round-robin, least
started group first, at most `trials_per_group` per group: every layer gets the same
number of trials, and a budget that runs out leaves all layers equally far along.

Tuner.restore (after a killed driver) unpickles the searcher, scheduler and callbacks from
the experiment folder, so they cannot hold the live ledger or stage state: they find the
stage running in this process through `LIVE`, keyed by experiment name.
"""

from __future__ import annotations

import contextlib
import pickle
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import Searcher
from ray.tune.stopper import Stopper

METRIC, MODE = "val_accuracy", "max"


@dataclass(frozen=True)
class Group:
    """One (layer, architecture, batch size, seed, optimizer): the unit that gets its own
    tuning."""

    layer: str
    arch: str
    batch_size: int
    seed: int
    optimizer: str = "sgd"

    @property
    def key(self) -> str:
        return f"{self.layer}|{self.arch}|{self.batch_size}|{self.seed}|{self.optimizer}"

    def fields(self) -> dict[str, Any]:
        return {"group": self.key, "layer": self.layer, "arch": self.arch,
                "batch_size": self.batch_size, "seed": self.seed, "optimizer": self.optimizer}


class StageHooks:
    """What the live stage offers the plug-ins (stage.py subclasses it)."""

    def can_start(self) -> bool:
        return True

    def should_stop(self, trial_id: str, result: dict) -> bool:
        return False

    def on_result(self, trial_id: str, result: dict) -> None:
        pass

    def on_recover(self, trial_id: str) -> None:
        pass

    def on_end(self, trial_id: str, error: str | None) -> None:
        pass


# Experiment name -> the stage running it in this process.
LIVE: dict[str, StageHooks] = {}


def _hooks(name: str) -> StageHooks:
    return LIVE.get(name) or StageHooks()


# --- search -------------------------------------------------------------------------


class GroupedSearch(Searcher):
    """One OptunaSearch (TPE) per group, `trials_per_group` trials each, round-robin.

    suggest() returns the next group's fields and layer plus Optuna's lr and weight decay; None
    while every group with trials left is at its concurrency limit; FINISHED once all
    trials are handed out or the stage's budget is spent (running trials go on).
    """

    def __init__(self, groups: list[Group], trials_per_group: int, make_optuna: Callable,
                 *, layer_specs: dict[str, dict], experiment: str, max_concurrent_per_group: int):
        super().__init__(metric=METRIC, mode=MODE)
        self.groups = list(groups)
        # Each trial's config carries its own layer only (Tune copies the config into
        # every result line it writes).
        self.layer_specs = layer_specs
        self.trials_per_group = trials_per_group
        self.experiment = experiment
        self.max_concurrent = max_concurrent_per_group
        self.searchers = {g.key: make_optuna(g) for g in self.groups}
        self.started: Counter = Counter()
        self.owner: dict[str, str] = {}  # trial id -> group key
        self.running: Counter = Counter()

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # metric and mode are fixed above; the space is Optuna's

    def suggest(self, trial_id: str) -> dict | str | None:
        if trial_id in self.owner:  # asked again for a trial it already placed
            return None
        left = [g for g in self.groups if self.started[g.key] < self.trials_per_group]
        if not left:
            return Searcher.FINISHED
        if not _hooks(self.experiment).can_start():
            return Searcher.FINISHED
        for group in sorted(left, key=lambda g: self.started[g.key]):
            if self.running[group.key] >= self.max_concurrent:
                continue
            params = self.searchers[group.key].suggest(trial_id)
            if params is None or params == Searcher.FINISHED:
                continue
            self.started[group.key] += 1
            self.running[group.key] += 1
            self.owner[trial_id] = group.key
            return {**group.fields(), "layer_spec": self.layer_specs[group.layer], **params}
        return None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        key = self.owner.get(trial_id)
        if key is not None:
            self.searchers[key].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        key = self.owner.get(trial_id)
        if key is None:
            return  # a trial from before a restore whose state was not saved: nothing to tell
        self.running[key] = max(0, self.running[key] - 1)
        self.searchers[key].on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
        # Trials that were running when the driver died are resumed by Tune and complete
        # again through on_trial_complete; count them as running until they do.


def make_optuna_factory(ranges: Callable[[str], tuple], trials_per_group: int,
                        base_seed: int) -> Callable[[Group], Any]:
    """A function making each group's OptunaSearch: TPE over log lr and log weight
    decay in the ranges of the group's optimizer (ranges(optimizer) -> (lr range, weight
    decay range, first point), FullTrainConfig.ranges), seeded per group, starting from
    the optimizer's standard recipe when it is in range, so each layer is also seen with
    the hyperparameters baselines are usually given (the paper's own protocol)."""
    import numpy as np
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    # Optuna announces every study it creates at INFO, one line per group on the
    # driver's console; the stage prints its own progress.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # TPE samples at random until it has n_startup_trials results; its default of 10
    # would make every budget below 10 trials per group a plain random search.
    startup = max(2, trials_per_group // 4)

    def make(group: Group):
        lr_range, wd_range, start = ranges(group.optimizer)
        space = {"lr": optuna.distributions.FloatDistribution(*lr_range, log=True),
                 "weight_decay": optuna.distributions.FloatDistribution(*wd_range, log=True)}
        inside = (lr_range[0] <= start["lr"] <= lr_range[1]
                  and wd_range[0] <= start["weight_decay"] <= wd_range[1])
        seed = int(np.random.SeedSequence([base_seed, *map(ord, group.key)]).generate_state(1)[0])
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
        return OptunaSearch(space, metric=METRIC, mode=MODE, sampler=sampler,
                            points_to_evaluate=[start] if inside else None)

    return make


# --- scheduling ---------------------------------------------------------------------


class GroupedASHA(FIFOScheduler):
    """ASHA with separate rungs per group: a trial competes only with its own group's."""

    def __init__(self, max_t: int, grace_period: int, reduction_factor: int):
        super().__init__()
        self.options = {"time_attr": "training_iteration", "metric": METRIC, "mode": MODE,
                        "max_t": max_t, "grace_period": min(grace_period, max_t),
                        "reduction_factor": reduction_factor, "brackets": 1}
        self.by_group: dict[str, ASHAScheduler] = {}

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True

    def _of(self, trial) -> ASHAScheduler:
        key = trial.config.get("group", "")
        if key not in self.by_group:
            self.by_group[key] = ASHAScheduler(**self.options)
        return self.by_group[key]

    def on_trial_add(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        asha = self._of(trial)
        try:
            return asha.on_trial_result(tune_controller, trial, result)
        except KeyError:  # a trial resumed after a restore, which this ASHA never saw added
            asha.on_trial_add(tune_controller, trial)
            return asha.on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        with contextlib.suppress(KeyError):  # not seen since a restore: nothing to record
            self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        with contextlib.suppress(KeyError):
            self._of(trial).on_trial_remove(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"ASHA with separate rungs for each of {len(self.by_group)} groups"


class BudgetStopper(Stopper):
    """Stops a running trial at the report that spends the stage's budget.

    Tune asks the stopper about each result before the callbacks see it (StageCallback
    charges the ledger), so the stage decides with the report's own cost in hand: a stage
    overruns its budget by at most one report per running trial, never by whole trainings.
    """

    def __init__(self, experiment: str):
        self.experiment = experiment

    def __call__(self, trial_id: str, result: dict) -> bool:
        return _hooks(self.experiment).should_stop(trial_id, result)

    def stop_all(self) -> bool:
        return False  # the searcher starts no new trial once the budget is spent


# --- the stage's view of the trials ---------------------------------------------------


class StageCallback(Callback):
    """Passes trial events to the live stage: results (charged to the ledger as they
    come), retries, and the end of each trial."""

    def __init__(self, experiment: str):
        self.experiment = experiment

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        _hooks(self.experiment).on_result(trial.trial_id, result)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        _hooks(self.experiment).on_recover(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        _hooks(self.experiment).on_end(trial.trial_id, None)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        _hooks(self.experiment).on_end(trial.trial_id, _error_text(trial))


def _error_text(trial) -> str:
    """The last line of the trial's error, e.g. "RuntimeError: boom"."""
    text = ""
    path = getattr(trial, "error_file", None) or ""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        pass
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "trial failed"


__all__ = ["Group", "GroupedSearch", "GroupedASHA", "BudgetStopper", "StageCallback",
           "StageHooks", "LIVE", "make_optuna_factory", "METRIC", "MODE"]
