"""The stability stage (search/rejection.stability_check): the paper's gradient-norm
ascent, measured at every point the ascent reaches, the last one included."""

import copy
import math

import torch
from torch import nn

from evonas.search.rejection import stability_check


def _model_and_batch():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(16, 6, generator=gen)
    y = torch.randint(0, 3, (16,), generator=gen)
    return model, x, y


def test_a_gradient_norm_that_passes_the_threshold_on_the_last_ascent_step_is_rejected():
    model, x, y = _model_and_batch()
    start = stability_check(copy.deepcopy(model), x, y, steps=0, lr=1.0, threshold=math.inf)
    after = stability_check(copy.deepcopy(model), x, y, steps=1, lr=1.0, threshold=math.inf)
    norm0 = start.metrics["stability_peak_grad_norm"]
    peak = after.metrics["stability_peak_grad_norm"]
    assert start.passed and after.passed and peak > norm0  # the one ascent step grew it
    # A threshold between the two: only a measurement after the last step sees it crossed.
    verdict = stability_check(copy.deepcopy(model), x, y, steps=1, lr=1.0,
                              threshold=(norm0 + peak) / 2)
    assert not verdict.passed and "after 1 ascent steps" in verdict.reason, verdict


def _evaluate(archs, threshold):
    from evonas.layers import zoo
    from evonas.search.config import SearchConfig, StageConfig
    from evonas.search.evaluate import evaluate_candidate
    from evonas.search.records import Candidate

    config = SearchConfig(space="norm_act_s", budget="1evals", dataset="synthetic",
                          archs=archs, proxy_steps=4, proxy_batch_size=16, proxy_width=4,
                          workers=0, stages=StageConfig(stability_steps=2, quality_steps=2,
                                                        quality_threshold=0.0,
                                                        stability_threshold=threshold))
    payload = {"candidate": Candidate("c000001", zoo.get("evonorm_b0").to_dict(), None,
                                      "random").to_dict(), "config": config.to_dict()}
    return evaluate_candidate(payload)


def test_the_stability_test_runs_on_every_proxy_architecture():
    """A layer stable in the first network and not in the second is rejected, on the
    second, where a test of the first network alone let it through."""
    archs = ("resnet", "mobilenetv2")
    ev = _evaluate(archs, math.inf)
    peaks = {a: ev["metrics"][f"stability_peak_grad_norm.{a}"] for a in archs}
    assert ev["status"] == "survivor" and peaks[archs[0]] != peaks[archs[1]]
    calm, wild = sorted(archs, key=peaks.get)
    rejected = _evaluate((calm, wild), (peaks[calm] + peaks[wild]) / 2)
    assert rejected["status"] == "rejected" and rejected["reject_stage"] == "stability"
    assert rejected["reject_reason"].endswith(f"on {wild}"), rejected["reject_reason"]
