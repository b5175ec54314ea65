"""A genome's formula: readable text, LaTeX, a sympy expression, and a numpy evaluator.

Where it sits: each op in ops.py declares its `symbol` as a lambda over the builder `S`
defined here; this module walks a genome's nodes in order and builds the sympy
expression of the layer's y, the value before the per-channel affine weight * y + bias
that every layer ends with. Reports, the CLI and the exporter's docstrings print it, and
the op contract test evaluates it with `numeric` to show that each op's symbol means what
its kernel computes.

sympy serves display only, never deciding whether two candidates are equal. Nothing is
simplified and nothing is auto-evaluated, so `x*1`, `x + 0` and the argument order of
max stay as evolved. Every entry point is linear in the number of nodes: a DAG that
reuses values would expand to up to 2^depth terms as a tree, so a formula too large to
expand names its shared nodes instead (`n3 = ...` lines, then `y = ...`).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import sympy as sp
from sympy.printing.latex import LatexPrinter
from sympy.printing.str import StrPrinter

from evonas.layers.genome import Genome
from evonas.layers.ops import AGGREGATE_OPS, AXES_LATEX, INPUTS, LAYOUTS, OPS

# Ops and leaves an expanded formula may hold; beyond it shared nodes are named. A
# readable 10-node layer stays far below; a value reused down a chain passes it quickly.
MAX_TREE = 200


# --- sympy functions for the ops sympy lacks or would reorder ---------------------------


class _Named(sp.Function):
    """A function shown by its name, its arguments kept in order and never evaluated."""

    text = ""  # name in readable formulas
    tex = ""  # LaTeX of the name

    def _sympystr(self, printer) -> str:
        return f"{self.text}({', '.join(printer._print(a) for a in self.args)})"

    def _latex(self, printer) -> str:
        args = ", ".join(printer._print(a) for a in self.args)
        return rf"{self.tex}\left({args}\right)"


class maximum(_Named):
    """Element-wise max(a, b). sympy's Max sorts its arguments even unevaluated."""

    nargs = 2
    text, tex = "max", r"\max"


class sigmoid(_Named):
    nargs = 1
    text, tex = "sigmoid", r"\operatorname{sigmoid}"


class slog(_Named):
    """sign(a) * ln|a|, the log op."""

    nargs = 1
    text, tex = "slog", r"\operatorname{slog}"


class ssqrt(_Named):
    """sign(a) * sqrt|a|, the sqrt op."""

    nargs = 1
    text, tex = "ssqrt", r"\operatorname{ssqrt}"


class Aggregate(_Named):
    """A reduction of its argument over `axes`, broadcast back; named like its op."""

    nargs = 1
    stat = axes = ""


_STAT_LATEX = {"mean": r"\mu", "var": r"\sigma^2", "std": r"\sigma", "rms": r"\operatorname{rms}"}


def _aggregate_class(name: str) -> type[Aggregate]:
    op = OPS[name]
    tex = f"{_STAT_LATEX[op.stat]}_{{{AXES_LATEX[op.axes]}}}"
    return type(name, (Aggregate,), {"stat": op.stat, "axes": op.axes, "text": name, "tex": tex})


AGGREGATES: dict[str, type[Aggregate]] = {name: _aggregate_class(name) for name in AGGREGATE_OPS}
FUNCTIONS: dict[str, type[sp.Function]] = {
    "sigmoid": sigmoid, "tanh": sp.tanh, "erf": sp.erf, "exp": sp.exp, "abs": sp.Abs,
    "slog": slog, "ssqrt": ssqrt,
}


class _Builder:
    """The `S` that ops' symbol lambdas receive: one method per kind of op, each building
    its sympy node unevaluated, so the expression is the evolved one."""

    @staticmethod
    def add(a: sp.Expr, b: sp.Expr) -> sp.Expr:
        return sp.Add(a, b, evaluate=False)

    @staticmethod
    def mul(a: sp.Expr, b: sp.Expr) -> sp.Expr:
        return sp.Mul(a, b, evaluate=False)

    @staticmethod
    def div(a: sp.Expr, b: sp.Expr) -> sp.Expr:
        return sp.Mul(a, sp.Pow(b, -1, evaluate=False), evaluate=False)

    @staticmethod
    def max(a: sp.Expr, b: sp.Expr) -> sp.Expr:
        return maximum(a, b)

    @staticmethod
    def neg(a: sp.Expr) -> sp.Expr:
        return sp.Mul(sp.S.NegativeOne, a, evaluate=False)

    @staticmethod
    def square(a: sp.Expr) -> sp.Expr:
        return sp.Pow(a, 2, evaluate=False)

    @staticmethod
    def fn(name: str, a: sp.Expr) -> sp.Expr:
        if name not in FUNCTIONS:
            raise KeyError(f"no symbolic function {name!r}; known: {', '.join(FUNCTIONS)}")
        return FUNCTIONS[name](a, evaluate=False)

    @staticmethod
    def aggregate(stat: str, axes: str, a: sp.Expr) -> sp.Expr:
        return AGGREGATES[f"{stat}_{axes}"](a)


