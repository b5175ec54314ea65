"""Torch kernels behind the primitive ops.

The interpreter calls these functions, and the exporter copies their source text verbatim
into every generated layer file that uses them, so interpreted and exported layers run the
same code and cannot drift apart. Hence the constraints on this file: every function is
TorchScript-compatible (full annotations, no closures, no module globals but torch), and
refers to no other function here except through the exporter's helper list in ops.py.

Statistics are computed in at least float32 (float64 stays float64, so gradient checks in
double precision work) and cast back to the input dtype, as timm's norm layers do, so
bfloat16 activations do not lose the variance to rounding.
"""

from typing import List

import torch

# Numeric guards (stated once here, in the code that runs): denominators nearer to 0 than
# 1e-6 are pushed away from 0 keeping their sign, arguments of the signed log and root are
# clamped to 1e-6 in magnitude, and exp saturates at e^80 instead of overflowing float32 or
# bfloat16 (both overflow at 88.7). Gradients stay finite; values a working layer meets are
# untouched, so the published layers come out exact. The literals are inline because the
# exporter copies each function alone.


def safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # 0 counts as positive: the denominator becomes +TINY rather than a NaN-producing 0.
    b = torch.where(b >= 0, b.clamp(min=1e-6), b.clamp(max=-1e-6))
    return a / b


def safe_exp(a: torch.Tensor) -> torch.Tensor:
    return torch.exp(a.clamp(max=80.0))


def signed_log(a: torch.Tensor) -> torch.Tensor:
    return torch.sign(a) * torch.log(a.abs().clamp(min=1e-6))


def signed_sqrt(a: torch.Tensor) -> torch.Tensor:
    return torch.sign(a) * torch.sqrt(a.abs().clamp(min=1e-6))


# --- per-sample aggregates: instance (H,W), layer (C,H,W), group (C/g,H,W) -------------


def sample_mean(x: torch.Tensor, dims: List[int]) -> torch.Tensor:
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return xf.mean(dim=dims, keepdim=True).to(x.dtype)


def sample_var(x: torch.Tensor, dims: List[int]) -> torch.Tensor:
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return xf.var(dim=dims, unbiased=False, keepdim=True).to(x.dtype)


def sample_std(x: torch.Tensor, dims: List[int], eps: float) -> torch.Tensor:
    var = x.to(torch.promote_types(x.dtype, torch.float32)).var(dim=dims, unbiased=False, keepdim=True)
    return (var + eps).sqrt().to(x.dtype)


def sample_rms(x: torch.Tensor, dims: List[int], eps: float) -> torch.Tensor:
    sq = x.to(torch.promote_types(x.dtype, torch.float32)).square().mean(dim=dims, keepdim=True)
    return (sq + eps).sqrt().to(x.dtype)


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    # A value may carry a single channel (the output of a layer aggregate); its group
    # statistic equals the statistic over all channels.
    g = groups if x.size(1) > 1 else 1
    return x.to(torch.promote_types(x.dtype, torch.float32)).reshape(x.size(0), g, -1)


