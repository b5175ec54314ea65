"""The full-training stage's record in MLflow, beside the search's.

Where it sits: stage.py calls `log_stage` once Tuner.fit returns (and again after a
resume), from the driver only: trials never write to the store (SQLite takes one
writer). It uses the search's store and experiment (evonas.runtime.tracking.Tracker) and adds:

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
import time
from pathlib import Path
from typing import Sequence

from mlflow.entities import Metric, Param

from evonas.fulltrain.leaderboard import table_rows, to_csv
from evonas.runtime.tracking import CANDIDATE_TAG, KIND_TAG, PARENT_TAG, Tracker

KIND = "full_train"
TRIAL_TAG = "evonas.trial_id"
_CURVES = ("val_accuracy", "val_loss", "train_loss", "lr")
_TAG_CHARS = 8000  # MLflow's tag value limit


def log_stage(tracker: Tracker, parent_run_id: str, records: Sequence[dict], rows: Sequence[dict],
              summary: dict) -> dict[str, str]:
    """Log every finished trial not yet logged, then the stage's tables on the parent run.
    Returns trial id -> MLflow run id for all trials logged so far."""
    logged = _existing(tracker, parent_run_id)
    candidate_runs = _candidate_runs(tracker, parent_run_id, records)
    for record in records:
        if record["trial_id"] in logged or record["status"] == "interrupted":
            continue
        logged[record["trial_id"]] = log_trial(tracker, parent_run_id, record,
                                               candidate_runs.get(record["candidate_id"]))
    log_summary(tracker, parent_run_id, rows, summary)
    return logged


def _existing(tracker: Tracker, parent_run_id: str) -> dict[str, str]:
    """Trial id -> run id of the FINISHED trial runs; unfinished ones are deleted."""
    kept: dict[str, str] = {}
    for run in tracker.candidates(parent_run_id, filter=f"tags.`{KIND_TAG}` = '{KIND}'"):
        tid = run.get("trial_id")
        if run["run_status"] == "FINISHED" and tid and tid not in kept:
            kept[tid] = run["run_id"]
        else:
            tracker.client.delete_run(run["run_id"])
    return kept


def _candidate_runs(tracker: Tracker, parent_run_id: str,
                    records: Sequence[dict]) -> dict[str, str]:
    wanted = {r["candidate_id"] for r in records if not r["candidate_id"].startswith("zoo:")}
    if not wanted:
        return {}
    found = {}
    for run in tracker.candidates(parent_run_id, filter=f"tags.`{KIND_TAG}` = 'candidate'"):
        cid = run.get("candidate_id")
        if cid in wanted and cid not in found:
            found[cid] = run["run_id"]
    return found


def log_trial(tracker: Tracker, parent_run_id: str, record: dict,
              candidate_run_id: str | None) -> str:
    """One trial as a child run of the search; FINISHED only once all of it is logged."""
    client = tracker.client
    tags = {PARENT_TAG: parent_run_id, KIND_TAG: KIND, TRIAL_TAG: record["trial_id"],
            # The Tune experiment: a run folder may hold stages of several plans.
            "evonas.fulltrain_experiment": Path(record["path"]).parent.name,
            CANDIDATE_TAG: record["candidate_id"], "evonas.layer": record["layer"],
            "evonas.arch": record["arch"], "evonas.batch_size": str(record["batch_size"]),
            "evonas.seed": str(record["seed"]), "evonas.status": record["status"],
            "evonas.attempts": str(record["attempts"])}
    if record.get("reason"):
        tags["evonas.reason"] = record["reason"][:_TAG_CHARS]
    if candidate_run_id:
        tags["evonas.candidate_run_id"] = candidate_run_id
    name = f"{record['layer']} {record['arch']} b{record['batch_size']} s{record['seed']}"
    run_id = client.create_run(tracker.experiment_id, run_name=name, tags=tags).info.run_id
    params = {"lr": record["lr"], "lr_effective": record["lr_effective"],
              "weight_decay": record["weight_decay"],
              **{f"settings.{k}": v for k, v in record["settings"].items()}}
    client.log_batch(run_id, params=[Param(k, _text(v)) for k, v in params.items()],
                     synchronous=True)
    metrics = _trial_metrics(record)
    for i in range(0, len(metrics), 1000):  # MLflow's per-batch metric limit
        client.log_batch(run_id, metrics=metrics[i:i + 1000], synchronous=True)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _trial_metrics(record: dict) -> list[Metric]:
    now = int(time.time() * 1000)
    out = [Metric(name, float(point[name]), now, int(point["step"]))
           for point in record["curve"] for name in _CURVES if point.get(name) is not None]
    final_step = record["curve"][-1]["step"] if record["curve"] else 0
    for name in ("test_accuracy", "val_accuracy", "seconds", "steps_done"):
        if record.get(name) is not None:
            out.append(Metric(f"final.{name}", float(record[name]), now, final_step))
    return out


def log_summary(tracker: Tracker, parent_run_id: str, rows: Sequence[dict], summary: dict) -> None:
    client = tracker.client
    client.log_text(parent_run_id, to_csv(rows), "fulltrain/leaderboard.csv")
    # Plain files, not log_table: log_table appends to an existing table, and a resumed
    # stage must replace its leaderboard, not add a second copy of the rows.
    client.log_text(parent_run_id, json.dumps(table_rows(rows), indent=2),
                    "fulltrain/leaderboard.json")
    client.log_text(parent_run_id, json.dumps(summary, indent=2, default=str),
                    "fulltrain/summary.json")
    now = int(time.time() * 1000)
    values = {f"fulltrain.trials_{k}": float(v) for k, v in summary["trials"].items()}
    tau = summary["kendall_tau"]["overall"]["tau"]
    if tau is not None:
        values["fulltrain.kendall_tau"] = float(tau)
    values["fulltrain.kendall_tau_layers"] = float(summary["kendall_tau"]["overall"]["n"])
    client.log_batch(parent_run_id, metrics=[Metric(k, v, now, 0) for k, v in values.items()],
                     synchronous=True)


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


__all__ = ["log_stage", "log_trial", "log_summary", "KIND", "TRIAL_TAG"]
