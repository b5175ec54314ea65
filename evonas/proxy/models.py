"""CIFAR-sized architectures that host a candidate normalization-activation layer.

Second step of the proxy flow (data -> models -> train): train_proxy builds one of these
around the candidate's layer factory, and the rejection stages and the search score the
candidate by how well it trains. Three families, so a layer that only suits one is caught:
a ResNet (basic blocks), MobileNetV2 (inverted residuals, depthwise convs, linear
bottlenecks) and an EfficientNet (MBConv with squeeze-excitation).

A layer factory follows timm's norm-act convention, norm_act(num_features, apply_act=True),
and the placement rule is the one of the EvoNorm ResNets in tensorflow/tpu: every BatchNorm
followed by an activation becomes norm_act(C); every BatchNorm with no activation after it
(last of a residual branch, projection shortcut, linear bottleneck) becomes
norm_act(C, apply_act=False). The layer is norm and activation at once, so no activation
module sits next to it. Activations that follow no BatchNorm stay ordinary: the ReLU after a
ResNet's residual addition, and the SiLU/sigmoid inside squeeze-excitation.

Architecture names for build_model:
  resnet, resnet8          ResNet-8 (proxy); resnet20, resnet32, resnet56 for full training
  mobilenetv2              small MobileNetV2 (proxy); mobilenetv2_full: standard MobileNetV2
  efficientnet             small EfficientNet (proxy); efficientnet_b0: EfficientNet-B0 layout
  lm, vit                  transformers (transformer.py): a causal character LM and a ViT, with
                           lm_full and vit_full for full training; SEQUENCE_ARCHS below
`width` is the channel count of the first stage (16 in all standard layouts); the other
stages scale with it.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from evonas.errors import EvonasError
from evonas.proxy.transformer import PLACEMENTS, post_norm_blocks, transformer_lm, vit

NormAct = Callable[..., nn.Module]
"""A layer factory: norm_act(num_features: int, apply_act: bool = True) -> nn.Module."""


class BatchNormReLU(nn.BatchNorm2d):
    """The reference layer: BatchNorm2d followed by ReLU, or BatchNorm2d alone."""

    def __init__(self, num_features: int, apply_act: bool = True) -> None:
        super().__init__(num_features)
        self.apply_act = apply_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return F.relu(x) if self.apply_act else x

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, apply_act={self.apply_act}"


def bn_relu(num_features: int, apply_act: bool = True) -> nn.Module:
    """Reference factory (BN-ReLU, or BN alone when apply_act=False), the baseline layer."""
    return BatchNormReLU(num_features, apply_act)


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    # No bias: every conv here is followed by the norm-act layer, as BN convs are.
    return nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups,
                     bias=False)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round a scaled channel count to a multiple of divisor, as MobileNet/EfficientNet do."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _init_weights(model: nn.Module) -> None:
    # Only convs and linears: the candidate layer keeps whatever initialisation it defines.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.01)
            nn.init.zeros_(module.bias)


def _check_width(width: int) -> None:
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise EvonasError(f"model width must be a positive integer, got {width!r}")


# --- ResNet ------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """conv3x3 - layer - conv3x3 - layer(no act), plus shortcut, then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm_act: NormAct) -> None:
        super().__init__()
        self.conv1 = _conv(in_ch, out_ch, 3, stride)
        self.act1 = norm_act(out_ch)
        self.conv2 = _conv(out_ch, out_ch, 3)
        self.norm2 = norm_act(out_ch, apply_act=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            # Projection shortcut (option B) where the shape changes, identity elsewhere.
            self.shortcut = nn.Sequential(_conv(in_ch, out_ch, 1, stride),
                                          norm_act(out_ch, apply_act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.act1(self.conv1(x))))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016): 3 stages of basic blocks at width w, 2w, 4w."""

    def __init__(self, norm_act: NormAct, width: int, blocks_per_stage: int,
                 num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv(3, width, 3), norm_act(width))
        blocks: list[nn.Module] = []
        in_ch = width
        for stage in range(3):
            out_ch = width * 2**stage
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_ch, out_ch, stride, norm_act))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_ch, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet(norm_act: NormAct, width: int = 16, depth: int = 8,
           num_classes: int = 10) -> ResNet:
    """CIFAR ResNet of depth 6n+2 (n basic blocks per stage): 8 for proxies, 20+ for full runs."""
    _check_width(width)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise EvonasError(f"ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 56, ...), "
                          f"got {depth!r}")
    return ResNet(norm_act, width, (depth - 2) // 6, num_classes)


# --- MobileNetV2 and EfficientNet ---------------------------------------------------------


class SqueezeExcite(nn.Module):
    """Channel gating from pooled features; its SiLU and sigmoid are its own, not the layer's."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = torch.sigmoid(self.expand(F.silu(self.reduce(scale))))
        return x * scale


