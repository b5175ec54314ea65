"""The zoo: published and classic normalization-activation layers, written as genomes.

These are the known points of the search space. They seed searches (`--seed-zoo`;
`seeds(space)` picks the ones a space contains, which the controller proposes before any
random graph), serve as the baselines a report compares discovered layers with, and give
the interpreter, exporter and symbolic view graphs whose right answer is known
(tests/test_zoo.py checks each one against torch.nn modules or the published formulas).

Every layer ends in the per-channel affine weight * y + bias that GenomeLayer adds, so a
classic norm + activation layer carries its own affine inside the graph as v1 * xhat + v0
(v1 = 1, v0 = 0 at init): with weight = 1 and bias = 0 the layer is exactly the classic
one. The EvoNorms need no inner affine: theirs is the outer one, as in the papers' code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from evonas.errors import EvonasError
from evonas.layers.genome import Genome, chain
from evonas.layers.interpreter import GenomeLayer, layer_factory

if TYPE_CHECKING:
    from evonas.layers.space import SearchSpace

_PAPER = ("Liu, Brock, Simonyan, Le, Evolving Normalization-Activation Layers, NeurIPS 2020 "
          "(arXiv 2004.02967)")
_TF = "tensorflow/tpu models/official/resnet/resnet_model.py evonorm()"


@dataclass(frozen=True)
class ZooEntry:
    """A known layer: its genome (genome.name == name), what it is, and where it is from.

    defaults: GenomeLayer keyword arguments the reference implementation uses where they
    differ from GenomeLayer's own (eps=1e-5, momentum=0.1, groups=32).
    """

    name: str
    genome: Genome
    description: str
    reference: str
    defaults: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}),
                                           hash=False)


Step = tuple[str, Sequence[str]]


def _normalize(mean: str, std: str) -> list[Step]:
    """v1 * (x - mean(x)) / std(x) + v0: a classic norm with its affine (7 nodes)."""
    return [
        (mean, ["x"]),         # n1
        ("neg", ["n1"]),       # n2
        ("add", ["x", "n2"]),  # n3 = x - mean
        (std, ["x"]),          # n4 = sqrt(var + eps)
        ("div", ["n3", "n4"]),
        ("mul", ["v1", "n5"]),
        ("add", ["n6", "v0"]),  # n7, the normalized and affine-transformed value
    ]


_RELU: list[Step] = [("max", ["n7", "zero"])]
_SILU: list[Step] = [("sigmoid", ["n7"]), ("mul", ["n7", "n8"])]


def _entry(name: str, steps: Sequence[Step], description: str, reference: str,
           **defaults: object) -> ZooEntry:
    return ZooEntry(name, chain(*steps, name=name), description, reference,
                    MappingProxyType(dict(defaults)))


_ENTRIES = (
    _entry("bn_relu", _normalize("mean_NHW", "std_NHW") + _RELU,
           "BatchNorm then ReLU: batch statistics, running estimates at eval",
           "torch.nn.BatchNorm2d(C) + torch.nn.ReLU (Ioffe & Szegedy 2015)"),
    _entry("gn_relu", _normalize("mean_GHW", "std_GHW") + _RELU,
           "GroupNorm then ReLU: statistics over each group of C/g channels and H, W",
           "torch.nn.GroupNorm(g, C) + torch.nn.ReLU (Wu & He 2018)"),
    _entry("in_relu", _normalize("mean_HW", "std_HW") + _RELU,
           "InstanceNorm then ReLU: statistics over H, W of each sample and channel",
           "torch.nn.InstanceNorm2d(C, affine=True) + torch.nn.ReLU (Ulyanov et al. 2016)"),
    # Layer statistics over (C, H, W) with a per-channel affine: GroupNorm(1, C), not
    # timm's LayerNorm2d (which normalizes over C at each pixel).
    _entry("ln_relu", _normalize("mean_CHW", "std_CHW") + _RELU,
           "LayerNorm over (C, H, W) with a per-channel affine, then ReLU",
           "torch.nn.LayerNorm([C, H, W], elementwise_affine=False) + per-channel affine "
           "+ torch.nn.ReLU, i.e. torch.nn.GroupNorm(1, C) + ReLU (Ba et al. 2016)"),
    _entry("bn_silu", _normalize("mean_NHW", "std_NHW") + _SILU,
           "BatchNorm then SiLU (Swish): y * sigmoid(y)",
           "torch.nn.BatchNorm2d(C) + torch.nn.SiLU (EfficientNet's norm-act)"),
    # timm's EvoNorm2dB0 uses eps 1e-3 (TF's evonorm() uses 1e-5): we follow timm, the
    # PyTorch layer users compare against; the other EvoNorms use 1e-5 in both.
    _entry("evonorm_b0",
           [("std_NHW", ["x"]), ("mul", ["v1", "x"]), ("std_HW", ["x"]),
            ("add", ["n2", "n3"]), ("max", ["n1", "n4"]), ("div", ["x", "n5"])],
           "EvoNorm-B0: x / max(sqrt(s2_NHW + eps), v1 * x + sqrt(s2_HW + eps))",
           f"{_PAPER}; timm.layers.EvoNorm2dB0; {_TF}", eps=1e-3),
    _entry("evonorm_b1",
           [("std_NHW", ["x"]), ("add", ["x", "one"]), ("rms_HW", ["x"]),
            ("mul", ["n2", "n3"]), ("max", ["n1", "n4"]), ("div", ["x", "n5"])],
           "EvoNorm-B1: x / max(sqrt(s2_NHW + eps), (x + 1) * sqrt(mu_HW(x^2) + eps))",
           f"{_PAPER}; timm.layers.EvoNorm2dB1"),
    _entry("evonorm_b2",
           [("std_NHW", ["x"]), ("rms_HW", ["x"]), ("neg", ["x"]),
            ("add", ["n2", "n3"]), ("max", ["n1", "n4"]), ("div", ["x", "n5"])],
           "EvoNorm-B2: x / max(sqrt(s2_NHW + eps), sqrt(mu_HW(x^2) + eps) - x)",
           f"{_PAPER}; timm.layers.EvoNorm2dB2"),
    _entry("evonorm_s0",
           [("mul", ["v1", "x"]), ("sigmoid", ["n1"]), ("mul", ["x", "n2"]),
            ("std_GHW", ["x"]), ("div", ["n3", "n4"])],
           "EvoNorm-S0: x * sigmoid(v1 * x) / sqrt(s2_GHW + eps)",
           f"{_PAPER}; timm.layers.EvoNorm2dS0; {_TF}"),
    _entry("evonorm_s1",
           [("sigmoid", ["x"]), ("mul", ["x", "n1"]), ("std_GHW", ["x"]),
            ("div", ["n2", "n3"])],
           "EvoNorm-S1: x * sigmoid(x) / sqrt(s2_GHW + eps)",
           f"{_PAPER}; timm.layers.EvoNorm2dS1"),
    _entry("evonorm_s2",
           [("sigmoid", ["x"]), ("mul", ["x", "n1"]), ("rms_GHW", ["x"]),
            ("div", ["n2", "n3"])],
           "EvoNorm-S2: x * sigmoid(x) / sqrt(mu_GHW(x^2) + eps)",
           f"{_PAPER}; timm.layers.EvoNorm2dS2"),
)

ZOO: Mapping[str, ZooEntry] = MappingProxyType({e.name: e for e in _ENTRIES})


def names() -> tuple[str, ...]:
    """The zoo's layer names: classic layers first, then the EvoNorms."""
    return tuple(ZOO)


def entry(name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        raise EvonasError(f"unknown zoo layer {name!r}; known: {', '.join(ZOO)}") from None


def get(name: str) -> Genome:
    """The named layer's genome (its .name is the zoo name)."""
    return entry(name).genome


def factory(name: str, **overrides: object) -> Callable[..., GenomeLayer]:
    """norm_act(num_features, ...) building the named layer with its reference defaults."""
    e = entry(name)
    return layer_factory(e.genome, **{**e.defaults, **overrides})


def seeds(space: "SearchSpace") -> dict[str, Genome]:
    """The zoo layers the space contains, by name: the seeds of a `--seed-zoo` search."""
    return {name: e.genome for name, e in ZOO.items() if space.contains(e.genome)}


__all__ = ["ZooEntry", "ZOO", "names", "entry", "get", "factory", "seeds"]
