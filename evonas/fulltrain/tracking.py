"""The full-training stage's record in MLflow, beside the search's.

Where it sits: stage.py calls `log_stage` once Tuner.fit returns (and again after a
resume), from the driver only: trials never write to the store (SQLite takes one
writer). It writes through the generic Tracker (evonas.runtime.tracking), which also writes
the search's candidate runs and handles MLflow's limits for both, into the search's store
and experiment:

    trial run    one per finished trial, a child of the search's parent run (tag
                 mlflow.parentRunId), tagged evonas.kind=full_train, evonas.trial_id,
                 evonas.fulltrain_experiment (the Tune experiment, one per plan),
                 evonas.layer, evonas.candidate_id (a search candidate's id, or zoo:NAME),
                 evonas.candidate_run_id (the candidate's own run, when it has one),
                 evonas.arch, evonas.batch_size, evonas.seed, evonas.status and
                 evonas.reason; params lr (at batch 128), lr_effective, weight_decay and the
                 trial's settings; metric curves val_accuracy, val_loss, train_loss, lr
                 against the training step; final test_accuracy and val_accuracy
    parent run   fulltrain/leaderboard.csv, fulltrain/leaderboard.json (the rows),
                 fulltrain/summary.json; metrics fulltrain.kendall_tau and trial counts

Only trials that ended are logged (an interrupted one resumes on the next run, and is
logged then). Idempotent: a trial already logged (a FINISHED run with its evonas.trial_id) is not
logged again; a run a crash left unfinished is deleted and logged anew.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from evonas.fulltrain.leaderboard import table_rows, to_csv
from evonas.runtime.tracking import ChildKind, Tracker
from evonas.search.tracking import CANDIDATE_TAG, CANDIDATES

KIND = "full_train"
TRIAL_TAG = "evonas.trial_id"
TRIALS = ChildKind(KIND, TRIAL_TAG)
_CURVES = ("val_accuracy", "val_loss", "train_loss", "lr")


def log_stage(tracker: Tracker, parent_run_id: str, records: Sequence[dict], rows: Sequence[dict],
              summary: dict) -> dict[str, str]:
    """Log every finished trial not yet logged, then the stage's tables on the parent run.
    Returns trial id -> MLflow run id for all trials logged so far."""
    # Trial id -> run id of the FINISHED trial runs; unfinished ones are deleted.
    logged = tracker.reconcile(parent_run_id, TRIALS)
    candidate_runs = _candidate_runs(tracker, parent_run_id, records)
    for record in records:
        if record["trial_id"] in logged or record["status"] == "interrupted":
            continue
        logged[record["trial_id"]] = log_trial(tracker, parent_run_id, record,
                                               candidate_runs.get(record["candidate_id"]))
    log_summary(tracker, parent_run_id, rows, summary)
    return logged


def _candidate_runs(tracker: Tracker, parent_run_id: str,
                    records: Sequence[dict]) -> dict[str, str]:
    wanted = {r["candidate_id"] for r in records if not r["candidate_id"].startswith("zoo:")}
    if not wanted:
        return {}
    found = {}
    for run in tracker.children(parent_run_id, CANDIDATES):
        cid = run.get("candidate_id")
        if cid in wanted and cid not in found:
            found[cid] = run["run_id"]
    return found


def log_trial(tracker: Tracker, parent_run_id: str, record: dict,
              candidate_run_id: str | None) -> str:
    """One trial as a child run of the search; FINISHED only once all of it is logged."""
    # evonas.fulltrain_experiment is the Tune experiment: a run folder may hold stages of
    # several plans. Tags without a value (no reason, no candidate run) are left out.
    tags = {"evonas.fulltrain_experiment": Path(record["path"]).parent.name,
            CANDIDATE_TAG: record["candidate_id"], "evonas.layer": record["layer"],
            "evonas.arch": record["arch"], "evonas.batch_size": record["batch_size"],
            "evonas.seed": record["seed"], "evonas.optimizer": record.get("optimizer", "sgd"),
            "evonas.status": record["status"],
            "evonas.attempts": record["attempts"], "evonas.reason": record.get("reason"),
            "evonas.candidate_run_id": candidate_run_id}
    name = (f"{record['layer']} {record['arch']} b{record['batch_size']} s{record['seed']} "
            f"{record.get('optimizer', 'sgd')}")
    params = {"lr": record["lr"], "lr_effective": record["lr_effective"],
              "weight_decay": record["weight_decay"], "settings": record["settings"]}
    return tracker.log_child(parent_run_id, TRIALS, record["trial_id"], name, tags=tags,
                             params=params, metrics=_trial_metrics(record))


def _trial_metrics(record: dict) -> list[tuple[str, float, int]]:
    """Curves against the training step; the final scores at the last step."""
    out = [(name, point[name], point["step"])
           for point in record["curve"] for name in _CURVES if point.get(name) is not None]
    final_step = record["curve"][-1]["step"] if record["curve"] else 0
    for name in ("test_accuracy", "val_accuracy", "test_bpc", "seconds", "steps_done"):
        if record.get(name) is not None:
            out.append((f"final.{name}", record[name], final_step))
    return out


def log_summary(tracker: Tracker, parent_run_id: str, rows: Sequence[dict], summary: dict) -> None:
    tracker.log_text(parent_run_id, "fulltrain/leaderboard.csv", to_csv(rows))
    # Plain files, not log_table: log_table appends to an existing table, and a resumed
    # stage must replace its leaderboard, not add a second copy of the rows.
    tracker.log_text(parent_run_id, "fulltrain/leaderboard.json",
                     json.dumps(table_rows(rows), indent=2))
    tracker.log_text(parent_run_id, "fulltrain/summary.json",
                     json.dumps(summary, indent=2, default=str))
    values = {f"fulltrain.trials_{k}": float(v) for k, v in summary["trials"].items()}
    tau = summary["kendall_tau"]["overall"]["tau"]
    if tau is not None:
        values["fulltrain.kendall_tau"] = float(tau)
    values["fulltrain.kendall_tau_layers"] = float(summary["kendall_tau"]["overall"]["n"])
    values["fulltrain.kendall_tau_rejected"] = float(
        len(summary["kendall_tau"]["overall"].get("rejected", ())))
    tracker.log_metrics(parent_run_id, values)


__all__ = ["log_stage", "log_trial", "log_summary", "KIND", "TRIAL_TAG", "TRIALS"]
