"""Genome -> torch module, by interpreting the lowered steps.

GenomeLayer follows timm's norm-act constructor convention, so a genome drops into any
model that takes a `norm_layer`: `functools.partial(GenomeLayer, genome)` or the factory
`layer_factory(genome, groups=8)`. A sequence (ntc) genome's layer takes any (..., C)
input and normalises its last dimension, so `layer_factory(genome)(C)` replaces
torch.nn.LayerNorm(C). Its state_dict keys (weight, bias, v0, v1, the genome's scalars,
running_var_n3, ...) are the ones the exporter writes, so the two load each other's state.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from evonas.layers.genome import Genome
from evonas.layers.kernels import resolve_groups
from evonas.layers.lowering import AFFINE, Step, fold_affine, lower
from evonas.layers.ops import INPUTS, LAYOUTS


class GenomeLayer(nn.Module):
    """A normalization-activation layer computed by interpreting a genome.

    Forward: y = genome(x), out = weight * y + bias (per channel: dimension 1 of an
    nchw genome's (N, C, H, W) input, the last of an ntc genome's (..., C) one). With
    apply_act=False the layer is the affine only, the form that replaces a BN with no
    activation after it.
    """

    def __init__(
        self,
        genome: Genome,
        num_features: int,
        apply_act: bool = True,
        eps: float = 1e-5,
        momentum: float = 0.1,
        groups: int = 32,
        group_size: int | None = None,
        device=None,
        dtype=None,
        **_,
    ):
        super().__init__()
        self.genome = genome
        self.num_features = num_features
        self.apply_act = apply_act
        self.eps = eps
        self.momentum = momentum
        self.groups = resolve_groups(num_features, groups, group_size or 0)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_features, **kw))
        self.bias = nn.Parameter(torch.empty(num_features, **kw))
        self._vectors = sorted(i for i in genome.inputs_used if i in INPUTS and INPUTS[i].trainable)
        for name in self._vectors:
            self.register_parameter(name, nn.Parameter(torch.empty(num_features, **kw)))
        self._scalars = tuple(genome.scalars)
        for name in self._scalars:
            self.register_parameter(name, nn.Parameter(torch.empty((), **kw)))
        self._vector_shape = LAYOUTS[genome.layout].vector_shape
        self._steps = lower(genome)
        folded = fold_affine(self._steps)
        self._affine_folded = folded is not None
        for step in self._steps:
            for name, _ in step.buffers:  # statistics stay float32 whatever the parameters' dtype
                self.register_buffer(name, torch.empty(num_features, device=device,
                                                       dtype=torch.float32))
        self._plan = self._compile_plan(folded or self._steps)
        self.reset_parameters()

    def _compile_plan(self, steps: list[Step]) -> list[tuple[Callable, tuple[int, ...], tuple,
                                                             tuple[str, ...], tuple[str, ...]]]:
        # Values live in a list; each step reads slots and appends one. Slot 0 is x, then
        # the inputs the genome uses (and the affine, when folded), then one slot per node.
        names = ["x"] + sorted(self.genome.inputs_used - {"x"})
        names += list(AFFINE) if self._affine_folded else []
        self._input_names = tuple(names)
        slot = {name: k for k, name in enumerate(names)}
        plan = []
        for step in steps:
            slot[step.node] = len(slot)
            dims = (list(step.op.dims),) if step.op.dims is not None else ()
            plan.append((step.op.kernel, tuple(slot[i] for i in step.inputs), dims,
                         tuple(name for name, _ in step.buffers), step.op.params))
        return plan

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        for name in self._vectors:
            nn.init.constant_(getattr(self, name), INPUTS[name].init)
        for name, init in self.genome.scalars.items():
            nn.init.constant_(getattr(self, name), init)
        for step in self._steps:
            for name, init in step.buffers:
                nn.init.constant_(getattr(self, name), init)

    def _input_value(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name in INPUTS and INPUTS[name].constant is not None:
            return x.new_full((), INPUTS[name].constant)
        if name in self._scalars:
            return getattr(self, name).to(x.dtype)
        # v0, v1, and the weight and bias a folded last step reads
        return getattr(self, name).view(self._vector_shape).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.apply_act:
            params = {"eps": self.eps, "groups": self.groups, "training": self.training,
                      "momentum": self.momentum}
            values = [x] + [self._input_value(n, x) for n in self._input_names[1:]]
            for kernel, args, dims, buffers, names in self._plan:
                extra = []
                for p in names:
                    if p == "running":
                        extra += [self._buffers[b] for b in buffers]
                    else:
                        extra.append(params[p])
                values.append(kernel(*[values[i] for i in args], *dims, *extra))
            x = values[-1]
            if self._affine_folded:
                return x
        shape = self._vector_shape
        return x * self.weight.view(shape).to(x.dtype) + self.bias.view(shape).to(x.dtype)

    def extra_repr(self) -> str:
        name = self.genome.name or self.genome.structural_hash
        return (f"{name}, {self.num_features}, apply_act={self.apply_act}, eps={self.eps}, "
                f"groups={self.groups}")


def layer_factory(genome: Genome, **defaults) -> Callable[..., GenomeLayer]:
    """norm_act(num_features, apply_act=True, ...) building this genome's layer: for an
    nchw genome timm's norm-act layer over (N, C, H, W), for an ntc genome the
    `norm_layer(num_features)` of a transformer, over (..., C) like nn.LayerNorm."""
    return functools.partial(GenomeLayer, genome, **defaults)
