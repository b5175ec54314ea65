"""Rejection stages, cheapest first: static, numeric, causal (sequence layers of causal
spaces), duplicate, stability (quality is a checkpoint of the proxy training, in
evaluate.py).

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
    def check():
        worst = _all_finite(genome, scales, groups)
        if worst is not None:
            return None, {"probe_max_abs": worst}
        return _scale_by_scale(genome, scales, groups)  # which scale and mode failed
    return _timed("numeric", check)


def _all_finite(genome: Genome, scales: tuple[float, ...], groups: int) -> float | None:
    """The largest output magnitude when every output and gradient is finite, else None.

    The driver's time per candidate is bounded (benchmarks/driver_throughput.py), and
    backward calls cost most of this check: one here, over the sum of every scale's loss
    in both modes (train first, so eval mode reads the running estimates the train-mode
    batches left, as in _scale_by_scale). Each forward's input gradient is its own; the
    parameters' gradients are the sum of each forward's, computed by the same ops as
    _scale_by_scale's one-forward backward, and a sum is finite only if every term is
    (inf and NaN never cancel to a finite value), so this passes no layer _scale_by_scale
    rejects. It may fail one that the scale-by-scale check passes (finite terms whose sum
    overflows): the caller then runs that check, which also names the scale and mode of a
    failure.
    """
    from evonas.layers.fingerprint import probe_inputs, probe_layer

    layer = probe_layer(genome, groups=groups, dtype=torch.float32)
    params = list(layer.parameters())
    probes = probe_inputs(scales, dtype=torch.float32, layout=genome.layout)
    xs, outs = [], []
    for training in (True, False):
        layer.train(training)
        for probe in probes:
            x = probe.detach().requires_grad_(True)
            xs.append(x)
            outs.append(layer(x))
    if any(out.shape != x.shape for out, x in zip(outs, xs)):
        return None
    flat = torch.cat([out.reshape(-1) for out in outs])
    if not bool(torch.isfinite(flat).all()):
        return None
    grads = torch.autograd.grad(sum(out.square().mean() for out in outs), [*xs, *params],
                                allow_unused=True)
    present = [g.reshape(-1) for g in grads if g is not None]
    if present and not bool(torch.isfinite(torch.cat(present)).all()):
        return None
    return float(flat.detach().abs().max())


def _scale_by_scale(genome: Genome, scales: tuple[float, ...], groups: int):
    """The numeric check one scale at a time: (reason of the first failure, {}), or
    (None, metrics) when every output and gradient is finite."""
    from evonas.layers.fingerprint import probe_inputs, probe_layer

    layer = probe_layer(genome, groups=groups, dtype=torch.float32)
    worst = 0.0
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        for scale, x in zip(scales, probe_inputs(scales, dtype=torch.float32,
                                                 layout=genome.layout)):
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


# Probe of the causality check: 8 tokens, compared in float64 (kernels keep float64), so
# a change is a dependence, never rounding. A position counts as changed beyond these
# tolerances; a statistic over tokens moves outputs by far more.
CAUSAL_TOKENS = 8
CAUSAL_RTOL, CAUSAL_ATOL = 1e-9, 1e-12


def causal_check(genome: Genome, space: SearchSpace, *, tokens: int = CAUSAL_TOKENS) -> Verdict:
    """Whether the layer's output at position t depends only on tokens up to t, as a
    decoder (causal language model) needs, in train and in eval mode.

    For each t, the tokens after t of a probe batch are redrawn and the outputs at
    positions <= t compared with those of the unchanged batch. Statistics over tokens
    (T) leak in both modes; statistics over batch and tokens (N,T) leak in training,
    where they are the batch's, and not in eval mode, where they are running estimates.
    """
    from evonas.layers.fingerprint import PROBE_GROUPS, probe_inputs, probe_layer
    from evonas.layers.ops import AXES, OPS

    def check():
        if genome.layout != "ntc" or space.layout != "ntc":
            return (f"causality is checked on sequence (ntc) layers; this {genome.layout} layer "
                    f"in space {space.name} ({space.layout}) has no token axis"), {}
        probe = probe_inputs((1.0,), layout="ntc")[0]
        x, noise = probe[:, :tokens], probe[:, -tokens:].flip(0)  # noise: other values
        layer = probe_layer(genome, groups=PROBE_GROUPS)
        leaks = sorted(o for o in genome.ops_used if OPS[o].axes and AXES[OPS[o].axes].tokens)
        why = (f"statistics over tokens ({', '.join(leaks)}) see the future" if leaks
               else "the layer sees the future")
        with torch.no_grad():
            for mode in ("train", "eval"):
                layer.train(mode == "train")
                y = layer(x)
                for t in range(tokens - 1):
                    changed = torch.cat([x[:, :t + 1], noise[:, t + 1:]], dim=1)
                    before, after = y[:, :t + 1], layer(changed)[:, :t + 1]
                    # NaN and inf where the unchanged batch has them are no dependence
                    if not bool(torch.isclose(after, before, rtol=CAUSAL_RTOL, atol=CAUSAL_ATOL,
                                              equal_nan=True).all()):
                        return (f"output at t={t} changes when tokens after it change "
                                f"({mode} mode): {why}"), {}
        return None, {}
    return _timed("causal", check)


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
        # steps + 1 measurements: the weights each ascent step reaches are measured too,
        # the last one included (a layer that blows up on the final step is rejected).
        for step in range(steps + 1):
            loss = F.cross_entropy(model(x), y)
            # Layers built with apply_act=False leave their graph's vectors unused.
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            norm = torch.sqrt(sum(g.square().sum() for g in grads if g is not None))
            value = float(norm.detach())
            peak = max(peak, value) if math.isfinite(value) else math.inf
            if not math.isfinite(value) or value > threshold:
                return (f"gradient norm {value:.3g} > {threshold:g} after {step} ascent steps",
                        {"stability_peak_grad_norm": min(peak, 1e300)})
            if step == steps:
                break
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
