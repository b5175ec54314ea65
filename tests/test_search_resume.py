"""`evonas search` stopped and resumed, as a user meets it: a SIGKILL mid-search (with
MLflow behind the run folder or not), a resume from another directory or with changed
flags, a wall-time budget that ends the search with an evaluation in flight."""

import json
import signal
import subprocess
import sys
import time

from searchrun import TINY, candidate_ids, child_runs, evonas, state


def test_sigkill_loses_nothing_finished_and_resume_completes(tmp_path):
    run = tmp_path / "k"
    cmd = [sys.executable, "-m", "evonas", "search", "--space", "norm_act_s", "--budget",
           "10evals", "--out", str(run), "--workers", "0", "--seed", "5", *TINY]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    seen = {}
    while time.monotonic() < deadline:
        if (run / "state.json").exists():
            seen = state(run)["evaluations"]
            if len(seen) >= 3:
                break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = state(run)["evaluations"]
    assert len(before) >= 3

    evonas("search", "--resume", run)
    after = state(run)
    assert len(after["evaluations"]) == 10
    for cid, ev in before.items():  # finished before the kill: kept as they were
        assert after["evaluations"][cid] == ev
    # The journal holds each finished candidate once, all of it committed by state.json.
    lines = (run / "journal.jsonl").read_bytes()
    assert after["journal_bytes"] == len(lines) and lines.count(b"\n") == 10
    assert "history" in after["controller"] and after["controller"]["history"] == []
    children = child_runs(run, after["parent_run_id"])
    assert len(children) == 10 and {r.info.status for r in children} == {"FINISHED"}
    assert len(set(candidate_ids(children))) == 10


def test_a_sigkill_while_mlflow_lags_loses_no_candidate_run_nor_doubles_one(tmp_path):
    # Candidates that cost the driver milliseconds (every one a duplicate of the first
    # survivor or rejected before a worker) queue for the MLflow writer faster than it
    # logs them: the kill finds the run folder ahead of MLflow.
    run = tmp_path / "lag"
    cmd = [sys.executable, "-m", "evonas", "search", "--space", "act", "--budget", "60evals",
           "--out", str(run), "--workers", "0", "--seed", "2", *TINY]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if (run / "state.json").exists() and len(state(run)["evaluations"]) >= 25:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = state(run)
    logged = child_runs(run, before["parent_run_id"])
    assert len(before["evaluations"]) >= 25

    evonas("search", "--resume", run)
    after = state(run)
    assert len(after["evaluations"]) == 60
    children = child_runs(run, after["parent_run_id"])
    assert sorted(candidate_ids(children)) == sorted(after["evaluations"])
    assert {r.info.status for r in children} == {"FINISHED"}
    assert len(logged) <= len(children)


def test_a_space_file_is_kept_by_absolute_path_and_resume_keeps_every_setting(tmp_path):
    import shutil

    from importlib import resources

    (tmp_path / "spaces").mkdir()
    shutil.copy(resources.files("evonas.search_spaces") / "act.json", tmp_path / "spaces" / "mine.json")
    run = tmp_path / "r"
    out = subprocess.run([sys.executable, "-m", "evonas", "search", "--space", "spaces/mine.json",
                          "--budget", "1evals", "--out", "r", "--workers", "0", *TINY],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    space = json.loads((run / "config.json").read_text())["space"]
    assert space == str(tmp_path / "spaces" / "mine.json")
    before = (run / "state.json").read_bytes()

    for flag in (["--space", "norm_act"], ["--workers", "2"], ["--seed", "0"]):
        refused = evonas("search", "--resume", run, *flag, check=False)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
        assert f"drop {flag[0]}" in refused.stderr
    assert (run / "state.json").read_bytes() == before

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resumed = subprocess.run([sys.executable, "-m", "evonas", "search", "--resume", str(run),
                              "--budget", "2evals"], cwd=elsewhere, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(state(run)["evaluations"]) == 2


def test_a_wall_time_budget_is_a_deadline(tmp_path):
    # One evaluation here would train for many minutes; a 40 s budget (of which starting
    # MLflow and Ray take up to 20 here) must end the search well within the 3 minutes the
    # call is given, cancelling the evaluation in flight.
    run = tmp_path / "w"
    long = [a if a != "12" else "100000" for a in TINY]
    evonas("search", "--space", "norm_act_s", "--budget", "40s", "--out", run, "--workers", "1",
           "--seed-zoo", *long, timeout=180)
    assert state(run)["controller"]["in_flight"]  # cancelled, to be proposed afresh
