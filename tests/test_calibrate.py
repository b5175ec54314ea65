"""Proxy calibration (evonas/calibrate/): whole-panel agreement computed by hand, then the
real chain on synthetic data: a search, `evonas train` (Ray Tune), the panel built from
it, and `evonas calibrate` scoring proxy settings on it and resuming without redoing work.
"""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from evonas.calibrate.agreement import (agreement, good_layers, ranks, spearman,
                                       whole_panel_scores)
from evonas.calibrate.sweep import chosen, gate, pareto_front, setting_key
from evonas.cli import main
from evonas.runtime.backends import InlineBackend, Outcome


# --- agreement, by hand ----------------------------------------------------------------

FULL = {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6}


def test_a_proxy_that_ranks_like_full_training_scores_one():
    got = agreement(FULL, {"a": 0.4, "b": 0.3, "c": 0.2, "d": 0.1})
    assert got["kendall_tau"] == pytest.approx(1.0) and got["spearman"] == pytest.approx(1.0)
    assert got["rejected"] == [] and got["false_rejections"] == []


def test_rejected_layers_rank_below_every_kept_one_and_count_against_the_proxy():
    # Kept alone, b, c, d are in full training's order (tau 1 over them); a, the best
    # layer, was rejected: it ranks last, and the whole-panel tau says so.
    got = agreement(FULL, {"a": None, "b": 0.3, "c": 0.2, "d": 0.1})
    # pairs: (a,b) (a,c) (a,d) discordant, the other three concordant: (3 - 3) / 6
    assert got["kendall_tau"] == pytest.approx(0.0)
    assert got["rejected"] == ["a"] and got["false_rejections"] == ["a"]
    assert got["false_rejection_rate"] == pytest.approx(0.5)  # a of the good half {a, b}
    # Two rejected layers tie: tau-b's tie correction applies on the proxy's side.
    tied = agreement(FULL, {"a": 0.3, "b": 0.2, "c": None, "d": None})
    assert tied["kendall_tau"] == pytest.approx(5 / (5 * 6) ** 0.5)
    assert tied["false_rejections"] == []


def test_ranks_and_spearman_with_ties():
    assert ranks([10.0, 30.0, 20.0, 20.0]) == [1.0, 4.0, 2.5, 2.5]
    assert spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert spearman([1.0, 1.0, 1.0], [3.0, 2.0, 1.0]) is None
    scores = whole_panel_scores({"x": 0.2, "y": None, "z": -0.5})
    assert scores["y"] < scores["z"] < scores["x"]


def _result(trial, tau, cost, lost=()):
    return {"trial": trial, "kendall_tau": tau, "seconds_per_candidate": cost, "n": 6,
            "false_rejections": list(lost), "spearman": tau, "rejected": list(lost)}


def test_the_chosen_setting_loses_no_good_layer_and_is_the_cheapest_near_the_best_tau():
    results = [_result(0, 0.80, 10.0), _result(1, 0.75, 4.0),  # within one pair (2/15)
               _result(2, 0.60, 1.0), _result(3, 0.95, 0.5, lost=["a"])]
    assert chosen(results)["trial"] == 1
    assert [r["trial"] for r in pareto_front(results)] == [3]  # cheapest and best tau
    assert chosen([_result(0, 0.9, 1.0, lost=["a"])]) is None
    # A screening proxy for a ladder: the cheapest that reaches the tau asked for.
    assert chosen(results, min_tau=0.6)["trial"] == 2
    assert chosen(results, min_tau=0.7)["trial"] == 1
    assert chosen(results, min_tau=0.9) is None  # only the setting that loses a layer


def _rec(fitness, quality, seconds=10.0, proxy_s=6.0):
    return {"fitness": fitness, "quality": quality, "seconds": seconds,
            "stage_seconds": {"stability": 1.0, "quality": 2.0, "proxy": proxy_s}}


