"""The zoo: every layer equals its reference, in train and eval mode, outputs and gradients.

Classic layers are checked against torch.nn modules; the EvoNorms against the published
formulas, written here again in plain torch (timm's EvoNorm2d* style), so a mistake in an
evonas kernel cannot hide in the reference. Parameters are random and shared between the
two sides, so a swapped operand or a wrong op order changes the numbers.
"""

import pytest
import torch
from torch import nn

from evonas.layers import zoo
from evonas.errors import EvonasError
from evonas.layers.genome import Genome
from evonas.layers.space import load_space

N, C, H, W = 6, 16, 5, 5
GROUPS = 4
TRAIN_STEPS = 3
# float32 layers against float32 references: rounding of reductions over N*H*W = 150
# values stays near 1e-6 relative. The float64 run has float64 references but the layer
# still takes its statistics in float32 (kernels.py), so the same bound applies.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-5, atol=1e-5)}
DTYPES = [torch.float32, torch.float64]




# --- references, written without evonas ------------------------------------------------


class Affine(nn.Module):
    """A per-channel affine: the closing weight * y + bias every zoo layer has, and the
    separate affine of LayerNorm(elementwise_affine=False)."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def instance_std(x, eps):
    return (x.var(dim=(2, 3), unbiased=False, keepdim=True) + eps).sqrt()


def instance_rms(x, eps):
    return (x.square().mean(dim=(2, 3), keepdim=True) + eps).sqrt()


def _by_group(x, groups, stat):
    n, c, h, w = x.shape
    xg = x.reshape(n, groups, c // groups, h, w)
    return stat(xg).expand_as(xg).reshape(n, c, h, w)


def group_std(x, groups, eps):
    return _by_group(x, groups, lambda g: (g.var(dim=(2, 3, 4), unbiased=False, keepdim=True)
                                           + eps).sqrt())


def group_rms(x, groups, eps):
    return _by_group(x, groups, lambda g: (g.square().mean(dim=(2, 3, 4), keepdim=True)
                                           + eps).sqrt())


class EvoNormB(nn.Module):
    """EvoNorm-B0/B1/B2 as timm's EvoNorm2dB*: running variance with momentum and the
    unbiased correction n / (n - 1); eval divides by sqrt(running_var + eps)."""

    def __init__(self, c, variant, eps, momentum=0.1):
        super().__init__()
        self.variant, self.eps, self.momentum = variant, eps, momentum
        self.v = nn.Parameter(torch.ones(c)) if variant == "b0" else None
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        if self.training:
            var = x.var(dim=(0, 2, 3), unbiased=False)
            n = x.numel() / x.shape[1]
            with torch.no_grad():
                self.running_var.copy_(self.running_var * (1 - self.momentum)
                                       + var.detach() * self.momentum * (n / (n - 1)))
        else:
            var = self.running_var
        left = (var + self.eps).sqrt().view(1, -1, 1, 1)
        if self.variant == "b0":
            right = x * self.v.view(1, -1, 1, 1) + instance_std(x, self.eps)
        elif self.variant == "b1":
            right = (x + 1) * instance_rms(x, self.eps)
        else:
            right = instance_rms(x, self.eps) - x
        y = x / torch.maximum(left, right)
        return y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class EvoNormS(nn.Module):
    """EvoNorm-S0/S1/S2 as timm's EvoNorm2dS*: group statistics over (C/g, H, W)."""

    def __init__(self, c, variant, groups, eps):
        super().__init__()
        self.variant, self.groups, self.eps = variant, groups, eps
        self.v = nn.Parameter(torch.ones(c)) if variant == "s0" else None
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        if self.variant == "s0":
            v = self.v.view(1, -1, 1, 1)
            y = x * torch.sigmoid(x * v) / group_std(x, self.groups, self.eps)
        elif self.variant == "s1":
            y = x * torch.sigmoid(x) / group_std(x, self.groups, self.eps)
        else:
            y = x * torch.sigmoid(x) / group_rms(x, self.groups, self.eps)
        return y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


