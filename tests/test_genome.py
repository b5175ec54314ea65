"""Genome validation, pruning, canonical numbering, JSON format and structural hash."""

import json

import pytest

from evonas.errors import GenomeError
from evonas.layers.genome import FORMAT, MAX_NODES, Genome, Node, chain

B0_STEPS = (("std_NHW", ["x"]), ("mul", ["v1", "x"]), ("std_HW", ["x"]),
            ("add", ["n2", "n3"]), ("max", ["n1", "n4"]), ("div", ["x", "n5"]))


def b0() -> Genome:
    return chain(*B0_STEPS, name="evonorm_b0")


def doc(nodes, output):
    return json.dumps({"format": FORMAT, "nodes": nodes, "output": output})


def node(id, op, *inputs):
    return {"id": id, "op": op, "inputs": list(inputs)}


@pytest.mark.parametrize("text, message", [
    (doc([node("a", "frobnicate", "x")], "a"), "unknown op 'frobnicate'"),
    (doc([node("a", "add", "x")], "a"), "takes 2 input(s), got 1"),
    (doc([node("a", "add", "x", "b"), node("b", "neg", "a")], "a"), "cycle through nodes"),
    (doc([node("a", "neg", "v1")], "a"), "does not depend on x"),
    (doc([node("a", "neg", "y")], "a"), "input 'y' is neither a node"),
    (doc([node("a", "std_NHW", "x"), node("b", "add", "a", "v1")], "b"), "a statistic's shape"),
    (doc([node("a", "neg", "x")], "b"), "output 'b' is not a node id"),
    (doc([node("a", "neg", "x"), node("a", "abs", "x")], "a"), "appears twice"),
    (doc([node("x", "neg", "x")], "x"), "name of a graph input"),
    (doc([node("a", "std_HW", "v0"), node("b", "add", "a", "x")], "b"), "is a constant"),
    (doc([node(f"n{i}", "neg", f"n{i - 1}" if i else "x") for i in range(MAX_NODES + 1)],
         f"n{MAX_NODES}"), "more than the limit"),
    ('{"nodes": [', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"nodes": [], "output": "a"}', "non-empty list"),
    (json.dumps({"nodes": [node("a", "neg", "x")], "output": "a", "code": "import os"}),
     "unknown key(s) ['code']"),
    (json.dumps({"format": "evonas.genome/99", "nodes": [node("a", "neg", "x")], "output": "a"}),
     "is not supported"),
    (json.dumps({"nodes": [{"id": "a", "op": "neg", "inputs": "x"}], "output": "a"}),
     "'inputs' must be a list"),
])
def test_every_defect_gets_a_one_line_message(text, message):
    with pytest.raises(GenomeError) as err:
        Genome.from_json(text, "layer.json")
    text = str(err.value)
    assert message in text and "\n" not in text and text.startswith("layer.json")


def test_dead_nodes_are_pruned_and_nodes_renumbered_topologically():
    # Listed out of order, with a node nobody reads.
    g = Genome([Node("out", "div", ("x", "s")), Node("dead", "exp", ("x",)),
                Node("s", "std_GHW", ("x",))], "out")
    assert [(n.id, n.op, n.inputs) for n in g] == [("n1", "std_GHW", ("x",)),
                                                   ("n2", "div", ("x", "n1"))]
    assert g.output == "n2"


def test_json_round_trip_and_file_load(tmp_path):
    g = b0()
    assert Genome.from_json(g.to_json()) == g
    path = tmp_path / "b0.json"
    g.save(path)
    loaded = Genome.load(path)
    assert loaded == g and loaded.name == "evonorm_b0"
    assert json.loads(path.read_text())["format"] == FORMAT


def test_load_reports_a_missing_file_in_one_line(tmp_path):
    with pytest.raises(GenomeError, match="cannot read genome file"):
        Genome.load(tmp_path / "absent.json")


def test_structural_hash_ignores_commutative_argument_order_and_names():
    reordered = chain(("std_HW", ["x"]), ("mul", ["x", "v1"]), ("add", ["n1", "n2"]),
                      ("std_NHW", ["x"]), ("max", ["n3", "n4"]), ("div", ["x", "n5"]))
    assert reordered.structural_hash == b0().structural_hash
    assert reordered.renamed("other").structural_hash == b0().structural_hash


def test_structural_hash_separates_argument_order_of_non_commutative_ops():
    a = chain(("std_HW", ["x"]), ("div", ["x", "n1"]))
    b = chain(("std_HW", ["x"]), ("div", ["n1", "x"]))
    assert a.structural_hash != b.structural_hash
    c = chain(("std_GHW", ["x"]), ("div", ["x", "n1"]))
    assert a.structural_hash != c.structural_hash


def test_graph_view_keeps_argument_positions_and_repeated_inputs():
    g = chain(("add", ["x", "x"]), ("div", ["n1", "v1"]))
    graph = g.graph
    assert graph.number_of_edges("x", "n1") == 2
    assert {d["arg"] for _, _, d in graph.in_edges("n2", data=True)} == {0, 1}
    assert graph.nodes["v1"]["input"] and graph.graph["output"] == "n2"
