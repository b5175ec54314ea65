"""Rejection stages, cheapest first: static, numeric, duplicate, stability (quality is a
checkpoint of the proxy training, in evaluate.py).

Each stage is a function returning a Verdict: passed, or rejected with a one-line reason,
and the seconds it took. Rejection is data, never an exception. The driver runs the
cheap stages (static, numeric, duplicate: milliseconds) before a candidate costs a worker
anything; the workers run stability and the proxy trainings.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from evonas.errors import GenomeError
from evonas.layers.genome import Genome
from evonas.layers.space import SearchSpace


@dataclass
class Verdict:
    stage: str
    passed: bool
    reason: str | None = None
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


def _timed(stage: str, check) -> Verdict:
    start = time.perf_counter()
    reason, metrics = check()
    return Verdict(stage, reason is None, reason, time.perf_counter() - start, metrics)


def static_check(genome: Genome, space: SearchSpace) -> Verdict:
    """Membership of the space: ops, inputs, node limit. (Every Genome is already a valid
    graph whose output depends on x: the constructor refuses anything else.)"""
    def check():
        try:
            space.check(genome)
        except GenomeError as err:
            return str(err), {}
        return None, {"nodes": float(len(genome))}
    return _timed("static", check)


def numeric_check(genome: Genome, scales: tuple[float, ...], groups: int) -> Verdict:
    """Finite outputs and gradients (to the input and the layer's parameters) on probe
    batches at several input scales, in train and eval mode, in float32 as trained."""
    from evonas.layers.fingerprint import probe_inputs, probe_layer

    def check():
        layer = probe_layer(genome, groups=groups, dtype=torch.float32)
        worst = 0.0
        for mode in ("train", "eval"):
            layer.train(mode == "train")
            for scale, x in zip(scales, probe_inputs(scales, dtype=torch.float32)):
                x = x.detach().requires_grad_(True)
                out = layer(x)
                if out.shape != x.shape:  # the genome rules this out; a kernel bug must not pass
                    return f"output shape {tuple(out.shape)} is not the input's {tuple(x.shape)}", {}
                if not bool(torch.isfinite(out).all()):
                    return f"non-finite output in {mode} mode at input scale {scale:g}", {}
                grads = torch.autograd.grad(out.square().mean(), [x, *layer.parameters()],
                                            allow_unused=True)
                for g in grads:
                    if g is not None and not bool(torch.isfinite(g).all()):
                        return f"non-finite gradient in {mode} mode at input scale {scale:g}", {}
                worst = max(worst, float(out.detach().abs().max()))
        return None, {"probe_max_abs": worst}
    return _timed("numeric", check)


def stability_check(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int,
                    lr: float, threshold: float) -> Verdict:
    """The paper's stability test: gradient ascent on the network's weights to maximise the
    gradient norm ||dL/dtheta|| (double backprop); reject if it passes the threshold or
    stops being finite within `steps` ascent steps.

    Each step moves the weights by `lr` in the direction that grows the gradient norm
    fastest (a normalised step, so the test probes a ball of fixed radius around the
    initialisation whatever the scale of the raw second-order gradient). The model is
    modified in place: pass a throwaway copy.
    """
    params = [p for p in model.parameters() if p.requires_grad]

    def check():
        peak = 0.0
        model.train()
        for step in range(steps):
            loss = F.cross_entropy(model(x), y)
            # Layers built with apply_act=False leave their graph's vectors unused.
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            norm = torch.sqrt(sum(g.square().sum() for g in grads if g is not None))
            value = float(norm.detach())
            peak = max(peak, value) if math.isfinite(value) else math.inf
            if not math.isfinite(value) or value > threshold:
                return (f"gradient norm {value:.3g} > {threshold:g} after {step} ascent steps",
                        {"stability_peak_grad_norm": min(peak, 1e300)})
            ascent = torch.autograd.grad(norm, params, allow_unused=True)
            ascent = [a if a is not None else torch.zeros_like(p) for a, p in zip(ascent, params)]
            size = torch.sqrt(sum(a.square().sum() for a in ascent))
            if not bool(torch.isfinite(size)):
                return (f"non-finite second-order gradient after {step} ascent steps",
                        {"stability_peak_grad_norm": min(peak, 1e300)})
            if float(size) == 0.0:
                break
            with torch.no_grad():
                for p, a in zip(params, ascent):
                    p.add_(a, alpha=lr / float(size))
        return None, {"stability_peak_grad_norm": peak}
    return _timed("stability", check)
