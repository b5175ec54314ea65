"""Full training (evonas/fulltrain/): real Ray Tune and Optuna on synthetic data, tiny sizes.

One small search run (module fixture) feeds every stage here; each stage works on its
own copy of the run folder. The Ray stages start an embedded Ray of two CPUs.
"""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sockets import descendants, is_loopback, listening_addresses

from evonas.cli import main
from evonas.errors import EvonasError
from evonas.fulltrain.config import FullTrainConfig, parse_seeds
from evonas.fulltrain.leaderboard import kendall_tau_b, leaderboard, mean_std, proxy_correlation
from evonas.search.results import load_run

pytestmark = pytest.mark.slow

SEARCH = ["--space", "norm_act_s", "--budget", "6evals", "--workers", "0", "--dataset",
          "synthetic", "--archs", "resnet", "--proxy-steps", "12", "--quality-steps", "6",
          "--quality-threshold", "0.05", "--proxy-batch", "32", "--proxy-width", "8",
          "--stability-steps", "2", "--population", "4", "--tournament", "2"]
# Two layers (the search's best and a zoo baseline), ResNet-20 at width 4, a few steps.
TINY = dict(top=1, baselines=("bn_relu",), archs=("resnet20",), dataset="synthetic",
            epochs=None, steps=4, reports=2, width=4, workers=2)