def test_the_quality_gate_sits_halfway_between_chance_and_the_weakest_good_layer():
    from types import SimpleNamespace

    from evonas.calibrate.sweep import gate, placed_threshold

    panel = SimpleNamespace(outcome=FULL)  # good: a and b
    recs = {"a": _rec(0.5, {"resnet": 0.41, "mobilenetv2": 0.35}),
            "b": _rec(0.4, {"resnet": 0.30, "mobilenetv2": 0.2095}),
            "c": _rec(0.45, {"resnet": 0.35, "mobilenetv2": 0.15}),
            "d": _rec(None, None, seconds=1.5)}  # rejected at stability: never gated
    # b's worst network, 0.2095, and chance 0.1: halfway is 0.15475, toward chance 0.154
    threshold = placed_threshold(panel, recs, 0.1, ("resnet", "mobilenetv2"))
    assert threshold == 0.154
    proxy, seconds = gate(recs, threshold, ("resnet", "mobilenetv2"))
    assert proxy == {"a": 0.5, "b": 0.4, "c": None, "d": None}
    # c stops at the gate: its proxy stage is not paid; d cost what it cost
    assert seconds == {"a": 10.0, "b": 10.0, "c": 4.0, "d": 1.5}
    # The good layers ahead of c whatever it would have scored: tau counts c as rejected.
    assert agreement(FULL, proxy)["false_rejections"] == []
    # For an LM the scores are bits per character, lower is better, chance log2(vocab).
    lm = {"a": _rec(1.0, {"lm": 2.0}), "b": _rec(0.9, {"lm": 3.0}), "c": _rec(0.8, {"lm": 5.5}),
          "d": _rec(0.1, {"lm": 6.0})}
    assert placed_threshold(panel, lm, 6.0, ("lm",)) == 4.5
    # A good layer no better than chance on some network: the gate sits at its score, no
    # higher (halfway to chance would be above it).
    recs["b"] = _rec(0.4, {"resnet": 0.30, "mobilenetv2": 0.0925})
    threshold = placed_threshold(panel, recs, 0.1, ("resnet", "mobilenetv2"))
    assert threshold == 0.092 and gate(recs, threshold, ("resnet", "mobilenetv2"))[0]["b"] == 0.4
    assert gate(lm, 4.5, ("lm",))[0] == {"a": 1.0, "b": 0.9, "c": None, "d": None}


# --- a worker lost mid-setting ----------------------------------------------------------

class _LosesWorkers(InlineBackend):
    """The inline backend, with the first `losses` evaluations of `layer` ending as a
    worker killed under them ends (a Ray worker's death reads so, backends._ray_reason)."""

    def __init__(self, layer, losses):
        super().__init__()
        self.layer, self.losses = layer, losses

    def wait(self, timeout=None):
        outcomes = super().wait(timeout)
        for i, o in enumerate(outcomes):
            if o.task_id == self.layer and self.losses:
                self.losses -= 1
                outcomes[i] = Outcome(o.task_id, False, None, "worker died: SIGKILL", o.seconds)
        return outcomes


def _tiny_panel():
    from evonas.calibrate.panel import Panel
    from evonas.layers import zoo

    names = ("bn_relu", "gn_relu", "evonorm_s0")
    return Panel("synthetic", {n: zoo.get(n).to_dict() for n in names},
                 {"bn_relu": 0.6, "gn_relu": 0.5, "evonorm_s0": 0.4},
                 {n: [] for n in names}, "by hand")


def test_a_layer_whose_worker_died_is_evaluated_again_not_ranked_as_rejected(tmp_path):
    from evonas.calibrate.sweep import CalibrationError, EvaluationCache, score_setting
    from evonas.search.config import SearchConfig, StageConfig

    config = SearchConfig(dataset="synthetic", archs=("resnet",), proxy_steps=4, proxy_width=4,
                          proxy_batch_size=16, proxy_eval_size=32,
                          stages=StageConfig(quality_steps=2, quality_threshold=0.0,
                                             stability_steps=1, quality_eval_size=32))
    cache = EvaluationCache(tmp_path / "evaluations.jsonl")
    result = score_setting(_tiny_panel(), config, _LosesWorkers("gn_relu", 1), cache)
    assert result["rejected"] == [] and result["n"] == 3
    recs = [json.loads(line) for line in cache.path.read_text().splitlines()]
    assert sorted(r["layer"] for r in recs) == ["bn_relu", "evonorm_s0", "gn_relu"]
    assert all(r["fitness"] is not None for r in recs)

    # Lost twice: the calibration stops, saying which layer and why, and keeps no verdict
    # for it, so the same command resumes with it.
    cache = EvaluationCache(tmp_path / "again.jsonl")
    with pytest.raises(CalibrationError, match="'gn_relu' could not be evaluated twice "
                                               r"\(worker died: SIGKILL\)"):
        score_setting(_tiny_panel(), config, _LosesWorkers("gn_relu", 2), cache)
    assert "gn_relu" not in cache.path.read_text()


