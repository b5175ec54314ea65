"""The layer genome: a DAG of primitive ops from the input x to the layer's output y.

A layer computes y from x with the ops of ops.py and ends in the per-channel affine
gamma * y + beta, which every layer has and the genome therefore does not store. x has the
genome's layout (ops.LAYOUTS): (N, C, H, W) feature maps, the default, or (N, T, C)
sequences and any (..., C) input, whose channels (features) are the last dimension; the
aggregates a genome may use are those of its layout.

A Genome is immutable and always valid: the constructor prunes dead nodes, renumbers the
rest n1..nk in topological order (so equal graphs get equal node names, and so equal
state_dict keys), and raises GenomeError naming the defect otherwise. Its networkx view
(`graph`) is what the search, the fingerprint and the report's pictures read.

File format (JSON, nothing in it is ever executed):

    {"format": "evonas.genome/1",
     "name": "evonorm_s0",                       # optional
     "nodes": [{"id": "n1", "op": "mul", "inputs": ["v1", "x"]}, ...],
     "output": "n5"}

Node ids are any names other than the inputs' (x, zero, one, v0, v1); inputs name earlier
or later nodes (order in the file does not matter) or graph inputs. Two optional keys,
written only when they differ from the default so older files read and hash unchanged:
"layout" ("nchw" when absent, or "ntc") and "scalars", the learnt scalars the graph reads
with their initial values ({"alpha": 0.5} for DyT's tanh(alpha * x)).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import networkx as nx
import torch

from evonas.errors import GenomeError
from evonas.layers import kernels
from evonas.layers.ops import AGGREGATE, DEFAULT_LAYOUT, INPUTS, LAYOUTS, OPS

FORMAT = "evonas.genome/1"
# Any genome, zoo or file, whatever its space: bounds the cost of every later step.
MAX_NODES = 64
MAX_FILE_BYTES = 1 << 20
_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
# A scalar becomes a parameter and a variable of the exported forward: a short lower-case
# identifier that no node (n1..nk after renumbering), input, layer attribute or copied
# kernel is named.
_SCALAR_NAME = re.compile(r"[a-z][a-z0-9_]{0,15}")
_RESERVED = {"x", "y", "weight", "bias", "eps", "momentum", "groups", "num_features",
             "apply_act", "genome", "normalized_shape", "elementwise_affine", "torch", "nn",
             "self", "training", "float"}


@dataclass(frozen=True)
class Node:
    id: str
    op: str
    inputs: tuple[str, ...]


class Genome:
    """A valid, pruned, canonically numbered layer graph."""

    def __init__(self, nodes: Iterable[Node | tuple], output: str, name: str | None = None,
                 layout: str = DEFAULT_LAYOUT, scalars: Mapping[str, float] | None = None):
        raw = [n if isinstance(n, Node) else Node(n[0], n[1], tuple(n[2])) for n in nodes]
        scalars = check_scalars(scalars or {})
        if not isinstance(layout, str) or layout not in LAYOUTS:
            raise GenomeError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
        self.layout = layout
        self.nodes, self.output = _canonical(raw, output, layout, scalars)
        used = {i for n in self.nodes for i in n.inputs}
        # only the scalars the pruned graph reads: a mutation passes all of its space's
        self._scalars = tuple((k, v) for k, v in sorted(scalars.items()) if k in used)
        self.name = name

    @property
    def scalars(self) -> dict[str, float]:
        """The learnt scalars the graph reads, by name, with their initial values."""
        return dict(self._scalars)

    # --- construction helpers ---------------------------------------------------------

    @classmethod
    def from_dict(cls, data: object, source: str = "genome") -> "Genome":
        if not isinstance(data, dict):
            raise GenomeError(f"{source}: expected a JSON object with 'nodes' and 'output'")
        unknown = set(data) - {"format", "name", "nodes", "output", "meta", "layout", "scalars"}
        if unknown:
            raise GenomeError(f"{source}: unknown key(s) {sorted(unknown)}; "
                              "allowed: format, name, nodes, output, meta, layout, scalars")
        if data.get("format", FORMAT) != FORMAT:
            raise GenomeError(f"{source}: format {data.get('format')!r} is not supported; "
                              f"this evonas reads {FORMAT!r}")
        nodes, output = data.get("nodes"), data.get("output")
        if not isinstance(nodes, list) or not nodes:
            raise GenomeError(f"{source}: 'nodes' must be a non-empty list of "
                              '{"id", "op", "inputs"} objects')
        if len(nodes) > MAX_NODES:
            raise GenomeError(f"{source}: {len(nodes)} nodes, more than the limit of {MAX_NODES}")
        if not isinstance(output, str):
            raise GenomeError(f"{source}: 'output' must be the id of a node")
        name = data.get("name")
        if name is not None and not isinstance(name, str):
            raise GenomeError(f"{source}: 'name' must be a string")
        parsed = [_parse_node(i, n, source) for i, n in enumerate(nodes)]
        try:
            return cls(parsed, output, name=name, layout=data.get("layout", DEFAULT_LAYOUT),
                       scalars=check_scalars(data.get("scalars", {})))
        except GenomeError as err:
            raise GenomeError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, text: str, source: str = "genome") -> "Genome":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise GenomeError(f"{source}: not valid JSON ({err.msg} at line {err.lineno}); "
                              "a genome file is JSON as written by `evonas export --genome`"
                              ) from None
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: str | Path) -> "Genome":
        path = Path(path)
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                raise GenomeError(f"{path}: larger than 1 MiB, not a genome file")
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise GenomeError(f"{path}: cannot read genome file ({err.__class__.__name__}); "
                              "give the path of a genome JSON file") from None
        return cls.from_json(text, str(path))

    def to_dict(self) -> dict:
        d: dict = {"format": FORMAT}
        if self.name:
            d["name"] = self.name
        if self.layout != DEFAULT_LAYOUT:
            d["layout"] = self.layout
        if self.scalars:
            d["scalars"] = dict(self.scalars)
        d["nodes"] = [{"id": n.id, "op": n.op, "inputs": list(n.inputs)} for n in self.nodes]
        d["output"] = self.output
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    def renamed(self, name: str | None) -> "Genome":
        return Genome(self.nodes, self.output, name=name, layout=self.layout,
                      scalars=self.scalars)

    # --- views ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self):
        return iter(self.nodes)

    def _key(self) -> tuple:
        return self.nodes, self.output, self.layout, self._scalars

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Genome) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        body = ", ".join(f"{n.id}={n.op}({','.join(n.inputs)})" for n in self.nodes)
        extra = "".join([f"; layout={self.layout}" if self.layout != DEFAULT_LAYOUT else "",
                         f"; scalars={dict(self.scalars)}" if self.scalars else ""])
        return f"Genome({body}; out={self.output}{extra})"

    @cached_property
    def by_id(self) -> dict[str, Node]:
        return {n.id: n for n in self.nodes}

    @cached_property
    def ops_used(self) -> frozenset[str]:
        return frozenset(n.op for n in self.nodes)

    @cached_property
    def inputs_used(self) -> frozenset[str]:
        scalars = self.scalars
        return frozenset(i for n in self.nodes for i in n.inputs if i in INPUTS or i in scalars)

    @cached_property
    def graph(self) -> nx.MultiDiGraph:
        """networkx view: nodes carry `op` (inputs: `input`), edges carry `arg` position.

        A MultiDiGraph, because add(a, a) has two edges from a to the same node.
        """
        g = nx.MultiDiGraph()
        for name in sorted(self.inputs_used):
            g.add_node(name, op="input", input=True)
        for n in self.nodes:
            g.add_node(n.id, op=n.op, input=False)
            for pos, src in enumerate(n.inputs):
                g.add_edge(src, n.id, arg=pos)
        g.graph["output"] = self.output
        return g

    @cached_property
    def structural_hash(self) -> str:
        """Hash of the graph's structure, independent of node names and of the argument
        order of commutative ops. Computed bottom-up over the DAG (exact, no
        Weisfeiler-Lehman approximation, and stable across networkx versions). A scalar
        counts with its initial value; a layout other than nchw wraps the whole hash."""
        h: dict[str, str] = {name: "in:" + name for name in INPUTS}
        h.update({name: f"in:{name}={init!r}" for name, init in self.scalars.items()})
        for n in self.nodes:
            args = [h[i] for i in n.inputs]
            if OPS[n.op].commutative:
                args.sort()
            h[n.id] = hashlib.sha256(f"{n.op}({','.join(args)})".encode()).hexdigest()
        top = h[self.output]
        if self.layout != DEFAULT_LAYOUT:
            top = hashlib.sha256(f"{self.layout}:{top}".encode()).hexdigest()
        return top[:16]

    def depends_on_x(self) -> dict[str, bool]:
        return _x_dependence(self.nodes, self.scalars)

    def full_shape(self) -> dict[str, bool]:
        return _full_shape(self.nodes, self.scalars)


def _parse_node(index: int, n: object, source: str) -> Node:
    where = f"{source}: nodes[{index}]"
    if not isinstance(n, dict) or set(n) - {"id", "op", "inputs"} or not {"id", "op", "inputs"} <= set(n):
        raise GenomeError(f'{where}: expected {{"id": str, "op": str, "inputs": [str, ...]}}')
    if not isinstance(n["id"], str) or not isinstance(n["op"], str):
        raise GenomeError(f"{where}: 'id' and 'op' must be strings")
    ins = n["inputs"]
    if not isinstance(ins, list) or not all(isinstance(i, str) for i in ins):
        raise GenomeError(f"{where}: 'inputs' must be a list of node or input names")
    return Node(n["id"], n["op"], tuple(ins))


def _x_dependence(nodes: Sequence[Node], scalars: Iterable[str] = ()) -> dict[str, bool]:
    dep = {name: name == "x" for name in [*INPUTS, *scalars]}
    for n in nodes:  # nodes are in topological order
        dep[n.id] = any(dep[i] for i in n.inputs)
    return dep


def _full_shape(nodes: Sequence[Node], scalars: Iterable[str] = ()) -> dict[str, bool]:
    """Whether each value has x's full shape: aggregates reduce axes, and an element-wise
    op is full when any input is (broadcasting)."""
    full = {name: name == "x" for name in [*INPUTS, *scalars]}
    for n in nodes:  # nodes are in topological order
        full[n.id] = OPS[n.op].kind != AGGREGATE and any(full[i] for i in n.inputs)
    return full


def check_scalars(scalars: object) -> dict[str, float]:
    """Learnt scalars {name: initial value} as floats, or GenomeError naming the defect
    (genome and space files declare them alike)."""
    if not isinstance(scalars, Mapping):
        raise GenomeError('\'scalars\' maps names to initial values, e.g. {"alpha": 0.5}')
    for name, init in scalars.items():
        if (not isinstance(name, str) or not _SCALAR_NAME.fullmatch(name) or name in INPUTS
                or name in _RESERVED or name.startswith("running_") or hasattr(kernels, name)
                or hasattr(torch.nn.Module, name)
                or re.fullmatch(r"n\d+", name)):
            raise GenomeError(f"scalar name {name!r}: use a short lower-case identifier that is "
                              f"not an input ({', '.join(INPUTS)}), n<digits> or a layer "
                              "attribute (weight, bias, eps, ...), e.g. alpha")
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not math.isfinite(init):
            raise GenomeError(f"scalar {name!r}: initial value {init!r} is not a finite number")
    return {name: float(init) for name, init in scalars.items()}


def _canonical(nodes: list[Node], output: str, layout: str = DEFAULT_LAYOUT,
               scalars: Mapping[str, float] | None = None) -> tuple[tuple[Node, ...], str]:
    """Validate, prune dead nodes, and renumber n1..nk in a stable topological order."""
    scalars = scalars or {}
    ids = [n.id for n in nodes]
    seen: set[str] = set()
    for n in nodes:
        if n.id in INPUTS or n.id in scalars:
            raise GenomeError(f"node id {n.id!r} is the name of a graph input; choose another id")
        if not n.id or not set(n.id) <= _ID_CHARS or len(n.id) > 64:
            raise GenomeError(f"node id {n.id!r}: use letters, digits, '_', '-', '.' (at most 64)")
        if n.id in seen:
            raise GenomeError(f"node id {n.id!r} appears twice; ids must be unique")
        seen.add(n.id)
        spec = OPS.get(n.op)
        if spec is None or not spec.searchable:
            known = ", ".join(o for o in OPS if OPS[o].searchable)
            raise GenomeError(f"node {n.id}: unknown op {n.op!r}; known ops: {known}")
        if len(n.inputs) != spec.arity:
            raise GenomeError(f"node {n.id}: op {n.op} takes {spec.arity} input(s), "
                              f"got {len(n.inputs)}")
        if spec.layout not in (None, layout):
            raise GenomeError(f"node {n.id}: {n.op} is a statistic of {spec.layout} layers "
                              f"({LAYOUTS[spec.layout].doc}); this genome's layout is {layout}"
                              f" (set \"layout\": \"{spec.layout}\" if it is meant for those)")
        for i in n.inputs:
            if i not in INPUTS and i not in ids and i not in scalars:
                raise GenomeError(f"node {n.id}: input {i!r} is neither a node, a declared "
                                  f"scalar nor one of {', '.join(INPUTS)}")
    if output not in seen:
        raise GenomeError(f"output {output!r} is not a node id; name the node whose value "
                          "the layer returns")
    if len(nodes) > MAX_NODES:
        raise GenomeError(f"{len(nodes)} nodes, more than the limit of {MAX_NODES}")

    g = nx.DiGraph()
    g.add_nodes_from(ids)
    g.add_edges_from((i, n.id) for n in nodes for i in n.inputs if i in seen)
    try:
        cycle = nx.find_cycle(g)
        raise GenomeError("cycle through nodes " + " -> ".join(e[0] for e in cycle)
                          + "; a layer graph must be acyclic")
    except nx.NetworkXNoCycle:
        pass

    live = nx.ancestors(g, output) | {output}
    position = {node_id: k for k, node_id in enumerate(ids)}
    order = [i for i in nx.lexicographical_topological_sort(g, key=position.__getitem__) if i in live]
    by_id = {n.id: n for n in nodes}
    live_nodes = [by_id[i] for i in order]

    dep = _x_dependence(live_nodes, scalars)
    if not dep[output]:
        raise GenomeError("the output does not depend on x; a layer must transform its input")
    if not _full_shape(live_nodes, scalars)[output]:
        raise GenomeError(f"the output has a statistic's shape, not x's {LAYOUTS[layout].doc}; "
                          "combine the statistic with an x-shaped value")
    for n in live_nodes:
        if OPS[n.op].kind == AGGREGATE and not dep[n.inputs[0]]:
            raise GenomeError(f"node {n.id}: {n.op} of a value that does not depend on x is a "
                              "constant; apply aggregates to x-dependent values")

    rename = {old: f"n{k + 1}" for k, old in enumerate(order)}
    rename.update({name: name for name in [*INPUTS, *scalars]})
    out = tuple(Node(rename[n.id], n.op, tuple(rename[a] for a in n.inputs)) for n in live_nodes)
    return out, rename[output]


def chain(*steps: tuple[str, Sequence[str]], name: str | None = None,
          layout: str = DEFAULT_LAYOUT, scalars: Mapping[str, float] | None = None) -> Genome:
    """Genome from steps in order, each (op, inputs); inputs may name graph inputs, the
    declared scalars or earlier steps as "n1", "n2", ... ; the last step is the output.
    For the zoo and tests.
    """
    nodes = [Node(f"n{k + 1}", op, tuple(ins)) for k, (op, ins) in enumerate(steps)]
    return Genome(nodes, nodes[-1].id, name=name, layout=layout, scalars=scalars)