# Each case: reference module for a layer of c channels with the layer's eps and groups,
# then (layer parameter, reference parameter) pairs, then (layer buffer prefix, reference
# buffer) pairs. Classic references end in Affine: the zoo layer's closing weight, bias.
_CLASSIC_PARAMS = [("v1", "0.weight"), ("v0", "0.bias"), ("weight", "2.weight"), ("bias", "2.bias")]
_BN_BUFFERS = [("running_mean_", "0.running_mean"), ("running_var_", "0.running_var")]
CLASSIC = {
    "bn_relu": (lambda c, eps, g: nn.Sequential(nn.BatchNorm2d(c, eps=eps), nn.ReLU(), Affine(c)),
                _CLASSIC_PARAMS, _BN_BUFFERS),
    "gn_relu": (lambda c, eps, g: nn.Sequential(nn.GroupNorm(g, c, eps=eps), nn.ReLU(), Affine(c)),
                _CLASSIC_PARAMS, []),
    "in_relu": (lambda c, eps, g: nn.Sequential(nn.InstanceNorm2d(c, eps=eps, affine=True),
                                                nn.ReLU(), Affine(c)),
                _CLASSIC_PARAMS, []),
    "ln_relu": (lambda c, eps, g: nn.Sequential(nn.LayerNorm([c, H, W], eps=eps,
                                                             elementwise_affine=False),
                                                Affine(c), nn.ReLU(), Affine(c)),
                [("v1", "1.weight"), ("v0", "1.bias"), ("weight", "3.weight"), ("bias", "3.bias")],
                []),
    "bn_silu": (lambda c, eps, g: nn.Sequential(nn.BatchNorm2d(c, eps=eps), nn.SiLU(), Affine(c)),
                _CLASSIC_PARAMS, _BN_BUFFERS),
}
_EVO_PARAMS = [("v1", "v"), ("weight", "weight"), ("bias", "bias")]
EVONORM = {
    f"evonorm_{v}": (lambda c, eps, g, v=v: EvoNormB(c, v, eps), _EVO_PARAMS,
                     [("running_var_", "running_var")])
    for v in ("b0", "b1", "b2")
} | {
    f"evonorm_{v}": (lambda c, eps, g, v=v: EvoNormS(c, v, g, eps), _EVO_PARAMS, [])
    for v in ("s0", "s1", "s2")
}
CASES = CLASSIC | EVONORM


# --- the comparison --------------------------------------------------------------------


def layer_buffer(layer, prefix):
    found = [b for name, b in layer.named_buffers() if name.startswith(prefix)]
    assert len(found) == 1, f"{prefix}* buffers: {len(found)}"
    return found[0]


def present(layer, ref, pairs):
    """The pairs whose reference parameter exists (EvoNorm-S1 has no v, ...); the layer
    must have exactly the paired parameters, so none escapes the comparison."""
    ref_names = dict(ref.named_parameters())
    pairs = [(a, b) for a, b in pairs if b in ref_names]
    assert sorted(a for a, _ in pairs) == sorted(n for n, _ in layer.named_parameters())
    return pairs


def randomize(layer, ref, pairs, gen):
    with torch.no_grad():
        for a, b in pairs:
            p = layer.get_parameter(a)
            if a in ("v1", "weight"):
                # Scales of magnitude 0.5 to 1.5, about one channel in four negative.
                value = torch.rand(p.shape, generator=gen, dtype=torch.float64) + 0.5
                flip = torch.rand(p.shape, generator=gen, dtype=torch.float64) < 0.25
                value = torch.where(flip, -value, value)
            else:
                value = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5
            p.copy_(value)
            ref.get_parameter(b).copy_(value)


