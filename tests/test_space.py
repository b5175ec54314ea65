"""Search spaces load by name or path and reject malformed files with one line."""

import json

import pytest

from evonas.errors import GenomeError, SpaceError
from evonas.layers.genome import chain
from evonas.layers.ops import AGGREGATE_OPS, ELEMENTWISE_OPS, OPS
from evonas.layers.space import builtin_spaces, load_space


def test_builtin_spaces_are_shipped_and_state_their_limits():
    assert builtin_spaces() == ["act", "norm_act", "norm_act_s"]
    full, s, act = (load_space(n) for n in ("norm_act", "norm_act_s", "act"))
    assert set(full.ops) == set(ELEMENTWISE_OPS) | set(AGGREGATE_OPS)
    assert set(s.ops) == set(full.ops) - {o for o in full.ops if o.endswith("_NHW")}
    assert set(act.ops) == set(ELEMENTWISE_OPS) and not act.aggregate_ops
    for space in (full, s, act):
        assert space.max_nodes == 10 and space.groups >= 1
        assert space.inputs == ("x", "zero", "one", "v0", "v1")


def test_membership():
    s0 = chain(("mul", ["v1", "x"]), ("sigmoid", ["n1"]), ("mul", ["x", "n2"]),
               ("std_GHW", ["x"]), ("div", ["n3", "n4"]))
    b = chain(("std_NHW", ["x"]), ("div", ["x", "n1"]))
    assert load_space("norm_act").contains(s0) and load_space("norm_act_s").contains(s0)
    with pytest.raises(GenomeError, match="std_NHW outside space norm_act_s"):
        load_space("norm_act_s").check(b)
    assert not load_space("act").contains(s0)


def test_space_from_path(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"ops": ["add", "sigmoid"], "max_nodes": 3}))
    space = load_space(str(path))
    assert space.name == "tiny" and space.ops == ("add", "sigmoid") and space.max_nodes == 3


@pytest.mark.parametrize("content, message", [
    ({"ops": ["add", "warp"]}, "unknown op(s) warp"),
    ({"ops": []}, "non-empty list"),
    ({"ops": ["add"], "max_nodes": 0}, "'max_nodes' must be an integer"),
    ({"ops": ["add"], "groups": "8"}, "'groups' must be an integer"),
    ({"ops": ["add"], "inputs": ["v0"]}, "'inputs' must list x"),
    ({"ops": ["add"], "colour": "red"}, "unknown key(s) ['colour']"),
    ({"ops": ["div_unguarded"]}, "unknown op(s) div_unguarded"),
])
def test_malformed_space_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(SpaceError) as err:
        load_space(str(path))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_space_name_lists_the_known_ones():
    with pytest.raises(SpaceError, match="use one of act, norm_act, norm_act_s"):
        load_space("norm-act")


def test_every_declared_op_is_searchable_except_internal_ones():
    internal = {name for name, op in OPS.items() if not op.searchable}
    assert internal == {"div_unguarded"} | {f"normalize{kind}_{axes}" for kind in ("", "_affine")
                                            for axes in ("NHW", "HW", "GHW", "CHW")}
