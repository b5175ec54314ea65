"""The causality check (search/rejection.py causal_check): a sequence layer whose output at
position t depends on a later token is refused with the position, the mode and the reason;
per-token layers pass, in train and eval mode."""

import numpy as np
import pytest

from evonas.layers import zoo
from evonas.layers.genome import chain
from evonas.layers.mutation import random_genome
from evonas.layers.space import load_space
from evonas.search.rejection import causal_check

CAUSAL = load_space("seq_causal")


def times_x(op):
    return chain((op, ["x"]), ("mul", ["x", "n1"]), layout="ntc")


@pytest.mark.parametrize("name", ["layernorm", "rmsnorm", "dyt", "derf", "scalenorm"])
def test_per_token_zoo_layers_pass(name):
    verdict = causal_check(zoo.get(name), CAUSAL)
    assert verdict.passed and verdict.stage == "causal" and verdict.reason is None


@pytest.mark.parametrize("op", ["mean_G", "std_G", "var_C", "rms_C"])
def test_statistics_within_a_token_pass(op):
    assert causal_check(times_x(op), CAUSAL).passed


@pytest.mark.parametrize("op", ["mean_T", "var_T", "std_T", "rms_T"])
def test_statistics_over_tokens_are_refused_with_their_reason(op):
    verdict = causal_check(times_x(op), CAUSAL)
    assert not verdict.passed
    assert verdict.reason == (f"output at t=0 changes when tokens after it change (train mode): "
                              f"statistics over tokens ({op}) see the future")


@pytest.mark.parametrize("name", ["bn_nt", "powernorm"])
def test_batch_statistics_over_tokens_leak_in_training(name):
    verdict = causal_check(zoo.get(name), CAUSAL)
    assert not verdict.passed and "(train mode)" in verdict.reason
    assert "_NT" in verdict.reason and "\n" not in verdict.reason


def test_a_statistic_over_tokens_that_changes_nothing_passes():
    # the check judges what the layer computes, not which ops it holds
    mixed = chain(("mean_T", ["x"]), ("mul", ["n1", "zero"]), ("add", ["x", "n2"]),
                  layout="ntc")
    assert causal_check(mixed, CAUSAL).passed  # times 0: the statistic changes nothing


def test_random_members_of_the_causal_space_pass():
    rng = np.random.default_rng(0)
    for _ in range(100):
        genome = random_genome(CAUSAL, rng)
        verdict = causal_check(genome, CAUSAL)
        assert verdict.passed, (genome, verdict.reason)


def test_a_conv_layer_has_no_token_axis():
    verdict = causal_check(zoo.get("evonorm_s0"), load_space("norm_act"))
    assert not verdict.passed and "sequence (ntc) layers" in verdict.reason