def _env():
    # One thread per process: this machine's two cores are shared, and two 2-thread torch
    # processes on two cores run 4x slower than one.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def search_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "s"
    done = subprocess.run([sys.executable, "-m", "evonas", "search", *SEARCH, "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture
def run_copy(search_run, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(search_run, dest, ignore=shutil.ignore_patterns("lock", "fulltrain"))
    return dest


# --- pure parts ------------------------------------------------------------------------


def test_kendall_tau_b_matches_reference_values():
    # scipy.stats.kendalltau's documented example (tau-b, with ties on both sides).
    assert kendall_tau_b([12, 2, 1, 12, 2], [1, 4, 7, 1, 0]) == pytest.approx(-0.47140452079103173)
    # No ties: 6 concordant and 4 discordant pairs of 10, counted by hand.
    assert kendall_tau_b([1, 2, 3, 4, 5], [3, 4, 1, 2, 5]) == pytest.approx(0.2)
    assert kendall_tau_b([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0
    assert kendall_tau_b([1, 1, 1], [1, 2, 3]) is None
    assert kendall_tau_b([1], [2]) is None


def _record(layer, bs, seed, val, test, status="completed", tid=None):
    return {"trial_id": tid or f"{layer}{bs}{seed}{val}", "layer": layer, "arch": "resnet20",
            "batch_size": bs, "seed": seed, "status": status, "val_accuracy": val,
            "test_accuracy": test if status == "completed" else None, "lr": 0.1,
            "weight_decay": 5e-4}


def test_leaderboard_takes_each_seeds_best_trial_by_validation_and_scores_it_on_test():
    records = [_record("a", 8, 0, 0.5, 0.40), _record("a", 8, 0, 0.6, 0.30),  # best val wins
               _record("a", 8, 1, 0.7, 0.50), _record("a", 8, 1, 0.9, 0.99, status="stopped"),
               _record("b", 8, 0, 0.2, 0.20), _record("b", 8, 1, 0.1, 0.0, status="failed")]
    rows = leaderboard(records, ["a", "b"], ["resnet20"], [8])
    a, b = rows
    assert (a["layer"], a["n"]) == ("a", 2) and a["mean"] == pytest.approx(0.40)
    assert a["std"] == pytest.approx(mean_std([0.30, 0.50])[1])
    assert (b["layer"], b["n"], b["mean"], b["std"]) == ("b", 1, 0.20, 0.0)
    assert b["trials"] == {"completed": 1, "failed": 1}
    corr = proxy_correlation(rows, {"a": 0.9, "b": 0.1})
    assert corr["overall"] == {"tau": 1.0, "n": 2, "layers": ["a", "b"], "rejected": []}
    # A layer the proxy rejected counts, ranked below every kept one: rejecting the
    # better layer a is a discordant pair, not a layer left out of the correlation.
    rejected_b = proxy_correlation(rows, {"a": 0.9, "b": None})["overall"]
    assert (rejected_b["tau"], rejected_b["n"], rejected_b["rejected"]) == (1.0, 2, ["b"])
    rejected_a = proxy_correlation(rows, {"a": None, "b": 0.1})["overall"]
    assert (rejected_a["tau"], rejected_a["rejected"]) == (-1.0, ["a"])
    # A layer whose proxy run failed says nothing of the proxy: left out.
    assert proxy_correlation(rows, {"a": 0.9, "b": None}, unscored=["b"])["overall"]["n"] == 1


def test_a_stage_begun_before_optimizers_were_a_setting_keeps_its_experiment_name():
    """The Tune experiment's name is a hash of the plan; a stage of one SGD optimizer names
    its experiment as evonas did before `optimizers` existed, so its resume finds it."""
    from evonas.fulltrain.stage import Layer, experiment_name
    from evonas.layers import zoo

    layers = [Layer("bn_relu", "zoo:bn_relu", zoo.get("bn_relu").to_dict(), "bn_relu")]
    config = FullTrainConfig(top=0, baselines=("bn_relu",), dataset="synthetic")
    assert experiment_name(layers, config, 8) == "fulltrain-68390b1f48"
    two = FullTrainConfig(top=0, baselines=("bn_relu",), dataset="synthetic",
                          optimizers=("sgd", "adamw"))
    assert experiment_name(layers, two, 8) != experiment_name(layers, config, 8)


def test_config_checks_and_seed_lists():
    assert parse_seeds("2") == (0, 1) and parse_seeds("0,3,7") == (0, 3, 7)
    assert FullTrainConfig(gpus_per_trial=0.25).device_share == 0.25
    for bad, message in [(dict(archs=("resnet99",)), "unknown architecture"),
                         (dict(batch_sizes=(0,)), ">= 1"),
                         (dict(gpus_per_trial=0.3), "does not split a GPU evenly"),
                         (dict(steps=10), "--epochs or as --steps"),
                         (dict(device="cuda"), "needs --gpus-per-trial"),
                         (dict(budget="2gpu-h"), "needs trials that hold a GPU: pass "
                                                 "--gpus-per-trial 0.25"),
                         (dict(budget="2cpu-h", gpus_per_trial=0.5),
                          "a cpu-h budget is never spent by trials that hold a GPU")]:
        with pytest.raises(EvonasError, match=message):
            FullTrainConfig(**bad)


def test_trial_with_bf16_and_channels_last_resumes_exactly_from_its_checkpoint():
    """The GPU path's options run on CPU too; a trial restored from its first checkpoint
    ends exactly as the uninterrupted one (data order and augmentation depend on the
    step only)."""
    from evonas.layers import zoo
    from evonas.fulltrain.trainable import TrialSpec, run_trial

    settings = FullTrainConfig(**{**TINY, "bf16": True, "channels_last": True})
    spec = TrialSpec("evonorm_s0", {"genome": zoo.get("evonorm_s0").to_dict(),
                                    "zoo": "evonorm_s0", "groups": 2},
                     "resnet20", 8, 0, 0.1, 5e-4, settings)

    class Memory:
        def __init__(self, start=None):
            self.start, self.reports = start, []

        def restore(self):
            return self.start

        def report(self, metrics, state):
            self.reports.append((metrics, copy.deepcopy(state)))

    whole = Memory()
    last = run_trial(spec, whole)
    assert [m["step"] for m, _ in whole.reports] == [2, 4]
    assert last["completed"] and not last["diverged"] and 0 <= last["test_accuracy"] <= 1
    resumed = Memory(start=whole.reports[0][1])
    again = run_trial(spec, resumed)
    assert [m["step"] for m, _ in resumed.reports] == [4]
    for key in ("val_accuracy", "val_loss", "train_loss", "test_accuracy"):
        assert again[key] == last[key], key


def test_grouped_search_gives_every_group_the_same_trials_and_stops_on_the_budget():
    from ray.tune.search import Searcher

    from evonas.fulltrain.tuning import LIVE, Group, GroupedSearch, StageHooks

    class Counting:  # stands in for one group's OptunaSearch
        def __init__(self, group):
            self.n = 0

        def suggest(self, trial_id):
            self.n += 1
            return {"lr": 0.1 * self.n, "weight_decay": 1e-4}

        def on_trial_complete(self, trial_id, result=None, error=False):
            pass

    groups = [Group(layer, "resnet20", 8, 0) for layer in ("a", "b", "c")]
    search = GroupedSearch(groups, 2, Counting, layer_specs={"a": {}, "b": {}, "c": {}},
                           experiment="t", max_concurrent_per_group=1)
    first = [search.suggest(f"t{i}") for i in range(4)]
    assert [s["layer"] for s in first[:3]] == ["a", "b", "c"] and first[3] is None  # all busy
    for i in range(3):
        search.on_trial_complete(f"t{i}", {"val_accuracy": 0.5})

    class Spent(StageHooks):
        def can_start(self):
            return False

    LIVE["t"] = Spent()
    try:
        assert search.suggest("t9") == Searcher.FINISHED
    finally:
        del LIVE["t"]
    second = [search.suggest(f"u{i}") for i in range(3)]
    assert sorted(s["layer"] for s in second) == ["a", "b", "c"]
    for i in range(3):
        search.on_trial_complete(f"u{i}", {"val_accuracy": 0.5})
    assert search.suggest("v0") == Searcher.FINISHED
    assert set(search.started.values()) == {2}


def test_grouped_asha_compares_a_trial_only_with_its_own_group():
    from ray.tune.schedulers import TrialScheduler

    from evonas.fulltrain.tuning import GroupedASHA

    class Trial:
        def __init__(self, trial_id, group):
            self.trial_id, self.config = trial_id, {"group": group}

    asha = GroupedASHA(max_t=4, grace_period=1, reduction_factor=2)
    strong, weak, weak_too = Trial("s", "a"), Trial("w", "b"), Trial("w2", "a")
    for trial in (strong, weak, weak_too):
        asha.on_trial_add(None, trial)

    def at_rung_1(trial, accuracy):
        result = {"training_iteration": 1, "val_accuracy": accuracy}
        return asha.on_trial_result(None, trial, result)

    assert at_rung_1(strong, 0.9) == TrialScheduler.CONTINUE
    assert at_rung_1(weak, 0.1) == TrialScheduler.CONTINUE  # first of its own group
    assert at_rung_1(weak_too, 0.1) == TrialScheduler.STOP  # below group a's rung


@pytest.mark.parametrize("flags, message", [
    (["--archs", "resnet99"], "unknown architecture 'resnet99'"),
    (["--baselines", "bn_relu,nope"], "unknown zoo layer 'nope'"),
    (["--baselines", "missing.json"], "missing.json: cannot read genome file"),
    (["--batch-sizes", "128,0"], "--batch-sizes: a batch size must be a whole number >= 1"),
    (["--gpus-per-trial", "0.3"], "does not split a GPU evenly"),
    (["--budget", "5evals"], "cannot bound full training"),
    (["--budget", "0.000001cpu-h"], "is already spent"),
    (["--budget", "1gpu-h"], "a gpu-h budget needs trials that hold a GPU"),
    (["--budget", "1cpu-h", "--gpus-per-trial", "0.5"], "a cpu-h budget is never spent"),
    pytest.param(["--budget", "1gpu-h", "--gpus-per-trial", "0.5"],
                 "a gpu-h budget needs a GPU but this machine has none",
                 marks=pytest.mark.skipif(torch.cuda.device_count() > 0, reason="needs no GPU")),
])
def test_bad_arguments_fail_in_one_line_and_write_nothing(run_copy, capsys, flags, message):
    before = sorted(p.name for p in run_copy.iterdir())
    assert main(["train", str(run_copy), "--dataset", "synthetic", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in run_copy.iterdir()) == before


# --- the stage on Ray ----------------------------------------------------------------


def test_stage_trains_tunes_ranks_and_logs_to_mlflow(run_copy):
    from mlflow.tracking import MlflowClient

    from evonas.fulltrain.stage import run_full_training

    listening = []

    def progress(line):
        if not listening:  # once, while Ray and its workers run
            listening.extend(listening_addresses(descendants(os.getpid())))

    config = FullTrainConfig(**TINY, batch_sizes=(16, 8), seeds=(0, 1), trials_per_layer=2)
    summary = run_full_training(str(run_copy), config, progress=progress)

    assert listening and all(is_loopback(a) for a in listening), listening
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ
    trials = summary["trials"]
    assert trials["planned"] == trials["started"] == 16  # 2 layers x 2 batch sizes x 2 seeds x 2
    assert trials["failed"] == 0
    cand = summary["layers"][0]["layer"]
    assert summary["trials_per_layer"] == {cand: 8, "bn_relu": 8}
    records = json.loads((run_copy / "fulltrain" / "trials.json").read_text())
    per_group = {}
    for r in records:
        per_group.setdefault((r["layer"], r["batch_size"], r["seed"]), []).append(r)
    assert len(per_group) == 8 and {len(v) for v in per_group.values()} == {2}
    # Each group's first trial is the standard recipe; the second is Optuna's.
    assert all(any(r["lr"] == 0.1 and r["weight_decay"] == 5e-4 for r in v)
               for v in per_group.values())

    board = json.loads((run_copy / "fulltrain" / "leaderboard.json").read_text())
    assert {(r["layer"], r["batch_size"]) for r in board} == {
        (cand, 16), (cand, 8), ("bn_relu", 16), ("bn_relu", 8)}
    for row in board:
        assert set(row) == {"layer", "arch", "batch_size", "optimizer", "mean", "std", "n",
                            "bpc"}
        assert row["optimizer"] == "sgd" and row["bpc"] is None  # SGD alone, no LM
        assert 1 <= row["n"] <= 2 and 0 <= row["mean"] <= 1 and row["std"] >= 0
    assert (run_copy / "fulltrain" / "leaderboard.csv").read_text().startswith(
        "layer,arch,batch_size,optimizer,mean,std,n,bpc")
    tau = summary["kendall_tau"]["overall"]
    assert tau["n"] == 2 and tau["tau"] in (-1.0, 1.0)  # the baseline got its proxy run
    assert summary["layers"][1]["proxy_fitness"] is not None

    state = json.loads((run_copy / "state.json").read_text())
    parent = state["parent_run_id"]
    client = MlflowClient(f"sqlite:///{run_copy / 'mlflow.db'}")
    exp = client.get_experiment_by_name("evonas").experiment_id
    runs = client.search_runs([exp], f"tags.`evonas.kind` = 'full_train' and "
                                     f"tags.mlflow.parentRunId = '{parent}'", max_results=100)
    assert len(runs) == 16 and all(r.info.status == "FINISHED" for r in runs)
    cand_run = client.search_runs([exp], f"tags.`evonas.candidate_id` = '{cand}' and "
                                         f"tags.`evonas.kind` = 'candidate'")[0].info.run_id
    for r in runs:
        tags, params = r.data.tags, r.data.params
        assert {"lr", "weight_decay", "lr_effective"} <= set(params)
        assert tags["evonas.arch"] == "resnet20" and tags["evonas.seed"] in ("0", "1")
        if tags["evonas.layer"] == cand:
            assert tags["evonas.candidate_id"] == cand
            assert tags["evonas.candidate_run_id"] == cand_run
        else:
            assert tags["evonas.candidate_id"] == "zoo:bn_relu"
    history = client.get_metric_history(runs[0].info.run_id, "val_accuracy")
    assert [m.step for m in history][:1] == [2]
    parent_run = client.get_run(parent)
    assert "fulltrain.kendall_tau" in parent_run.data.metrics
    files = {f.path for f in client.list_artifacts(parent, "fulltrain")}
    assert {"fulltrain/leaderboard.csv", "fulltrain/leaderboard.json"} <= files
    _a_clone_without_its_mlflow_store(run_copy, config, summary)


def _a_clone_without_its_mlflow_store(run_copy, config, summary):
    """What git keeps of a run committed to a repository (no mlflow.db, no artifacts/):
    the stage re-run keeps its results and says MLflow lacks the search's run; the
    search's resume logs the search again, every candidate once."""
    from mlflow.tracking import MlflowClient

    from evonas.fulltrain.stage import run_full_training

    clone = run_copy.parent / "clone"
    shutil.copytree(run_copy, clone,
                    ignore=shutil.ignore_patterns("lock", "mlflow.db", "artifacts"))
    lines = []
    again = run_full_training(str(clone), config, progress=lines.append)
    assert again["leaderboard"] == summary["leaderboard"]
    assert any("is not in" in line and "evonas search --resume" in line for line in lines)
    old_parent = json.loads((clone / "state.json").read_text())["parent_run_id"]

    done = subprocess.run([sys.executable, "-m", "evonas", "search", "--resume", str(clone)],
                          capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"MLflow run {old_parent} is not in" in done.stderr
    state = json.loads((clone / "state.json").read_text())
    assert state["parent_run_id"] != old_parent
    client = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    exp = client.get_experiment_by_name("evonas").experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{state['parent_run_id']}'",
                                  max_results=100)
    logged = sorted(r.data.tags["evonas.candidate_id"] for r in children)
    assert logged == sorted(load_run(clone).state.evaluations)


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
    env = {**_env(), "TUNE_GLOBAL_CHECKPOINT_S": "0.5"}
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

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    for tid, (result, mtime, text) in before.items():
        assert result.stat().st_mtime_ns == mtime and result.read_text() == text, tid
    records = json.loads((run_copy / "fulltrain" / "trials.json").read_text())
    assert finished <= {r["trial_id"] for r in records}
    summary = json.loads((run_copy / "fulltrain" / "summary.json").read_text())
    assert summary["trials"]["started"] == summary["trials"]["planned"] == 6
    assert sorted(summary["trials_per_layer"].values()) == [3, 3]


# --- evonas search --full-train-top ---------------------------------------------------


def test_search_then_full_training_in_one_command_on_one_budget(tmp_path):
    from mlflow.tracking import MlflowClient

    settings = tmp_path / "fulltrain.json"
    settings.write_text(json.dumps({**{k: v for k, v in TINY.items() if k not in ("top", "dataset")},
                                    "baselines": ["bn_relu"], "archs": ["resnet20"],
                                    "batch_sizes": [16], "seeds": [0], "trials_per_layer": 1}))
    flags = [f for f in SEARCH]
    flags[flags.index("--budget") + 1] = "0.1cpu-h"  # 360 CPU-seconds for both stages
    out = tmp_path / "s"
    done = subprocess.run([sys.executable, "-m", "evonas", "search", *flags, "--out", str(out),
                           "--full-train-top", "1", "--full-train-config", str(settings),
                           "--search-share", "0.05"],
                          capture_output=True, text=True, timeout=600, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((out / "state.json").read_text())
    # The search's best layer, as the search ranks it (the run folder's reader).
    (best_candidate, _), = load_run(out).leaderboard(1)
    best = best_candidate.candidate_id
    trials = json.loads((out / "fulltrain" / "trials.json").read_text())
    assert sorted(t["layer"] for t in trials) == sorted([best, "bn_relu"])
    assert all(t["status"] == "completed" and t["arch"] == "resnet20" and t["batch_size"] == 16
               for t in trials)
    # The leaderboard is printed; one ledger holds both stages, within the one budget
    # but for the last report of a trial.
    assert best in done.stdout and "bn_relu" in done.stdout
    summary = json.loads((out / "fulltrain" / "summary.json").read_text())
    stages = summary["budget"]["stages"]
    assert "fulltrain" in stages and "quality" in stages
    search_spent = sum(v["device_seconds"]["cpu"] for k, v in stages.items()
                       if not k.startswith("fulltrain"))
    # The search stopped at its share, 5% of 360 s, but for its last evaluation.
    assert 0.05 * 360 <= search_spent < 0.05 * 360 + 10
    # The full-training runs hang under the search's parent run in its MLflow store.
    client = MlflowClient(f"sqlite:///{out.resolve()}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.`evonas.kind` = 'full_train'")
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {state["parent_run_id"]}
    assert len(runs) == 2
    # A resume keeps the file's settings: they are part of the run's config.
    config = json.loads((out / "config.json").read_text())
    assert config["full_train"]["archs"] == ["resnet20"]


def test_full_train_config_is_checked_before_the_search_starts(tmp_path):
    bad = tmp_path / "ft.json"
    for content, message in (('{"archs": ["resnet99"]}', "unknown architecture 'resnet99'"),
                             ('{"top": 3}', "sets 'top', which the search decides"),
                             ('{"epohcs": 3}', "unknown full-training setting 'epohcs'"),
                             ("[1, 2]", "expected a JSON object"),
                             ("{oops", "malformed JSON")):
        bad.write_text(content)
        out = tmp_path / "s"
        done = subprocess.run([sys.executable, "-m", "evonas", "search", *SEARCH, "--out",
                               str(out), "--full-train-top", "1", "--budget", "1cpu-h",
                               "--full-train-config", str(bad)],
                              capture_output=True, text=True, timeout=120, env=_env())
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert message in done.stderr and not out.exists()
