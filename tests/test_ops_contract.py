"""The op contract: for every op in ops.OPS, the three readings of its one declaration agree.

Each op is run in the smallest genome that uses it by the interpreter (its `kernel`), by
an exported module (its `source` and copied `helpers`) and through the formula (its
`symbol`, evaluated by symbolic.numeric), on an input of its layout: (N, C, H, W) for the
conv aggregates, (N, T, C) for the sequence ones, both for element-wise ops. Adding an op
to ops.py adds it here; so does adding a layout. Learnt scalars, the inputs a genome
declares itself, get the same three-way check.
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
from evonas.layers.ops import AGGREGATE, LAYOUTS, OPS

C, GROUPS = 4, 2
_module_ids = itertools.count()
# Every op with every layout it fits: aggregates their own, element-wise ops all.
CASES = [(name, layout) for name, op in OPS.items() for layout in LAYOUTS
         if op.layout in (None, layout)]
IDS = [f"{name}-{layout}" for name, layout in CASES]




def smallest_genome(name, layout):
    return chain(*_smallest_steps(name, layout), layout=layout)


def _smallest_steps(name, layout):
    op = OPS[name]
    if name == "div_unguarded":  # not searchable: lowering makes it from a division by a std
        return [("std_HW" if layout == "nchw" else "std_C", ["x"]), ("div", ["x", "n1"])]
    if name.startswith("normalize"):  # not searchable: lowering fuses the normalisation
        axes = op.axes
        steps = [(f"mean_{axes}", ["x"]), ("neg", ["n1"]), ("add", ["x", "n2"]),
                 (f"std_{axes}", ["x"]), ("div", ["n3", "n4"])]
        # the affine form takes v1 and v0; the plain one is followed by a product with x,
        # so the layer's own affine is not folded into it (lowering.fold_affine)
        steps += ([("mul", ["n5", "v1"]), ("add", ["v0", "n6"])] if op.arity == 3 else
                  [("mul", ["x", "n5"])])
        return steps
    if op.kind == AGGREGATE:
        # Times x, so the output keeps x's shape and has a gradient in eval mode too.
        return [(name, ["x"]), ("mul", ["x", "n1"])]
    if op.arity == 1:
        return [(name, ["x"])]
    # exp(x) is the second x-dependent value: positive, so a safe denominator.
    return [("exp", ["x"]), (name, ["x", "n1"])]


def load_exported(genome, folder):
    module_name = f"exported_{next(_module_ids)}"
    path = folder / f"{module_name}.py"
    path.write_text(export_source(genome))
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EvolvedNormAct


def sample_input(seed=0, layout="nchw"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, C, 3, 3, generator=g)
    x = x + 0.2 * torch.sign(x)  # away from 0, where log and sqrt are steep
    return x if layout == "nchw" else x.flatten(2).transpose(1, 2)  # (3, 9 tokens, C)


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


def layers(genome, folder):
    exported = load_exported(genome, folder)(C, groups=GROUPS)
    return GenomeLayer(genome, C, groups=GROUPS), exported


def op_layers(name, layout, folder):
    genome = smallest_genome(name, layout)
    assert name in {s.op.name for s in lower(genome)}
    return (genome, *layers(genome, folder))


@pytest.mark.parametrize("name, layout", CASES, ids=IDS)
def test_interpreter_export_and_formula_agree(name, layout, tmp_path):
    assert_three_readings_agree(*op_layers(name, layout, tmp_path), sample_input(0, layout))


# A scalar read twice and one read once, next to a vector: tanh(a*x + s) * a * v1.
SCALAR_STEPS = [("mul", ["a", "x"]), ("add", ["n1", "s"]), ("tanh", ["n2"]), ("mul", ["n3", "a"]),
                ("mul", ["n4", "v1"])]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_learnt_scalars_agree_in_every_reading(layout, tmp_path):
    genome = chain(*SCALAR_STEPS, layout=layout, scalars={"a": 0.7, "s": -0.2})
    interpreted, exported = layers(genome, tmp_path)
    with torch.no_grad():
        interpreted.a.fill_(1.3)  # away from the initial value: the formula is told it
        exported.load_state_dict(interpreted.state_dict())
    assert_three_readings_agree(genome, interpreted, exported, sample_input(3, layout),
                                a=1.3)
    assert exported.s.item() == pytest.approx(-0.2) and exported.s.shape == ()


def assert_three_readings_agree(genome, interpreted, exported, x, **scalars):
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
            y_sym = torch.from_numpy(np.asarray(f(x.double().numpy(), **scalars))).float()
            assert_same(y_sym.expand_as(y), y)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("name, layout", CASES, ids=IDS)
def test_exported_op_is_scriptable(name, layout, tmp_path):
    _, interpreted, exported = op_layers(name, layout, tmp_path)
    scripted = torch.jit.script(exported)
    x = sample_input(1, layout)
    assert_same(scripted(x), interpreted(x))


@pytest.mark.parametrize("name, layout", CASES, ids=IDS)
def test_float64_runs_the_same_function(name, layout, tmp_path):
    # the batch kernels take another path in float64 (batch_normalize)
    _, interpreted, exported = op_layers(name, layout, tmp_path)
    x = sample_input(4, layout)
    want = interpreted(x)
    for layer in (interpreted.double(), exported.double()):
        layer.load_state_dict(exported.state_dict())  # the running estimates before the step
        y = layer(x.double())
        assert y.dtype == torch.float64
        assert_same(y.float(), want)


@pytest.mark.parametrize("name, layout", CASES, ids=IDS)
def test_bfloat16_in_bfloat16_out(name, layout, tmp_path):
    _, interpreted, exported = op_layers(name, layout, tmp_path)
    x = sample_input(2, layout).bfloat16()
    assert interpreted(x).dtype == torch.bfloat16
    assert exported(x).dtype == torch.bfloat16