def batch(gen, dtype, c=C):
    # Channels with their own mean and scale, so running estimates move visibly away
    # from their initial 0 and 1 and eval mode cannot pass on batch statistics.
    shift = torch.randn(1, c, 1, 1, generator=gen, dtype=torch.float64)
    scale = torch.rand(1, c, 1, 1, generator=gen, dtype=torch.float64) * 2 + 0.5
    return (torch.randn(N, c, H, W, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)


def assert_step(layer, ref, pairs, gen, dtype):
    """One forward and backward of both: outputs, input gradients, parameter gradients."""
    tol = TOL[dtype]
    x = batch(gen, dtype, layer.num_features).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out, out_ref = layer(x), ref(x_ref)
    torch.testing.assert_close(out, out_ref, **tol)
    upstream = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, [x] + [layer.get_parameter(a) for a, _ in pairs], upstream)
    refs = torch.autograd.grad(out_ref, [x_ref] + [ref.get_parameter(b) for _, b in pairs],
                               upstream)
    for what, g, g_ref in zip(["x"] + [a for a, _ in pairs], grads, refs):
        torch.testing.assert_close(g, g_ref, **tol, msg=lambda m: f"d/d{what}: {m}")


def assert_buffers(layer, ref, buffers, dtype):
    for prefix, b in buffers:
        torch.testing.assert_close(layer_buffer(layer, prefix), ref.get_buffer(b),
                                   check_dtype=False, **TOL[dtype])


def assert_matches(layer, ref, pairs, buffers, dtype, seed=0, random_params=True):
    gen = torch.Generator().manual_seed(seed)
    layer.to(dtype)
    ref.to(dtype)
    pairs = present(layer, ref, pairs)
    if random_params:
        randomize(layer, ref, pairs, gen)
    layer.train()
    ref.train()
    with torch.no_grad():
        for _ in range(TRAIN_STEPS):
            x = batch(gen, dtype, layer.num_features)
            torch.testing.assert_close(layer(x), ref(x), **TOL[dtype])
    assert_buffers(layer, ref, buffers, dtype)
    assert_step(layer, ref, pairs, gen, dtype)
    assert_buffers(layer, ref, buffers, dtype)
    layer.eval()
    ref.eval()
    assert_step(layer, ref, pairs, gen, dtype)
    assert_buffers(layer, ref, buffers, dtype)


def build(name, c=C, groups=GROUPS):
    layer = zoo.factory(name, groups=groups)(c)
    make_ref, pairs, buffers = CASES[name]
    return layer, make_ref(c, layer.eps, layer.groups), pairs, buffers


# --- each layer against its reference --------------------------------------------------


def test_every_conv_zoo_layer_has_a_reference_case():
    # the sequence layers' references are in test_zoo_sequence.py
    assert sorted(CASES) == sorted(zoo.names("nchw"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CLASSIC))
def test_classic_layer_matches_torch_modules(name, dtype):
    layer, ref, pairs, buffers = build(name)
    assert_matches(layer, ref, pairs, buffers, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(EVONORM))
def test_evonorm_matches_published_formula(name, dtype):
    layer, ref, pairs, buffers = build(name)
    assert_matches(layer, ref, pairs, buffers, dtype)


@pytest.mark.parametrize("name, torch_norm", [
    ("bn_relu", lambda: nn.Sequential(nn.BatchNorm2d(C), nn.ReLU())),
    ("bn_silu", lambda: nn.Sequential(nn.BatchNorm2d(C), nn.SiLU())),
    ("gn_relu", lambda: nn.Sequential(nn.GroupNorm(GROUPS, C), nn.ReLU())),
    ("in_relu", lambda: nn.Sequential(nn.InstanceNorm2d(C, affine=True), nn.ReLU())),
    ("ln_relu", lambda: nn.Sequential(nn.GroupNorm(1, C), nn.ReLU())),
])
def test_classic_layer_at_init_is_exactly_the_torch_layer(name, torch_norm):
    # Fresh parameters on both sides, nothing copied: v1 = 1, v0 = 0 inside the graph
    # are the torch module's own affine at init, and the layer's closing weight = 1,
    # bias = 0 match an identity Affine (there only so its gradients are compared too).
    layer = zoo.factory(name, groups=GROUPS)(C)
    ref = torch_norm().append(Affine(C))
    buffers = _BN_BUFFERS if name.startswith("bn") else []
    assert_matches(layer, ref, _CLASSIC_PARAMS, buffers, torch.float32, random_params=False)


