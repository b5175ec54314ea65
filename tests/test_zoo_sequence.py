"""The sequence zoo: every (N, T, C) layer equals its reference, outputs and gradients,
in train and eval mode.

LayerNorm, RMSNorm and BatchNorm are checked against torch.nn modules; DyT, Derf,
PowerNorm and ScaleNorm against their papers' formulas written here again in plain torch,
so a mistake in an evonas kernel cannot hide in the reference. Parameters are random and
shared between the two sides, so a swapped operand or a wrong op order changes the numbers.
"""

import math

import pytest
import torch
from torch import nn

from evonas.layers import zoo

N, T, C = 4, 7, 16
TRAIN_STEPS = 3
EPS = 1e-5
TOL = dict(rtol=1e-5, atol=1e-5)
DTYPES = [torch.float32, torch.float64]


# --- references, written without evonas ------------------------------------------------


class DyT(nn.Module):
    """jiachenzhu/DyT's DynamicTanh: weight * tanh(alpha * x) + bias."""

    def __init__(self, c, alpha_init=0.5):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1) * alpha_init)
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return torch.tanh(self.alpha * x) * self.weight + self.bias


class Derf(nn.Module):
    """weight * erf(alpha * x + s) + bias, alpha and s scalars."""

    def __init__(self, c):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor([0.5]))
        self.s = nn.Parameter(torch.zeros(1))
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return torch.erf(self.alpha * x + self.s) * self.weight + self.bias


class PowerNormForward(nn.Module):
    """PowerNorm's forward statistic: x / sqrt(psi^2 + eps), psi^2 the quadratic mean over
    batch and tokens in training (its running average, momentum 0.1 from 1, in eval)."""

    def __init__(self, c, eps=EPS, momentum=0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_phi", torch.ones(c))

    def forward(self, x):
        if self.training:
            phi = x.square().mean(dim=(0, 1))
            with torch.no_grad():
                self.running_phi.mul_(1 - self.momentum).add_(self.momentum * phi.float())
        else:
            phi = self.running_phi.to(x.dtype)
        return x / torch.sqrt(phi + self.eps) * self.weight + self.bias


class ScaleNorm(nn.Module):
    """Nguyen & Salazar: g * x / ||x||, g one scalar initialised to sqrt(C); eps inside the
    root, as evonas's rms (sqrt(||x||^2 + C * eps) = sqrt(C) * rms)."""

    def __init__(self, c, eps=EPS):
        super().__init__()
        self.eps = eps * c
        self.g = nn.Parameter(torch.tensor(math.sqrt(c)))
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        norm = torch.sqrt(x.square().sum(dim=-1, keepdim=True) + self.eps)
        return self.g * x / norm * self.weight + self.bias


class BatchNormNT(nn.Module):
    """torch.nn.BatchNorm1d over (N, C, T): the features of every token of every sample."""

    def __init__(self, c):
        super().__init__()
        self.bn = nn.BatchNorm1d(c, eps=EPS)

    def forward(self, x):
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


def _rms_norm(c):
    ref = nn.RMSNorm(c, eps=EPS)
    ref.bias = nn.Parameter(torch.zeros(c))  # the layer's bias, 0 in torch's RMSNorm
    ref.register_forward_hook(lambda m, args, out: out + m.bias)
    return ref


# name: (reference, [(layer parameter, reference parameter, scale)], [(buffer, buffer)]).
# scale: the reference's parameter is the layer's times it (ScaleNorm's g = sqrt(C) gain).
CASES = {
    "layernorm": (lambda c: nn.LayerNorm(c, eps=EPS),
                  [("weight", "weight", 1), ("bias", "bias", 1)], []),
    "rmsnorm": (_rms_norm, [("weight", "weight", 1), ("bias", "bias", 1)], []),
    "dyt": (DyT, [("weight", "weight", 1), ("bias", "bias", 1), ("alpha", "alpha", 1)], []),
    "derf": (Derf, [("weight", "weight", 1), ("bias", "bias", 1), ("alpha", "alpha", 1),
                    ("shift", "s", 1)], []),
    "bn_nt": (BatchNormNT, [("weight", "bn.weight", 1), ("bias", "bn.bias", 1)],
              [("running_mean_n1", "bn.running_mean"), ("running_var_n4", "bn.running_var")]),
    "powernorm": (PowerNormForward, [("weight", "weight", 1), ("bias", "bias", 1)],
                  [("running_sqmean_n1", "running_phi")]),
    "scalenorm": (ScaleNorm, [("weight", "weight", 1), ("bias", "bias", 1),
                              ("gain", "g", math.sqrt(C))], []),
}


# --- harness ---------------------------------------------------------------------------


def batch(gen, dtype):
    return (1.5 * torch.randn(N, T, C, generator=gen) + 0.3).to(dtype)


def share_random_params(layer, ref, pairs, gen):
    refs = dict(ref.named_parameters())
    with torch.no_grad():
        for name, ref_name, scale in pairs:
            p = getattr(layer, name)
            p.add_(0.3 * torch.randn(p.shape, generator=gen).to(p.dtype))
            refs[ref_name].copy_((p * scale).reshape(refs[ref_name].shape))


def step(module, x):
    x = x.clone().requires_grad_(True)
    module.zero_grad()
    y = module(x)
    (y * torch.linspace(-1.0, 1.0, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
    return y.detach(), x.grad


def assert_matches(name, dtype, seed=0):
    make_ref, pairs, buffers = CASES[name]
    layer, ref = zoo.factory(name)(C).to(dtype), make_ref(C).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    share_random_params(layer, ref, pairs, gen)
    refs = dict(ref.named_parameters())
    for mode in ("train", "eval"):  # train first: eval reads the running estimates it left
        layer.train(mode == "train")
        ref.train(mode == "train")
        for _ in range(TRAIN_STEPS):
            x = batch(gen, dtype)
            y, dx = step(layer, x)
            y_ref, dx_ref = step(ref, x)
            torch.testing.assert_close(y, y_ref, **TOL)
            torch.testing.assert_close(dx, dx_ref, **TOL)
            for p, ref_p, scale in pairs:  # d/d(gain) = scale * d/dg
                want = (refs[ref_p].grad * scale).reshape(getattr(layer, p).shape)
                torch.testing.assert_close(getattr(layer, p).grad, want, **TOL)
            for b, ref_b in buffers:
                torch.testing.assert_close(layer.get_buffer(b), ref.get_buffer(ref_b), **TOL)


# --- tests -----------------------------------------------------------------------------


def test_every_sequence_zoo_layer_has_a_reference_case():
    assert sorted(CASES) == sorted(zoo.names("ntc"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_sequence_layer_matches_its_reference(name, dtype):
    assert_matches(name, dtype)


def test_layernorm_loads_an_nn_layernorm_state_dict():
    ln = nn.LayerNorm(C)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    layer = zoo.factory("layernorm")(C)
    layer.load_state_dict(ln.state_dict())
    x = torch.randn(2, 3, 5, C)  # any (..., C): a grid of patches too
    torch.testing.assert_close(layer(x), ln(x), **TOL)


def test_scalars_start_at_the_papers_values():
    assert zoo.factory("dyt")(C).alpha.item() == 0.5
    derf = zoo.factory("derf")(C)
    assert (derf.alpha.item(), derf.shift.item()) == (0.5, 0.0)
    assert zoo.factory("scalenorm")(C).gain.item() == 1.0
    assert zoo.get("dyt").scalars == {"alpha": 0.5}

