"""Random genomes and mutations: where new candidate layers come from.

Place in the flow: the evolution controller (evolution.py) calls `random_genome` to fill
its initial population and `mutate` on each tournament winner; both draw every random
number from the numpy Generator they are given, so a seeded search is reproducible. What
they return is always a valid Genome (genome.py) that is a member of the search space
(space.py); whether it computes anything useful is for the rejection stages to judge.

Random genomes follow the paper: nodes are added one at a time, each op drawn uniformly
from the space's ops and each argument uniformly from the values that exist so far (the
space's inputs and learnt scalars, and the earlier nodes); the last node is the output.
Genomes take the space's layout, and the initial values of the scalars they read. An aggregate draws its
argument from x-dependent values only, since a statistic of a constant is no layer.

Mutations are small graph edits, one function each, named in MUTATIONS:
- op_change: a node gets a different op of the space (arguments kept, dropped or drawn
  when the arity changes);
- input_change: one argument of a node is redrawn from the values that are not
  downstream of it, so no cycle can arise;
- node_insert: a new random node goes between a value and one of its users, or on top
  of the output;
- node_remove: a node goes, its users read one of its arguments instead.
An edit may disconnect part of the graph; the Genome constructor prunes it.

Each edit is written once against a `pick(options, why)` chooser. With a random chooser
it is a mutation; with the enumerating chooser of `_outcomes` it lists every child the
edit can make, which is how `mutate` tells "unlucky" from "no valid child exists".
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar

import numpy as np

from evonas.errors import EvonasError, GenomeError
from evonas.layers.genome import Genome, Node
from evonas.layers.ops import AGGREGATE, OPS
from evonas.layers.space import SearchSpace

T = TypeVar("T")
Pick = Callable[[Sequence[T], str], T]
Mutation = Callable[[Genome, SearchSpace, np.random.Generator], Genome]

# Random draws of a random genome before falling back to a construction valid by design.
# A draw fails when its output does not depend on x or has a statistic's shape: 94% of
# draws in norm_act, 91% in norm_act_s (measured over 2,000 draws each), so a genome
# takes about 16 draws; 1000 draws all fail with odds below 1e-26 there. A failed draw
# costs microseconds (_draw_genome decides it before building any node).
RANDOM_ATTEMPTS = 1000
# mutate draws a mutation kind up to KIND_DRAWS times and applies each drawn kind up to
# KIND_ATTEMPTS times before it enumerates every child of the parent. A kind that can make
# a good child at all makes one in about 1 try in 2 (input_change, whose redrawn argument
# may cut x off the output) or better; enumeration is for spaces of a handful of genomes.
KIND_DRAWS = 30
KIND_ATTEMPTS = 10
_NEW = "new"  # id of an inserted node; never an input name nor a canonical n<k> id


class MutationError(EvonasError):
    """No mutation of this kind applies, or no valid child of the parent exists."""


# --- random genomes ---------------------------------------------------------------------


def random_genome(space: SearchSpace, rng: np.random.Generator) -> Genome:
    """A random member of the space, drawn as the paper does, then pruned.

    Always space.max_nodes nodes are drawn: pruning then removes the nodes the output
    does not read, which spreads sizes over 1..max_nodes (see tests/test_mutation.py for
    the means). Drawing the count first would stack that pruning on top of a smaller
    draw and make most genomes one- or two-node layers such as sigmoid(x).
    """
    for _ in range(RANDOM_ATTEMPTS):
        genome = _draw_genome(space, rng)
        if genome is not None:
            return genome
    return _one_node_genome(space, rng)


def _draw_genome(space: SearchSpace, rng: np.random.Generator) -> Genome | None:
    """One draw, or None when its output does not depend on x or has a statistic's shape.

    The draw is the paper's (each op uniform over the space's ops, each argument uniform
    over the values that exist so far, an aggregate's over the x-dependent ones), made of
    one block of uniforms per draw: row k holds node k's op and its arguments' numbers.
    Whether the output has x's shape needs only the element-wise nodes, whose arguments
    come from all values and so do not depend on which values read x: that is decided
    first, from the numbers alone, and only a draw that passes builds its nodes (the
    same nodes a node-by-node construction from the same numbers would give).
    """
    ops, sources, x = _draw_tables(space)
    n_src, n_ops = len(sources), len(ops)
    rows = rng.random((space.max_nodes, 1 + _MAX_ARITY)).tolist()
    chosen = [ops[min(int(row[0] * n_ops), n_ops - 1)] for row in rows]
    if chosen[-1][2]:  # the output is a statistic
        return None
    # full[v]: value v (sources, then nodes) has x's shape and depends on x
    full = [k == x for k in range(n_src)]
    for k, ((_, arity, aggregate), row) in enumerate(zip(chosen, rows)):
        size = n_src + k
        full.append(not aggregate and any(full[min(int(row[1 + j] * size), size - 1)]
                                          for j in range(arity)))
    if not full[-1]:
        return None
    names = list(sources)
    x_dep = [k == x for k in range(n_src)]
    nodes = []
    for k, ((name, arity, aggregate), row) in enumerate(zip(chosen, rows)):
        pool = [v for v in range(n_src + k) if x_dep[v]] if aggregate else range(n_src + k)
        args = [pool[min(int(row[1 + j] * len(pool)), len(pool) - 1)] for j in range(arity)]
        node = Node(f"n{k + 1}", name, tuple(names[a] for a in args))
        nodes.append(node)
        names.append(node.id)
        x_dep.append(any(x_dep[a] for a in args))
    return _new_genome(space, nodes, nodes[-1].id)


_MAX_ARITY = max(op.arity for op in OPS.values())


@functools.lru_cache(maxsize=64)
def _draw_tables(space: SearchSpace) -> tuple[tuple[tuple[str, int, bool], ...],
                                              tuple[str, ...], int]:
    """(name, arity, is aggregate) per op of the space, its sources, and x's index."""
    ops = tuple((o, OPS[o].arity, OPS[o].kind == AGGREGATE) for o in space.ops)
    return ops, space.sources, space.sources.index("x")


