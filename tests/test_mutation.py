"""Random genomes and mutations (evonas/mutation.py): "always" and "never" properties over
thousands of seeds in every built-in space and two small custom ones, plus the edge cases
of tiny spaces where few or no children exist."""

import collections
import functools

import numpy as np
import pytest
import torch

from evonas.errors import GenomeError
from evonas.layers.genome import Genome, chain
from evonas.layers.interpreter import GenomeLayer
from evonas.layers.mutation import (
    _EDITS,
    MUTATIONS,
    MutationError,
    _outcomes,
    mutate,
    node_insert,
    random_genome,
)
from evonas.layers.ops import AGGREGATE, INPUTS, OPS
from evonas.layers.space import load_space, space_from_dict

SEEDS = 2000
STEPS = 2  # mutations chained per seed: children of children are parents too
CUSTOM = {
    "small": {"name": "small", "ops": ["add", "mul", "div", "sigmoid", "std_HW", "mean_GHW"],
              "max_nodes": 3},
    "unary_add": {"name": "unary_add", "ops": ["neg", "sigmoid", "tanh", "exp", "abs", "square",
                                               "log", "sqrt", "add"]},
}
SPACES = ["norm_act", "norm_act_s", "act", "small", "unary_add", "seq_causal",
          "seq_bidirectional"]
B0 = chain(("std_NHW", ["x"]), ("mul", ["v1", "x"]), ("std_HW", ["x"]), ("add", ["n2", "n3"]),
           ("max", ["n1", "n4"]), ("div", ["x", "n5"]), name="evonorm_b0")




@functools.cache
def space(name):
    return space_from_dict(CUSTOM[name], name) if name in CUSTOM else load_space(name)


def lineage(name, seed):
    """[(genome, how)]: a random genome, then STEPS successive mutants."""
    rng = np.random.default_rng(seed)
    g = random_genome(space(name), rng)
    out = [(g, "random")]
    for _ in range(STEPS):
        g, how = mutate(g, space(name), rng)
        out.append((g, how))
    return out


@functools.cache
def lineages(name):
    return [lineage(name, seed) for seed in range(SEEDS)]


def assert_valid(g: Genome):
    """The genome invariants, checked independently of the Genome constructor."""
    dep = {i: i == "x" for i in [*INPUTS, *g.scalars]}
    used = set()
    for k, n in enumerate(g.nodes):
        assert n.id == f"n{k + 1}"
        assert len(n.inputs) == OPS[n.op].arity
        assert all(i in dep for i in n.inputs), "reads a later node or an unknown value"
        if OPS[n.op].kind == AGGREGATE:
            assert dep[n.inputs[0]], "aggregate of a constant"
        dep[n.id] = any(dep[i] for i in n.inputs)
        used.update(n.inputs)
    assert g.output == g.nodes[-1].id and dep[g.output]
    assert all(n.id in used for n in g.nodes[:-1]), "dead node"


@pytest.mark.parametrize("name", SPACES)
def test_every_random_genome_and_child_is_a_valid_member_of_its_space(name):
    sp = space(name)
    for line in lineages(name):
        for (parent, _), (child, how) in zip([(None, None)] + line, line):
            assert_valid(child)
            sp.check(child)
            assert 1 <= len(child) <= sp.max_nodes
            assert Genome.from_json(child.to_json()) == child
            if parent is None:
                continue
            assert how in MUTATIONS
            assert child.structural_hash != parent.structural_hash
            if how == "node_insert":  # nothing can be pruned: the new node sits on an edge
                assert len(child) == len(parent) + 1
            elif how == "node_remove":
                assert len(child) < len(parent)
            else:
                assert len(child) <= len(parent)


@pytest.mark.parametrize("name", SPACES)
def test_every_mutation_kind_occurs_at_a_sensible_rate(name):
    counts = collections.Counter(how for line in lineages(name) for _, how in line[1:])
    total = sum(counts.values())
    print(name, {k: round(v / total, 3) for k, v in counts.most_common()})
    # Equal weights; the shortfalls are kinds that cannot apply (node_remove on a one-node
    # genome reading inputs, input_change on a lone aggregate of x, node_insert at the limit).
    assert all(counts[k] > 0.1 * total for k in MUTATIONS), counts


@pytest.mark.parametrize("name", SPACES)
def test_random_genome_sizes_spread_over_the_range(name):
    sizes = np.array([len(line[0][0]) for line in lineages(name)])
    print(name, f"mean {sizes.mean():.2f}", np.bincount(sizes).tolist())
    assert 1.5 < sizes.mean() < 0.6 * space(name).max_nodes + 1
    # Large genomes are rarer where the output must end in an element-wise op of x's
    # shape, but a real share of them still reaches the limit or four nodes.
    assert (sizes >= min(4, space(name).max_nodes)).mean() > 0.05
    if space(name).max_nodes >= 10:
        assert len({line[0][0].structural_hash for line in lineages(name)}) > 0.3 * SEEDS


def test_act_has_no_aggregates_and_norm_act_s_no_batch_statistics():
    for line in lineages("act"):
        assert all(OPS[op].kind != AGGREGATE for g, _ in line for op in g.ops_used)
    for line in lineages("norm_act_s"):
        assert not any(op.endswith("_NHW") for g, _ in line for op in g.ops_used)
    assert any(op.endswith("_NHW") for line in lineages("norm_act") for g, _ in line
               for op in g.ops_used)


