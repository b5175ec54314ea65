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

The sequence layers (layout ntc: (N, T, C) or any (..., C), features last) replace
torch.nn.LayerNorm in transformers. They have no activation after them, so their affine
is the outer one too: weight and bias are LayerNorm's, and the state_dict of an
nn.LayerNorm loads into the layernorm entry as it is. Learnt scalars (DyT's alpha) are
genome scalars with the initial values the papers give.
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

_DYT = ("Zhu, Chen, He, LeCun, Liu, Transformers without Normalization, CVPR 2025 "
        "(arXiv 2503.10622; code jiachenzhu/DyT)")
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


def _sequence(name: str, steps: Sequence[Step], description: str, reference: str,
              scalars: Mapping[str, float] | None = None) -> ZooEntry:
    return ZooEntry(name, chain(*steps, name=name, layout="ntc", scalars=scalars), description,
                    reference)


def _standardize(mean: str, std: str) -> list[Step]:
    """(x - mean(x)) / std(x), the outer affine being the norm's own (5 nodes)."""
    return _normalize(mean, std)[:5]


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
    # --- sequence layers (ntc): drop-ins for torch.nn.LayerNorm --------------------------
    _sequence("layernorm", _standardize("mean_C", "std_C"),
              "LayerNorm: statistics over the features of each token",
              "torch.nn.LayerNorm(C) (Ba, Kiros, Hinton 2016)"),
    _sequence("rmsnorm", [("rms_C", ["x"]), ("div", ["x", "n1"])],
              "RMSNorm: x over the root mean square of its token's features, no centring",
              "torch.nn.RMSNorm(C) (Zhang & Sennrich 2019); its missing bias is ours at 0"),
    _sequence("dyt", [("mul", ["alpha", "x"]), ("tanh", ["n1"])],
              "DyT: tanh(alpha * x), alpha one learnt scalar (0.5 at init); no statistics",
              f"{_DYT}; the LLaMA variant drops beta and sets alpha per site and width",
              {"alpha": 0.5}),
    # Ports disagree whether alpha and s are scalars or per-feature: scalars here, as
    # DyT's alpha, with DyT's initial 0.5 and a shift starting at 0.
    _sequence("derf", [("mul", ["alpha", "x"]), ("add", ["n1", "shift"]), ("erf", ["n2"])],
              "Derf: erf(alpha * x + s), alpha and s learnt scalars (0.5 and 0 at init)",
              "Derf, arXiv 2512.10938 (2025), found by a search over point-wise functions",
              {"alpha": 0.5, "shift": 0.0}),
    _sequence("bn_nt", _standardize("mean_NT", "std_NT"),
              "BatchNorm over batch and tokens: per feature, running estimates at eval",
              "torch.nn.BatchNorm1d(C) on x.transpose(1, 2) (Ioffe & Szegedy 2015)"),
    # PowerNorm's forward statistic only. The paper (Shen, Yao, Gholami, Mahoney, Keutzer,
    # ICML 2020) also divides by the running quadratic mean in the training forward after
    # a warm-up, and backpropagates through it with an approximate backward pass that
    # keeps a running estimate of the gradient's statistic. Running estimates are buffers
    # outside autograd here, so no graph of these ops can carry a gradient through them:
    # that custom backward is what this entry lacks.
    _sequence("powernorm", [("rms_NT", ["x"]), ("div", ["x", "n1"])],
              "PowerNorm's forward: x over the quadratic mean over batch and tokens, no "
              "centring; the running estimate at eval",
              "Shen et al., PowerNorm: Rethinking Batch Normalization in Transformers, ICML "
              "2020 (arXiv 2003.07845), without its approximate backward"),
    # ScaleNorm's g * x / ||x|| with ||x|| = sqrt(C) * rms_C(x): gain = g / sqrt(C), so the
    # paper's initial g = sqrt(C) is gain = 1 at every width.
    _sequence("scalenorm", [("rms_C", ["x"]), ("div", ["x", "n1"]), ("mul", ["gain", "n2"])],
              "ScaleNorm: g * x / ||x|| over each token's features, g one learnt scalar",
              "Nguyen & Salazar, Transformers without Tears, 2019 (arXiv 1910.05895); "
              "gain = g / sqrt(C), the paper's g = sqrt(C) at init",
              {"gain": 1.0}),
)

ZOO: Mapping[str, ZooEntry] = MappingProxyType({e.name: e for e in _ENTRIES})


def names(layout: str | None = None) -> tuple[str, ...]:
    """The zoo's layer names: classic layers first, then the EvoNorms, then the sequence
    layers; only those of one layout ("nchw", "ntc") when it is given."""
    return tuple(n for n, e in ZOO.items() if layout in (None, e.genome.layout))


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
