"""`evonas search` over sequence (N, T, C) layers, as a user runs it: the LM on the
synthetic text task and the ViT on synthetic images, each with its defaults, its quality
gate in the right direction, the causality stage in the driver, and one clear line with
exit status 2 for a layer layout that does not fit the task."""

import json
from pathlib import Path

import pytest
import torch

from evonas.cli import build_parser, main
from evonas.cli.search import _config
from evonas.layers import zoo
from evonas.search.config import LM_SMOKE_SIZES, SearchConfig, StageConfig, proxy_sizes
from evonas.search.evaluate import evaluate_candidate
from evonas.search.records import Candidate

# Tiny LM proxies: a candidate costs about a second of one core.
TINY_LM = ["--dataset", "synthetic_text", "--workers", "0", "--proxy-steps", "12",
           "--quality-steps", "6", "--stability-steps", "1", "--proxy-width", "16",
           "--population", "4", "--tournament", "2"]


def journal(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "journal.jsonl").read_text().splitlines()]


def test_an_lm_search_on_text_runs_end_to_end_and_scores_minus_bpc(tmp_path, capsys):
    run = tmp_path / "lm"
    # The quality gate is loosened: after 6 steps no layer is far from the symbol
    # frequencies yet, and this test is about the run, not the gate.
    assert main(["search", "--space", "seq_causal", "--budget", "5evals", "--seed-zoo",
                 "--quality-threshold", "4", "--out", str(run), *TINY_LM]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["archs"] == ["lm"]  # the causal space's default proxy
    records = journal(run)
    assert len(records) == 5
    survivors = [r["evaluation"] for r in records if r["evaluation"]["status"] == "survivor"]
    assert survivors
    for ev in survivors:
        bpc = ev["metrics"]["proxy_bpc.lm"]
        assert ev["fitness"] == {"lm": -bpc} and 0 < bpc < 6
        assert "quality_bpc.lm" in ev["metrics"]
    # Every candidate went through the causality stage before a worker saw it.
    assert all("causal" in r["evaluation"]["stage_seconds"] for r in records)
    capsys.readouterr()
    assert main(["top", str(run)]) == 0
    assert "lm" in capsys.readouterr().out.splitlines()[1]


def test_a_layer_that_sees_later_tokens_is_refused_in_an_lm_search(tmp_path):
    """A bidirectional space lists statistics over tokens; searched with the LM proxy,
    the driver's causality stage refuses such layers, with the reason, before training."""
    run = tmp_path / "leak"
    assert main(["search", "--space", "seq_bidirectional", "--archs", "lm", "--budget",
                 "7evals", "--seed-zoo", "--quality-threshold", "4", "--out", str(run),
                 *TINY_LM]) == 0
    refused = [r for r in journal(run) if r["evaluation"].get("reject_stage") == "causal"]
    assert refused, "no layer was refused at the causality stage"
    for r in refused:
        ev = r["evaluation"]
        assert ev["status"] == "rejected"
        assert "changes when tokens after it change" in ev["reject_reason"]
        assert "statistics over tokens" in ev["reject_reason"]
        assert set(ev["stage_seconds"]) <= {"static", "numeric", "causal"}  # no worker stage
        assert any(op["op"].endswith(("_T", "_NT")) for op in r["candidate"]["genome"]["nodes"])
    # The report's funnel shows the stage where it runs, after the numeric check.
    from evonas.search.report import funnel
    from evonas.search.results import load_run

    rows = {r.stage: r for r in funnel(load_run(run))}
    assert list(rows)[:3] == ["static", "numeric", "causal"]
    assert rows["causal"].rejected == len(refused)


def _evaluate(name: str) -> dict:
    sizes, stage = proxy_sizes("synthetic_text", {"proxy_steps": 40, "quality_steps": 30,
                                                  "stability_steps": 1}, ("lm",))
    config = SearchConfig(space="seq_causal", dataset="synthetic_text", budget="1evals",
                          workers=0, **sizes, stages=StageConfig(**stage))
    cand = Candidate(f"zoo_{name}", zoo.get(name).to_dict(), None, f"zoo:{name}")
    return evaluate_candidate({"candidate": cand.to_dict(), "config": config.to_dict()})


def test_the_lm_quality_gate_rejects_high_bpc_and_passes_low():
    """DyT at GPT-2's initialisation stays at the symbol frequencies (3.37 bits on the
    synthetic chain), LayerNorm learns the transitions: bpc above the threshold rejects."""
    assert LM_SMOKE_SIZES["quality_threshold"] == 2.9
    dyt, ln = _evaluate("dyt"), _evaluate("layernorm")
    assert dyt["status"] == "rejected" and dyt["reject_stage"] == "quality"
    assert "bits per character > 2.9 after 30 steps on lm" in dyt["reject_reason"]
    assert ln["status"] == "survivor"
    assert ln["metrics"]["quality_bpc.lm"] < 2.9 < dyt["metrics"]["quality_bpc.lm"]
    assert ln["fitness"]["lm"] == -ln["metrics"]["proxy_bpc.lm"]


def test_a_vit_search_on_images_runs_with_the_bidirectional_space(tmp_path):
    run = tmp_path / "vit"
    assert main(["search", "--space", "seq_bidirectional", "--dataset", "synthetic",
                 "--budget", "2evals", "--seed-zoo", "--workers", "0", "--proxy-steps", "4",
                 "--quality-steps", "2", "--quality-threshold", "0", "--stability-steps", "1",
                 "--proxy-width", "16", "--proxy-batch", "16", "--population", "4",
                 "--tournament", "2", "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["archs"] == ["vit"]
    evs = [r["evaluation"] for r in journal(run)]
    assert [ev["status"] for ev in evs] == ["survivor", "survivor"]
    assert all(0 <= ev["fitness"]["vit"] <= 1 for ev in evs)


def test_placement_post_trains_the_proxies_post_norm(tmp_path):
    """--placement post: the search's proxies put each norm after its residual sum, and a
    search with the same seed scores its layers differently than pre-norm."""
    from evonas.proxy.text import load_text_dataset
    from evonas.search.evaluate import _trainer

    fitness = {}
    for placement in ("pre", "post"):
        run = tmp_path / placement
        assert main(["search", "--space", "seq_causal", "--budget", "1evals", "--seed-zoo",
                     "--quality-threshold", "4", "--placement", placement, "--out", str(run),
                     *TINY_LM]) == 0
        assert json.loads((run / "config.json").read_text())["placement"] == placement
        fitness[placement] = [r["evaluation"]["fitness"] for r in journal(run)]
    assert fitness["pre"] != fitness["post"]
    config = SearchConfig.from_dict(json.loads((tmp_path / "post" / "config.json").read_text()))
    data = load_text_dataset("synthetic_text")
    model = _trainer(zoo.factory("layernorm"), config, "lm", data, seed=0).model
    assert all(block.post for block in model.trunk.blocks)
    assert isinstance(model.trunk.norm, torch.nn.Identity)  # post-norm ends normalised


def parsed(*flags):
    return build_parser().parse_args(["search", "--budget", "5m", "--out", "unused", *flags])


@pytest.mark.parametrize("flags, archs, expected", [
    # Tiny Shakespeare takes the LM proxy's recipe and its 4.3 bpc gate after 100 steps.
    (["--space", "seq_causal", "--dataset", "shakespeare"], ("lm",),
     dict(proxy_steps=300, proxy_batch_size=32, proxy_width=64, proxy_lr=1e-2,
          quality_steps=100, quality_threshold=4.3)),
    (["--space", "seq_causal", "--dataset", "synthetic_text"], ("lm",),
     dict(proxy_steps=60, proxy_width=32, quality_steps=30, quality_threshold=2.9)),
    (["--space", "seq_bidirectional", "--dataset", "cifar10"], ("vit",),
     dict(proxy_width=64, proxy_lr=1e-3, quality_threshold=0.2)),
    (["--space", "norm_act", "--dataset", "cifar10"], ("resnet", "mobilenetv2", "efficientnet"),
     dict(proxy_width=16, proxy_lr=0.1, quality_threshold=0.2)),
    (["--space", "seq_causal", "--dataset", "shakespeare", "--quality-threshold", "3.9"],
     ("lm",), dict(quality_threshold=3.9)),
])
def test_sequence_spaces_default_to_their_proxy_and_its_sizes(monkeypatch, flags, archs,
                                                              expected):
    monkeypatch.delenv("EVONAS_DATA_DIR", raising=False)
    config = _config(parsed(*flags))
    assert config.archs == archs
    settings = {**config.to_dict(), **config.to_dict()["stages"]}
    assert {k: settings[k] for k in expected} == expected


@pytest.mark.parametrize("flags, says", [
    (["--space", "seq_causal"], "--archs lm is a language model and reads text, not cifar10"),
    (["--space", "norm_act", "--archs", "lm", "--dataset", "synthetic_text"],
     "--archs lm takes ntc layers, but space norm_act holds nchw layers"),
    (["--space", "seq_causal", "--archs", "resnet", "--dataset", "synthetic"],
     "--archs resnet takes nchw layers, but space seq_causal holds ntc layers"),
    (["--space", "norm_act", "--dataset", "synthetic_text"],
     "--dataset synthetic_text is text, which resnet cannot read"),
    (["--space", "seq_bidirectional", "--dataset", "shakespeare"],
     "--dataset shakespeare is text, which vit cannot read"),
    (["--space", "seq_causal", "--dataset", "synthetic_text", "--quality-threshold", "0.2"],
     "for a language model it is a loss in bits per character"),
    (["--space", "norm_act", "--dataset", "synthetic", "--placement", "post"],
     "--placement post: 'resnet' is a CNN, whose norm-act layers have one place"),
    # The LM proxy has two blocks: Mix-LN's post-norm quarter would hold none of them.
    (["--space", "seq_causal", "--dataset", "synthetic_text", "--placement", "mixln"],
     "--placement mixln on lm (2 blocks)"),
    (["--space", "seq_causal", "--dataset", "synthetic_text", "--placement", "middle"],
     "--placement 'middle': use one of pre, post, mixln"),
])
def test_a_layout_or_data_that_does_not_fit_the_task_is_one_line_and_exit_2(
        tmp_path, capsys, flags, says):
    out = tmp_path / "run"
    assert main(["search", *flags, "--budget", "1evals", "--workers", "0",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
