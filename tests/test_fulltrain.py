"""Full training (evonas/fulltrain/): real Ray Tune and Optuna on synthetic data, tiny sizes.

One small search run (module fixture, fulltrainrun.py) feeds every stage here; each stage
works on its own copy of the run folder. The Ray stages start an embedded Ray of two CPUs.
A stage stopped by its budget, failing or killed is in test_fulltrain_resume.py.
"""

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from fulltrainrun import SEARCH, TINY, one_thread_env
from sockets import descendants, is_loopback, listening_addresses

from evonas.cli import main
from evonas.errors import EvonasError
from evonas.fulltrain.config import FullTrainConfig, parse_seeds
from evonas.fulltrain.leaderboard import (format_table, kendall_tau_b, leaderboard, mean_std,
                                          proxy_correlation)
from evonas.search.results import load_run

pytestmark = pytest.mark.slow

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


def test_a_seed_that_diverged_at_every_trial_scores_zero_and_others_say_nothing_of_the_layer():
    asha = {"status": "stopped", "stopped_by": "asha"}
    records = [_record("c", 8, 0, 0.6, 0.50), _record("c", 8, 1, 0.0, None, status="diverged"),
               {**_record("c", 8, 1, 0.3, None, tid="c-asha"), **asha},
               # A trial that failed or the budget stopped might have completed: unscored.
               _record("d", 8, 0, 0.6, 0.40), _record("d", 8, 1, 0.0, None, status="diverged"),
               _record("d", 8, 1, 0.0, None, status="failed"),
               _record("e", 8, 0, 0.6, 0.30), _record("e", 8, 1, 0.0, None, status="diverged"),
               {**_record("e", 8, 1, 0.2, None, tid="e-budget"), "status": "stopped",
                "stopped_by": "budget"}]
    rows = leaderboard(records, ["c", "d", "e"], ["resnet20"], [8])
    assert [r["layer"] for r in rows] == ["d", "e", "c"]
    d, e, c = rows
    # c's lucky seed alone would rank it first; its diverged seed counts as accuracy 0.
    assert (c["layer"], c["n"], c["diverged"]) == ("c", 2, 1) and c["mean"] == pytest.approx(0.25)
    assert c["seeds"][1] == {"seed": 1, "test_accuracy": 0.0, "diverged": True}
    assert (d["layer"], d["n"], d["diverged"], d["mean"]) == ("d", 1, 0, 0.40)
    assert (e["layer"], e["n"], e["diverged"], e["mean"]) == ("e", 1, 0, 0.30)
    assert "0.2500 ± 0.3536 (2, 1 diverged)" in format_table([c])
    assert proxy_correlation(rows, {"c": 0.9, "d": 0.5, "e": 0.1})["overall"]["tau"] == \
        pytest.approx(-1 / 3)


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
                          capture_output=True, text=True, timeout=300, env=one_thread_env())
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
                          capture_output=True, text=True, timeout=600, env=one_thread_env())
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
                              capture_output=True, text=True, timeout=120, env=one_thread_env())
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert message in done.stderr and not out.exists()