class InvertedResidual(nn.Module):
    """Expand 1x1 - layer - depthwise kxk - layer - [SE] - project 1x1 - layer(no act).

    MobileNetV2's block without SE, EfficientNet's MBConv with it. The projection is the
    linear bottleneck, hence apply_act=False; the residual joins when shapes match.
    """

    def __init__(self, in_ch: int, out_ch: int, *, stride: int, expand: int, kernel: int,
                 se_ratio: float, norm_act: NormAct) -> None:
        super().__init__()
        hidden = in_ch * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [_conv(in_ch, hidden, 1), norm_act(hidden)]
        layers += [_conv(hidden, hidden, kernel, stride, groups=hidden), norm_act(hidden)]
        if se_ratio > 0:
            # Squeeze width relative to the block input, as in EfficientNet.
            layers.append(SqueezeExcite(hidden, max(1, int(in_ch * se_ratio))))
        layers += [_conv(hidden, out_ch, 1), norm_act(out_ch, apply_act=False)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


# A stage: (expansion, kernel, stride, channels at width 16, blocks).
Stage = tuple[int, int, int, int, int]


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """Layout of an inverted-residual network; channel counts are for width 16."""

    stem: int
    stem_stride: int
    stages: tuple[Stage, ...]
    head: int


# The full layouts use the usual CIFAR adaptation (stem and first ImageNet downsampling at
# stride 1, so 32x32 inputs end at 4x4). The proxies downsample in the stem instead: on CPU
# the expanded 32x32 maps would cost three times a ResNet-8 step, and the candidate layer
# still meets maps from 16x16 down to 4x4.
MOBILENETV2_CONFIGS: dict[str, StackConfig] = {
    "proxy": StackConfig(16, 2, ((1, 3, 1, 16, 1), (4, 3, 2, 24, 1), (4, 3, 1, 32, 2),
                                 (4, 3, 2, 64, 1)), 256),
    "full": StackConfig(32, 1, ((1, 3, 1, 16, 1), (6, 3, 1, 24, 2), (6, 3, 2, 32, 3),
                                (6, 3, 2, 64, 4), (6, 3, 1, 96, 3), (6, 3, 2, 160, 3),
                                (6, 3, 1, 320, 1)), 1280),
}

EFFICIENTNET_CONFIGS: dict[str, StackConfig] = {
    "proxy": StackConfig(16, 2, ((1, 3, 1, 16, 1), (4, 3, 2, 24, 1), (4, 5, 1, 40, 1),
                                 (4, 3, 2, 80, 1)), 256),
    "b0": StackConfig(32, 1, ((1, 3, 1, 16, 1), (6, 3, 1, 24, 2), (6, 5, 2, 40, 2),
                              (6, 3, 2, 80, 3), (6, 5, 1, 112, 3), (6, 5, 2, 192, 4),
                              (6, 3, 1, 320, 1)), 1280),
}


class InvertedResidualNet(nn.Module):
    """Stem conv - layer - inverted residual stages - 1x1 head conv - layer - pool - linear."""

    def __init__(self, norm_act: NormAct, width: int, layout: StackConfig, se_ratio: float,
                 num_classes: int) -> None:
        super().__init__()
        scale = width / 16

        def channels(c: int) -> int:
            return _make_divisible(c * scale)

        stem_ch = channels(layout.stem)
        self.stem = nn.Sequential(_conv(3, stem_ch, 3, layout.stem_stride), norm_act(stem_ch))
        blocks: list[nn.Module] = []
        in_ch = stem_ch
        for expand, kernel, stride, out, repeats in layout.stages:
            for i in range(repeats):
                blocks.append(InvertedResidual(
                    in_ch, channels(out), stride=stride if i == 0 else 1, expand=expand,
                    kernel=kernel, se_ratio=se_ratio, norm_act=norm_act))
                in_ch = channels(out)
        self.blocks = nn.Sequential(*blocks)
        # As in MobileNetV2, the head does not shrink below its base size for narrow nets.
        head_ch = channels(layout.head) if scale > 1 else layout.head
        self.head = nn.Sequential(_conv(in_ch, head_ch, 1), norm_act(head_ch))
        self.fc = nn.Linear(head_ch, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def mobilenetv2(norm_act: NormAct, width: int = 16, num_classes: int = 10,
                config: str = "proxy") -> InvertedResidualNet:
    """MobileNetV2 for 32x32 inputs; width 16 is width_mult 1.0.

    config "proxy": stride-2 stem, 5 blocks, expansion 4, head 256; "full": the standard
    17-block layout with CIFAR strides.
    """
    _check_width(width)
    layout = _pick(MOBILENETV2_CONFIGS, config, "mobilenetv2")
    return InvertedResidualNet(norm_act, width, layout, 0.0, num_classes)


def efficientnet(norm_act: NormAct, width: int = 16, num_classes: int = 10,
                 config: str = "proxy", se_ratio: float = 0.25) -> InvertedResidualNet:
    """EfficientNet for 32x32 inputs: MBConv blocks with squeeze-excitation.

    config "proxy": stride-2 stem, 4 blocks with 3x3 and 5x5 depthwise kernels, expansion 4,
    head 256; "b0": the EfficientNet-B0 layout with CIFAR strides (no stochastic depth or
    dropout, so training stays a function of the seed).
    """
    _check_width(width)
    layout = _pick(EFFICIENTNET_CONFIGS, config, "efficientnet")
    return InvertedResidualNet(norm_act, width, layout, se_ratio, num_classes)


def _pick(configs: dict[str, StackConfig], config: str, family: str) -> StackConfig:
    if config not in configs:
        raise EvonasError(f"unknown {family} config {config!r}: use one of "
                          f"{', '.join(sorted(configs))}")
    return configs[config]


# --- registry ----------------------------------------------------------------------------

ARCHS: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {
    "resnet": (resnet, {}),
    "resnet8": (resnet, {"depth": 8}),
    "resnet20": (resnet, {"depth": 20}),
    "resnet32": (resnet, {"depth": 32}),
    "resnet56": (resnet, {"depth": 56}),
    "mobilenetv2": (mobilenetv2, {}),
    "mobilenetv2_full": (mobilenetv2, {"config": "full"}),
    "efficientnet": (efficientnet, {}),
    "efficientnet_b0": (efficientnet, {"config": "b0"}),
    "lm": (transformer_lm, {}),
    "lm_full": (transformer_lm, {"depth": 6, "context": 256}),
    "vit": (vit, {}),
    "vit_full": (vit, {"depth": 9}),
}

SEQUENCE_ARCHS = ("lm", "lm_full", "vit", "vit_full")
"""Transformers (transformer.py): their factory is norm_layer(C) over (N, T, C), not norm_act."""

TEXT_ARCHS = ("lm", "lm_full")
"""Causal LMs: they read a text dataset's windows and train with train_lm.LMTrainer."""

PROXY_ARCHS = ("resnet", "mobilenetv2", "efficientnet")
"""The three small architectures the proxy tasks use by default."""


def _placement_options(arch: str, placement: str) -> dict[str, Any]:
    """build_model's keywords for a norm placement (transformer.py: pre, post, mixln):
    the transformers take it; a CNN has one place for each norm-act layer, so it takes
    only the default "pre" and no keyword."""
    if placement not in PLACEMENTS:
        raise EvonasError(f"--placement {placement!r}: use one of {', '.join(PLACEMENTS)}")
    if arch in SEQUENCE_ARCHS:
        return {"placement": placement}
    if placement != "pre":
        raise EvonasError(f"--placement {placement}: {arch!r} is a CNN, whose norm-act layers "
                          f"have one place; placements are for the transformers "
                          f"({', '.join(SEQUENCE_ARCHS)}): drop --placement")
    return {}


def check_placement(placement: str, archs) -> None:
    """The placement suits every architecture: a transformer too shallow for Mix-LN's
    post-norm quarter fails here, before any model is built."""
    for arch in archs:
        if _placement_options(arch, placement):
            builder, preset = ARCHS[arch]
            depth = preset.get("depth", inspect.signature(builder).parameters["depth"].default)
            try:
                post_norm_blocks(placement, depth)
            except EvonasError as err:
                raise EvonasError(f"--placement {placement} on {arch} ({depth} blocks): "
                                  f"{err}") from None


def build_model(arch: str, norm_act: NormAct, width: int, num_classes: int = 10,
                placement: str = "pre", **kw: Any) -> nn.Module:
    """Build an architecture by name around norm_act; placement is where a transformer's
    norms sit (a CNN takes only "pre"), kw goes to the family's builder."""
    if arch not in ARCHS:
        raise EvonasError(f"unknown architecture {arch!r}: use one of {', '.join(ARCHS)}")
    kw = {**_placement_options(arch, placement), **kw}
    builder, preset = ARCHS[arch]
    options = set(inspect.signature(builder).parameters) - {"norm_act", "norm_layer", "width",
                                                             "num_classes"}
    unknown = sorted(set(kw) - options)
    if unknown:
        raise EvonasError(f"unknown option {unknown[0]!r} for architecture {arch!r}: use "
                          f"{', '.join(sorted(options))}")
    return builder(norm_act, width=width, num_classes=num_classes, **{**preset, **kw})
