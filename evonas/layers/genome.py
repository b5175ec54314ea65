"""The layer genome: a DAG of primitive ops from the input x to the layer's output y.

A layer computes y from x (N, C, H, W) with the ops of ops.py and ends in the per-channel
affine gamma * y + beta, which every layer has and the genome therefore does not store.

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
or later nodes (order in the file does not matter) or graph inputs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import networkx as nx

from evonas.errors import GenomeError
from evonas.layers.ops import AGGREGATE, INPUTS, OPS

FORMAT = "evonas.genome/1"
# Any genome, zoo or file, whatever its space: bounds the cost of every later step.
MAX_NODES = 64
MAX_FILE_BYTES = 1 << 20
_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


@dataclass(frozen=True)
class Node:
    id: str
    op: str
    inputs: tuple[str, ...]


class Genome:
    """A valid, pruned, canonically numbered layer graph."""

    def __init__(self, nodes: Iterable[Node | tuple], output: str, name: str | None = None):
        raw = [n if isinstance(n, Node) else Node(n[0], n[1], tuple(n[2])) for n in nodes]
        self.nodes, self.output = _canonical(raw, output)
        self.name = name

    # --- construction helpers ---------------------------------------------------------

    @classmethod
    def from_dict(cls, data: object, source: str = "genome") -> "Genome":
        if not isinstance(data, dict):
            raise GenomeError(f"{source}: expected a JSON object with 'nodes' and 'output'")
        unknown = set(data) - {"format", "name", "nodes", "output", "meta"}
        if unknown:
            raise GenomeError(f"{source}: unknown key(s) {sorted(unknown)}; "
                              "allowed: format, name, nodes, output, meta")
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
            return cls(parsed, output, name=name)
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
        d["nodes"] = [{"id": n.id, "op": n.op, "inputs": list(n.inputs)} for n in self.nodes]
        d["output"] = self.output
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    def renamed(self, name: str | None) -> "Genome":
        return Genome(self.nodes, self.output, name=name)

    # --- views ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self):
        return iter(self.nodes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Genome) and (self.nodes, self.output) == (other.nodes, other.output)

    def __hash__(self) -> int:
        return hash((self.nodes, self.output))

    def __repr__(self) -> str:
        body = ", ".join(f"{n.id}={n.op}({','.join(n.inputs)})" for n in self.nodes)
        return f"Genome({body}; out={self.output})"

    @cached_property
    def by_id(self) -> dict[str, Node]:
        return {n.id: n for n in self.nodes}

    @cached_property
    def ops_used(self) -> frozenset[str]:
        return frozenset(n.op for n in self.nodes)

    @cached_property
    def inputs_used(self) -> frozenset[str]:
        return frozenset(i for n in self.nodes for i in n.inputs if i in INPUTS)

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
        Weisfeiler-Lehman approximation, and stable across networkx versions)."""
        h: dict[str, str] = {name: "in:" + name for name in INPUTS}
        for n in self.nodes:
            args = [h[i] for i in n.inputs]
            if OPS[n.op].commutative:
                args.sort()
            h[n.id] = hashlib.sha256(f"{n.op}({','.join(args)})".encode()).hexdigest()
        return h[self.output][:16]

    def depends_on_x(self) -> dict[str, bool]:
        return _x_dependence(self.nodes)

    def full_shape(self) -> dict[str, bool]:
        return _full_shape(self.nodes)


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


def _x_dependence(nodes: Sequence[Node]) -> dict[str, bool]:
    dep = {name: name == "x" for name in INPUTS}
    for n in nodes:  # nodes are in topological order
        dep[n.id] = any(dep[i] for i in n.inputs)
    return dep


def _full_shape(nodes: Sequence[Node]) -> dict[str, bool]:
    """Whether each value has x's full (N, C, H, W) shape: aggregates reduce axes, and an
    element-wise op is full when any input is (broadcasting)."""
    full = {name: name == "x" for name in INPUTS}
    for n in nodes:  # nodes are in topological order
        full[n.id] = OPS[n.op].kind != AGGREGATE and any(full[i] for i in n.inputs)
    return full


def _canonical(nodes: list[Node], output: str) -> tuple[tuple[Node, ...], str]:
    """Validate, prune dead nodes, and renumber n1..nk in a stable topological order."""
    ids = [n.id for n in nodes]
    seen: set[str] = set()
    for n in nodes:
        if n.id in INPUTS:
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
        for i in n.inputs:
            if i not in INPUTS and i not in ids:
                raise GenomeError(f"node {n.id}: input {i!r} is neither a node nor one of "
                                  f"{', '.join(INPUTS)}")
    if output not in seen:
        raise GenomeError(f"output {output!r} is not a node id; name the node whose value "
                          "the layer returns")
    if len(nodes) > MAX_NODES:
        raise GenomeError(f"{len(nodes)} nodes, more than the limit of {MAX_NODES}")

    g = nx.DiGraph()
    g.add_nodes_from(ids)
    g.add_edges_from((i, n.id) for n in nodes for i in n.inputs if i not in INPUTS)
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

    dep = _x_dependence(live_nodes)
    if not dep[output]:
        raise GenomeError("the output does not depend on x; a layer must transform its input")
    if not _full_shape(live_nodes)[output]:
        raise GenomeError("the output has a statistic's shape, not x's (N, C, H, W); combine "
                          "the statistic with an x-shaped value")
    for n in live_nodes:
        if OPS[n.op].kind == AGGREGATE and not dep[n.inputs[0]]:
            raise GenomeError(f"node {n.id}: {n.op} of a value that does not depend on x is a "
                              "constant; apply aggregates to x-dependent values")

    rename = {old: f"n{k + 1}" for k, old in enumerate(order)}
    rename.update({name: name for name in INPUTS})
    out = tuple(Node(rename[n.id], n.op, tuple(rename[a] for a in n.inputs)) for n in live_nodes)
    return out, rename[output]


def chain(*steps: tuple[str, Sequence[str]], name: str | None = None) -> Genome:
    """Genome from steps in order, each (op, inputs); inputs may name graph inputs or
    earlier steps as "n1", "n2", ... ; the last step is the output. For the zoo and tests.
    """
    nodes = [Node(f"n{k + 1}", op, tuple(ins)) for k, (op, ins) in enumerate(steps)]
    return Genome(nodes, nodes[-1].id, name=name)
