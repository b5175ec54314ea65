"""A full-training stage that does not run to its end in one go: stopped by a spent budget,
a trial that fails, a worker killed mid-trial, the driver killed and the stage resumed.
Real Ray Tune on synthetic data at tiny sizes, on a copy of one small search run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fulltrainrun import TINY, one_thread_env

from evonas.fulltrain.config import FullTrainConfig


def test_a_spent_ledger_stops_the_running_trial_at_its_report_and_starts_no_other(run_copy):
    from evonas.search.budget import Budget, Ledger
    from evonas.fulltrain.stage import run_full_training

    search_state = json.loads((run_copy / "state.json").read_text())
    ledger = Ledger.from_state(search_state["ledger"])
    # What the search left of the whole budget: a millisecond, less than any report costs.
    ledger.budget = Budget("device", ledger.device_seconds("cpu") + 1e-3, "cpu")
    config = FullTrainConfig(**{**TINY, "baselines": (), "workers": 1, "steps": 40,
                                "reports": 4}, batch_sizes=(16,), seeds=(0,),
                             trials_per_layer=3)
    summary = run_full_training(str(run_copy), config, ledger, progress=lambda line: None)
    assert summary["trials"]["planned"] == 3 and summary["trials"]["started"] == 1
    (trial,) = json.loads((run_copy / "fulltrain" / "trials.json").read_text())
    # The one trial that started stopped at its first report (step 10 of 40), not at 40.
    assert trial["status"] == "stopped" and trial["steps_done"] == 10
    assert trial["stopped_by"] == "budget"  # not the layer's doing: leaderboard.diverged_seeds
    assert trial["reason"] == "the budget was spent: stopped after step 10"
    assert summary["trials"]["stopped_by_budget"] == 1
    charged = ledger.summary()["stages"]["fulltrain"]["device_seconds"]["cpu"]
    assert ledger.exhausted() and 0 < charged <= trial["seconds"] + 1e-6


# Fault injection, run in Ray workers: this module is pickled by value for them.
FAULTS = {"dir": ""}


def _faulty_train_layer(config):
    from evonas.fulltrain.trainable import TrialSpec, TuneReporter, run_trial

    folder = Path(FAULTS["dir"])
    if config["layer"] == "bn_relu":
        with open(folder / "raised", "a") as f:
            f.write("x\n")
        raise RuntimeError("injected fault in bn_relu")

    class KillOnce(TuneReporter):
        def restore(self):
            state = super().restore()
            if state is not None:
                (folder / "restored_at").write_text(str(state["step"]))
            return state

        def report(self, metrics, state):
            if metrics["step"] == 4 and not (folder / "killed").exists():
                (folder / "killed").write_text("")
                os.kill(os.getpid(), signal.SIGKILL)  # the worker dies mid-trial
            super().report(metrics, state)

    run_trial(TrialSpec.from_config(config), KillOnce())


def test_failing_trial_is_retried_then_recorded_and_a_killed_worker_does_not_stop_the_stage(
        run_copy, tmp_path, monkeypatch):
    from ray import cloudpickle

    from evonas.fulltrain import stage

    FAULTS["dir"] = str(tmp_path)
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    monkeypatch.setattr(stage, "train_layer", _faulty_train_layer)
    try:
        config = FullTrainConfig(**TINY, batch_sizes=(16,), seeds=(0,), trials_per_layer=1,
                                 max_retries=1)
        summary = stage.run_full_training(str(run_copy), config, progress=lambda line: None)
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    records = {r["layer"]: r for r in
               json.loads((run_copy / "fulltrain" / "trials.json").read_text())}
    failed = records["bn_relu"]
    assert failed["status"] == "failed" and failed["attempts"] == 2
    assert "RuntimeError: injected fault in bn_relu" in failed["reason"]
    assert (tmp_path / "raised").read_text().count("x") == 2  # the first try and one retry
    survivor = next(r for name, r in records.items() if name != "bn_relu")
    assert survivor["status"] == "completed" and survivor["attempts"] == 2
    assert (tmp_path / "restored_at").read_text() == "2"  # went on from its checkpoint
    assert [p["step"] for p in survivor["curve"]] == [2, 4]
    rows = {r["layer"]: r for r in summary["leaderboard"]}
    assert rows["bn_relu"]["mean"] is None and rows[survivor["layer"]]["n"] == 1


def _terminated(experiment):
    """Trial ids Tune's saved experiment state counts as finished."""
    states = sorted(experiment.glob("experiment_state-*.json"))
    if not states:
        return set()
    try:
        data = json.loads(states[-1].read_text())
    except ValueError:  # caught mid-write
        return set()
    return {json.loads(t[0])["trial_id"] for t in data["trial_data"]
            if json.loads(t[0])["status"] == "TERMINATED"}


def test_killed_driver_resumes_the_stage_without_redoing_finished_trials(run_copy):
    cmd = [sys.executable, "-m", "evonas", "train", str(run_copy), "--top", "1",
           "--baselines", "bn_relu", "--archs", "resnet20", "--batch-sizes", "16", "--seeds", "1",
           "--trials-per-layer", "3", "--steps", "30", "--reports", "3", "--width", "4",
           "--workers", "1", "--dataset", "synthetic"]
    # Tune saves its experiment state every 10 s or more by default; every half second
    # here, so the kill comes soon after two trials are on record, on any machine's speed.
    env = {**one_thread_env(), "TUNE_GLOBAL_CHECKPOINT_S": "0.5"}
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True, env=env)
    tune_dir = run_copy / "fulltrain" / "tune"
    finished, deadline = set(), time.monotonic() + 600  # a slow, shared machine included
    try:
        while len(finished) < 2 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            finished = set().union(*(_terminated(e) for e in tune_dir.glob("fulltrain-*")))
        assert driver.poll() is None, "the stage ended before it could be killed"
        assert len(finished) >= 2, "no trial finished in time"
        before = {}
        for tid in finished:
            result = next(tune_dir.glob(f"fulltrain-*/{tid}-*/result.json"))
            before[tid] = (result, result.stat().st_mtime_ns, result.read_text())
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started
        driver.wait()

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=one_thread_env())
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    for tid, (result, mtime, text) in before.items():
        assert result.stat().st_mtime_ns == mtime and result.read_text() == text, tid
    records = json.loads((run_copy / "fulltrain" / "trials.json").read_text())
    assert finished <= {r["trial_id"] for r in records}
    summary = json.loads((run_copy / "fulltrain" / "summary.json").read_text())
    assert summary["trials"]["started"] == summary["trials"]["planned"] == 6
    assert sorted(summary["trials_per_layer"].values()) == [3, 3]
