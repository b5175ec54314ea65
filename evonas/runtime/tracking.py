"""The search's record in MLflow: one parent run per search, one child run per candidate.

Where it sits: the search driver owns the only Tracker. It opens the parent run when a
search starts (or reopens it on --resume, then calls `reconcile`), logs each candidate
once its Evaluation is final, logs progress summaries as stepped metrics, and ends the
parent run. Workers never write here: SQLite takes one writer at a time, and one writer
also keeps the record in the driver's order.

Everything goes through an explicit MlflowClient, never the fluent API (mlflow.start_run
and friends keep a global active run, which a driver juggling many runs must not share).

Run layout:

    search run     tags evonas.kind=search and the caller's tags; the configuration as
                   params (nested keys dotted) and as config.json; summary metrics per step
    candidate run  tag mlflow.parentRunId (the UI nests it under the search), run name =
                   the formula; tags evonas.*; metrics fitness.<arch>, fitness.mean,
                   cost.<stage>_s, cost.total_s, cost.device_s, genome.nodes and the
                   evaluation's own metrics; artifacts genome.json, formula.txt,
                   formula.tex, layer.py (when exported), graph.png (unless pictures=False)

A candidate run is marked FINISHED only after all of it is logged. A crash part-way
leaves it RUNNING; `reconcile` deletes such runs on resume, so that every finished
evaluation has exactly one FINISHED candidate run.

MLflow's limits (ECOSYSTEM.md) are enforced here, never left to raise mid-search: keys
are reduced to MLflow's characters and 250 chars, tag values cut at 8000 chars and param
values at 6000 with a visible marker, batches kept to 100 params+tags / 1000 metrics.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence
from urllib.parse import unquote

from mlflow.entities import Metric, Param, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from evonas.layers.drawing import draw_genome
from evonas.errors import EvonasError
from evonas.layers.genome import Genome
from evonas.search.records import Candidate, Evaluation

PARENT_TAG = "mlflow.parentRunId"
KIND_TAG = "evonas.kind"
CANDIDATE_TAG = "evonas.candidate_id"
FINISHED = "FINISHED"

# MLflow's limits (mlflow.utils.validation), restated so the numbers are visible here.
MAX_KEY = 250
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
# Run names show in the UI's run table, where a whole formula would not fit.
RUN_NAME_CHARS = 80

# Characters MLflow accepts in metric, param and tag keys on every platform (it also
# takes ':' except on Windows, and '/' where it does not make the key a different path).
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.\- ]")


class Tracker:
    """Writes a search and its candidates to one MLflow experiment.

    Call order: start_search (or resume_search then reconcile), then log_candidate for
    each finished evaluation and log_summary now and then, and end_search.
    """

    def __init__(self, tracking_uri: str, experiment: str = "evonas", *,
                 artifact_location: str | None = None, pictures: bool = True):
        """Open the store and the experiment, creating the experiment if absent.

        artifact_location applies only when the experiment is created. For a
        sqlite:/// store it defaults to artifacts/mlflow beside the database file, so a
        run folder (runfolder.py) holds its artifacts; otherwise the server decides.
        pictures=False skips graph.png, most of a candidate's logging time (about 80 of
        100 ms on a SQLite store), for searches that reject candidates faster than that.
        """
        self.tracking_uri = tracking_uri
        self.pictures = pictures
        # Against a tracking server MLflow prints two "View run ... at" lines for every run
        # it terminates, after a get_run round trip: thousands of lines on the driver's
        # console. setdefault: a user who set the variable keeps their choice.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.client = MlflowClient(tracking_uri=tracking_uri)
        if artifact_location is None:
            artifact_location = _artifacts_beside(tracking_uri)
        self.experiment_id = self._experiment(experiment, artifact_location)

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self.client.create_experiment(name, artifact_location=artifact_location)
            except MlflowException:
                # Created meanwhile by another client: use theirs.
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage != "active":
            raise EvonasError(f"MLflow experiment {name!r} at {self.tracking_uri} is deleted; "
                              f"restore it (mlflow experiments restore --experiment-id "
                              f"{exp.experiment_id}) or choose another experiment name")
        return exp.experiment_id

    # --- the search run -----------------------------------------------------------------

    def start_search(self, run_name: str, config: dict, tags: dict) -> str:
        """Create the search's parent run; returns its run id."""
        run_tags = {_key(k): _truncate(str(v), MAX_TAG_VALUE) for k, v in tags.items()}
        run_tags[KIND_TAG] = "search"
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=run_tags)
        run_id = run.info.run_id
        params = [Param(k, v) for k, v in _flatten(config).items()]
        for chunk in _chunks(params, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=chunk, synchronous=True)
        # The params are cut to MLflow's limit; the file keeps the whole configuration.
        self.client.log_text(run_id, json.dumps(config, indent=2, default=str), "config.json")
        return run_id

    def resume_search(self, parent_run_id: str) -> None:
        """Mark the search's run RUNNING again (a resumed search continues the same run)."""
        self.client.update_run(parent_run_id, status="RUNNING")

    def log_summary(self, parent_run_id: str, metrics: dict[str, float], step: int) -> None:
        """Progress (best fitness so far, evaluated count, budget spent) at `step`: stepped
        metrics, so the UI plots them against the step."""
        now = _now_ms()
        entries = [Metric(_key(k), float(v), now, step) for k, v in metrics.items()]
        self._log_metrics(parent_run_id, entries)

    def log_artifact_text(self, parent_run_id: str, name: str, text: str) -> None:
        self.client.log_text(parent_run_id, text, name)

    def end_search(self, parent_run_id: str, status: str = FINISHED) -> None:
        """Close the search's run: FINISHED, FAILED or KILLED."""
        self.client.set_terminated(parent_run_id, status)

    # --- candidate runs -----------------------------------------------------------------

    def log_candidate(self, parent_run_id: str, candidate: Candidate, evaluation: Evaluation,
                      *, genome: Genome, formula: str, latex: str, source: str | None) -> str:
        """Log one candidate as a child run of the search; returns its run id.

        source is the exported layer (export.export_source), None where there is none
        (failed candidates). The run is FINISHED only once everything is logged.
        """
        # All tags (about a dozen) go with the creation: one store call fewer.
        tags = {PARENT_TAG: parent_run_id, KIND_TAG: "candidate",
                **_candidate_tags(candidate, evaluation, genome)}
        run = self.client.create_run(self.experiment_id, run_name=_run_name(formula), tags=tags)
        run_id = run.info.run_id
        self._log_metrics(run_id, _candidate_metrics(evaluation, genome, _now_ms()))
        self._log_candidate_files(run_id, evaluation, genome, formula, latex, source)
        self.client.set_terminated(run_id, FINISHED)
        return run_id

    def _log_candidate_files(self, run_id: str, evaluation: Evaluation, genome: Genome,
                             formula: str, latex: str, source: str | None) -> None:
        # One prepared folder, one log_artifacts call: log_text per file would resolve the
        # artifact store and write each file through a temp folder of its own.
        with tempfile.TemporaryDirectory(prefix="evonas-artifacts-") as tmp:
            folder = Path(tmp)
            files = {"genome.json": genome.to_json() + "\n",
                     "formula.txt": formula + "\n", "formula.tex": latex + "\n"}
            if source is not None:
                files["layer.py"] = source
            reason = evaluation.reject_reason or ""
            if len(reason) > MAX_TAG_VALUE:
                files["reject_reason.txt"] = reason  # the tag holds only its beginning
            for name, text in files.items():
                (folder / name).write_text(text, encoding="utf-8")
            if self.pictures:
                draw_genome(genome, folder / "graph.png", title=evaluation.candidate_id)
            self.client.log_artifacts(run_id, tmp)

    def _log_metrics(self, run_id: str, metrics: Sequence[Metric]) -> None:
        for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk, synchronous=True)

    # --- reading back -------------------------------------------------------------------

    def reconcile(self, parent_run_id: str, finished: set[str]) -> set[str]:
        """Make the candidate runs agree with the driver's state after a resume.

        finished: the candidate ids whose evaluations the driver's state counts as
        finished. Deleted: every candidate run not FINISHED (a crash mid-logging), every
        FINISHED run after the first of the same candidate, and every run of a candidate
        outside `finished` (logged just before a crash that lost its state update; the
        driver evaluates it again and logs it then). Returns the ids in `finished` that
        now have exactly one FINISHED run; the driver logs the others.
        """
        kept: dict[str, str] = {}
        # Read all before deleting any: the SQL store pages by offset, and deleting runs
        # between pages would shift later runs past the next page's start.
        runs = list(self._children(parent_run_id, "", ["attributes.start_time ASC"]))
        for run in runs:
            cid = run.data.tags.get(CANDIDATE_TAG)
            keep = (run.info.status == FINISHED and cid in finished and cid not in kept)
            if keep:
                kept[cid] = run.info.run_id
            else:
                self.client.delete_run(run.info.run_id)
        return set(kept)

    def candidates(self, parent_run_id: str, filter: str = "",
                   order_by: list[str] | None = None) -> list[dict[str, Any]]:
        """The search's candidate runs as flat dicts, oldest first unless order_by says.

        filter: an extra MLflow filter, e.g. "tags.`evonas.status` = 'survivor'" (dotted
        names need backticks). Each dict has run_id, run_name, run_status, start_time,
        artifact_uri, metrics (a dict) and the evonas.* tags without their prefix
        (candidate_id, status, genome_hash, ...).
        """
        return [_flat(run) for run in self._children(parent_run_id, filter, order_by)]

    def _children(self, parent_run_id: str, filter: str,
                  order_by: list[str] | None) -> Iterator:
        query = f"tags.{PARENT_TAG} = '{parent_run_id}'"
        if filter:
            query += f" and {filter}"
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], filter_string=query, run_view_type=ViewType.ACTIVE_ONLY,
                max_results=1000, order_by=order_by or ["attributes.start_time ASC"],
                page_token=token)
            yield from page
            token = page.token
            if not token:
                return