# --- the chain on synthetic data ---------------------------------------------------------

SEARCH = ["--space", "norm_act_s", "--budget", "4evals", "--workers", "0", "--dataset",
          "synthetic", "--archs", "resnet", "--proxy-steps", "12", "--quality-steps", "6",
          "--quality-threshold", "0.05", "--proxy-batch", "32", "--proxy-width", "8",
          "--stability-steps", "2", "--population", "4", "--tournament", "2"]


def _evonas(*args, cwd):
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "evonas", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_panel_from_a_full_training_then_calibration_that_resumes_without_redoing(tmp_path,
                                                                                 capsys):
    assert _evonas("search", *SEARCH, "--out", "run", cwd=tmp_path).returncode == 0
    # A panel's layer of no search or zoo, as a genome file: x * sigmoid(x).
    swish = {"format": "evonas.genome/1", "output": "n2",
             "nodes": [{"id": "n1", "op": "sigmoid", "inputs": ["x"]},
                       {"id": "n2", "op": "mul", "inputs": ["x", "n1"]}]}
    (tmp_path / "swish.json").write_text(json.dumps(swish))
    trained = _evonas("train", "run", "--top", "1", "--baselines", "bn_relu,gn_relu,swish.json",
                      "--archs", "resnet20", "--steps", "4", "--reports", "2", "--width", "4",
                      "--batch-sizes", "16", "--seeds", "1", "--trials-per-layer", "1",
                      "--workers", "2", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    built = _evonas("calibrate", "--panel", "panel", "--panel-from", "run", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    panel = json.loads((tmp_path / "panel" / "panel.json").read_text())
    board = json.loads((tmp_path / "run" / "fulltrain" / "leaderboard.json").read_text())
    assert {name: v["score"] for name, v in panel["layers"].items()} == pytest.approx(
        {r["layer"]: r["mean"] for r in board})
    assert {"bn_relu", "gn_relu", "swish"} <= set(panel["layers"]) and len(panel["layers"]) == 4
    assert panel["layers"]["swish"]["genome"]["nodes"] == swish["nodes"]
    # It prints the panel, best first, each layer's score and its seed's accuracy.
    printed = built.stdout.splitlines()
    best = max(panel["layers"], key=lambda name: panel["layers"][name]["score"])
    assert printed[1].split()[:2] == [best, f"{panel['layers'][best]['score']:.4f}"]
    assert len(printed) == 2 + len(panel["layers"])
    _panel_grows_run_by_run(tmp_path, panel, capsys)

    flags = ["calibrate", "--panel", "panel", "--out", "cal", "--trials", "1", "--archs",
             "resnet", "--steps", "6,8", "--batches", "16", "--widths", "4"]
    first = _evonas(*flags, cwd=tmp_path)
    assert first.returncode in (0, 1), first.stderr[-3000:]
    cal = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert len(cal["results"]) == 2 and sum(r["defaults"] for r in cal["results"]) == 1
    assert cal["settings_finished"] == cal["settings_planned"] == 2
    lines = (tmp_path / "cal" / "evaluations.jsonl").read_text().splitlines()
    assert len(lines) == 8  # 4 layers x 2 settings
    # The evaluations ran with the gate open; the setting the study proposed has its gate
    # placed halfway between chance (0.1) and the weakest good layer's worst network.
    recs = {}
    for rec in map(json.loads, lines):
        recs.setdefault(rec["setting"], {})[rec["layer"]] = rec
    outcome = {name: v["score"] for name, v in panel["layers"].items()}
    proposed = next(r for r in cal["results"] if not r["defaults"])
    evaluated = recs[setting_key(proposed["setting"])]
    weakest = min(min(evaluated[name]["quality"].values()) for name in good_layers(outcome)
                  if evaluated[name]["quality"])
    assert proposed["setting"]["quality_threshold"] == math.floor((0.1 + weakest) / 2 * 1000) / 1000
    # Every result's tau is the whole-panel agreement of its evaluations behind its gate.
    for r in cal["results"]:
        gated, _ = gate(recs[setting_key(r["setting"])], r["setting"]["quality_threshold"],
                        ["resnet"])
        tau = agreement(outcome, gated)["kendall_tau"]
        assert r["kendall_tau"] == (tau if tau is None else pytest.approx(tau))
    if first.returncode == 0:
        config = json.loads((tmp_path / "cal" / "proxy_config.json").read_text())
        pick = next(r for r in cal["results"] if r["trial"] == cal["chosen"])
        assert config["settings"] == pick["setting"] and not pick["false_rejections"]
    else:
        assert all(r["false_rejections"] or r["kendall_tau"] is None for r in cal["results"])

    again = _evonas(*flags, cwd=tmp_path)  # resumed: nothing re-evaluated
    assert again.returncode == first.returncode
    assert (tmp_path / "cal" / "evaluations.jsonl").read_text().splitlines() == lines
    # Chosen again by another rule (the cheapest reaching a tau), nothing re-evaluated.
    screening = _evonas(*flags, "--min-tau", "-1", cwd=tmp_path)
    cal = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    ok = [r for r in cal["results"] if not r["false_rejections"] and r["kendall_tau"] is not None]
    assert cal["min_tau"] == -1 and screening.returncode == (0 if ok else 1)
    if ok:
        cheapest = min(ok, key=lambda r: r["seconds_per_candidate"])
        config = json.loads((tmp_path / "cal" / "proxy_config.json").read_text())
        assert cal["chosen"] == cheapest["trial"] and config["settings"] == cheapest["setting"]
    assert (tmp_path / "cal" / "evaluations.jsonl").read_text().splitlines() == lines
    # Its evaluations are of ResNet proxies: resumed with another network, it refuses.
    other = _evonas(*[f if f != "resnet" else "mobilenetv2" for f in flags], cwd=tmp_path)
    assert other.returncode == 2 and "--archs resnet" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    assert (tmp_path / "cal" / "evaluations.jsonl").read_text().splitlines() == lines

    # Asked for one more setting, it draws a new one, the one a calibration asked for two
    # from the start draws second: resuming neither repeats nor changes what is tried.
    more = [*flags, "--trials", "2"]
    assert _evonas(*more, cwd=tmp_path).returncode in (0, 1)
    assert _evonas(*[f if f != "cal" else "cal2" for f in more], cwd=tmp_path).returncode in (0, 1)
    settings = {}
    for out in ("cal", "cal2"):
        results = json.loads((tmp_path / out / "calibration.json").read_text())["results"]
        settings[out] = [json.dumps(r["setting"], sort_keys=True) for r in results]
    assert len(set(settings["cal"])) == 3 and settings["cal"] == settings["cal2"]


def _panel_grows_run_by_run(tmp_path, panel, capsys):
    """--panel-from RUN1,RUN2: runs trained alike, each with part of the layers, make the
    panel one run with all of them makes; runs trained otherwise, or a layer in two, are
    refused in one line."""
    def part(name, keep):
        shutil.copytree(tmp_path / "run", tmp_path / name)
        path = tmp_path / name / "fulltrain" / "summary.json"
        summary = json.loads(path.read_text())
        summary["layers"] = [x for x in summary["layers"] if x["layer"] in keep]
        summary["leaderboard"] = [r for r in summary["leaderboard"] if r["layer"] in keep]
        path.write_text(json.dumps(summary))

    part("part1", {"swish"})
    part("part2", set(panel["layers"]) - {"swish"})

    def calibrate(out, runs):
        code = main(["calibrate", "--panel", str(tmp_path / out), "--panel-from",
                     ",".join(str(tmp_path / r) for r in runs)])
        return code, capsys.readouterr().err

    # The stage's summary holds every genome: a genome file moved away since is not needed.
    (tmp_path / "swish.json").unlink()
    code, err = calibrate("merged", ["part1", "part2"])
    assert code == 0, err
    merged = json.loads((tmp_path / "merged" / "panel.json").read_text())
    assert merged["layers"] == panel["layers"]

    code, err = calibrate("twice", ["run", "part1"])
    assert code == 2 and "layer 'swish' is in " in err and "part1 and an earlier run" in err
    config = tmp_path / "part1" / "fulltrain" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "steps": 8}))
    code, err = calibrate("longer", ["part2", "part1"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "part1 trained with steps 8, " in err and "part2 with 4" in err
    assert not (tmp_path / "twice").exists() and not (tmp_path / "longer").exists()


def test_a_missing_panel_is_one_line_and_writes_nothing(tmp_path, capsys):
    assert main(["calibrate", "--panel", str(tmp_path / "none"), "--out",
                 str(tmp_path / "cal")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "panel-from RUN" in err
    assert not (tmp_path / "cal").exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "panel.json").write_text('{"format": 1, "dataset": "synthetic", '
                                                 '"layers": {"x": {"score": 1, "genome": '
                                                 '{"nodes": [["__import__", 0]]}}}}')
    assert main(["calibrate", "--panel", str(tmp_path / "bad"), "--out",
                 str(tmp_path / "cal")]) == 2
    err = capsys.readouterr().err  # the genome's loader names the layer and the problem
    assert err.count("\n") == 1 and "panel.json:x:" in err, err
    assert not (tmp_path / "cal").exists()
    assert main(["calibrate", "--panel", str(tmp_path / "bad"), "--out", str(tmp_path / "cal"),
                 "--min-tau", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--min-tau 1.5 is no Kendall's tau" in err, err
    assert not (tmp_path / "cal").exists()


# --- a calibration's settings in a search ----------------------------------------------------

def _proxy_config(path, **over):
    data = {"format": 1, "dataset": "synthetic", "archs": ["resnet"],
            "settings": {"proxy_steps": 10, "proxy_batch_size": 16, "proxy_width": 4,
                         "proxy_lr": 0.05, "quality_steps": 5, "quality_threshold": 0.05},
            "kendall_tau": 0.7, "panel": "p", "panel_layers": ["a", "b"], **over}
    path.write_text(json.dumps(data))
    return str(path)


def test_a_search_takes_the_calibrated_settings_under_its_own_flags(tmp_path):
    cal = _proxy_config(tmp_path / "proxy_config.json")
    assert main(["search", "--space", "norm_act_s", "--budget", "1evals", "--workers", "0",
                 "--dataset", "synthetic", "--proxy-config", cal, "--proxy-width", "8",
                 "--population", "4", "--tournament", "2", "--out", str(tmp_path / "run")]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["proxy_steps"], config["proxy_batch_size"], config["proxy_lr"]) == (10, 16, 0.05)
    assert config["proxy_width"] == 8  # the flag wins over the calibration
    assert (config["stages"]["quality_steps"], config["stages"]["quality_threshold"]) == (5, 0.05)
    assert config["archs"] == ["resnet"] and config["proxy_config"] == cal


@pytest.mark.parametrize("over, flags, message", [
    ({"dataset": "cifar10"}, [], "was calibrated on --dataset cifar10"),
    ({}, ["--archs", "mobilenetv2"], "was calibrated on --archs resnet"),
    ({"settings": {"proxy_depth": 3}}, [], "'proxy_depth', which is not a proxy setting"),
    ({"settings": None}, [], "is not a calibration's proxy_config.json"),
])
def test_a_proxy_config_that_does_not_fit_is_one_line_and_writes_nothing(
        tmp_path, capsys, over, flags, message):
    cal = _proxy_config(tmp_path / "proxy_config.json", **over)
    assert main(["search", "--budget", "1evals", "--dataset", "synthetic", "--proxy-config",
                 cal, *flags, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()
