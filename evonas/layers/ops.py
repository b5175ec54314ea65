"""The primitive ops and graph inputs: one declaration each, read by every part.

The interpreter (interpreter.py) calls `kernel`; the exporter (export.py) writes
`source(...)` and copies the `helpers` it names; the symbolic view (symbolic.py) calls
`symbol`; the functional fingerprint and the genome's validation read `arity`,
`commutative` and `kind`; the lowering pass (lowering.py) reads `sign` to drop guards
that cannot fire. Adding an op is adding one entry here; tests/test_ops_contract.py then
checks that its kernel, exported source and symbolic form agree. Layouts work the same
way: a layout is a row of LAYOUTS (how a per-channel vector meets x), and its aggregate
families rows of AXES, from which the mean/var/std/rms ops of each family are made.

Op names are what genome files store, so they never change meaning once released.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from evonas.layers import kernels as K

# Sign classes of a value, used to prove a denominator is bounded away from 0:
# "pos" >= some c > 0 for every input, "nonneg" >= 0, "any" unknown.
POS, NONNEG, ANY = "pos", "nonneg", "any"

ELEMENTWISE, AGGREGATE = "elementwise", "aggregate"



@dataclass(frozen=True)
class Layout:
    """The shape of the activations a layer works on.

    vector_shape: the view of a per-channel vector (and of the layer's affine) against x.
    """

    name: str
    doc: str
    vector_shape: tuple[int, ...]


LAYOUTS = {
    "nchw": Layout("nchw", "(N, C, H, W) feature maps", (1, -1, 1, 1)),
    "ntc": Layout("ntc", "(N, T, C) token sequences, or any (..., C) input", (-1,)),
}
DEFAULT_LAYOUT = "nchw"  # genomes and spaces that name no layout (all files before 0.x)


@dataclass(frozen=True)
class Axes:
    """What an aggregate family reduces over, and the kernels.py functions computing it.

    kernels: prefix of the functions f"{kernels}_{stat}"; dims: fixed dimensions passed
    to them; param: "groups" (group count) or "running" (batch: running estimates in eval
    mode); helpers: the kernels' callees an export copies; fused: prefix of the fused
    (a - mean) / std kernels lowering.py swaps in, if any; tokens: whether positions of a
    sequence see one another through the statistic (a causal model must not have them).
    """

    layout: str
    doc: str
    latex: str
    kernels: str
    dims: tuple[int, ...] | None = None
    param: str | None = None
    helpers: tuple[Callable, ...] = ()
    fused: str | None = None
    tokens: bool = False


# The aggregate families by name; the name is the op's suffix (mean_NHW, rms_C, ...).
AXES: dict[str, Axes] = {
    "NHW": Axes("nchw", "batch: over N, H, W for each channel (running estimate in eval mode)",
                "N,H,W", "batch", param="running", helpers=(K._update, K._per_channel),
                fused="batch"),
    "HW": Axes("nchw", "instance: over H, W for each sample and channel", "H,W", "sample",
               dims=(2, 3), fused="instance"),
    "GHW": Axes("nchw", "group: over C/g channels of a group and H, W for each sample",
                "C/g,H,W", "group", param="groups", helpers=(K._grouped, K._ungrouped),
                fused="group"),
    "CHW": Axes("nchw", "layer: over C, H, W for each sample", "C,H,W", "sample",
                dims=(1, 2, 3), fused="layer"),
    "C": Axes("ntc", "token: over the C features of each token (LayerNorm, RMSNorm)", "C",
              "sample", dims=(-1,), fused="token"),
    "G": Axes("ntc", "feature group: over C/g features of a group for each token", "C/g",
              "feature_group", param="groups",
              helpers=(K._feature_grouped, K._feature_ungrouped)),
    "NT": Axes("ntc", "batch: over N and T for each feature (BatchNorm, PowerNorm; running "
                      "estimate in eval mode)", "N,T", "seqbatch", param="running",
               helpers=(K._update, K._feature_rows, K._per_feature), fused="seqbatch",
               tokens=True),
    "T": Axes("ntc", "sequence: over the T tokens for each sample and feature", "T", "tokens",
              helpers=(K._token_rows, K._per_sample_feature), tokens=True),
}
AXES_LATEX = {name: axes.latex for name, axes in AXES.items()}

# Where each kernel parameter comes from in an exported module; the interpreter reads the
# same attributes of its own module.
PARAM_SOURCE = {
    "eps": "self.eps",
    "groups": "self.groups",
    "training": "self.training",
    "momentum": "self.momentum",
    "running": "{running}",
}


@dataclass(frozen=True)
class Op:
    """A primitive op of the search space.

    kernel: torch callable, called as kernel(*inputs, *[dims], *params).
    template: export source; {0}, {1} are the inputs. Derived from the kernel's name,
        dims and params when not given, so aggregates cannot say one thing and run another.
    symbol: (S, *inputs) -> sympy expression, S being symbolic.py's builder namespace.
    helpers: kernels.py functions an exported file must define for `template` to run.
    sign: sign class of the result from the sign classes of the inputs.
    running: (buffer prefix, initial value) of each running estimate the op keeps, in the
        order its kernel takes them (batch aggregates keep one, fused batch norm two).
    layout: the layout (LAYOUTS) whose axes an aggregate reduces; element-wise ops fit all.
    """

    name: str
    arity: int
    kernel: Callable
    symbol: Callable
    doc: str
    kind: str = ELEMENTWISE
    template: str = ""
    helpers: tuple[Callable, ...] = ()
    dims: tuple[int, ...] | None = None
    params: tuple[str, ...] = ()
    commutative: bool = False
    sign: Callable[[tuple[str, ...]], str] = field(default=lambda s: ANY)
    axes: str | None = None
    stat: str | None = None
    running: tuple[tuple[str, float], ...] = ()
    guard: str = "none needed"
    searchable: bool = True
    layout: str | None = None  # the one layout an aggregate belongs to; None: any

    def source(self, args: tuple[str, ...], running: str = "") -> str:
        """Export source computing this op from the variables named in args."""
        if self.template:
            return self.template.format(*args)
        parts = list(args)
        if self.dims is not None:
            parts.append(repr(list(self.dims)))
        parts += [PARAM_SOURCE[p].format(running=running) for p in self.params]
        return f"{self.kernel.__name__}({', '.join(parts)})"


@dataclass(frozen=True)
class Input:
    """A value every graph may read besides its op nodes."""

    name: str
    doc: str
    sign: str
    constant: float | None = None  # fixed value (0 or 1)
    init: float | None = None  # trainable per-channel vector's initial value

    @property
    def trainable(self) -> bool:
        return self.init is not None


INPUTS: dict[str, Input] = {
    i.name: i
    for i in (
        Input("x", "the layer's input, of the genome's layout: (N, C, H, W) or (..., C)", ANY),
        Input("zero", "the constant 0", NONNEG, constant=0.0),
        Input("one", "the constant 1", POS, constant=1.0),
        Input("v0", "trainable per-channel vector, initialised to 0", ANY, init=0.0),
        Input("v1", "trainable per-channel vector, initialised to 1", ANY, init=1.0),
    )
}


# --- sign rules -------------------------------------------------------------------------


def _add_sign(s: tuple[str, ...]) -> str:
    if all(c in (POS, NONNEG) for c in s):
        return POS if POS in s else NONNEG
    return ANY


def _mul_sign(s: tuple[str, ...]) -> str:
    if s == (POS, POS):
        return POS
    return NONNEG if all(c in (POS, NONNEG) for c in s) else ANY


def _max_sign(s: tuple[str, ...]) -> str:
    return POS if POS in s else NONNEG if NONNEG in s else ANY


def _keep_sign(s: tuple[str, ...]) -> str:
    return s[0]


def _nonneg_sign(s: tuple[str, ...]) -> str:
    return NONNEG


def _pos_sign(s: tuple[str, ...]) -> str:
    return POS


def _magnitude_sign(s: tuple[str, ...]) -> str:
    # abs and square keep a positive lower bound, otherwise give >= 0.
    return POS if s[0] == POS else NONNEG


def _div_sign(s: tuple[str, ...]) -> str:
    # A quotient of bounded positives is positive but may still approach 0.
    return NONNEG if all(c in (POS, NONNEG) for c in s) else ANY


# --- element-wise ops -------------------------------------------------------------------

_ELEMENTWISE = (
    Op("add", 2, torch.add, lambda S, a, b: S.add(a, b), "a + b",
       template="{0} + {1}", commutative=True, sign=_add_sign),
    Op("mul", 2, torch.mul, lambda S, a, b: S.mul(a, b), "a * b",
       template="{0} * {1}", commutative=True, sign=_mul_sign),
    Op("div", 2, K.safe_div, lambda S, a, b: S.div(a, b), "a / b",
       template="safe_div({0}, {1})", helpers=(K.safe_div,), sign=_div_sign,
       guard="denominator pushed to +-1e-6 when nearer 0; dropped where the denominator "
             "is provably >= sqrt(eps) (a std, an rms, a max with one of them, ...)"),
    Op("max", 2, torch.maximum, lambda S, a, b: S.max(a, b), "element-wise maximum",
       template="torch.maximum({0}, {1})", commutative=True, sign=_max_sign),
    Op("neg", 1, torch.neg, lambda S, a: S.neg(a), "-a", template="-{0}"),
    Op("sigmoid", 1, torch.sigmoid, lambda S, a: S.fn("sigmoid", a), "1 / (1 + exp(-a))",
       template="torch.sigmoid({0})", sign=_nonneg_sign),
    Op("tanh", 1, torch.tanh, lambda S, a: S.fn("tanh", a), "tanh(a)",
       template="torch.tanh({0})", sign=_keep_sign),
    Op("erf", 1, torch.erf, lambda S, a: S.fn("erf", a), "the error function erf(a)",
       template="torch.erf({0})", sign=_keep_sign),
    Op("exp", 1, K.safe_exp, lambda S, a: S.fn("exp", a), "e^a",
       template="safe_exp({0})", helpers=(K.safe_exp,), sign=_nonneg_sign,
       guard="argument clamped to <= 80 (float32 and bfloat16 overflow at 88.7)"),
    Op("abs", 1, torch.abs, lambda S, a: S.fn("abs", a), "|a|",
       template="torch.abs({0})", sign=_magnitude_sign),
    Op("square", 1, torch.square, lambda S, a: S.square(a), "a^2",
       template="torch.square({0})", sign=_magnitude_sign),
    Op("log", 1, K.signed_log, lambda S, a: S.fn("slog", a), "sign(a) * ln|a|",
       template="signed_log({0})", helpers=(K.signed_log,),
       guard="|a| clamped to >= 1e-6"),
    Op("sqrt", 1, K.signed_sqrt, lambda S, a: S.fn("ssqrt", a), "sign(a) * sqrt|a|",
       template="signed_sqrt({0})", helpers=(K.signed_sqrt,), sign=_keep_sign,
       guard="|a| clamped to >= 1e-6 (finite gradient at 0)"),
)

# Division by a value proven bounded away from 0 needs no guard; lowering.py swaps it in
# so exported EvoNorms run exactly the hand-written `x / d`.
DIV_UNGUARDED = Op("div_unguarded", 2, torch.div, lambda S, a, b: S.div(a, b),
                   "a / b where b >= sqrt(eps) is proven", template="{0} / {1}",
                   sign=_div_sign, searchable=False)


# --- aggregates -------------------------------------------------------------------------

_STATS = {
    # stat: (doc, sign, needs eps)
    "mean": ("mean", _keep_sign, False),
    "var": ("biased variance", _nonneg_sign, False),
    "std": ("sqrt(biased variance + eps)", _pos_sign, True),
    "rms": ("sqrt(mean of squares + eps), the root of the second raw moment", _pos_sign, True),
}
# Running estimate each batch statistic keeps, with torch.nn.BatchNorm2d's initial values.
_RUNNING = {"mean": ("running_mean", 0.0), "var": ("running_var", 1.0),
            "std": ("running_var", 1.0), "rms": ("running_sqmean", 1.0)}


def _aggregate(stat: str, name: str) -> Op:
    doc, sign, eps = _STATS[stat]
    axes = AXES[name]
    kernel = getattr(K, f"{axes.kernels}_{stat}")
    # var and std of a batch family share one callee computing and recording the variance
    shared = getattr(K, f"_{axes.kernels}_var", None) if stat in ("var", "std") else None
    params = (("running", "training", "momentum") if axes.param == "running" else
              ("groups",) if axes.param == "groups" else ()) + (("eps",) if eps else ())
    return Op(f"{stat}_{name}", 1, kernel, lambda S, a: S.aggregate(stat, name, a),
              f"{doc} {axes.doc}", kind=AGGREGATE, axes=name, stat=stat, sign=sign,
              helpers=axes.helpers + ((shared,) if shared else ()) + (kernel,),
              dims=axes.dims, params=params, layout=axes.layout,
              running=(_RUNNING[stat],) if axes.param == "running" else ())


_AGGREGATES = tuple(_aggregate(stat, axes) for axes in AXES for stat in _STATS)


# --- fused normalisation (internal) ------------------------------------------------------
# lowering.py replaces (a - mean_A(a)) / std_A(a), and that times a trainable vector plus
# another, by one of these: torch's fused norm kernels, same math, fewer passes.

def _normalized(S, axes, a):
    return S.div(S.add(a, S.neg(S.aggregate("mean", axes, a))), S.aggregate("std", axes, a))


def _normalize(name: str, affine: bool) -> Op:
    axes = AXES[name]
    base = getattr(K, f"{axes.fused}_normalize")
    kernel = getattr(K, f"{axes.fused}_normalize_affine") if affine else base
    batch = axes.param == "running"
    # The batch kernels fall back to the unfused statistics in float64 (batch_normalize).
    helpers = ((K._update, K._per_channel, K._batch_var, K.batch_mean, K.batch_std,
                K.batch_normalize) + ((K.batch_normalize_affine,) if affine else ())
               if batch else ())
    helpers += (kernel,)
    params = (("running", "training", "momentum") if batch else
              ("groups",) if axes.param == "groups" else ()) + ("eps",)
    if affine:
        symbol = lambda S, a, w, b: S.add(S.mul(_normalized(S, name, a), w), b)  # noqa: E731
    else:
        symbol = lambda S, a: _normalized(S, name, a)  # noqa: E731
    return Op(f"normalize{'_affine' if affine else ''}_{name}", 3 if affine else 1, kernel,
              symbol, f"(a - mean_{name}(a)) / std_{name}(a)" + (" * w + b" if affine else ""),
              kind=AGGREGATE, axes=name, helpers=tuple(dict.fromkeys(helpers)), params=params,
              running=(("running_mean", 0.0), ("running_var", 1.0)) if batch else (),
              searchable=False, layout=axes.layout)


NORMALIZE = {name: _normalize(name, False) for name, axes in AXES.items() if axes.fused}
NORMALIZE_AFFINE = {name: _normalize(name, True) for name, axes in AXES.items() if axes.fused}

OPS: dict[str, Op] = {op.name: op for op in _ELEMENTWISE + _AGGREGATES + (DIV_UNGUARDED,)
                      + tuple(NORMALIZE.values()) + tuple(NORMALIZE_AFFINE.values())}
SEARCHABLE_OPS: tuple[str, ...] = tuple(name for name, op in OPS.items() if op.searchable)
ELEMENTWISE_OPS: tuple[str, ...] = tuple(op.name for op in _ELEMENTWISE)
AGGREGATE_OPS: tuple[str, ...] = tuple(op.name for op in _AGGREGATES)


def _check_table() -> None:
    """Catch a malformed declaration when the table loads, not deep inside a search."""
    import inspect

    for op in OPS.values():
        assert op.arity in (1, 2) or (op.arity == 3 and not op.searchable), op.name
        assert op.name not in INPUTS, op.name
        assert not op.commutative or op.arity == 2, op.name
        src = op.source(tuple(f"a{i}" for i in range(op.arity)), running="self.r")
        for helper in op.helpers:
            assert inspect.isfunction(helper) and helper.__module__ == K.__name__, op.name
        if not op.template:
            assert op.kernel in op.helpers, op.name
        assert all(p in PARAM_SOURCE for p in op.params), op.name
        assert all(f"a{i}" in src for i in range(op.arity)), op.name
        assert bool(op.running) == ("running" in op.params), op.name
        assert (op.layout in LAYOUTS) == (op.kind == AGGREGATE), op.name


_check_table()


def op(name: str) -> Op:
    return OPS[name]


def describe() -> str:
    """One line per op and input, for `evonas ops` and the README."""
    lines = [f"{i.name:<12} input      {i.doc}" for i in INPUTS.values()]
    lines += [f"{o.name:<12} {o.kind:<10} {o.doc}" + (f" [{o.layout}]" if o.layout else "")
              for o in OPS.values() if o.searchable]
    return "\n".join(lines)


__all__ = ["Op", "Input", "Layout", "Axes", "LAYOUTS", "AXES", "DEFAULT_LAYOUT", "OPS",
           "INPUTS", "SEARCHABLE_OPS", "ELEMENTWISE_OPS",
           "AGGREGATE_OPS", "DIV_UNGUARDED", "NORMALIZE", "NORMALIZE_AFFINE", "POS", "NONNEG", "ANY", "op", "describe"]
