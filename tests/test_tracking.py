"""The MLflow record of a search and of full training's trials, against real stores: SQLite
in a temp folder, and once a real `mlflow server` subprocess. No mocks: what MLflow
accepts, stores and finds is the point of these tests. Candidate runs go through
SearchTracker, trial runs through fulltrain.tracking, both over the one generic Tracker."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from evonas.layers import zoo
from evonas.cli.dashboards import wait_for_health
from evonas.layers.export import export_source
from evonas.layers.genome import Genome
from evonas.search.records import Candidate, Evaluation
from evonas.layers.symbolic import formula, latex
from evonas.fulltrain.tracking import TRIALS, log_stage, log_trial
from evonas.runtime.tracking import MAX_TAG_VALUE, RUN_NAME_CHARS, ChildKind, _key, _run_name
from evonas.search.tracking import CANDIDATES, SearchTracker

ARCHS = ("resnet", "mobilenet")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # One database for the module: creating one runs MLflow's migrations (seconds). Each
    # test opens its own search run, so the tests stay independent.
    folder = tmp_path_factory.mktemp("runfolder")
    return SearchTracker(f"sqlite:///{folder / 'mlflow.db'}"), folder


def _log(tracker, parent, cid, status, genome_name="evonorm_s0", **evaluation):
    genome = zoo.get(genome_name)
    candidate = Candidate(cid, genome.to_dict(), parent_id="c0", mutation="insert_node",
                          structural_hash=genome.structural_hash, fingerprint="fp-" + cid)
    if status in ("survivor", "duplicate"):
        evaluation.setdefault("fitness", {a: 0.5 for a in ARCHS})
    evaluation.setdefault("stage_seconds", {"static": 0.01, "proxy": 2.0})
    ev = Evaluation(cid, status, **evaluation)
    source = None if status == "failed" else export_source(genome)
    return tracker.log_candidate(parent, candidate, ev, genome=genome, formula=formula(genome),
                                 latex=latex(genome), source=source)


def _children(tracker, parent, **view):
    # No run_view_type unless asked: deleted runs must vanish from the default view.
    return tracker.client.search_runs([tracker.experiment_id], **view,
                                      filter_string=f"tags.mlflow.parentRunId = '{parent}'")


def test_candidates_are_child_runs_found_by_status(store, monkeypatch, tmp_path):
    tracker, folder = store
    parent = tracker.start_search("by-status", {"seed": 1}, {})
    ids = {
        "survivor": _log(tracker, parent, "c1", "survivor",
                         metrics={"acc@quality/resnet": 0.4}),
        "rejected": _log(tracker, parent, "c2", "rejected", reject_stage="stability",
                         reject_reason="gradient norm 3.1e9 > 1e6 at step 12"),
        "duplicate": _log(tracker, parent, "c3", "duplicate", duplicate_of="c1"),
        "failed": _log(tracker, parent, "c4", "failed", genome_name="bn_relu",
                       reject_reason="CUDA error: out of memory"),
    }

    # Through the fluent API, as a user would: dotted tag names need backticks.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.tracking_uri)
    found = mlflow.search_runs(
        experiment_ids=[tracker.experiment_id], output_format="list",
        filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.`evonas.status` = 'rejected'")
    assert [r.info.run_id for r in found] == [ids["rejected"]]

    rejected = found[0]
    assert rejected.info.status == "FINISHED"
    assert rejected.info.run_name == "x*sigmoid(v1*x) / std_GHW(x)"
    tags = rejected.data.tags
    assert tags["evonas.candidate_id"] == "c2" and tags["evonas.kind"] == "candidate"
    assert tags["evonas.reject_stage"] == "stability"
    assert tags["evonas.genome_hash"] == zoo.get("evonorm_s0").structural_hash
    assert tags["evonas.parent_id"] == "c0" and tags["evonas.mutation"] == "insert_node"
    assert "evonas.duplicate_of" not in tags
    assert "fitness.mean" not in rejected.data.metrics
    assert rejected.data.metrics["cost.total_s"] == pytest.approx(2.01)

    survivor = tracker.client.get_run(ids["survivor"]).data
    assert survivor.metrics["fitness.resnet"] == 0.5 and survivor.metrics["fitness.mean"] == 0.5
    assert survivor.metrics["cost.proxy_s"] == 2.0
    assert survivor.metrics["acc_quality_resnet"] == 0.4  # '@' and '/' made MLflow-safe
    assert tracker.client.get_run(ids["duplicate"]).data.tags["evonas.duplicate_of"] == "c1"

    by_status = {c["status"]: c for c in tracker.candidates(parent)}
    assert set(by_status) == {"survivor", "rejected", "duplicate", "failed"}
    survivors = tracker.candidates(parent, "tags.`evonas.status` = 'survivor'")
    assert [c["candidate_id"] for c in survivors] == ["c1"]

    # Artifacts, downloaded with the client; the failed candidate has no layer.py.
    listed = {f.path for f in tracker.client.list_artifacts(ids["survivor"])}
    assert listed == {"genome.json", "formula.txt", "formula.tex", "layer.py", "graph.png"}
    assert "layer.py" not in {f.path for f in tracker.client.list_artifacts(ids["failed"])}
    # The others' graphs are DOT text (a picture costs most of a candidate's logging).
    for status in ("rejected", "duplicate", "failed"):
        listed = {f.path for f in tracker.client.list_artifacts(ids[status])}
        assert "graph.txt" in listed and "graph.png" not in listed
    dot = tracker.client.download_artifacts(ids["rejected"], "graph.txt", str(tmp_path))
    text = Path(dot).read_text()
    assert text.count(" -> ") == sum(len(n.inputs) for n in zoo.get("evonorm_s0").nodes)
    assert all(f'"{n.id}" [label="{n.id} = {n.op}"' in text for n in zoo.get("evonorm_s0").nodes)
    local = tracker.client.download_artifacts(ids["failed"], "genome.json", str(tmp_path))
    assert Genome.load(local) == zoo.get("bn_relu")
    # Artifacts live in the run folder beside the database.
    assert (folder / "artifacts" / "mlflow" / ids["survivor"] / "artifacts" / "graph.png").is_file()


def test_long_reject_reason_is_truncated_and_kept_whole_as_a_file(store, tmp_path):
    tracker, _ = store
    parent = tracker.start_search("long-reason", {}, {})
    reason = "NaN in layer output; " * 1000  # 21k chars
    run_id = _log(tracker, parent, "c1", "rejected", reject_stage="numeric",
                  reject_reason=reason)
    tag = tracker.client.get_run(run_id).data.tags["evonas.reject_reason"]
    assert len(tag) <= MAX_TAG_VALUE and tag.startswith(reason[:100])
    assert tag.endswith(f"[truncated: {len(reason)} chars in all]")
    whole = tracker.client.download_artifacts(run_id, "reject_reason.txt", str(tmp_path))
    assert open(whole, encoding="utf-8").read() == reason


def test_reconcile_leaves_one_finished_run_per_finished_candidate(store):
    tracker, _ = store
    parent = tracker.start_search("crashed", {}, {})
    _log(tracker, parent, "c1", "survivor")
    _log(tracker, parent, "c2", "rejected", reject_stage="static", reject_reason="no x")
    _log(tracker, parent, "c1", "survivor")  # logged twice: a resume re-logged it
    _log(tracker, parent, "c4", "survivor")  # logged, but the state update was lost
    # A crash mid-logging: created, never finished.
    stuck = tracker.client.create_run(tracker.experiment_id, tags={
        "mlflow.parentRunId": parent, "evonas.kind": "candidate",
        "evonas.candidate_id": "c3"}).info.run_id

    tracker.resume_search(parent)
    assert tracker.client.get_run(parent).info.status == "RUNNING"
    done = tracker.reconcile(parent, finished={"c1", "c2", "c3"})
    assert done == {"c1", "c2"}  # the driver logs c3 again

    runs = _children(tracker, parent)
    assert sorted(r.data.tags["evonas.candidate_id"] for r in runs) == ["c1", "c2"]
    assert all(r.info.status == "FINISHED" for r in runs)
    deleted = _children(tracker, parent, run_view_type=ViewType.DELETED_ONLY)
    assert stuck in {r.info.run_id for r in deleted} and len(deleted) == 3

    _log(tracker, parent, "c3", "survivor")
    assert tracker.reconcile(parent, finished={"c1", "c2", "c3"}) == {"c1", "c2", "c3"}
    assert len(_children(tracker, parent)) == 3


def test_search_run_holds_config_summary_and_status(store, tmp_path):
    tracker, _ = store
    config = {"space": "norm_act", "proxy": {"archs": ["resnet", "mobilenet"], "epochs": 2},
              "notes": "n" * 7000, "many": {f"k{i}": i for i in range(150)}}
    parent = tracker.start_search("config", config, {"user": "ci", "note": "x" * 9000})
    run = tracker.client.get_run(parent)
    params = run.data.params
    assert params["proxy.epochs"] == "2" and params["proxy.archs"] == '["resnet", "mobilenet"]'
    assert params["space"] == "norm_act" and params["many.k149"] == "149"
    assert len(params["notes"]) == 6000 and params["notes"].endswith("chars in all]")
    assert run.data.tags["evonas.kind"] == "search" and run.data.tags["user"] == "ci"
    assert len(run.data.tags["note"]) == MAX_TAG_VALUE
    path = tracker.client.download_artifacts(parent, "config.json", str(tmp_path))
    assert json.loads(open(path).read()) == config

    for step in range(3):
        tracker.log_summary(parent, {"best.fitness": 0.1 * step, "evaluated": step}, step)
    history = tracker.client.get_metric_history(parent, "best.fitness")
    assert [m.step for m in history] == [0, 1, 2]
    tracker.log_artifact_text(parent, "pareto.txt", "front")
    tracker.end_search(parent)
    assert tracker.client.get_run(parent).info.status == "FINISHED"


def test_keys_and_run_names_fit_mlflow():
    assert _key("acc@q/x") == "acc_q_x" and _key("..up") == "_..up" and _key("") == "_"
    assert len(_key("k" * 300)) == 250
    name = _run_name("n3 = mean_HW(x)\ny = " + "x + " * 100 + "x")
    assert len(name) == RUN_NAME_CHARS and name.endswith("\u2026") and "\n" not in name


# --- trial runs and the generic Tracker -----------------------------------------------------


def _trial(tid, candidate_id, status="completed", reason=None, steps=3):
    """A trial's record as fulltrain/stage.py's trial_record writes it."""
    curve = [{"step": s, "val_accuracy": 0.1 + s / (10 * steps), "val_loss": 2.0 - s / steps,
              "train_loss": 2.1 - s / steps, "lr": 0.1} for s in range(1, steps + 1)]
    return {"trial_id": tid, "layer": candidate_id.removeprefix("zoo:"),
            "candidate_id": candidate_id, "arch": "resnet20", "batch_size": 16, "seed": 0,
            "lr": 0.1, "lr_effective": 0.0125, "weight_decay": 5e-4, "status": status,
            "reason": reason, "attempts": 1, "steps_done": steps, "val_accuracy": 0.4,
            "test_accuracy": 0.38 if status == "completed" else None, "seconds": 12.0,
            "curve": curve, "path": f"/runs/s/fulltrain/tune/fulltrain-abc/{tid}-x",
            "settings": {"dataset": "synthetic", "steps": steps, "width": 4, "bf16": False}}


ROWS = [{"layer": "c1", "arch": "resnet20", "batch_size": 16, "mean": 0.38, "std": 0.0, "n": 1}]
SUMMARY = {"trials": {"planned": 3, "started": 3}, "kendall_tau": {"overall": {"tau": None, "n": 1}}}


def test_a_trial_run_and_a_candidate_run_get_the_same_limit_handling(store):
    tracker, _ = store
    parent = tracker.start_search("limits", {}, {})
    reason = "loss is NaN at step 12; " * 1000  # 24k chars
    cand = _log(tracker, parent, "c1", "rejected", reject_stage="numeric", reject_reason=reason)
    # A long training reports 300 times: 1200 curve points, more than one batch holds.
    trial = log_trial(tracker.runs, parent, _trial("t1", "c1", "failed", reason, steps=300), cand)
    for run_id, key in ((cand, "evonas.reject_reason"), (trial, "evonas.reason")):
        tag = tracker.client.get_run(run_id).data.tags[key]
        assert len(tag) == MAX_TAG_VALUE and tag.startswith(reason[:100])
        assert tag.endswith(f"[truncated: {len(reason)} chars in all]")
    assert len(tracker.client.get_metric_history(trial, "val_loss")) == 300
    assert tracker.client.get_run(trial).info.status == "FINISHED"


def test_trials_are_logged_once_and_a_resumed_search_leaves_them(store):
    tracker, _ = store
    parent = tracker.start_search("with-trials", {}, {})
    cand = _log(tracker, parent, "c1", "survivor")
    records = [_trial("t1", "c1"), _trial("t2", "zoo:bn_relu"),
               _trial("t3", "c1", "interrupted", "the stage stopped while it ran")]
    first = log_stage(tracker.runs, parent, records, ROWS, SUMMARY)
    assert set(first) == {"t1", "t2"}  # an interrupted trial is logged once it ends
    t1 = tracker.client.get_run(first["t1"]).data
    assert t1.tags["evonas.kind"] == "full_train" and t1.tags["mlflow.parentRunId"] == parent
    assert t1.tags["evonas.candidate_run_id"] == cand and t1.tags["evonas.batch_size"] == "16"
    assert t1.params["lr"] == "0.1" and t1.params["settings.steps"] == "3"
    assert t1.params["settings.bf16"] == "false"
    assert "evonas.candidate_run_id" not in tracker.client.get_run(first["t2"]).data.tags

    # The next run of the stage: t3 ended, and a crash had left a run of it unfinished.
    stuck = tracker.client.create_run(tracker.experiment_id, tags={
        "mlflow.parentRunId": parent, "evonas.kind": "full_train",
        "evonas.trial_id": "t3"}).info.run_id
    records[2] = _trial("t3", "c1")
    again = log_stage(tracker.runs, parent, records, ROWS, SUMMARY)
    assert {k: again[k] for k in first} == first and again["t3"] != stuck
    assert tracker.client.get_run(stuck).info.lifecycle_stage == "deleted"
    parent_run = tracker.client.get_run(parent)
    assert parent_run.data.metrics["fulltrain.trials_planned"] == 3
    files = {f.path for f in tracker.client.list_artifacts(parent, "fulltrain")}
    assert "fulltrain/leaderboard.csv" in files

    # A resumed search reconciles its candidates only: the trials of c1 stay.
    assert tracker.reconcile(parent, finished={"c1"}) == {"c1"}
    trials = tracker.runs.children(parent, TRIALS)
    assert sorted(t["trial_id"] for t in trials) == ["t1", "t2", "t3"]
    assert [c["candidate_id"] for c in tracker.candidates(parent)] == ["c1"]


def test_any_child_run_is_written_within_mlflows_batch_limits(store):
    runs = store[0].runs
    parent = runs.start_parent("generic", "probe-set")
    kind = ChildKind("probe", "evonas.probe_id")
    run_id = runs.log_child(
        parent, kind, "p1", "probe\nrun", tags={f"t{i}": i for i in range(150)},
        params={"group": {f"p{i}": i for i in range(150)}},
        metrics=[("loss", 1.0 / (s + 1), s) for s in range(1500)],
        texts={"notes/a.txt": "a"})
    run = runs.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "probe run"
    assert run.data.tags["t149"] == "149" and run.data.tags["evonas.probe_id"] == "p1"
    assert len(run.data.params) == 150 and run.data.params["group.p149"] == "149"
    assert len(runs.client.get_metric_history(run_id, "loss")) == 1500
    assert [f.path for f in runs.client.list_artifacts(run_id, "notes")] == ["notes/a.txt"]
    assert [c["probe_id"] for c in runs.children(parent, kind)] == ["p1"]
    assert runs.children(parent, CANDIDATES) == []


def test_candidates_logged_from_a_background_thread_beside_the_drivers_writes(store):
    tracker, _ = store
    parent = tracker.start_search("threaded", {}, {})
    errors = []

    def writer():
        try:
            for i in range(4):
                _log(tracker, parent, f"c{i}", "survivor")
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    step = 0
    while thread.is_alive():  # the driver's own writes while the writer logs
        tracker.log_summary(parent, {"evaluated": step}, step)
        tracker.log_artifact_text(parent, "report.html", f"<p>{step}</p>")
        step += 1
    thread.join()
    assert errors == []
    found = tracker.candidates(parent)
    assert sorted(c["candidate_id"] for c in found) == ["c0", "c1", "c2", "c3"]
    assert all(c["run_status"] == "FINISHED" for c in found)
    assert all("graph.png" in {f.path for f in tracker.client.list_artifacts(c["run_id"])}
               for c in found)


# --- a real tracking server ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, timeout: float) -> None:
    problem = wait_for_health(url, proc, timeout)
    assert problem is None, f"mlflow server {problem}"


def _stop(proc: subprocess.Popen) -> None:
    # The server runs uvicorn in a child process: signal the whole session it leads.
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass
    # Children that outlive the leader still hold its process group id.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_through_a_tracking_server(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "wb")
    # The background job runner (seven huey consumers) is of no use here.
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
               MLFLOW_DISABLE_TELEMETRY="true")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{tmp_path / 'm.db'}", "--default-artifact-root", str(tmp_path / "art"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_up(url, proc, timeout=60)
        tracker = SearchTracker(url)
        parent = tracker.start_search("served", {"seed": 3}, {})
        run_id = _log(tracker, parent, "c1", "survivor", metrics={"grad_norm": float("inf")})
        tracker.end_search(parent)

        back = MlflowClient(url).get_run(run_id)
        assert back.info.status == "FINISHED"
        assert back.data.tags["mlflow.parentRunId"] == parent
        assert back.data.metrics["fitness.mean"] == 0.5
        assert [c["candidate_id"] for c in tracker.candidates(parent)] == ["c1"]
        local = tracker.client.download_artifacts(run_id, "genome.json", str(tmp_path))
        assert Genome.load(local) == zoo.get("evonorm_s0")
    finally:
        _stop(proc)
        log.close()
    assert proc.poll() is not None