def test_sequence_genomes_take_layout_and_scalars_from_their_space():
    causal = space("seq_causal")
    inits = dict(causal.scalars)
    genomes = [g for name in ("seq_causal", "seq_bidirectional") for line in lineages(name)
               for g, _ in line]
    assert all(g.layout == "ntc" for g in genomes)
    with_scalars = [g for g in genomes if g.scalars]
    assert len(with_scalars) > 0.2 * len(genomes)  # the scalars are drawn like any input
    assert all(g.scalars == {k: inits[k] for k in g.scalars} for g in with_scalars)
    for line in lineages("seq_causal"):  # no statistic over tokens in a causal space
        assert not any(op.endswith(("_T", "_NT")) for g, _ in line for op in g.ops_used)
    assert any(op.endswith("_NT") for line in lineages("seq_bidirectional") for g, _ in line
               for op in g.ops_used)


def test_a_child_keeps_its_parents_scalar_values():
    parent = chain(("mul", ["alpha", "x"]), ("tanh", ["n1"]), layout="ntc",
                   scalars={"alpha": 2.0})
    rng = np.random.default_rng(0)
    children = [mutate(parent, space("seq_causal"), rng)[0] for _ in range(200)]
    kept = [c for c in children if "alpha" in c.scalars]
    assert kept and all(c.scalars["alpha"] == 2.0 for c in kept)


@pytest.mark.parametrize("name", SPACES)
def test_same_seed_same_genomes(name):
    for seed in range(0, SEEDS, 10):
        assert lineage(name, seed) == lineages(name)[seed]
    assert lineage(name, 1) != lineage(name, 2)


def test_a_sample_runs_through_the_layer():
    # inf and nan are allowed: the numeric rejection stage judges those.
    x = torch.randn(4, 16, 3, 3, generator=torch.Generator().manual_seed(0))
    inputs = {"nchw": x, "ntc": x.flatten(2).transpose(1, 2)}  # (N, T, C): C last
    picked = [line[-1][0] for name in SPACES for line in lineages(name)[:10]]
    for g in picked:
        layer = GenomeLayer(g, 16, groups=8)
        x = inputs[g.layout]
        with torch.no_grad():
            assert layer(x).shape == x.shape
            layer.eval()
            layer(x)


def test_random_genome_falls_back_to_one_node_when_draws_keep_failing(monkeypatch):
    import evonas.layers.mutation as m

    monkeypatch.setattr(m, "RANDOM_ATTEMPTS", 0)
    for seed in range(20):
        g = random_genome(space("norm_act"), np.random.default_rng(seed))
        assert_valid(g)
        assert len(g) == 1 and set(g.nodes[0].inputs) == {"x"}


def test_random_children_are_among_the_enumerated_children():
    """The random chooser and the enumerating one run the same edit code."""
    sp = space("norm_act")
    for name, edit in _EDITS.items():
        every = {g.structural_hash for g in _outcomes(edit, B0, sp)}
        for seed in range(100):
            try:
                child = MUTATIONS[name](B0, sp, np.random.default_rng(seed))
            except GenomeError:
                continue
            assert child.structural_hash in every, (name, child)


def test_node_insert_at_the_limit_is_refused():
    sp = space_from_dict({"name": "six", "ops": ["add", "std_HW"], "max_nodes": 6}, "six")
    g = chain(("std_HW", ["x"]), ("add", ["x", "n1"]), ("add", ["n2", "x"]), ("add", ["n3", "x"]),
              ("add", ["n4", "x"]), ("add", ["n5", "x"]))
    with pytest.raises(MutationError, match="limit of 6"):
        node_insert(g, sp, np.random.default_rng(0))
    for seed in range(20):
        child, how = mutate(g, sp, np.random.default_rng(seed))
        assert how != "node_insert" and len(child) <= 6


def test_mutate_finds_the_only_child_of_a_tiny_space_and_gives_up_when_there_is_none():
    two = space_from_dict({"name": "two", "ops": ["sigmoid", "tanh"], "inputs": ["x"],
                           "max_nodes": 1}, "two")
    sig, tanh = chain(("sigmoid", ["x"])), chain(("tanh", ["x"]))
    assert mutate(sig, two, np.random.default_rng(0)) == (tanh, "op_change")
    one = space_from_dict({"name": "one", "ops": ["sigmoid"], "inputs": ["x"], "max_nodes": 1},
                          "one")
    with pytest.raises(MutationError, match="too small"):
        mutate(sig, one, np.random.default_rng(0))
    # Only node_insert may run, and it cannot: the enumeration proves there is no child.
    with pytest.raises(MutationError, match="too small"):
        mutate(sig, two, np.random.default_rng(0), weights={"node_insert": 1.0})


def test_weights_choose_the_mutation():
    sp = space("norm_act")
    for seed in range(30):
        rng = np.random.default_rng(seed)
        assert mutate(B0, sp, rng, weights={"op_change": 1.0})[1] == "op_change"
        assert mutate(B0, sp, rng, weights={"node_remove": 2.0, "op_change": 0})[1] == "node_remove"


@pytest.mark.parametrize("weights, match", [
    ({"crossover": 1.0}, "unknown mutation"),
    ({"op_change": -1.0}, ">= 0"),
    ({"op_change": 0.0}, "positive"),
])
def test_bad_weights_are_refused(weights, match):
    with pytest.raises(MutationError, match=match):
        mutate(B0, space("norm_act"), np.random.default_rng(0), weights=weights)


def test_a_parent_outside_the_space_is_refused():
    with pytest.raises(MutationError, match="outside the space.*std_NHW"):
        mutate(B0, space("norm_act_s"), np.random.default_rng(0))