S = _Builder()


def _input_symbol(name: str) -> sp.Expr:
    constant = INPUTS[name].constant if name in INPUTS else None  # scalars are symbols
    if constant is not None:
        return sp.Integer(int(constant)) if constant == int(constant) else sp.Float(constant)
    return sp.Symbol(name, real=True)


# --- building -----------------------------------------------------------------------------


def _definitions(genome: Genome, named: frozenset[str] = frozenset()) -> dict[str, sp.Expr]:
    """Each node's expression; nodes in `named` appear in later ones as their symbol."""
    value = {name: _input_symbol(name) for name in [*INPUTS, *genome.scalars]}
    defs = {}
    for n in genome.nodes:
        defs[n.id] = OPS[n.op].symbol(S, *(value[i] for i in n.inputs))
        value[n.id] = sp.Symbol(n.id) if n.id in named else defs[n.id]
    return defs


def _tree_size(genome: Genome) -> int:
    """Ops and leaves of the output expanded as a tree, counted without expanding it."""
    size = dict.fromkeys([*INPUTS, *genome.scalars], 1)
    for n in genome.nodes:
        size[n.id] = 1 + sum(size[i] for i in n.inputs)
    return size[genome.output]


def _shared(genome: Genome) -> frozenset[str]:
    uses: dict[str, int] = {}
    for n in genome.nodes:
        for i in n.inputs:
            uses[i] = uses.get(i, 0) + 1
    return frozenset(n.id for n in genome.nodes if uses.get(n.id, 0) > 1)


def _lines(genome: Genome, name_shared: bool) -> list[tuple[str, sp.Expr]]:
    """(name, expression) lines ending with ("y", ...): one line when it expands."""
    if not name_shared and _tree_size(genome) <= MAX_TREE:
        return [("y", expression(genome))]
    named = _shared(genome)
    defs = _definitions(genome, named)
    lines = [(n.id, defs[n.id]) for n in genome.nodes if n.id in named]
    return lines + [("y", defs[genome.output])]


def expression(genome: Genome) -> sp.Expr:
    """The sympy expression of the layer's y (before the final affine weight * y + bias).

    Built unevaluated, in time linear in the nodes: a reused node is one shared sympy
    object. Printing it with sympy expands sharing as a tree, which can be exponential;
    `formula` and `latex` bound that.
    """
    return _definitions(genome)[genome.output]


# --- printing -------------------------------------------------------------------------------

# Binding strength of each printed form, weakest first.
ADD, MUL, NEG, POW, ATOM = range(5)


def _shape(e: sp.Basic) -> tuple[str, tuple]:
    """The op an expression node was built by, with its operands (see _Builder)."""
    if isinstance(e, sp.Add):
        a, b = e.args
        if _shape(b)[0] == "neg":
            return "sub", (a, b.args[1])
        return "add", (a, b)
    if isinstance(e, sp.Mul):
        a, b = e.args
        if a is sp.S.NegativeOne:
            return "neg", (b,)
        if isinstance(b, sp.Pow) and b.exp == -1:
            return "div", (a, b.base)
        return "mul", (a, b)
    if isinstance(e, sp.Pow):
        return "square", (e.base,)
    return "atom", ()


class _Layout:
    """Operator placement and parenthesisation shared by the text and LaTeX printers.

    Each binary form states the binding its left and right operands need; operands that
    bind more weakly, or whose form is in the `wrap` set, are parenthesised. Right-nested
    sums and products keep their parentheses, so the printed tree is the evolved one.
    """

    prec = {"add": ADD, "sub": ADD, "mul": MUL, "div": MUL, "neg": NEG, "square": POW,
            "atom": ATOM}
    # form: (left needs, left wraps, right needs, right wraps)
    rules = {"add": (ADD, (), MUL, ()), "sub": (ADD, (), MUL, ("neg",)),
             "mul": (MUL, ("div",), POW, ()), "div": (MUL, ("div",), POW, ())}

    def _operand(self, e: sp.Basic, needs: int, wraps: tuple[str, ...] = ()) -> str:
        kind = _shape(e)[0]
        text = self._print(e)
        return self._wrap(text) if self.prec[kind] < needs or kind in wraps else text

    def _binary(self, kind: str, a: sp.Basic, b: sp.Basic) -> str:
        left_needs, left_wraps, right_needs, right_wraps = self.rules[kind]
        return self.infix[kind].format(self._operand(a, left_needs, left_wraps),
                                       self._operand(b, right_needs, right_wraps))

    def _print_Add(self, e: sp.Add) -> str:
        kind, ops = _shape(e)
        return self._binary(kind, *ops)

    def _print_Mul(self, e: sp.Mul) -> str:
        kind, ops = _shape(e)
        if kind == "neg":
            return "-" + self._operand(ops[0], POW)
        return self._binary(kind, *ops)

    def _print_Pow(self, e: sp.Pow) -> str:
        return self.infix["square"].format(self._operand(e.base, ATOM))


