"""Functional fingerprints: one short hash per behaviour, for the equivalence cache.

Place in the flow: before a candidate is trained, the worker fingerprints it; a hit in
the cache means an equivalent layer was already measured, and its fitness is reused
(AutoML-Zero's functional-equivalence cache). Graphs that differ in structure but compute
the same function, x*1 and x, add(a, b) and add(b, a), x/s and x*(1/s), share one
fingerprint, so the search never trains one behaviour twice. The numeric rejection stage
runs the same probes (`probe_inputs`, `probe_layer`) at more scales.

How: the genome's GenomeLayer runs on fixed-seed probe tensors in float64, in train mode
at each probe scale and then in eval mode (the batch statistics' running estimates have
moved from their initial values by then, so a batch statistic is not a constant). Its
trainable vectors v0 and v1 are fixed-seed random per channel rather than their inits 0
and 1, under which v1*x and x or v0+x and x would be one function. The outputs are rounded
to about 6 significant digits, and the rounded values hashed (sha256, first 16 hex).

Every random number comes from this module's own torch.Generator, so fingerprints are the
same in every process and the global RNG is left alone.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from evonas.layers.genome import Genome
from evonas.layers.interpreter import GenomeLayer
from evonas.layers.ops import INPUTS

# Changing any of these changes every fingerprint: bump VERSION so old caches miss.
VERSION = "evonas.fingerprint/1"
PROBE_SEED = 20200406
# 8 channels in 4 groups of 2, so instance (H,W), group (C/g,H,W) and layer (C,H,W)
# statistics all differ; 6 samples of 5x5 so batch statistics differ from instance ones.
# Sequence (ntc) genomes read the same numbers as 6 samples of 25 tokens of 8 features.
PROBE_SHAPE = (6, 8, 5, 5)
PROBE_GROUPS = 4
# Learnt scalars are probed at their initial value plus this offset: scalars of equal
# initial values stay equal (alpha*x and beta*x are one function), and a scalar starting
# at 1 or 0 is not the constant (gain*x is not x).
SCALAR_OFFSET = 0.6180339887
# The same probe at three scales: scale-invariant layers (x / std(x)) answer alike, others
# do not; 10 reaches the tails of sigmoid, tanh and exp, and 0.1 puts statistics below
# the constant 1 (at scales 1 and 10 alone, max(rms(x), 1) and rms(x) collide).
PROBE_SCALES = (0.1, 1.0, 10.0)
# Kept mantissa bits: a relative step of 2^-20 ~ 1e-6. Equivalent graphs differ by a few
# float64 ulps (1e-16), so a value straddles a rounding step with odds ~1e-10, about 1e-6
# per fingerprint; a straddle is a cache miss, not a wrong hit. One exception: kernels.py
# takes statistics in float32 even of float64 values, so equivalent graphs that feed a
# statistic values differing beyond float32 rounding (var(x + v1) and var(x)) differ by
# ~1e-7 and usually miss.
MANTISSA_BITS = 20
# Values this small next to the largest output are cancellation residue (a + v0 - v0 vs
# a): they count as 0, as does -0.0.
FLUSH = 1e-12
_ZERO, _NAN, _POS_INF, _NEG_INF = 0, 1, 2, 3  # exponent codes of the mantissa-0 tokens


def _generator(offset: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(PROBE_SEED + offset)


def probe_inputs(scales: Sequence[float] = PROBE_SCALES, *, shape: Sequence[int] = PROBE_SHAPE,
                 dtype: torch.dtype = torch.float64, layout: str = "nchw") -> list[torch.Tensor]:
    """The probe tensor times each scale, from a fixed seed.

    Samples and channels get their own offsets and spreads, so statistics over different
    axes (batch, instance, group, layer) come out clearly different, and no value is 0.
    With layout "ntc" the same numbers are (N, H*W tokens, C): channels become features.
    """
    # Copies of a cached set: the driver probes every candidate, and drawing the probes
    # anew cost a tenth of its checks' time.
    return [x.clone() for x in _probes(tuple(scales), tuple(shape), dtype, layout)]


@functools.lru_cache(maxsize=16)
def _probes(scales: tuple[float, ...], shape: tuple[int, ...], dtype: torch.dtype,
            layout: str) -> tuple[torch.Tensor, ...]:
    if layout == "ntc":
        return tuple(p.flatten(2).transpose(1, 2).contiguous()
                     for p in _probes(scales, shape, dtype, "nchw"))
    n, c = shape[0], shape[1]
    gen = _generator()
    z = torch.randn(*shape, generator=gen, dtype=torch.float64)
    spread = torch.exp(0.5 * torch.randn(n, c, 1, 1, generator=gen, dtype=torch.float64))
    offset = 0.5 * torch.randn(n, c, 1, 1, generator=gen, dtype=torch.float64)
    channel = 0.5 * torch.randn(1, c, 1, 1, generator=gen, dtype=torch.float64)
    base = z * spread + offset + channel
    return tuple((base * s).to(dtype) for s in scales)


def probe_layer(genome: Genome, *, groups: int = PROBE_GROUPS, num_features: int = PROBE_SHAPE[1],
                dtype: torch.dtype = torch.float64) -> GenomeLayer:
    """The genome's layer with v0 and v1 set to fixed-seed random per-channel values
    (uniform in [-1.5, 1.5]: away from one another and, in most channels, from 0 and 1),
    and its scalars moved by SCALAR_OFFSET. The affine stays the identity: it is the same
    for every genome."""
    layer = GenomeLayer(genome, num_features, groups=groups, dtype=dtype)
    gen = _generator(1)
    with torch.no_grad():
        for name, init in genome.scalars.items():
            getattr(layer, name).fill_(init + SCALAR_OFFSET)
        for name in sorted(n for n in INPUTS if INPUTS[n].trainable):
            values = 3.0 * torch.rand(num_features, generator=gen, dtype=torch.float64) - 1.5
            if hasattr(layer, name):  # drawn for every vector, so v1's values never depend on v0's use
                getattr(layer, name).copy_(values)
    return layer


def probe_outputs(genome: Genome, *, groups: int = PROBE_GROUPS) -> list[torch.Tensor]:
    """Outputs on the probes: train mode at each scale, then eval mode at each scale."""
    layer = probe_layer(genome, groups=groups)
    probes = probe_inputs(layout=genome.layout)
    with torch.no_grad():
        layer.train()
        outputs = [layer(x) for x in probes]
        layer.eval()
        outputs += [layer(x) for x in probes]
    return outputs


def functional_fingerprint(genome: Genome, *, groups: int = PROBE_GROUPS) -> str:
    """16 hex digits, equal for genomes computing the same function on the probes.

    groups must split the probe's 8 channels into groups of several channels but fewer
    than all (2 or 4), else group statistics coincide with instance or layer ones.
    """
    h = hashlib.sha256(VERSION.encode())
    outputs = probe_outputs(genome, groups=groups)
    for y, rounded in zip(outputs, _rounded_each([y.double().numpy() for y in outputs])):
        h.update(repr(tuple(y.shape)).encode())
        h.update(rounded)
    return h.hexdigest()[:16]


def _rounded(y: np.ndarray) -> bytes:
    """Canonical bytes of y rounded to MANTISSA_BITS: (mantissa, exponent) int pairs,
    with mantissa 0 marking 0 (either sign, and residue), NaN (any payload), +inf, -inf."""
    return _rounded_each([y])[0]


def _rounded_each(ys: Sequence[np.ndarray]) -> list[bytes]:
    """_rounded of each array, in one pass over all of them (numpy's per-call cost, times
    the six probe outputs, was most of a fingerprint's time). Each array keeps its own
    largest value as the reference of FLUSH."""
    sizes = [y.size for y in ys]
    y = np.concatenate([a.ravel() for a in ys])
    finite = np.isfinite(y)
    magnitude = np.where(finite, np.abs(y), 0.0)
    starts = np.cumsum([0, *sizes[:-1]])
    top = np.repeat(np.maximum.reduceat(magnitude, starts), sizes) if y.size else magnitude
    regular = finite & (np.abs(y) > FLUSH * top)
    mant, expo = np.frexp(np.where(regular, y, 1.0))
    q = np.rint(mant * 2.0**MANTISSA_BITS).astype(np.int64)
    # Rounding up to the next power of two (0.99999997 -> 1.0) must give 1.0's own token.
    carry = np.abs(q) == 2**MANTISSA_BITS
    q = np.where(carry, q // 2, q)
    expo = np.where(carry, expo + 1, expo)
    special = np.select([np.isnan(y), y == np.inf, y == -np.inf], [_NAN, _POS_INF, _NEG_INF], _ZERO)
    q = np.where(regular, q, 0).astype("<i4")
    expo = np.where(regular, expo, special).astype("<i4")
    ends = np.cumsum(sizes)
    return [q[a:b].tobytes() + expo[a:b].tobytes() for a, b in zip(ends - sizes, ends)]


__all__ = ["functional_fingerprint", "probe_inputs", "probe_layer", "probe_outputs",
           "PROBE_SHAPE", "PROBE_SCALES", "PROBE_GROUPS", "VERSION"]
