"""The zoo layers written by hand in torch, as an engineer would write them without evonas.

Two forms per layer (conv layers, HandLayer; sequence layers, SEQUENCE and SEQUENCE_NATIVE):
- `formula`: the layer's formula in plain torch ops (timm's style for the EvoNorms), the
  yardstick for the exporter: same math, no interpreter, no generated code.
- `native` (classic layers only): torch's fused module (BatchNorm2d, GroupNorm, ...) with
  its activation, the speed a user gets today from nn.BatchNorm2d + ReLU.

Every form computes what the zoo genome computes: y, then the per-channel affine
weight * y + bias; apply_act=False is that affine alone (evonas's convention, after the
EvoNorm ResNets of tensorflow/tpu).

The sequence layers (layernorm, rmsnorm, dyt) act on (..., C) over the last dimension and
have the zoo genomes' parameters under the same names (weight, bias, DyT's scalar alpha),
so an exported or interpreted layer's state_dict loads into them. Their native forms are
nn.LayerNorm and nn.RMSNorm; nn.RMSNorm has no bias, where the zoo's rmsnorm has one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _groups(c: int, groups: int) -> int:
    g = min(groups, c)
    while c % g:
        g -= 1
    return g


class HandLayer(nn.Module):
    def __init__(self, kind: str, num_features: int, apply_act: bool = True, eps: float = 1e-5,
                 momentum: float = 0.1, groups: int = 8, native: bool = False, **_):
        super().__init__()
        self.kind, self.apply_act, self.eps, self.momentum = kind, apply_act, eps, momentum
        self.native = native
        self.groups = _groups(num_features, groups)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.v0 = nn.Parameter(torch.zeros(num_features))
        self.v1 = nn.Parameter(torch.ones(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _batch_stats(self, x):
        if not self.training:
            return self.running_mean.view(1, -1, 1, 1), self.running_var.view(1, -1, 1, 1)
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False, keepdim=True)
        n = x.numel() / x.size(1)
        with torch.no_grad():
            self.running_mean.mul_(1 - self.momentum).add_(mean.flatten() * self.momentum)
            self.running_var.mul_(1 - self.momentum).add_(var.flatten() * self.momentum * n / (n - 1))
        return mean, var

    def _batch_var(self, x):
        if not self.training:
            return self.running_var.view(1, -1, 1, 1)
        var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        n = x.numel() / x.size(1)
        with torch.no_grad():
            self.running_var.mul_(1 - self.momentum).add_(var.flatten() * self.momentum * n / (n - 1))
        return var

    def _group_var(self, x):
        n, c, h, w = x.shape
        var = x.reshape(n, self.groups, -1).var(dim=-1, unbiased=False, keepdim=True)
        return var.expand(n, self.groups, c // self.groups).reshape(n, c, 1, 1)

    def _group_sq(self, x):
        n, c, h, w = x.shape
        sq = x.reshape(n, self.groups, -1).square().mean(dim=-1, keepdim=True)
        return sq.expand(n, self.groups, c // self.groups).reshape(n, c, 1, 1)

    def _normalized(self, x):
        """(x - mean) / sqrt(var + eps) over the kind's axes, by formula or natively."""
        k = self.kind[:2]
        if self.native:
            if k == "bn":
                return F.batch_norm(x, self.running_mean, self.running_var, None, None,
                                    self.training, self.momentum, self.eps)
            g = {"gn": self.groups, "in": x.size(1), "ln": 1}[k]
            return F.group_norm(x, g, None, None, self.eps)
        if k == "bn":
            mean, var = self._batch_stats(x)
        elif k == "gn":
            n, c, h, w = x.shape
            xg = x.reshape(n, self.groups, -1)
            var, mean = torch.var_mean(xg, dim=-1, unbiased=False, keepdim=True)
            mean = mean.expand(n, self.groups, c // self.groups).reshape(n, c, 1, 1)
            var = var.expand(n, self.groups, c // self.groups).reshape(n, c, 1, 1)
        else:
            dims = (2, 3) if k == "in" else (1, 2, 3)
            var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
        return (x - mean) / (var + self.eps).sqrt()

    def _y(self, x):
        v0, v1 = self.v0.view(1, -1, 1, 1), self.v1.view(1, -1, 1, 1)
        kind, eps = self.kind, self.eps
        if kind in ("bn_relu", "gn_relu", "in_relu", "ln_relu"):
            return torch.relu(self._normalized(x) * v1 + v0)
        if kind == "bn_silu":
            return F.silu(self._normalized(x) * v1 + v0)
        inst_std = lambda t: (t.var(dim=(2, 3), unbiased=False, keepdim=True) + eps).sqrt()
        inst_rms = lambda t: (t.square().mean(dim=(2, 3), keepdim=True) + eps).sqrt()
        if kind == "evonorm_b0":
            return x / torch.maximum((self._batch_var(x) + eps).sqrt(), v1 * x + inst_std(x))
        if kind == "evonorm_b1":
            return x / torch.maximum((self._batch_var(x) + eps).sqrt(), (x + 1) * inst_rms(x))
        if kind == "evonorm_b2":
            return x / torch.maximum((self._batch_var(x) + eps).sqrt(), inst_rms(x) - x)
        if kind == "evonorm_s0":
            return x * torch.sigmoid(v1 * x) / (self._group_var(x) + eps).sqrt()
        if kind == "evonorm_s1":
            return x * torch.sigmoid(x) / (self._group_var(x) + eps).sqrt()
        if kind == "evonorm_s2":
            return x * torch.sigmoid(x) / (self._group_sq(x) + eps).sqrt()
        raise ValueError(f"no hand-written form of {kind}")

    def forward(self, x):
        if self.apply_act:
            x = self._y(x)
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


NATIVE = ("bn_relu", "gn_relu", "in_relu", "ln_relu", "bn_silu")


# --- sequence layers (..., C) ------------------------------------------------------------


class _LastDimAffine(nn.Module):
    """weight * y + bias over the last dimension, as every sequence zoo layer ends."""

    def __init__(self, num_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x):
        return self._y(x) * self.weight + self.bias


class HandLayerNorm(_LastDimAffine):
    """(x - mean) / sqrt(var + eps) over the last dimension, then weight * y + bias."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features)
        self.eps = eps

    def _y(self, x):
        var, mean = torch.var_mean(x, dim=-1, unbiased=False, keepdim=True)
        return (x - mean) / (var + self.eps).sqrt()


class HandRMSNorm(_LastDimAffine):
    """LLaMA's RMSNorm, x * rsqrt(mean(x^2) + eps) * weight, plus the zoo's bias."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features)
        self.eps = eps

    def _y(self, x):
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)


class HandDyT(_LastDimAffine):
    """DyT (jiachenzhu/DyT's DynamicTanh): weight * tanh(alpha * x) + bias, alpha a scalar."""

    def __init__(self, num_features: int, alpha_init: float = 0.5):
        super().__init__(num_features)
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))

    def _y(self, x):
        return torch.tanh(self.alpha * x)


# norm_layer(num_features) -> module, by zoo name
SEQUENCE = {"layernorm": HandLayerNorm, "rmsnorm": HandRMSNorm, "dyt": HandDyT}
SEQUENCE_NATIVE = {"layernorm": lambda c: nn.LayerNorm(c, eps=1e-5),
                   "rmsnorm": lambda c: nn.RMSNorm(c, eps=1e-5)}
