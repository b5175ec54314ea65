"""The op contract: for every op in ops.OPS, the three readings of its one declaration agree.

Each op is run in the smallest genome that uses it by the interpreter (its `kernel`), by
an exported module (its `source` and copied `helpers`) and through the formula (its
`symbol`, evaluated by symbolic.numeric). Adding an op to ops.py adds it here.
"""

import importlib.util
import itertools

import numpy as np
import pytest
import torch

from evonas.layers import symbolic
from evonas.layers.export import export_source
from evonas.layers.genome import chain
from evonas.layers.interpreter import GenomeLayer
from evonas.layers.lowering import lower
from evonas.layers.ops import AGGREGATE, OPS

C, GROUPS = 4, 2
_module_ids = itertools.count()




def smallest_genome(name):
    op = OPS[name]
    if name == "div_unguarded":  # not searchable: lowering makes it from a division by a std
        return chain(("std_HW", ["x"]), ("div", ["x", "n1"]))
    if name.startswith("normalize"):  # not searchable: lowering fuses the normalisation
        axes = op.axes
        steps = [(f"mean_{axes}", ["x"]), ("neg", ["n1"]), ("add", ["x", "n2"]),
                 (f"std_{axes}", ["x"]), ("div", ["n3", "n4"])]
        if op.arity == 3:
            steps += [("mul", ["n5", "v1"]), ("add", ["v0", "n6"])]
        return chain(*steps)
    if op.kind == AGGREGATE:
        # Times x, so the output keeps x's shape and has a gradient in eval mode too.
        return chain((name, ["x"]), ("mul", ["x", "n1"]))
    if op.arity == 1:
        return chain((name, ["x"]))
    # exp(x) is the second x-dependent value: positive, so a safe denominator.
    return chain(("exp", ["x"]), (name, ["x", "n1"]))


def load_exported(genome, folder):
    module_name = f"exported_{next(_module_ids)}"
    path = folder / f"{module_name}.py"
    path.write_text(export_source(genome))
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EvolvedNormAct


def sample_input(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, C, 3, 3, generator=g)
    return x + 0.2 * torch.sign(x)  # away from 0, where log and sqrt are steep


def run(layer, x):
    """Output, input gradient and parameter gradients of a weighted sum of the output."""
    x = x.clone().requires_grad_(True)
    layer.zero_grad()
    y = layer(x)
    weights = torch.linspace(-1.0, 1.0, y.numel()).reshape(y.shape)
    (y * weights).sum().backward()
    return y.detach(), x.grad, {k: p.grad for k, p in layer.named_parameters()}


def assert_same(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def layers(name, folder):
    genome = smallest_genome(name)
    assert name in {s.op.name for s in lower(genome)}
    exported = load_exported(genome, folder)(C, groups=GROUPS)
    return genome, GenomeLayer(genome, C, groups=GROUPS), exported


@pytest.mark.parametrize("name", list(OPS))
def test_interpreter_export_and_formula_agree(name, tmp_path):
    genome, interpreted, exported = layers(name, tmp_path)
    x = sample_input()
    for mode in ("train", "eval"):  # train first: eval then reads the updated estimates
        interpreted.train(mode == "train")
        exported.train(mode == "train")
        y, dx, dp = run(interpreted, x)
        y_exp, dx_exp, dp_exp = run(exported, x)
        assert_same(y_exp, y)
        assert_same(dx_exp, dx)
        for k in dp:
            assert_same(dp_exp[k], dp[k])
        for k, buffer in interpreted.named_buffers():
            assert_same(exported.get_buffer(k), buffer)
        if mode == "train":  # the formula reads batch statistics
            f = symbolic.numeric(genome, eps=interpreted.eps, groups=interpreted.groups)
            y_sym = torch.from_numpy(np.asarray(f(x.double().numpy()))).float()
            assert_same(y_sym.expand_as(y), y)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("name", list(OPS))
def test_exported_op_is_scriptable(name, tmp_path):
    _, interpreted, exported = layers(name, tmp_path)
    scripted = torch.jit.script(exported)
    x = sample_input(1)
    assert_same(scripted(x), interpreted(x))


@pytest.mark.parametrize("name", list(OPS))
def test_bfloat16_in_bfloat16_out(name, tmp_path):
    _, interpreted, exported = layers(name, tmp_path)
    x = sample_input(2).bfloat16()
    assert interpreted(x).dtype == torch.bfloat16
    assert exported(x).dtype == torch.bfloat16
