"""MLflow for both stages: one experiment, parent runs, and child runs keyed by a tag, with
every MLflow limit handled here once.

Where it sits: the lowest layer, knowing MLflow and nothing of layers, searches or trials.
The search (evonas/search/tracking.py: a parent run per search, a child per candidate)
and full training (evonas/fulltrain/tracking.py: a child per trial under the search's
run) say what their runs hold; this module says how a run is written and read back.
Only drivers write here, never workers: SQLite takes one writer at a time, and one writer
also keeps the record in the driver's order.

Everything goes through an explicit MlflowClient, never the fluent API (mlflow.start_run
and friends keep a global active run, which a driver juggling many runs must not share).

A child run carries mlflow.parentRunId (the UI nests it under its parent), evonas.kind
and its key tag (a ChildKind names both), and is marked FINISHED only after all of it is
logged. A crash part-way leaves it RUNNING; `reconcile` deletes such runs, so that every
key has at most one FINISHED run.

MLflow's limits (ECOSYSTEM.md) are enforced here, never left to raise mid-search: keys
are reduced to MLflow's characters and 250 chars, tag values cut at 8000 chars and param
values at 6000 with a visible marker, batches kept to 100 params, 100 tags and 1000
metrics.

Threads: a driver may log from one background thread while its own thread writes reports
through the same Tracker. The Tracker holds no state between calls but the client, and
MLflow's stores take concurrent calls (the SQL store opens a session per call and SQLite
makes a second writer wait), so no lock of its own is needed.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union
from urllib.parse import unquote

from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from evonas.errors import EvonasError

PARENT_TAG = "mlflow.parentRunId"
KIND_TAG = "evonas.kind"
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

# Metrics: name -> value (all at one step), or (name, value, step) triples for curves.
Metrics = Union[Mapping[str, float], Iterable[tuple[str, float, int]]]
# Writes more artifact files (a picture) into the folder it is given.
Draw = Callable[[Path], object]


@dataclass(frozen=True)
class ChildKind:
    """A kind of child run: its evonas.kind value and the tag holding its key (one run per
    key, e.g. evonas.candidate_id for candidates, evonas.trial_id for trials)."""

    kind: str
    key_tag: str


class Tracker:
    """One MLflow experiment's parent and child runs, written within MLflow's limits.

    Call order: start_parent (or resume, then reconcile), log_child per finished piece
    of work and log_metrics / log_text on the parent now and then, and end.
    """

    def __init__(self, tracking_uri: str, experiment: str = "evonas", *,
                 artifact_location: str | None = None):
        """Open the store and the experiment, creating the experiment if absent.

        artifact_location applies only when the experiment is created. For a
        sqlite:/// store it defaults to artifacts/mlflow beside the database file, so a
        run folder (search/runfolder.py) holds its artifacts; otherwise the server decides.
        """
        self.tracking_uri = tracking_uri
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

    # --- parent runs --------------------------------------------------------------------

    def start_parent(self, name: str, kind: str, *, tags: Mapping[str, Any] | None = None,
                     params: Mapping[str, Any] | None = None,
                     texts: Mapping[str, str] | None = None) -> str:
        """Create a top-level run, left RUNNING; returns its run id. params may nest:
        nested keys are dotted."""
        with _artifact_folder(texts, None) as folder:
            run_id, artifact_uri = self._create(name, {**(tags or {}), KIND_TAG: kind})
            self._write(run_id, params, None, 0, folder, artifact_uri)
        return run_id

    def exists(self, run_id: str) -> bool:
        """Whether the store holds this run (not one made anew since the id was kept)."""
        try:
            self.client.get_run(run_id)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    def resume(self, run_id: str) -> None:
        """Mark a run RUNNING again (a resumed search continues the same run)."""
        self.client.update_run(run_id, status="RUNNING")

    def end(self, run_id: str, status: str = FINISHED) -> None:
        """Close a run: FINISHED, FAILED or KILLED."""
        self.client.set_terminated(run_id, status)

    def log_metrics(self, run_id: str, metrics: Metrics, step: int = 0) -> None:
        """Metrics of a mapping are logged at `step`, so the UI plots them against it."""
        self._write(run_id, None, metrics, step, None)

    def log_text(self, run_id: str, name: str, text: str) -> None:
        """One text artifact; a later call with the same name replaces it."""
        self.client.log_text(run_id, text, name)

    # --- child runs ---------------------------------------------------------------------

    def log_child(self, parent_run_id: str, kind: ChildKind, key: str, name: str, *,
                  tags: Mapping[str, Any] | None = None,
                  params: Mapping[str, Any] | None = None, metrics: Metrics | None = None,
                  texts: Mapping[str, str] | None = None, draw: Draw | None = None) -> str:
        """Log one child run of `kind` under the parent; returns its run id.

        texts: artifact name -> content; draw(folder) adds files of its own (a picture).
        All of it goes to the store in one artifact upload; the run is FINISHED last.
        """
        run_tags = {PARENT_TAG: parent_run_id, KIND_TAG: kind.kind, kind.key_tag: key,
                    **(tags or {})}
        with _artifact_folder(texts, draw) as folder:
            run_id, artifact_uri = self._create(name, run_tags)
            self._write(run_id, params, metrics, 0, folder, artifact_uri)
            self.client.set_terminated(run_id, FINISHED)
        return run_id

    def reconcile(self, parent_run_id: str, kind: ChildKind,
                  finished: set[str] | None = None) -> dict[str, str]:
        """Make the parent's children of `kind` agree with the caller's state after a crash.

        Deleted: every such run not FINISHED (a crash mid-logging), every FINISHED run after
        the first of the same key, and, when `finished` is given, every run whose key is
        outside it (logged just before a crash that lost the caller's state update; the
        caller does that work again and logs it then). Returns key -> run id of the runs
        kept: the caller logs the keys missing from it.
        """
        kept: dict[str, str] = {}
        # Read all before deleting any: the SQL store pages by offset, and deleting
        # runs between pages would shift later runs past the next page's start.
        for run in list(self._children(parent_run_id, kind, "", None)):
            key = run.data.tags.get(kind.key_tag)
            if (run.info.status == FINISHED and key is not None and key not in kept
                    and (finished is None or key in finished)):
                kept[key] = run.info.run_id
            else:
                self.client.delete_run(run.info.run_id)
        return kept

    def children(self, parent_run_id: str, kind: ChildKind | None = None, filter: str = "",
                 order_by: list[str] | None = None) -> list[dict[str, Any]]:
        """The parent's child runs (of `kind`, or all) as flat dicts, oldest first unless
        order_by says.

        filter: an extra MLflow filter, e.g. "tags.`evonas.status` = 'survivor'" (dotted
        names need backticks). Each dict has run_id, run_name, run_status, start_time,
        artifact_uri, metrics (a dict) and the evonas.* tags without their prefix
        (kind, candidate_id, status, ...).
        """
        return [_flat(run) for run in self._children(parent_run_id, kind, filter, order_by)]

    # --- the store calls ----------------------------------------------------------------

    def _create(self, name: str, tags: Mapping[str, Any]) -> tuple[str, str]:
        """A run with its first tags, as (run id, artifact URI); tags past one batch's worth
        follow in batches."""
        entries = _tags(tags)
        first = {t.key: t.value for t in entries[:MAX_PARAMS_TAGS_PER_BATCH]}
        run = self.client.create_run(self.experiment_id, run_name=_run_name(name), tags=first)
        for chunk in _chunks(entries[MAX_PARAMS_TAGS_PER_BATCH:], MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run.info.run_id, tags=chunk, synchronous=True)
        return run.info.run_id, run.info.artifact_uri

    def _write(self, run_id: str, params: Mapping[str, Any] | None, metrics: Metrics | None,
               step: int, folder: str | None, artifact_uri: str | None = None) -> None:
        """Params and metrics in batches (one for a candidate's dozen metrics), then the
        folder's files. artifact_uri: the run's, when the caller has it from create_run;
        the client would read the run back to learn it (a store round trip per run)."""
        for chunk in _chunks(_params(params or {}), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=chunk, synchronous=True)
        for chunk in _chunks(_metrics(metrics or {}, step), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk, synchronous=True)
        if folder is None:
            return
        if artifact_uri is None or self.tracking_uri.startswith("databricks"):
            self.client.log_artifacts(run_id, folder)  # resolves the URI as MLflow does there
        else:
            get_artifact_repository(artifact_uri, tracking_uri=self.tracking_uri).log_artifacts(folder)

    def _children(self, parent_run_id: str, kind: ChildKind | None, filter: str,
                  order_by: list[str] | None) -> Iterator:
        query = f"tags.{PARENT_TAG} = '{parent_run_id}'"
        if kind is not None:
            query += f" and tags.`{KIND_TAG}` = '{kind.kind}'"
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


@contextmanager
def _artifact_folder(texts: Mapping[str, str] | None, draw: Draw | None) -> Iterator[str | None]:
    """A temporary folder holding a run's text files and drawings, or None when there are
    none. One folder, one log_artifacts call: log_text per file would resolve the artifact
    store and write each file through a temporary folder of its own."""
    if not texts and draw is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="evonas-artifacts-") as tmp:
        for name, text in (texts or {}).items():
            path = Path(tmp) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        if draw is not None:
            draw(Path(tmp))
        yield tmp


# --- MLflow's limits --------------------------------------------------------------------


def _tags(tags: Mapping[str, Any]) -> list[RunTag]:
    """Tags with a value, in the caller's order; absent ones (None, '') are left out, not
    stored empty. Keys reduced to MLflow's characters could meet: the last value wins."""
    values = {_key(k): _truncate(str(v), MAX_TAG_VALUE)
              for k, v in tags.items() if v is not None and v != ""}
    return [RunTag(k, v) for k, v in values.items()]


def _params(params: Mapping[str, Any]) -> list[Param]:
    return [Param(k, v) for k, v in _flatten(params).items()]


def _metrics(metrics: Metrics, step: int) -> list[Metric]:
    """Keys reduced to MLflow's characters could meet: the last value of a key at a step
    wins (MLflow refuses a batch that holds two)."""
    if isinstance(metrics, Mapping):
        metrics = [(k, v, step) for k, v in metrics.items()]
    values = {(_key(k), int(s)): float(v) for k, v, s in metrics}
    now = _now_ms()
    return [Metric(k, v, now, s) for (k, s), v in values.items()]


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


def _run_name(name: str) -> str:
    # One line (a formula that names shared nodes has several), then cut for the UI.
    text = " ".join(name.split()) or "run"
    return text if len(text) <= RUN_NAME_CHARS else text[:RUN_NAME_CHARS - 1] + "\u2026"


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys; values as JSON text (strings as they are), cut to
    MLflow's param limit. An empty dict stays visible as '{}'."""
    out: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[_key(key)] = _truncate(text, MAX_PARAM_VALUE)
    return out


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    return (items[i:i + size] for i in range(0, len(items), size))


def _flat(run) -> dict[str, Any]:
    out: dict[str, Any] = {
        "run_id": run.info.run_id, "run_name": run.info.run_name,
        "run_status": run.info.status, "start_time": run.info.start_time,
        "artifact_uri": run.info.artifact_uri, "metrics": dict(run.data.metrics),
    }
    out.update({k[len("evonas."):]: v for k, v in run.data.tags.items()
                if k.startswith("evonas.")})
    return out


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


__all__ = ["Tracker", "ChildKind", "PARENT_TAG", "KIND_TAG", "FINISHED", "MAX_KEY",
           "MAX_PARAM_VALUE", "MAX_TAG_VALUE", "MAX_PARAMS_TAGS_PER_BATCH",
           "MAX_METRICS_PER_BATCH", "RUN_NAME_CHARS"]
