"""Formulas of known genomes, as text and LaTeX, and the numeric meaning of the expression.

The printed strings are exact: the formula is what users read in reports and exported
docstrings, so a change to its shape should be a decision. The numeric form is checked
against the interpreter, the reference for what a genome computes.
"""

import numpy as np
import pytest
import sympy
import torch

from evonas.layers import symbolic
from evonas.layers.genome import chain
from evonas.layers.interpreter import GenomeLayer

B0 = chain(("std_NHW", ["x"]), ("mul", ["v1", "x"]), ("std_HW", ["x"]), ("add", ["n2", "n3"]),
           ("max", ["n1", "n4"]), ("div", ["x", "n5"]))
S0 = chain(("mul", ["v1", "x"]), ("sigmoid", ["n1"]), ("mul", ["x", "n2"]), ("std_GHW", ["x"]),
           ("div", ["n3", "n4"]))
CENTRED = chain(("mean_HW", ["x"]), ("neg", ["n1"]), ("add", ["x", "n2"]), ("var_HW", ["x"]),
                ("mul", ["v1", "x"]), ("sigmoid", ["n5"]), ("add", ["n4", "n6"]),
                ("div", ["n3", "n7"]))
UNARY = chain(("mul", ["x", "one"]), ("add", ["n1", "zero"]), ("neg", ["n2"]), ("square", ["n3"]),
              ("mul", ["v0", "n4"]), ("abs", ["n5"]), ("log", ["n6"]), ("sqrt", ["x"]),
              ("div", ["n7", "n8"]), ("tanh", ["n9"]))
# (x - mean_CHW(x)) / (rms_GHW(x - mean_CHW(x)) + std_GHW(mean_CHW(x))): a group
# statistic of a one-channel value, and an exp in the numerator.
LAYER = chain(("mean_CHW", ["x"]), ("neg", ["n1"]), ("add", ["x", "n2"]), ("rms_GHW", ["n3"]),
              ("std_GHW", ["n1"]), ("add", ["n4", "n5"]), ("exp", ["n3"]), ("mul", ["v0", "n7"]),
              ("add", ["n3", "n8"]), ("div", ["n9", "n6"]))
# Each node reads the one before twice: 2^64 leaves as a tree.
ADVERSARIAL = chain(("add", ["x", "x"]), *[("add", [f"n{k}", f"n{k}"]) for k in range(1, 64)])




@pytest.mark.parametrize("genome, text", [
    (B0, "x / max(std_NHW(x), v1*x + std_HW(x))"),
    (S0, "x*sigmoid(v1*x) / std_GHW(x)"),
    (CENTRED, "(x - mean_HW(x)) / (var_HW(x) + sigmoid(v1*x))"),
    (UNARY, "tanh(slog(abs(v0*(-(x*1 + 0))**2)) / ssqrt(x))"),
    (LAYER, "(x - mean_CHW(x) + v0*exp(x - mean_CHW(x))) / "
            "(rms_GHW(x - mean_CHW(x)) + std_GHW(mean_CHW(x)))"),
])
def test_formula_of_known_genomes(genome, text):
    assert symbolic.formula(genome) == text


@pytest.mark.parametrize("steps, text", [
    ([("std_HW", ["x"]), ("max", ["x", "n1"])], "max(x, std_HW(x))"),
    ([("std_HW", ["x"]), ("max", ["n1", "x"])], "max(std_HW(x), x)"),
    ([("mul", ["x", "one"])], "x*1"),
    ([("mul", ["one", "x"])], "1*x"),
    ([("add", ["x", "x"]), ("add", ["x", "n1"])], "x + (x + x)"),
    ([("add", ["x", "x"]), ("add", ["n1", "x"])], "x + x + x"),
    ([("neg", ["x"]), ("neg", ["n1"]), ("add", ["x", "n2"])], "x - (-x)"),
    ([("neg", ["x"]), ("add", ["x", "n1"]), ("neg", ["n2"]), ("add", ["x", "n3"])],
     "x - (x - x)"),
    ([("std_HW", ["x"]), ("div", ["x", "n1"]), ("div", ["n2", "n1"])],
     "(x / std_HW(x)) / std_HW(x)"),
    ([("neg", ["x"]), ("mul", ["v1", "n1"]), ("square", ["n2"])], "(v1*(-x))**2"),
])
def test_formula_keeps_the_evolved_form(steps, text):
    assert symbolic.formula(chain(*steps)) == text


def test_expression_is_unevaluated():
    expr = symbolic.expression(chain(("mul", ["x", "one"])))
    assert isinstance(expr, sympy.Mul) and expr.args == (sympy.Symbol("x", real=True), 1)
    assert {s.name for s in symbolic.expression(B0).free_symbols} == {"x", "v1"}


def test_latex():
    assert symbolic.latex(B0) == (
        r"\frac{x}{\max\left(\sigma_{N,H,W}\left(x\right), v_{1} \cdot x + "
        r"\sigma_{H,W}\left(x\right)\right)}")
    assert symbolic.latex(CENTRED) == (
        r"\frac{x - \mu_{H,W}\left(x\right)}{\sigma^2_{H,W}\left(x\right) + "
        r"\operatorname{sigmoid}\left(v_{1} \cdot x\right)}")
    assert r"\sigma_{C/g,H,W}\left(x\right)" in symbolic.latex(S0)
    assert r"\operatorname{rms}_{C/g,H,W}" in symbolic.latex(LAYER)
    assert symbolic.latex(UNARY).startswith(r"\tanh\left(\frac{\operatorname{slog}\left(\left|")