class _Text(_Layout, StrPrinter):
    """Readable, Python-like: `x / max(std_NHW(x), v1*x + std_HW(x))`."""

    infix = {"add": "{} + {}", "sub": "{} - {}", "mul": "{}*{}", "div": "{} / {}",
             "square": "{}**2"}

    def _wrap(self, text: str) -> str:
        return f"({text})"

    def _print_Abs(self, e: sp.Abs) -> str:
        return f"abs({self._print(e.args[0])})"


class _Latex(_Layout, LatexPrinter):
    r"""LaTeX: `\frac{x}{\max\left(\sigma_{N,H,W}\left(x\right), ...\right)}`."""

    # A fraction needs no parentheses beside + - and \cdot, only as the base of a power.
    prec = {**_Layout.prec, "div": POW}
    rules = {**_Layout.rules, "mul": (MUL, (), POW, ()), "div": (ADD, (), ADD, ())}
    infix = {"add": "{} + {}", "sub": "{} - {}", "mul": r"{} \cdot {}",
             "div": r"\frac{{{}}}{{{}}}", "square": "{}^{{2}}"}

    def _wrap(self, text: str) -> str:
        return rf"\left({text}\right)"

    def _print_Abs(self, e: sp.Abs) -> str:
        return rf"\left|{self._print(e.args[0])}\right|"

    def _print_exp(self, e: sp.exp) -> str:
        return rf"\exp\left({self._print(e.args[0])}\right)"

    def _print_tanh(self, e: sp.tanh) -> str:
        return rf"\tanh\left({self._print(e.args[0])}\right)"

    def _print_Symbol(self, e: sp.Symbol, style: str = "plain") -> str:
        # a scalar named like "shift" reads as one word; alpha, v1 and n3 keep sympy's form
        shown = super()._print_Symbol(e, style)
        return rf"\mathrm{{{shown}}}" if shown == e.name and len(e.name) > 1 else shown

    def _print_erf(self, e: sp.erf) -> str:
        return rf"\operatorname{{erf}}\left({self._print(e.args[0])}\right)"


def formula(genome: Genome, *, name_shared: bool = False) -> str:
    """Readable formula of the layer's y, before the final affine weight * y + bias.

    `x / max(std_NHW(x), v1*x + std_HW(x))` for EvoNorm-B0: ops print in the order and
    shape they were evolved, aggregates by their op names. When the expanded formula
    would exceed MAX_TREE ops and leaves (or with name_shared=True), nodes used more than
    once are named on lines of their own, `n3 = ...` up to `y = ...`.
    """
    printer = _Text()
    lines = _lines(genome, name_shared)
    if len(lines) == 1:
        return printer.doprint(lines[0][1])
    return "\n".join(f"{name} = {printer.doprint(e)}" for name, e in lines)


def latex(genome: Genome, *, name_shared: bool = False) -> str:
    r"""LaTeX of the layer's y, before the final affine weight * y + bias.

    Aggregates show their statistic and axes (\sigma_{N,H,W}, \mu_{H,W}, \sigma^2_{C/g,H,W},
    \operatorname{rms}_{C,H,W}); named shared nodes make an aligned block as in `formula`.
    """
    printer = _Latex()
    lines = _lines(genome, name_shared)
    if len(lines) == 1:
        return printer.doprint(lines[0][1])
    rows = [f"{printer.doprint(sp.Symbol(name))} &= {printer.doprint(e)}" for name, e in lines]
    rows = [row + r" \\" for row in rows[:-1]] + rows[-1:]  # LaTeX's line break
    return "\n".join([r"\begin{aligned}", *rows, r"\end{aligned}"])


def equation(genome: Genome, *, tex: bool = False) -> str:
    """`y = <formula>`, or the block of named lines that ends with `y = ...`, as text or
    (tex=True) LaTeX: what to show where a formula may be too large to expand."""
    shown = latex(genome) if tex else formula(genome)
    return shown if "\n" in shown else f"y = {shown}"  # named lines end with y's own


# --- numeric evaluation -----------------------------------------------------------------------

