"""Lowering: the genome's nodes turned into the steps a layer runs.

The interpreter and the exporter both run this one pass, so what is interpreted is what
is exported. Two rewrites, each exact:

- Guard elision. A sign analysis (each op's `sign` rule in ops.py) proves some
  denominators bounded away from zero, e.g. a std or a max with a std; their divisions run
  unguarded, as the hand-written EvoNorms do.
- Norm fusion. (a - mean_A(a)) / std_A(a), optionally times a trainable vector plus
  another, runs as torch's fused batch_norm / group_norm (ops.NORMALIZE*): one kernel
  where the graph has five to seven, which is what makes BN-, GN-, IN- and LN-style
  candidates as fast as torch's own modules. The fused step owns the running estimates
  of the mean and std nodes it replaces, under their names, so state_dicts do not change.
  When such a normalisation is the layer's last step, `fold_affine` also folds in the
  closing weight * y + bias every layer ends with.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from evonas.layers.genome import Genome, Node
from evonas.layers.ops import (ANY, DIV_UNGUARDED, INPUTS, NORMALIZE, NORMALIZE_AFFINE, OPS, POS,
                               Op)


# The names under which a folded step reads the layer's closing affine (fold_affine).
AFFINE = ("weight", "bias")


@dataclass(frozen=True)
class Step:
    node: str  # genome node id, also the variable name of its value in exported code
    op: Op
    inputs: tuple[str, ...]
    # (buffer name, initial value) of each running estimate the step reads and updates,
    # in the order op.kernel takes them.
    buffers: tuple[tuple[str, float], ...] = ()


def signs(genome: Genome) -> dict[str, str]:
    """Sign class (ops.POS / NONNEG / ANY) of every input and node of the genome."""
    sign = {name: inp.sign for name, inp in INPUTS.items()}
    sign.update(dict.fromkeys(genome.scalars, ANY))  # learnt: any sign once trained
    for n in genome.nodes:
        sign[n.id] = OPS[n.op].sign(tuple(sign[i] for i in n.inputs))
    return sign


def lower(genome: Genome) -> list[Step]:
    sign = signs(genome)
    fused = _fusions(genome)
    skipped = {node for step in fused.values() for node in step[1]}
    steps = []
    for n in genome.nodes:
        if n.id in fused:
            steps.append(fused[n.id][0])
        elif n.id not in skipped:
            op = OPS[n.op]
            if op.name == "div" and sign[n.inputs[1]] == POS:
                op = DIV_UNGUARDED
            buffers = tuple((f"{prefix}_{n.id}", init) for prefix, init in op.running)
            steps.append(Step(n.id, op, n.inputs, buffers))
    return steps


def fold_affine(steps: list[Step]) -> list[Step] | None:
    """The steps with the layer's closing affine weight * y + bias folded into its last
    step, when that is a fused normalisation without an affine of its own (LayerNorm,
    BatchNorm): torch's norm kernels then apply weight and bias in the same pass, as
    nn.LayerNorm does. None when there is nothing to fold. The folded step reads the
    layer's weight and bias under those names (AFFINE)."""
    last = steps[-1]
    if last.op.axes is None or NORMALIZE.get(last.op.axes) is not last.op:
        return None
    folded = Step(last.node, NORMALIZE_AFFINE[last.op.axes], (*last.inputs, *AFFINE), last.buffers)
    return steps[:-1] + [folded]


def _fusions(genome: Genome) -> dict[str, tuple[Step, set[str]]]:
    """Fused steps by the node whose value they compute, with the nodes they absorb."""
    uses = Counter(i for n in genome.nodes for i in n.inputs)
    uses[genome.output] += 1
    by_id = genome.by_id
    full = genome.full_shape()
    users = {}
    for n in genome.nodes:
        for i in n.inputs:
            users.setdefault(i, n)
    result = {}
    for n in genome.nodes:
        match = _normalization(n, by_id, uses)
        # torch's fused norms need every axis they normalise over (batch_norm refuses N = 1)
        if match is None or not full[match[0]] or match[1] not in NORMALIZE:
            continue
        a, axes, mean, std, absorbed = match
        buffers = (((f"running_mean_{mean}", 0.0), (f"running_var_{std}", 1.0))
                   if NORMALIZE[axes].running else ())
        step, top = Step(n.id, NORMALIZE[axes], (a,), buffers), n
        affine = _affine(n, users, by_id, uses)
        if affine is not None:
            top, w, b, extra = affine
            step = Step(top.id, NORMALIZE_AFFINE[axes], (a, w, b), buffers)
            absorbed |= extra
        result[top.id] = (step, absorbed)
    return result


def _single_use(node_id: str, uses: Counter) -> bool:
    return uses[node_id] == 1


def _normalization(n: Node, by_id: dict[str, Node], uses: Counter):
    """Match n = (a - mean_A(a)) / std_A(a), the subtraction written add(a, neg(mean)) in
    either order, each inner node used only here. Returns (a, A, mean id, std id, absorbed)."""
    if n.op != "div":
        return None
    num, den = (by_id.get(i) for i in n.inputs)
    if num is None or den is None or num.op != "add" or OPS[den.op].stat != "std":
        return None
    axes, a = OPS[den.op].axes, den.inputs[0]
    for first, second in (num.inputs, num.inputs[::-1]):
        neg = by_id.get(second)
        if first != a or neg is None or neg.op != "neg":
            continue
        mean = by_id.get(neg.inputs[0])
        if mean is None or mean.op != f"mean_{axes}" or mean.inputs[0] != a:
            continue
        inner = {num.id, den.id, neg.id, mean.id}
        if all(_single_use(i, uses) for i in inner):
            return a, axes, mean.id, den.id, inner
    return None


def _affine(n: Node, users: dict[str, Node], by_id: dict[str, Node], uses: Counter):
    """Match users of n computing n * w + b with w, b trainable vectors, each used once here.
    Returns (top node, w, b, absorbed ids)."""
    if not _single_use(n.id, uses):
        return None
    mul = users.get(n.id)
    if mul is None or mul.op != "mul" or not _single_use(mul.id, uses):
        return None
    w = mul.inputs[1] if mul.inputs[0] == n.id else mul.inputs[0]
    add = users.get(mul.id)
    if add is None or add.op != "add" or w not in INPUTS or not INPUTS[w].trainable:
        return None
    b = add.inputs[1] if add.inputs[0] == mul.id else add.inputs[0]
    if b not in INPUTS or not INPUTS[b].trainable:
        return None
    return add, w, b, {n.id, mul.id}