def _one_node_genome(space: SearchSpace, rng: np.random.Generator) -> Genome:
    # op(x) or op(x, x) with an element-wise op keeps x's shape; every space has one.
    ops = [o for o in space.ops if OPS[o].kind != AGGREGATE]
    op = OPS[ops[int(rng.integers(len(ops)))]]
    return _new_genome(space, [Node("n1", op.name, ("x",) * op.arity)], "n1")


def _new_genome(space: SearchSpace, nodes: list[Node], output: str,
                scalars: Mapping[str, float] | None = None) -> Genome:
    """A genome of the space's layout; it keeps the scalars it reads (given ones first,
    so a child keeps its parent's initial values, then the space's)."""
    return Genome(nodes, output, layout=space.layout,
                  scalars={**dict(space.scalars), **(scalars or {})})


# --- graph facts the edits need ---------------------------------------------------------


def _downstream(genome: Genome, node_id: str) -> set[str]:
    """The node and every node that reads it, directly or not."""
    down = {node_id}
    for n in genome.nodes:  # topological order
        if any(a in down for a in n.inputs):
            down.add(n.id)
    return down


def _sources(genome: Genome, space: SearchSpace, node_id: str | None, aggregate: bool) -> list[str]:
    """Values an argument of node_id may read without making a cycle: the space's inputs
    and the nodes not downstream of it (all values when node_id is None, i.e. above the
    output). An aggregate's argument must depend on x."""
    down = _downstream(genome, node_id) if node_id else set()
    values = list(space.sources) + [n.id for n in genome.nodes if n.id not in down]
    if aggregate:
        x_dep = genome.depends_on_x()
        values = [v for v in values if x_dep.get(v, False)]
    return values


def _rebuilt(genome: Genome, space: SearchSpace, nodes: list[Node],
             output: str | None = None) -> Genome:
    return _new_genome(space, nodes, output or genome.output, genome.scalars)


def _replace(genome: Genome, space: SearchSpace, node: Node, new: Node) -> Genome:
    return _rebuilt(genome, space, [new if n.id == node.id else n for n in genome.nodes])