# The axes each family reduces, for a value of rank r (written apart from kernels.py on
# purpose: the contract test compares the two readings).
_AXES_DIMS: dict[str, Callable[[int], tuple[int, ...]]] = {
    "NHW": lambda r: (0, 2, 3), "HW": lambda r: (2, 3), "CHW": lambda r: (1, 2, 3),
    "C": lambda r: (r - 1,), "NT": lambda r: tuple(range(r - 1)),
    "T": lambda r: tuple(range(1, r - 1)),
}
# Group families: the axis whose channels are grouped, and the axes reduced with them.
_GROUPED = {"GHW": 1, "G": -1}


def _np_stat(stat: str, a: np.ndarray, dims: tuple[int, ...] | int, eps: float) -> np.ndarray:
    if stat == "mean":
        return a.mean(axis=dims, keepdims=True)
    if stat == "var":
        return a.var(axis=dims, keepdims=True)
    if stat == "std":
        return np.sqrt(a.var(axis=dims, keepdims=True) + eps)
    return np.sqrt(np.square(a).mean(axis=dims, keepdims=True) + eps)


def _np_aggregate(f: Aggregate, a: np.ndarray, eps: float, groups: int) -> np.ndarray:
    if f.axes not in _GROUPED:
        return _np_stat(f.stat, a, _AXES_DIMS[f.axes](a.ndim), eps)
    if f.axes == "G":  # per token: the last axis in groups of C/g features
        c = a.shape[-1]
        g = groups if c > 1 else 1
        stat = _np_stat(f.stat, a.reshape(*a.shape[:-1], g, c // g), -1, eps)
        return np.repeat(stat, c // g, axis=-1).reshape(a.shape)
    n, c = a.shape[:2]
    g = groups if c > 1 else 1  # as kernels._grouped: a one-channel value is one group
    stat = _np_stat(f.stat, a.reshape(n, g, -1), -1, eps)
    return np.repeat(stat, c // g, axis=1).reshape(n, c, 1, 1)


_NUMPY: dict[type, Callable[..., np.ndarray]] = {
    maximum: np.maximum,
    sigmoid: lambda a: 1.0 / (1.0 + np.exp(-a)),
    sp.tanh: np.tanh,
    sp.erf: np.vectorize(math.erf, otypes=[np.float64]),
    sp.exp: np.exp,
    sp.Abs: np.abs,
    slog: lambda a: np.sign(a) * np.log(np.abs(a)),
    ssqrt: lambda a: np.sign(a) * np.sqrt(np.abs(a)),
}


def _evaluate(e: sp.Basic, env: dict, eps: float, groups: int, memo: dict) -> np.ndarray:
    # Keyed by identity: a reused node is one object, so each is evaluated once.
    if id(e) in memo:
        return memo[id(e)]
    if e.is_Symbol:
        value = env[e.name]
    elif e.is_Number:
        value = np.float64(e)
    else:
        args = [_evaluate(a, env, eps, groups, memo) for a in e.args]
        if isinstance(e, sp.Add):
            value = args[0] + args[1]
        elif isinstance(e, sp.Mul):
            value = args[0] * args[1]
        elif isinstance(e, sp.Pow):
            value = args[0] ** args[1]
        elif isinstance(e, Aggregate):
            value = _np_aggregate(e, args[0], eps, groups)
        else:
            value = _NUMPY[e.func](*args)
    memo[id(e)] = value
    return value


def numeric(genome: Genome, *, eps: float = 1e-5, groups: int = 1) -> Callable[..., np.ndarray]:
    """f(x, v0=None, v1=None, **scalars) -> y: the sympy expression evaluated in float64
    numpy.

    x has the genome's layout, (N, C, H, W) or (..., C); v0 and v1 are per-channel vectors
    and the scalars numbers (their initial values when omitted). Batch aggregates use the
    batch's statistics (training mode); groups is the layer's resolved group count. The
    numeric guards of ops.py (clamped denominators and logs) are implementation, not part
    of the formula, and are not applied.
    """
    expr = expression(genome)
    shape = LAYOUTS[genome.layout].vector_shape
    inits = genome.scalars

    def f(x: np.ndarray, v0: np.ndarray | None = None, v1: np.ndarray | None = None,
          **scalars: float) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        c = x.shape[shape.index(-1) - len(shape)]  # the channel axis the vectors align with
        env = {"x": x, **{k: np.float64(scalars.get(k, v)) for k, v in inits.items()}}
        for name, given in (("v0", v0), ("v1", v1)):
            vec = np.full(c, INPUTS[name].init) if given is None else np.asarray(given, np.float64)
            env[name] = vec.reshape(shape)
        with np.errstate(all="ignore"):
            return _evaluate(expr, env, eps, groups, {})

    return f


__all__ = ["S", "MAX_TREE", "expression", "formula", "latex", "equation", "numeric", "maximum",
           "sigmoid", "slog", "ssqrt", "Aggregate", "AGGREGATES", "FUNCTIONS"]