# --- what a candidate run holds -----------------------------------------------------------


def _candidate_tags(candidate: Candidate, evaluation: Evaluation,
                    genome: Genome) -> dict[str, str]:
    """Tags with a value; absent ones (no parent, no rejection) are left out, not empty."""
    values = {
        CANDIDATE_TAG: candidate.candidate_id,
        "evonas.status": evaluation.status,
        "evonas.reject_stage": evaluation.reject_stage,
        "evonas.reject_reason": evaluation.reject_reason,
        "evonas.genome_hash": genome.structural_hash,
        "evonas.fingerprint": candidate.fingerprint,
        "evonas.parent_id": candidate.parent_id,
        "evonas.mutation": candidate.mutation,
        "evonas.duplicate_of": evaluation.duplicate_of,
        "evonas.device": evaluation.device,
        "evonas.worker": evaluation.worker,
    }
    return {k: _truncate(str(v), MAX_TAG_VALUE) for k, v in values.items() if v}


def _candidate_metrics(evaluation: Evaluation, genome: Genome, now: int) -> list[Metric]:
    values: dict[str, float] = {}
    fitness = evaluation.fitness or {}
    for arch, value in fitness.items():
        values[f"fitness.{arch}"] = value
    if fitness:
        values["fitness.mean"] = sum(fitness.values()) / len(fitness)
    for stage, seconds in evaluation.stage_seconds.items():
        values[f"cost.{stage}_s"] = seconds
    values["cost.total_s"] = evaluation.seconds
    values["cost.device_s"] = evaluation.seconds * evaluation.share
    values["genome.nodes"] = len(genome)
    values.update(evaluation.metrics)
    # Keys reduced to MLflow's characters could meet; the last value of a key wins.
    metrics = {_key(k): float(v) for k, v in values.items()}
    return [Metric(k, v, now, 0) for k, v in metrics.items()]


