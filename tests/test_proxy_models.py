"""Proxy architectures: where the layer factory is called, and that the models run."""

import pytest
import torch
from torch import nn

from evonas.errors import EvonasError
from evonas.proxy.models import (ARCHS, PROXY_ARCHS, SEQUENCE_ARCHS, BatchNormReLU,
                                 SqueezeExcite, bn_relu, build_model)



class ScaleLayer(nn.Module):
    """A non-BN stand-in for a candidate layer: per-channel scale, then ReLU if apply_act."""

    def __init__(self, num_features: int, apply_act: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.apply_act = apply_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.weight.shape[1], "layer built for the wrong channel count"
        x = x * self.weight
        return torch.relu(x) if self.apply_act else x


class Recorder:
    """A layer factory that records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []

    def __call__(self, num_features: int, apply_act: bool = True) -> nn.Module:
        self.calls.append((num_features, apply_act))
        return ScaleLayer(num_features, apply_act)

    def count(self, apply_act: bool) -> int:
        return sum(1 for _, act in self.calls if act is apply_act)


# (arch, calls with apply_act=True, calls with apply_act=False) at width 16.
EXPECTED_CALLS = [
    # ResNet-8: stem + 1 per block | last of each block's branch + 2 projection shortcuts.
    ("resnet", 4, 5),
    ("resnet20", 10, 11),
    # stem + depthwise of block 1 + (expand, depthwise) x 4 + head | 5 linear bottlenecks.
    ("mobilenetv2", 11, 5),
    ("mobilenetv2_full", 35, 17),
    # stem + depthwise of block 1 + (expand, depthwise) x 3 + head | 4 linear bottlenecks.
    ("efficientnet", 9, 4),
    ("efficientnet_b0", 33, 16),
]


@pytest.mark.parametrize("arch,with_act,without_act", EXPECTED_CALLS)
def test_factory_calls_follow_the_bn_placement_rule(arch, with_act, without_act):
    rec = Recorder()
    model = build_model(arch, rec, 16)
    assert (rec.count(True), rec.count(False)) == (with_act, without_act)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # The layer is norm and activation at once: no activation module next to it. SE's own
    # SiLU/sigmoid are functional and belong to SqueezeExcite.
    leaves = {type(m) for m in model.modules() if not list(m.children())}
    assert leaves <= {nn.Conv2d, nn.Linear, nn.Identity, ScaleLayer}


# The transformers take a sequence factory; tests/test_proxy_transformer.py covers them.
@pytest.mark.parametrize("arch", sorted(set(ARCHS) - set(SEQUENCE_ARCHS)))
def test_forward_shape_and_layer_gets_gradients(arch):
    rec = Recorder()
    model = build_model(arch, rec, 8 if arch.endswith(("full", "b0")) else 16, num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    layers = [m for m in model.modules() if isinstance(m, ScaleLayer)]
    assert layers and all(m.weight.grad is not None for m in layers)


def test_resnet_basic_block_layout():
    rec = Recorder()
    build_model("resnet", rec, 16)
    # stem; stage 1 block; stage 2 block with projection; stage 3 block with projection
    assert rec.calls == [(16, True), (16, True), (16, False),
                         (32, True), (32, False), (32, False),
                         (64, True), (64, False), (64, False)]


def test_efficientnet_has_squeeze_excitation_outside_the_factory():
    rec = Recorder()
    model = build_model("efficientnet", rec, 16)
    assert sum(isinstance(m, SqueezeExcite) for m in model.modules()) == 4
    assert not any(isinstance(m, SqueezeExcite) for m in build_model("mobilenetv2", rec, 16)
                   .modules())


@pytest.mark.parametrize("arch", PROXY_ARCHS)
def test_bn_relu_reference_models(arch):
    rec = Recorder()
    build_model(arch, rec, 16)
    model = build_model(arch, bn_relu, 16)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == len(rec.calls)
    assert [bn.apply_act for bn in bns] == [act for _, act in rec.calls]
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)


@pytest.mark.parametrize("arch", PROXY_ARCHS)
def test_proxies_stay_small(arch):
    # CPU-sized: the search trains one of these for every candidate.
    params = sum(p.numel() for p in build_model(arch, bn_relu, 16).parameters())
    assert 20_000 < params < 150_000


def test_width_scales_channels():
    small, large = Recorder(), Recorder()
    build_model("mobilenetv2", small, 16)
    build_model("mobilenetv2", large, 32)
    assert max(c for c, _ in large.calls[:-1]) == 2 * max(c for c, _ in small.calls[:-1])
    wide = Recorder()
    build_model("resnet", wide, 24)
    assert wide.calls[0] == (24, True) and wide.calls[-1] == (96, False)


def test_bn_relu():
    x = torch.randn(8, 4, 5, 5)
    with_act, without_act = bn_relu(4), bn_relu(4, apply_act=False)
    assert isinstance(with_act, BatchNormReLU)
    assert (with_act(x) >= 0).all()
    plain = nn.BatchNorm2d(4)
    torch.testing.assert_close(without_act(x), plain(x))
    torch.testing.assert_close(with_act(x), torch.relu(plain(x)))


def test_build_model_rejects_unknown_names_and_options():
    with pytest.raises(EvonasError, match="resnet, .*mobilenetv2.*efficientnet"):
        build_model("vgg", bn_relu, 16)
    with pytest.raises(EvonasError, match="depth"):
        build_model("resnet", bn_relu, 16, depth=10)
    with pytest.raises(EvonasError, match="'dropout'"):
        build_model("resnet", bn_relu, 16, dropout=0.1)
    with pytest.raises(EvonasError, match="config"):
        build_model("mobilenetv2", bn_relu, 16, config="huge")
    with pytest.raises(EvonasError, match="width"):
        build_model("efficientnet", bn_relu, 0)
    assert isinstance(build_model("resnet", bn_relu, 8, depth=14), nn.Module)
