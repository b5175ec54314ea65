"""The CIFAR-10 proxy evonas ships, held to the reference panel it was calibrated on.

benchmarks/panel/cifar10/ holds the panel (layers trained fully on CIFAR-10, their
scores) and benchmarks/calibration/cifar10/ the calibration that chose the proxy: every
panel layer evaluated by the search's own stages on CIFAR-10 at each setting it tried.
At the setting a search on `--dataset cifar10` uses, no layer full training rates in the
panel's top half may be rejected by the numeric, stability or quality gate. Changing a
default without calibrating it fails here (no evaluations at the new setting), as does
a gate that would reject a good panel layer.
"""

import dataclasses
import json
from pathlib import Path

import pytest

from evonas.calibrate.agreement import good_layers
from evonas.calibrate.panel import load_panel
from evonas.calibrate.sweep import fixed_settings, gate, setting_key, setting_of
from evonas.search.records import SURVIVOR

ROOT = Path(__file__).resolve().parents[1]
PANEL = ROOT / "benchmarks" / "panel" / "cifar10"
CALIBRATION = ROOT / "benchmarks" / "calibration" / "cifar10"


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The config `evonas search --dataset cifar10` builds, with nothing else given."""
    from evonas.cli import build_parser
    from evonas.cli.search import _config

    with pytest.MonkeyPatch.context() as env:
        env.delenv("EVONAS_DATA_DIR", raising=False)
        env.delenv("RAY_ADDRESS", raising=False)
        args = build_parser().parse_args(["search", "--dataset", "cifar10", "--budget", "1evals",
                                          "--out", str(tmp_path_factory.mktemp("unused"))])
        return _config(args)


@pytest.fixture(scope="module")
def panel():
    return load_panel(PANEL)


def test_at_the_shipped_proxy_no_good_panel_layer_was_rejected_on_cifar10(shipped, panel):
    """The calibration's own evaluations at the shipped setting (made with the quality
    gate open), behind the shipped gate: on CIFAR-10, every gate."""
    calibrated = json.loads((CALIBRATION / "calibration.json").read_text())
    # What the setting's key leaves out must be as the search has it too: other networks,
    # another stability test or evaluation size judge layers otherwise.
    assert calibrated["archs"] == list(shipped.archs)
    assert calibrated["fixed"] == json.loads(json.dumps(fixed_settings(shipped)))
    key = setting_key(setting_of(shipped))
    evaluated = {}
    for line in (CALIBRATION / "evaluations.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["setting"] == key:
            evaluated[rec["layer"]] = rec
    missing = sorted(set(panel.outcome) - set(evaluated))
    assert not missing, (f"benchmarks/calibration/cifar10 holds no evaluation of {missing} at "
                         f"the shipped setting: calibrate it (BENCHMARKS.md says how)")
    proxy, _ = gate(evaluated, shipped.stages.quality_threshold, shipped.archs)
    lost = {name: evaluated[name]["verdict"] if evaluated[name]["fitness"] is None
            else f"quality {evaluated[name]['quality']} < {shipped.stages.quality_threshold}"
            for name in good_layers(panel.outcome) if proxy[name] is None}
    assert lost == {}


def test_the_shipped_proxy_is_the_one_the_calibration_chose(shipped):
    """--dataset cifar10's defaults are the calibration's choice (its default rule: the
    cheapest within one discordant pair of the best tau), threshold included."""
    calibrated = json.loads((CALIBRATION / "calibration.json").read_text())
    assert calibrated["settings_finished"] == calibrated["settings_planned"]
    pick = next(r for r in calibrated["results"] if r["trial"] == calibrated["chosen"])
    assert pick["setting"] == setting_of(shipped) and calibrated["min_tau"] is None
    config = json.loads((CALIBRATION / "proxy_config.json").read_text())
    assert config["settings"] == setting_of(shipped)


def test_the_numeric_and_stability_gates_pass_every_good_panel_layer(shipped, panel):
    """The gates as they are now, at the shipped settings and on every proxy network: a
    change to a check or a threshold that would reject a good panel layer fails here
    before any calibration is redone. (Synthetic images stand in for CIFAR-10: the gates
    probe a layer's numbers, not what it learns; the quality gate is the test above.)"""
    from evonas.layers.genome import Genome
    from evonas.layers.space import load_space
    from evonas.search.evaluate import evaluate_candidate
    from evonas.search.records import Candidate
    from evonas.search.rejection import numeric_check

    probe = dataclasses.replace(
        shipped, dataset="synthetic", data_dir=None, proxy_steps=2, proxy_eval_size=64,
        stages=dataclasses.replace(shipped.stages, quality_steps=1, quality_threshold=0.0,
                                   quality_eval_size=64))
    groups = load_space(shipped.space).groups
    verdicts = {}
    for name in good_layers(panel.outcome):
        numeric = numeric_check(Genome.from_dict(panel.genomes[name]), shipped.stages.numeric_scales, groups)
        if not numeric.passed:
            verdicts[name] = f"numeric: {numeric.reason}"
            continue
        payload = {"candidate": Candidate(f"panel_{name}", panel.genomes[name], None,
                                          "panel").to_dict(), "config": probe.to_dict()}
        ev = evaluate_candidate(payload)
        verdicts[name] = ev["status"] if ev["status"] == SURVIVOR else (
            f"{ev['reject_stage']}: {ev['reject_reason']}")
        for arch in shipped.archs:  # the stability test ran on every network
            assert f"stability_peak_grad_norm.{arch}" in ev["metrics"], (name, arch)
    assert verdicts == {name: SURVIVOR for name in verdicts}
