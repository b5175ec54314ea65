"""Search spaces load by name or path and reject malformed files with one line."""

import json

import pytest

from evonas.errors import GenomeError, SpaceError
from evonas.layers.genome import chain
from evonas.layers.ops import AGGREGATE_OPS, ELEMENTWISE_OPS, OPS
from evonas.layers.space import builtin_spaces, load_space, space_from_dict


def ops_of(layout):
    return {o for o in AGGREGATE_OPS if OPS[o].layout == layout}


def test_builtin_spaces_are_shipped_and_state_their_limits():
    assert builtin_spaces() == ["act", "norm_act", "norm_act_s", "seq_bidirectional",
                                "seq_causal"]
    full, s, act = (load_space(n) for n in ("norm_act", "norm_act_s", "act"))
    conv_elementwise = set(ELEMENTWISE_OPS) - {"erf"}  # the conv spaces predate erf
    assert set(full.ops) == conv_elementwise | ops_of("nchw")
    assert set(s.ops) == set(full.ops) - {o for o in full.ops if o.endswith("_NHW")}
    assert set(act.ops) == conv_elementwise and not act.aggregate_ops
    for space in (full, s, act):
        assert space.max_nodes == 10 and space.groups >= 1
        assert space.inputs == ("x", "zero", "one", "v0", "v1")
        assert space.layout == "nchw" and not space.causal and not space.scalars
        assert set(space.to_dict()) == {"format", "name", "description", "ops", "inputs",
                                        "max_nodes", "groups"}  # records as before


def test_sequence_spaces_state_layout_causality_and_scalars():
    causal, bidir = load_space("seq_causal"), load_space("seq_bidirectional")
    assert causal.layout == bidir.layout == "ntc" and causal.causal and not bidir.causal
    assert set(bidir.ops) == set(ELEMENTWISE_OPS) | ops_of("ntc")
    assert set(causal.ops) == set(bidir.ops) - {o for o in bidir.ops
                                                if o.endswith(("_T", "_NT"))}
    for space in (causal, bidir):
        assert dict(space.scalars) == {"alpha": 0.5, "shift": 0.0, "gain": 1.0}
        assert space.sources[-3:] == ("alpha", "gain", "shift")
        assert space_from_dict(space.to_dict(), space.name) == space  # records read back


def test_a_layer_of_the_other_layout_is_named_in_one_line():
    seq = chain(("rms_C", ["x"]), ("div", ["x", "n1"]), layout="ntc")
    with pytest.raises(GenomeError) as err:
        load_space("norm_act").check(seq)
    assert "layer for ntc" in str(err.value) and "space norm_act is for nchw" in str(err.value)
    dyt = chain(("mul", ["alpha", "x"]), ("tanh", ["n1"]), scalars={"alpha": 0.5})
    assert not load_space("seq_causal").contains(dyt)  # an element-wise nchw genome too
    assert load_space("seq_causal").contains(
        chain(("mul", ["alpha", "x"]), ("tanh", ["n1"]), layout="ntc", scalars={"alpha": 0.5}))
    with pytest.raises(GenomeError, match="reads input.s. beta outside space seq_causal"):
        load_space("seq_causal").check(chain(("mul", ["beta", "x"]), layout="ntc",
                                             scalars={"beta": 1.0}))


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
    ({"ops": ["add", "mean_C"]}, 'op(s) mean_C are statistics of layout ntc, not nchw; set '
                                 '"layout": "ntc"'),
    ({"ops": ["add", "mean_NHW"], "layout": "ntc"}, "op(s) mean_NHW are statistics of layout nchw"),
    ({"ops": ["add"], "layout": "nhwc"}, "'layout' must be one of nchw, ntc"),
    ({"ops": ["add"], "causal": True}, "true only with layout ntc"),
    ({"ops": ["add", "mean_T", "std_NT", "rms_C"], "layout": "ntc", "causal": True},
     "a causal space cannot list mean_T, std_NT: statistics over tokens"),
    ({"ops": ["add"], "scalars": {"weight": 1.0}}, "scalar name 'weight'"),
    ({"ops": ["add"], "scalars": {"alpha": "0.5"}}, "scalar 'alpha': initial value"),
    ({"ops": ["add"], "scalars": [0.5]}, "'scalars' maps names to initial values"),
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
                                            for axes in ("NHW", "HW", "GHW", "CHW", "C", "NT")}