def _flat(run) -> dict[str, Any]:
    out: dict[str, Any] = {
        "run_id": run.info.run_id, "run_name": run.info.run_name,
        "run_status": run.info.status, "start_time": run.info.start_time,
        "artifact_uri": run.info.artifact_uri, "metrics": dict(run.data.metrics),
    }
    out.update({k[len("evonas."):]: v for k, v in run.data.tags.items()
                if k.startswith("evonas.")})
    return out


# --- MLflow's limits --------------------------------------------------------------------


def _key(name: str) -> str:
    """A metric, param or tag key MLflow accepts: its characters, at most 250 of them,
    and not a relative path ('.', '..x'), which MLflow refuses because keys become files."""
    key = _BAD_KEY_CHARS.sub("_", str(name)).strip() or "_"
    if key.startswith("."):
        key = "_" + key
    return key[:MAX_KEY]


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    marker = f" ... [truncated: {len(text)} chars in all]"
    return text[:limit - len(marker)] + marker


def _run_name(formula: str) -> str:
    # One line (a formula that names shared nodes has several), then cut for the UI.
    text = " ".join(formula.split()) or "candidate"
    return text if len(text) <= RUN_NAME_CHARS else text[:RUN_NAME_CHARS - 1] + "\u2026"


def _flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys; values as JSON text (strings as they are), cut to
    MLflow's param limit. An empty dict stays visible as '{}'."""
    out: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[_key(key)] = _truncate(text, MAX_PARAM_VALUE)
    return out


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    return (items[i:i + size] for i in range(0, len(items), size))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _artifacts_beside(tracking_uri: str) -> str | None:
    """file:// URI of artifacts/mlflow beside a sqlite:/// store's database file; None for
    other stores (a tracking server has its own artifact root) and in-memory databases."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    # sqlite:///rel.db names rel.db (relative to the working directory), sqlite:////abs.db
    # names /abs.db; a query (?timeout=...) is no part of the path.
    path = unquote(tracking_uri[len("sqlite:///"):].split("?", 1)[0])
    if not path or path == ":memory:":
        return None
    return (Path(path).absolute().parent / "artifacts" / "mlflow").as_uri()