def _ungrouped(stat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # (N, g, 1) -> (N, C, 1, 1): each channel gets its group's statistic.
    n, c = x.size(0), x.size(1)
    g = stat.size(1)
    return stat.expand(n, g, c // g).reshape(n, c, 1, 1).to(x.dtype)


def group_mean(x: torch.Tensor, groups: int) -> torch.Tensor:
    return _ungrouped(_grouped(x, groups).mean(dim=-1, keepdim=True), x)


def group_var(x: torch.Tensor, groups: int) -> torch.Tensor:
    return _ungrouped(_grouped(x, groups).var(dim=-1, unbiased=False, keepdim=True), x)


def group_std(x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    var = _grouped(x, groups).var(dim=-1, unbiased=False, keepdim=True)
    return _ungrouped((var + eps).sqrt(), x)


def group_rms(x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    sq = _grouped(x, groups).square().mean(dim=-1, keepdim=True)
    return _ungrouped((sq + eps).sqrt(), x)


# --- batch aggregates (N,H,W) with BatchNorm2d's running estimates ----------------------
# Training normalises with the batch statistic and updates the running estimate in place
# (momentum as in torch: new = (1 - m) * old + m * batch); eval uses the estimate. The
# running variance is the unbiased one, as torch.nn.BatchNorm2d keeps it.


def _update(running: torch.Tensor, batch: torch.Tensor, momentum: float) -> None:
    running.mul_(1.0 - momentum).add_(batch.detach().reshape(-1) * momentum)


def _per_channel(running: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return running.reshape(1, -1, 1, 1).to(x.dtype)


def batch_mean(x: torch.Tensor, running: torch.Tensor, training: bool, momentum: float) -> torch.Tensor:
    if not training:
        return _per_channel(running, x)
    mean = x.to(torch.promote_types(x.dtype, torch.float32)).mean(dim=[0, 2, 3], keepdim=True)
    _update(running, mean, momentum)
    return mean.to(x.dtype)


def _batch_var(x: torch.Tensor, running: torch.Tensor, momentum: float) -> torch.Tensor:
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    var = xf.var(dim=[0, 2, 3], unbiased=False, keepdim=True)
    n = xf.numel() // xf.size(1)
    _update(running, var * (n / max(n - 1, 1)), momentum)
    return var


def batch_var(x: torch.Tensor, running: torch.Tensor, training: bool, momentum: float) -> torch.Tensor:
    if not training:
        return _per_channel(running, x)
    return _batch_var(x, running, momentum).to(x.dtype)


def batch_std(
    x: torch.Tensor, running: torch.Tensor, training: bool, momentum: float, eps: float
) -> torch.Tensor:
    if not training:
        return _per_channel((running + eps).sqrt(), x)
    return (_batch_var(x, running, momentum) + eps).sqrt().to(x.dtype)


def batch_rms(
    x: torch.Tensor, running: torch.Tensor, training: bool, momentum: float, eps: float
) -> torch.Tensor:
    if not training:
        return _per_channel((running + eps).sqrt(), x)
    sq = x.to(torch.promote_types(x.dtype, torch.float32)).square().mean(dim=[0, 2, 3], keepdim=True)
    _update(running, sq, momentum)
    return (sq + eps).sqrt().to(x.dtype)


def resolve_groups(num_features: int, groups: int, group_size: int = 0) -> int:
    """Group count for num_features channels (timm's groups/group_size arguments).

    With group_size the count is num_features // group_size and must divide evenly. With
    groups alone it is reduced until it divides num_features, as TensorFlow's EvoNorm does,
    so one layer definition fits every width of a network.
    """
    if group_size:
        if num_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide num_features {num_features}")
        return num_features // group_size
    g = max(1, min(groups, num_features))
    while num_features % g:
        g -= 1
    return g


# --- fused normalisation -----------------------------------------------------------------
# lowering.py runs (a - mean(a)) / std(a), and that times v1 plus v0, through torch's fused
# norm kernels: the same math in one or two passes over memory instead of five or seven.
# Running estimates follow BatchNorm2d (which is what F.batch_norm is), so the buffers are
# those the unfused mean and std nodes would keep.


def batch_normalize(
    x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, training: bool,
    momentum: float, eps: float
) -> torch.Tensor:
    if x.dtype == torch.float64:  # torch's CPU kernel wants the float32 buffers' dtype
        mean = batch_mean(x, running_mean, training, momentum)
        return (x - mean) / batch_std(x, running_var, training, momentum, eps)
    return torch.nn.functional.batch_norm(x, running_mean, running_var, None, None, training,
                                          momentum, eps)


def batch_normalize_affine(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
    running_var: torch.Tensor, training: bool, momentum: float, eps: float
) -> torch.Tensor:
    if x.dtype == torch.float64:
        return batch_normalize(x, running_mean, running_var, training, momentum, eps) * weight + bias
    # With bfloat16 activations torch wants weight and bias in the buffers' float32.
    return torch.nn.functional.batch_norm(
        x, running_mean, running_var, weight.reshape(-1).to(running_mean.dtype),
        bias.reshape(-1).to(running_mean.dtype), training, momentum, eps)


def group_normalize(x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    return torch.nn.functional.group_norm(x, groups, None, None, eps)


def group_normalize_affine(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float
) -> torch.Tensor:
    return torch.nn.functional.group_norm(x, groups, weight.reshape(-1), bias.reshape(-1), eps)


def instance_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.nn.functional.group_norm(x, x.size(1), None, None, eps)


def instance_normalize_affine(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    return torch.nn.functional.group_norm(x, x.size(1), weight.reshape(-1), bias.reshape(-1), eps)


def layer_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.nn.functional.group_norm(x, 1, None, None, eps)


def layer_normalize_affine(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    return torch.nn.functional.group_norm(x, 1, weight.reshape(-1), bias.reshape(-1), eps)


# --- sequence layout: x of (N, T, C), or any (N, ..., C) ----------------------------------
# Features are the last dimension; every dimension between the first and the last is a
# token axis, so (N, H, W, C) patch grids and (N, C) single tokens work too. Statistics
# keep x's rank (size 1 on the reduced axes), so they broadcast against any value.


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    # (N, L, C) in at least float32: the L tokens of each sample, a (N, C) input as L = 1.
    return x.to(torch.promote_types(x.dtype, torch.float32)).reshape(x.size(0), -1, x.size(-1))


def _per_sample_feature(stat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # (N, 1, C) -> (N, 1, ..., 1, C), x's rank.
    shape = [x.size(0)] + [1] * (x.dim() - 2) + [stat.size(-1)]
    return stat.reshape(shape).to(x.dtype)


def tokens_mean(x: torch.Tensor) -> torch.Tensor:
    return _per_sample_feature(_token_rows(x).mean(dim=1, keepdim=True), x)


def tokens_var(x: torch.Tensor) -> torch.Tensor:
    return _per_sample_feature(_token_rows(x).var(dim=1, unbiased=False, keepdim=True), x)


def tokens_std(x: torch.Tensor, eps: float) -> torch.Tensor:
    var = _token_rows(x).var(dim=1, unbiased=False, keepdim=True)
    return _per_sample_feature((var + eps).sqrt(), x)


def tokens_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    sq = _token_rows(x).square().mean(dim=1, keepdim=True)
    return _per_sample_feature((sq + eps).sqrt(), x)


def _feature_grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    # (..., C) -> (..., g, C/g); a one-feature value (a per-token statistic) is one group.
    g = groups if x.size(-1) > 1 else 1
    shape = list(x.shape[:-1])
    return x.to(torch.promote_types(x.dtype, torch.float32)).reshape(shape + [g, x.size(-1) // g])


def _feature_ungrouped(stat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # (..., g, 1) -> (..., C): each feature gets its group's statistic.
    shape = list(x.shape[:-1])
    g = stat.size(-2)
    return stat.expand(shape + [g, x.size(-1) // g]).reshape(shape + [x.size(-1)]).to(x.dtype)


def feature_group_mean(x: torch.Tensor, groups: int) -> torch.Tensor:
    return _feature_ungrouped(_feature_grouped(x, groups).mean(dim=-1, keepdim=True), x)


def feature_group_var(x: torch.Tensor, groups: int) -> torch.Tensor:
    var = _feature_grouped(x, groups).var(dim=-1, unbiased=False, keepdim=True)
    return _feature_ungrouped(var, x)


def feature_group_std(x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    var = _feature_grouped(x, groups).var(dim=-1, unbiased=False, keepdim=True)
    return _feature_ungrouped((var + eps).sqrt(), x)


def feature_group_rms(x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    sq = _feature_grouped(x, groups).square().mean(dim=-1, keepdim=True)
    return _feature_ungrouped((sq + eps).sqrt(), x)


# Batch and tokens (N, T): BatchNorm1d over (N, C, T) read as (..., C); the running
# estimates follow the batch aggregates above (_update), unbiased variance included.


def _feature_rows(x: torch.Tensor) -> torch.Tensor:
    # (L, C) in at least float32: every position of every sample a row.
    return x.to(torch.promote_types(x.dtype, torch.float32)).reshape(-1, x.size(-1))


def _per_feature(stat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # (C,) -> (1, ..., 1, C), x's rank.
    return stat.reshape([1] * (x.dim() - 1) + [-1]).to(x.dtype)


def seqbatch_mean(x: torch.Tensor, running: torch.Tensor, training: bool, momentum: float) -> torch.Tensor:
    if not training:
        return _per_feature(running, x)
    mean = _feature_rows(x).mean(dim=0)
    _update(running, mean, momentum)
    return _per_feature(mean, x)


def _seqbatch_var(x: torch.Tensor, running: torch.Tensor, momentum: float) -> torch.Tensor:
    rows = _feature_rows(x)
    var = rows.var(dim=0, unbiased=False)
    n = rows.size(0)
    _update(running, var * (n / max(n - 1, 1)), momentum)
    return var


def seqbatch_var(x: torch.Tensor, running: torch.Tensor, training: bool, momentum: float) -> torch.Tensor:
    if not training:
        return _per_feature(running, x)
    return _per_feature(_seqbatch_var(x, running, momentum), x)


def seqbatch_std(
    x: torch.Tensor, running: torch.Tensor, training: bool, momentum: float, eps: float
) -> torch.Tensor:
    if not training:
        return _per_feature((running + eps).sqrt(), x)
    return _per_feature((_seqbatch_var(x, running, momentum) + eps).sqrt(), x)


def seqbatch_rms(
    x: torch.Tensor, running: torch.Tensor, training: bool, momentum: float, eps: float
) -> torch.Tensor:
    if not training:
        return _per_feature((running + eps).sqrt(), x)
    sq = _feature_rows(x).square().mean(dim=0)
    _update(running, sq, momentum)
    return _per_feature((sq + eps).sqrt(), x)


# Fused forms of the sequence layout: layer_norm over the features, and batch_norm over
# the (L, C) rows viewed as (L, C, 1, 1) so the float64 path of batch_normalize applies.


def token_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, [x.size(-1)], None, None, eps)


def token_normalize_affine(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, [x.size(-1)], weight.reshape(-1), bias.reshape(-1),
                                          eps)


def seqbatch_normalize(
    x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, training: bool,
    momentum: float, eps: float
) -> torch.Tensor:
    rows = x.reshape(-1, x.size(-1), 1, 1)
    y = batch_normalize(rows, running_mean, running_var, training, momentum, eps)
    return y.reshape(x.shape)


def seqbatch_normalize_affine(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
    running_var: torch.Tensor, training: bool, momentum: float, eps: float
) -> torch.Tensor:
    rows = x.reshape(-1, x.size(-1), 1, 1)
    w, b = weight.reshape(1, -1, 1, 1), bias.reshape(1, -1, 1, 1)  # as the rows' channels
    return batch_normalize_affine(rows, w, b, running_mean, running_var, training, momentum,
                                  eps).reshape(x.shape)