def test_ln_relu_equals_group_norm_with_one_group():
    layer = zoo.factory("ln_relu")(C)
    ref = nn.Sequential(nn.GroupNorm(1, C), nn.ReLU(), Affine(C))
    assert_matches(layer, ref, _CLASSIC_PARAMS, [], torch.float32)


@pytest.mark.parametrize("name, reference", [
    ("gn_relu", lambda: nn.Sequential(nn.GroupNorm(6, 12), nn.ReLU(), Affine(12))),
    ("evonorm_s0", lambda: EvoNormS(12, "s0", 6, 1e-5)),
])
def test_groups_are_reduced_until_they_divide_channels(name, reference):
    # TensorFlow's rule: 8 groups asked of 12 channels become 6 (8 and 7 do not divide).
    layer = zoo.factory(name, groups=8)(12)
    assert layer.groups == 6
    pairs = _CLASSIC_PARAMS if name == "gn_relu" else _EVO_PARAMS
    assert_matches(layer, reference(), pairs, [], torch.float32)


def test_apply_act_false_is_the_affine_only():
    layer = zoo.factory("evonorm_s0", apply_act=False)(C)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.weight.normal_(generator=gen)
        layer.bias.normal_(generator=gen)
    x = batch(gen, torch.float32)
    expected = x * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected)


# --- the registry ----------------------------------------------------------------------

# Which built-in space holds each layer: the batch-free ones are also in the S space, and
# none is a pure activation.
# The sequence spaces hold the sequence layers; the causal one none with statistics over
# tokens.
SPACES = {
    "norm_act": set(zoo.names("nchw")),
    "norm_act_s": {"gn_relu", "in_relu", "ln_relu", "evonorm_s0", "evonorm_s1", "evonorm_s2"},
    "act": set(),
    "seq_bidirectional": set(zoo.names("ntc")),
    "seq_causal": {"layernorm", "rmsnorm", "dyt", "derf", "scalenorm"},
}
NODES = {"bn_relu": 8, "gn_relu": 8, "in_relu": 8, "ln_relu": 8, "bn_silu": 9,
         "evonorm_b0": 6, "evonorm_b1": 6, "evonorm_b2": 6,
         "evonorm_s0": 5, "evonorm_s1": 4, "evonorm_s2": 4,
         "layernorm": 5, "rmsnorm": 2, "dyt": 2, "derf": 3, "bn_nt": 5, "powernorm": 2,
         "scalenorm": 3}


def test_names_and_entries():
    assert zoo.names() == ("bn_relu", "gn_relu", "in_relu", "ln_relu", "bn_silu",
                           "evonorm_b0", "evonorm_b1", "evonorm_b2",
                           "evonorm_s0", "evonorm_s1", "evonorm_s2", "layernorm", "rmsnorm",
                           "dyt", "derf", "bn_nt", "powernorm", "scalenorm")
    assert zoo.names("ntc") == zoo.names()[11:] and zoo.names("nchw") == zoo.names()[:11]
    for name, e in zoo.ZOO.items():
        assert e.name == name and e.genome.name == name and zoo.get(name) is e.genome
        assert e.description and "\n" not in e.description and e.reference
    assert dict(zoo.ZOO["evonorm_b0"].defaults) == {"eps": 1e-3}
    assert zoo.factory("evonorm_b0")(C).eps == 1e-3
    assert zoo.factory("evonorm_b0", eps=1e-5)(C).eps == 1e-5


@pytest.mark.parametrize("name", zoo.names())
def test_genome_fits_a_search_and_round_trips(name):
    g = zoo.get(name)
    assert len(g) == NODES[name] <= 10
    back = Genome.from_json(g.to_json())
    assert back == g and back.name == name
    assert back.layout == g.layout and back.scalars == g.scalars


@pytest.mark.parametrize("space", list(SPACES))
def test_space_membership(space):
    s = load_space(space)
    assert {name for name in zoo.names() if s.contains(zoo.get(name))} == SPACES[space]
    assert set(zoo.seeds(s)) == SPACES[space]


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(EvonasError) as err:
        zoo.get("nope")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("unknown zoo layer 'nope'; known: ")
    assert all(name in message for name in zoo.names())