def _unique(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


# --- the edits, written against a chooser -----------------------------------------------


def _op_change(genome: Genome, space: SearchSpace, pick: Pick) -> Genome:
    node = pick(genome.nodes, "the genome has no node")
    new = OPS[pick([o for o in space.ops if o != node.op], f"space {space.name} has one op")]
    x_dep = genome.depends_on_x()
    args = list(node.inputs)
    if len(args) > new.arity:  # binary -> unary: keep an argument, an x-dependent one if any
        args = [pick(_unique([a for a in args if x_dep[a]] or args), "")]
    if new.kind == AGGREGATE and not x_dep[args[0]]:  # a statistic of a constant: redraw
        args = [pick(_sources(genome, space, node.id, True), "")]
    if len(args) < new.arity:  # unary -> binary: the old argument plus a drawn one
        other = pick(_sources(genome, space, node.id, False), "")
        args = [args[0], other] if new.commutative or pick([0, 1], "") == 0 else [other, args[0]]
    return _replace(genome, space, node, Node(node.id, new.name, tuple(args)))


def _input_change(genome: Genome, space: SearchSpace, pick: Pick) -> Genome:
    slots = [(n, pos) for n in genome.nodes for pos in range(len(n.inputs))]
    node, pos = pick(slots, "the genome has no node")
    aggregate = OPS[node.op].kind == AGGREGATE
    choices = [v for v in _sources(genome, space, node.id, aggregate) if v != node.inputs[pos]]
    args = list(node.inputs)
    args[pos] = pick(choices, f"no other value for argument {pos} of {node.id}")
    return _replace(genome, space, node, Node(node.id, node.op, tuple(args)))


def _node_insert(genome: Genome, space: SearchSpace, pick: Pick) -> Genome:
    if len(genome) >= space.max_nodes:
        raise MutationError(f"node_insert: the genome has space {space.name}'s limit of "
                            f"{space.max_nodes} nodes")
    # An edge is (user, argument position, value); (None, None, output) sits above the output.
    edges = [(n, pos, a) for n in genome.nodes for pos, a in enumerate(n.inputs)]
    user, pos, value = pick(edges + [(None, None, genome.output)], "")
    x_dep = genome.depends_on_x()
    ops = [o for o in space.ops if x_dep[value] or OPS[o].kind != AGGREGATE]
    new = OPS[pick(ops, f"no op of space {space.name} applies to {value}")]
    args = [value]
    if new.arity == 2:  # the new node may read anything its user could read
        other = pick(_sources(genome, space, user.id if user else None, False), "")
        args = [value, other] if new.commutative or pick([0, 1], "") == 0 else [other, value]
    inserted = Node(_NEW, new.name, tuple(args))
    if user is None:
        return _rebuilt(genome, space, list(genome.nodes) + [inserted], _NEW)
    rewired = tuple(_NEW if k == pos else a for k, a in enumerate(user.inputs))
    nodes = [Node(n.id, n.op, rewired) if n is user else n for n in genome.nodes]
    return _rebuilt(genome, space, nodes + [inserted])


def _bypasses(genome: Genome, node: Node) -> list[str]:
    """Values that may take a removed node's place: its x-dependent arguments if it has
    any, so every layer that read x still does; nodes only for the output."""
    x_dep = genome.depends_on_x()
    args = [a for a in node.inputs if x_dep[a]] or list(node.inputs)
    if node.id == genome.output:
        args = [a for a in args if a in genome.by_id]
    return _unique(args)


def _node_remove(genome: Genome, space: SearchSpace, pick: Pick) -> Genome:
    removable = [n for n in genome.nodes if _bypasses(genome, n)]
    node = pick(removable, "node_remove: no node can go (the genome is one node reading inputs)")
    bypass = pick(_bypasses(genome, node), "")
    nodes = [Node(n.id, n.op, tuple(bypass if a == node.id else a for a in n.inputs))
             for n in genome.nodes if n is not node]
    return _rebuilt(genome, space, nodes, bypass if node.id == genome.output else None)


_EDITS: dict[str, Callable[[Genome, SearchSpace, Pick], Genome]] = {
    "op_change": _op_change,
    "input_change": _input_change,
    "node_insert": _node_insert,
    "node_remove": _node_remove,
}


# --- choosers ---------------------------------------------------------------------------


def _random_pick(rng: np.random.Generator) -> Pick:
    def pick(options: Sequence[T], why: str) -> T:
        if not options:
            raise MutationError(why or "nothing to choose from")
        return options[int(rng.integers(len(options)))]

    return pick


def _outcomes(edit: Callable[[Genome, SearchSpace, Pick], Genome], genome: Genome,
              space: SearchSpace) -> Iterator[Genome]:
    """Every valid genome the edit can make, by replaying it over all its choice paths.

    path holds [index, count] per choice point of the current replay; after each replay
    the deepest choice that has options left advances, like an odometer whose later
    wheels are re-discovered because their options depend on the earlier choices.
    """
    path: list[list[int]] = []
    while True:
        depth = 0

        def pick(options: Sequence[T], why: str) -> T:
            nonlocal depth
            if not options:
                raise MutationError(why)
            if depth == len(path):
                path.append([0, len(options)])
            choice = options[path[depth][0]]
            depth += 1
            return choice

        try:
            yield edit(genome, space, pick)
        except (MutationError, GenomeError):
            pass
        del path[depth:]
        while path and path[-1][0] + 1 == path[-1][1]:
            path.pop()
        if not path:
            return
        path[-1][0] += 1


# --- the mutations ----------------------------------------------------------------------


def op_change(genome: Genome, space: SearchSpace, rng: np.random.Generator) -> Genome:
    """A random node gets a different op of the space. Binary -> unary keeps one argument
    (an x-dependent one when there is one); unary -> binary adds a drawn argument; an
    aggregate whose argument would not depend on x draws one that does."""
    return _op_change(genome, space, _random_pick(rng))


def input_change(genome: Genome, space: SearchSpace, rng: np.random.Generator) -> Genome:
    """A random argument of a random node is redrawn among the values not downstream of
    that node: the space's inputs and the nodes earlier in some topological order."""
    return _input_change(genome, space, _random_pick(rng))


def node_insert(genome: Genome, space: SearchSpace, rng: np.random.Generator) -> Genome:
    """A new random node goes on a random edge (a value and one of its users) or on top of
    the output; it reads the value, and a binary op also a drawn value. Raises
    MutationError when the genome already has space.max_nodes nodes."""
    return _node_insert(genome, space, _random_pick(rng))


def node_remove(genome: Genome, space: SearchSpace, rng: np.random.Generator) -> Genome:
    """A random node is removed and its users read one of its arguments instead (an
    x-dependent one when there is one). Raises MutationError for a one-node genome whose
    node reads only graph inputs."""
    return _node_remove(genome, space, _random_pick(rng))


MUTATIONS: dict[str, Mutation] = {
    "op_change": op_change,
    "input_change": input_change,
    "node_insert": node_insert,
    "node_remove": node_remove,
}


def mutate(genome: Genome, space: SearchSpace, rng: np.random.Generator,
           weights: Mapping[str, float] | None = None) -> tuple[Genome, str]:
    """(child, mutation name): a valid member of the space, structurally unlike the parent.

    weights: relative weight per MUTATIONS name (missing names weigh 0); None weighs all
    equally. A mutation is drawn by weight and applied; an invalid, foreign or unchanged
    child is discarded and the same mutation applied again (KIND_ATTEMPTS times), so the
    weights are the frequencies of the children's kinds, not of the attempts: a kind that
    cannot apply (node_insert at max_nodes) makes way for a redraw. After KIND_DRAWS
    draws, every child of every weighted mutation is enumerated and the first good one
    returned.

    Raises MutationError when the parent is not a member of the space, when the weights
    are malformed, or when no mutation of positive weight can make a valid member of the
    space that differs from the parent: in practice only in spaces with a handful of
    genomes, e.g. ops ["sigmoid"], inputs ["x"], max_nodes 1, whose one genome is sigmoid(x).
    """
    try:
        space.check(genome)
    except GenomeError as err:
        raise MutationError(f"cannot mutate a genome outside the space: {err}") from None
    names, p = _weights(weights)
    parent = genome.structural_hash
    for _ in range(KIND_DRAWS):
        name = names[int(rng.choice(len(names), p=p))]
        for _ in range(KIND_ATTEMPTS):
            try:
                child = MUTATIONS[name](genome, space, rng)
            except (MutationError, GenomeError):
                continue
            if child.structural_hash != parent and space.contains(child):
                return child, name
    for name in names:
        for child in _outcomes(_EDITS[name], genome, space) if name in _EDITS else ():
            if child.structural_hash != parent and space.contains(child):
                return child, name
    raise MutationError(f"no mutation among {', '.join(names)} makes a valid member of space "
                        f"{space.name} other than {genome!r}; the space is too small to search")


def _weights(weights: Mapping[str, float] | None) -> tuple[list[str], np.ndarray]:
    if weights is None:
        weights = dict.fromkeys(MUTATIONS, 1.0)
    unknown = sorted(set(weights) - set(MUTATIONS))
    if unknown:
        raise MutationError(f"unknown mutation(s) {', '.join(unknown)}; known: "
                            f"{', '.join(MUTATIONS)}")
    if any(not np.isfinite(w) or w < 0 for w in weights.values()):
        raise MutationError(f"mutation weights must be finite and >= 0, got {dict(weights)}")
    names = [n for n in MUTATIONS if weights.get(n, 0) > 0]
    if not names:
        raise MutationError("at least one mutation weight must be positive, e.g. "
                            '{"op_change": 1, "input_change": 1}')
    w = np.array([float(weights[n]) for n in names])
    return names, w / w.sum()


__all__ = ["random_genome", "mutate", "MUTATIONS", "MutationError", "op_change",
           "input_change", "node_insert", "node_remove", "RANDOM_ATTEMPTS", "KIND_DRAWS",
           "KIND_ATTEMPTS"]
