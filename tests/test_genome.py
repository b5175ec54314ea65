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
    (json.dumps({"nodes": [node("a", "mean_C", "x"), node("b", "mul", "a", "x")], "output": "b"}),
     'mean_C is a statistic of ntc layers'),
    (json.dumps({"layout": "ntc", "nodes": [node("a", "mean_NHW", "x"),
                                            node("b", "mul", "a", "x")], "output": "b"}),
     "mean_NHW is a statistic of nchw layers"),
    (json.dumps({"layout": "nhwc", "nodes": [node("a", "neg", "x")], "output": "a"}),
     "layout 'nhwc' is not one of nchw, ntc"),
    (json.dumps({"layout": ["ntc"], "nodes": [node("a", "neg", "x")], "output": "a"}),
     "layout ['ntc'] is not one of nchw, ntc"),
    (json.dumps({"nodes": [node("a", "mul", "alpha", "x")], "output": "a"}),
     "input 'alpha' is neither a node, a declared scalar"),
    (json.dumps({"scalars": {"weight": 1.0}, "nodes": [node("a", "mul", "weight", "x")],
                 "output": "a"}), "scalar name 'weight'"),
    (json.dumps({"scalars": {"n3": 1.0}, "nodes": [node("a", "mul", "n3", "x")],
                 "output": "a"}), "scalar name 'n3'"),
    (json.dumps({"scalars": {"safe_div": 1.0}, "nodes": [node("a", "mul", "safe_div", "x")],
                 "output": "a"}), "scalar name 'safe_div'"),
    (json.dumps({"scalars": {"eval": 1.0}, "nodes": [node("a", "mul", "eval", "x")],
                 "output": "a"}), "scalar name 'eval'"),
    (json.dumps({"scalars": {"a": float("nan")}, "nodes": [node("b", "mul", "a", "x")],
                 "output": "b"}), "scalar 'a': initial value nan"),
    (json.dumps({"scalars": [1], "nodes": [node("b", "neg", "x")], "output": "b"}),
     "'scalars' maps names to initial values"),
    (json.dumps({"scalars": {"a": 1.0}, "nodes": [node("a", "neg", "x")], "output": "a"}),
     "name of a graph input"),
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


DYT = {"format": FORMAT, "layout": "ntc", "scalars": {"alpha": 0.5},
       "nodes": [node("n1", "mul", "alpha", "x"), node("n2", "tanh", "n1")], "output": "n2"}


def test_layout_and_scalars_round_trip_and_are_written_only_when_set(tmp_path):
    g = Genome.from_dict(DYT)
    assert g.layout == "ntc" and g.scalars == {"alpha": 0.5} and g.inputs_used == {"x", "alpha"}
    assert g.to_dict() == DYT
    g.save(tmp_path / "dyt.json")
    assert Genome.load(tmp_path / "dyt.json") == g
    assert set(b0().to_dict()) == {"format", "name", "nodes", "output"}  # conv files as before


def test_unused_scalars_are_pruned_like_dead_nodes():
    g = chain(("neg", ["x"]), layout="ntc", scalars={"alpha": 0.5, "shift": 0.0})
    assert g.scalars == {} and "scalars" not in g.to_dict()


def test_layout_and_scalar_values_are_part_of_identity_and_hash():
    ntc = Genome.from_dict(DYT)
    other_init = Genome.from_dict({**DYT, "scalars": {"alpha": 1.0}})
    nchw = Genome.from_dict({k: v for k, v in DYT.items() if k != "layout"})
    renamed = Genome.from_dict({**DYT, "scalars": {"beta": 0.5}, "nodes": [
        node("n1", "mul", "beta", "x"), node("n2", "tanh", "n1")]})
    hashes = {g.structural_hash for g in (ntc, other_init, nchw, renamed)}
    assert len(hashes) == 4 and len({ntc, other_init, nchw, renamed}) == 4
    # an element-wise genome without scalars keeps its conv hash; a layout wraps it
    act = chain(("sigmoid", ["x"]), ("mul", ["x", "n1"]))
    assert act.structural_hash == chain(("sigmoid", ["x"]), ("mul", ["n1", "x"])).structural_hash
    assert chain(("sigmoid", ["x"]), ("mul", ["x", "n1"]), layout="ntc").structural_hash \
        != act.structural_hash


def test_renamed_keeps_layout_and_scalars():
    g = Genome.from_dict(DYT).renamed("dyt")
    assert g.name == "dyt" and g.layout == "ntc" and g.scalars == {"alpha": 0.5}


# Structural hashes of the conv zoo as released before layouts and scalars existed: run
# folders and equivalence caches key on them, so they must not move.
RELEASED_HASHES = {
    "bn_relu": "e40aba244d8d4a40", "gn_relu": "fc234f3d92acff3f", "in_relu": "acbdd7753bd6d75e",
    "ln_relu": "470ec6305f03a325", "bn_silu": "d5dafc194c2966c5",
    "evonorm_b0": "57eac3f49d9def38", "evonorm_b1": "3703496e90591ee9",
    "evonorm_b2": "fdae478afc0601cb", "evonorm_s0": "53485602636b82b2",
    "evonorm_s1": "b55eaec7c0d24398", "evonorm_s2": "b4105458172ff4af",
}


def test_released_structural_hashes_do_not_move():
    from evonas.layers import zoo

    assert {name: zoo.get(name).structural_hash for name in RELEASED_HASHES} == RELEASED_HASHES
