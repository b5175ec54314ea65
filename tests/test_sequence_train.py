"""`evonas train` on a search over sequence layers: the transformer baselines, the LM,
AdamW and SGD tuned alike and reported side by side; a layer of the wrong layout is one
line and exit status 2. Real Ray Tune and Optuna on the synthetic text task, tiny sizes."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from evonas.cli import build_parser
from evonas.cli.train import config_from_args
from evonas.errors import EvonasError
from evonas.fulltrain.config import SEQUENCE_BASELINES, FullTrainConfig
from evonas.fulltrain.leaderboard import format_table, leaderboard

SEARCH = ["--space", "seq_causal", "--dataset", "synthetic_text", "--budget", "3evals",
          "--workers", "0", "--seed-zoo", "--proxy-steps", "12", "--quality-steps", "6",
          "--quality-threshold", "4", "--stability-steps", "1", "--proxy-width", "16",
          "--population", "4", "--tournament", "2"]


def evonas(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("EVONAS_DATA_DIR", None)
    return subprocess.run([sys.executable, "-m", "evonas", *args], capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "lm"
    done = evonas("search", *SEARCH, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


def test_a_sequence_search_trains_the_transformer_baselines_under_two_optimizers(lm_run):
    done = evonas("train", str(lm_run), "--top", "1", "--archs", "lm", "--width", "16",
                  "--steps", "4", "--reports", "1", "--trials-per-layer", "1", "--seeds", "1",
                  "--workers", "2")
    assert done.returncode == 0, done.stderr
    rows = json.loads((lm_run / "fulltrain" / "leaderboard.json").read_text())
    top = json.loads((lm_run / "fulltrain" / "summary.json").read_text())["layers"][0]["layer"]
    layers = {top, *SEQUENCE_BASELINES}
    # One row per layer and optimizer: a layer that trains under only one shows apart.
    assert {(r["layer"], r["optimizer"]) for r in rows} == {
        (layer, opt) for layer in layers for opt in ("adamw", "sgd")}
    assert all(r["arch"] == "lm" and r["n"] == 1 for r in rows)
    assert all(0 <= r["mean"] <= 1 and 0 < r["bpc"] < 10 for r in rows)
    trials = json.loads((lm_run / "fulltrain" / "trials.json").read_text())
    assert len(trials) == 8 and {t["status"] for t in trials} == {"completed"}
    # Equal tuning: every (layer, optimizer) got the same number of trials.
    assert sorted({(t["layer"], t["optimizer"]) for t in trials}) == sorted(
        (layer, opt) for layer in layers for opt in ("adamw", "sgd"))
    assert "adamw" in done.stdout and "bits per character" in done.stdout


@pytest.mark.parametrize("flags, says", [
    (["--baselines", "bn_relu"], "--baselines bn_relu is a layer for nchw activations"),
    (["--archs", "resnet20"], "--archs resnet20 takes nchw layers, but space seq_causal"),
    (["--archs", "vit_full"], "--dataset synthetic_text is text, which vit_full cannot read"),
    (["--lr-range", "0.01,1"], "--lr-range sets the range of one optimizer"),
])
def test_a_layer_or_network_of_the_other_layout_is_one_line_and_exit_2(lm_run, flags, says):
    done = evonas("train", str(lm_run), "--steps", "2", *flags)
    assert done.returncode == 2
    assert says in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_the_defaults_follow_the_searched_layers():
    def config(archs, placement="pre", *flags):
        run = SimpleNamespace(config=SimpleNamespace(dataset="synthetic_text", data_dir=None,
                                                     archs=archs, placement=placement))
        return config_from_args(build_parser().parse_args(["train", "RUN", *flags]), run)

    lm = config(("lm",))
    assert (lm.baselines, lm.archs, lm.optimizers) == (SEQUENCE_BASELINES, ("lm_full",),
                                                       ("adamw", "sgd"))
    assert (lm.steps, lm.epochs) == (5000, None)
    vit = config(("vit",))
    assert (vit.archs, vit.optimizers) == (("vit_full",), ("adamw", "sgd"))
    conv = config(("resnet",))
    assert conv == FullTrainConfig(dataset="synthetic_text")
    # A length given in epochs replaces the LM's default length in steps.
    given = config(("lm",), "pre", "--epochs", "2")
    assert (given.epochs, given.steps) == (2, None)
    # The full-size networks take the search's norm placement, unless told another.
    assert (lm.placement, config(("lm",), "post").placement) == ("pre", "post")
    assert config(("lm",), "post", "--placement", "mixln").placement == "mixln"


def test_each_optimizer_has_its_own_leaderboard_rows():
    def record(layer, opt, test):
        return {"trial_id": f"{layer}{opt}", "layer": layer, "arch": "lm", "batch_size": 32,
                "seed": 0, "optimizer": opt, "status": "completed", "val_accuracy": test,
                "lr": 1e-3, "weight_decay": 0.1,
                "test_accuracy": test, "test_bpc": 3 - test}

    records = [record("a", "adamw", 0.5), record("b", "adamw", 0.4),
               record("a", "sgd", 0.1), record("b", "sgd", 0.3)]
    rows = leaderboard(records, ["a", "b"], ["lm"], [32], ["adamw", "sgd"])
    assert [(r["optimizer"], r["layer"], r["mean"]) for r in rows] == [
        ("adamw", "a", 0.5), ("adamw", "b", 0.4), ("sgd", "b", 0.3), ("sgd", "a", 0.1)]
    assert rows[0]["bpc"] == 2.5
    assert "sgd" in format_table(rows)


def test_full_training_after_a_sequence_search_is_checked_before_the_search(tmp_path):
    settings = tmp_path / "full.json"
    settings.write_text(json.dumps({"baselines": ["bn_relu"]}))
    out = tmp_path / "run"
    done = evonas("search", *SEARCH, "--full-train-top", "1", "--budget", "10m",
                  "--full-train-config", str(settings), "--out", str(out))
    assert done.returncode == 2
    assert "--baselines bn_relu is a layer for nchw activations" in done.stderr
    assert not out.exists()


def test_a_trial_builds_its_transformer_in_the_stage_placement():
    """Mix-LN on the 6-block lm_full: post-norm in the first block only, pre after."""
    import torch

    from evonas.fulltrain.trainable import TrialSpec, build
    from evonas.layers import zoo

    settings = FullTrainConfig(dataset="synthetic_text", archs=("lm_full",), width=16,
                               baselines=("layernorm",), top=0, epochs=None, steps=2,
                               placement="mixln")
    spec = TrialSpec("layernorm", {"genome": zoo.get("layernorm").to_dict(), "zoo": "layernorm",
                                   "groups": 8}, "lm_full", 4, 0, 1e-3, 0.1, settings, "adamw")
    model = build(spec, num_classes=65, device=torch.device("cpu"))
    assert [block.post for block in model.trunk.blocks] == [True] + [False] * 5
    with pytest.raises(EvonasError, match="'resnet20' is a CNN"):
        FullTrainConfig(archs=("resnet20",), placement="post")