def test_shared_nodes_named_on_request():
    genome = chain(("std_HW", ["x"]), ("div", ["x", "n1"]), ("mul", ["n2", "n2"]))
    assert symbolic.formula(genome) == "(x / std_HW(x))*(x / std_HW(x))"
    assert symbolic.formula(genome, name_shared=True) == "n2 = x / std_HW(x)\ny = n2*n2"
    assert symbolic.latex(genome, name_shared=True) == "\n".join([
        r"\begin{aligned}",
        r"n_{2} &= \frac{x}{\sigma_{H,W}\left(x\right)} \\",
        r"y &= n_{2} \cdot n_{2}",
        r"\end{aligned}"])


def test_equation_shows_y_once():
    assert symbolic.equation(S0) == "y = x*sigmoid(v1*x) / std_GHW(x)"
    assert symbolic.equation(S0, tex=True).startswith(r"y = \frac{x \cdot")
    assert symbolic.equation(ADVERSARIAL).count("y = ") == 1
    assert symbolic.equation(ADVERSARIAL, tex=True).startswith(r"\begin{aligned}")


@pytest.mark.timeout(30)
def test_adversarial_genome_stays_linear():
    lines = symbolic.formula(ADVERSARIAL).splitlines()
    assert len(lines) == 64
    assert lines[0] == "n1 = x + x" and lines[-1] == "y = n63 + n63"
    tex = symbolic.latex(ADVERSARIAL).splitlines()
    assert tex[:2] == [r"\begin{aligned}", r"n_{1} &= x + x \\"] and tex[-1] == r"\end{aligned}"
    assert isinstance(symbolic.expression(ADVERSARIAL), sympy.Add)
    y = symbolic.numeric(ADVERSARIAL)(np.ones((1, 1, 1, 1)))
    assert y.item() == 2.0 ** 64


def test_unknown_function_is_named():
    with pytest.raises(KeyError, match="known: sigmoid"):
        symbolic.S.fn("softplus", sympy.Symbol("x"))


@pytest.mark.parametrize("genome", [B0, S0, CENTRED, UNARY, LAYER, ADVERSARIAL])
def test_numeric_matches_interpreter(genome):
    layer = GenomeLayer(genome, 4, groups=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ("v0", "v1"):
            if hasattr(layer, name):
                getattr(layer, name).add_(0.5 * torch.randn(4, generator=g))
    x = torch.randn(3, 4, 3, 3, generator=g)
    x = x + 0.2 * torch.sign(x)  # away from the guards at 0 of log, sqrt and division
    with torch.no_grad():
        want = layer(x).double().numpy()
    vectors = {k: getattr(layer, k).detach().double().numpy() for k in ("v0", "v1")
               if hasattr(layer, k)}
    f = symbolic.numeric(genome, eps=layer.eps, groups=layer.groups)
    got = f(x.double().numpy(), **vectors)
    np.testing.assert_allclose(np.broadcast_to(got, want.shape), want, rtol=1e-5, atol=1e-5)


# --- sequence (ntc) genomes: their statistics, erf and learnt scalars ----------------------

DERF_G = chain(("mul", ["alpha", "x"]), ("add", ["n1", "shift"]), ("erf", ["n2"]),
               ("rms_G", ["x"]), ("div", ["n3", "n4"]), ("mean_T", ["x"]), ("add", ["n5", "n6"]),
               ("std_NT", ["n6"]), ("mul", ["n7", "n8"]), ("var_C", ["x"]), ("add", ["n9", "n10"]),
               layout="ntc", scalars={"alpha": 0.5, "shift": 0.0})


def test_sequence_formula_and_latex():
    assert symbolic.formula(DERF_G) == ("(erf(alpha*x + shift) / rms_G(x) + mean_T(x))"
                                        "*std_NT(mean_T(x)) + var_C(x)")
    tex = symbolic.latex(DERF_G)
    for part in (r"\operatorname{erf}\left(\alpha \cdot x + \mathrm{shift}\right)",
                 r"\operatorname{rms}_{C/g}", r"\mu_{T}", r"\sigma_{N,T}", r"\sigma^2_{C}"):
        assert part in tex


@pytest.mark.parametrize("shape", [(3, 5, 4), (2, 3, 2, 4)])
def test_sequence_numeric_matches_interpreter(shape):
    layer = GenomeLayer(DERF_G, 4, groups=2)
    with torch.no_grad():
        layer.alpha.fill_(0.8)
        layer.shift.fill_(-0.3)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = layer(x).double().numpy()
    f = symbolic.numeric(DERF_G, eps=layer.eps, groups=layer.groups)
    got = f(x.double().numpy(), alpha=0.8, shift=-0.3)
    np.testing.assert_allclose(np.broadcast_to(got, want.shape), want, rtol=1e-5, atol=1e-5)
