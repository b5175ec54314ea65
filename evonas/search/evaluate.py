"""One candidate's evaluation on a worker: stability, then quality and proxy fitness.

`evaluate_candidate(payload) -> dict` is the function the engine runs on Ray workers; it
takes and returns plain JSON types (the candidate, the search config) and never raises
for a bad layer: a rejection is an Evaluation with its stage and reason. Exceptions that
do escape are bugs or broken workers, and the engine records them as failed candidates.

Order, cheapest rejection first:
1. stability: the paper's gradient-norm ascent, on every proxy architecture;
2. quality: every architecture trains `quality_steps` steps, then is scored on a slice of
   the validation set; below the threshold on any architecture rejects the layer;
3. proxy: the survivors' trainings continue (same models, same schedule) to proxy_steps
   and their validation accuracies are the fitness, one objective per architecture.

A language model (proxy/train_transformer.py) is scored by its validation bits per
character, lower better: its quality gate rejects a layer above the threshold, and its
fitness is -bpc (lm_fitness), so the search maximises every objective alike. Its
stability check runs on windows of the training text, the next character as the target.
The ViT trains as the CNNs do, on images, with its own recipe (VIT_PROXY).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from evonas.layers.genome import Genome
from evonas.layers.interpreter import layer_factory
from evonas.proxy.data import load_dataset
from evonas.proxy.models import SEQUENCE_ARCHS, TEXT_ARCHS, build_model
from evonas.proxy.text import eval_windows
from evonas.proxy.train import ProxyConfig, ProxyTrainer
from evonas.proxy.train_transformer import LM_PROXY, VIT_PROXY, LMTrainer, lm_fitness
from evonas.runtime.limits import task_device, worker_name
from evonas.search.records import FAILED, REJECTED, SURVIVOR, Candidate, Evaluation
from evonas.search.config import SearchConfig
from evonas.search.rejection import stability_check
from evonas.layers.space import load_space


def proxy_seed(search_seed: int) -> int:
    """The training seed of every candidate of a search: common random numbers.

    All candidates start from the same network weights and see the same minibatches and
    augmentations, so two layers' fitnesses differ by what the layers do, not by the luck
    of their draws. With a seed per candidate, equivalent-at-init layers (x, x*v1, x+v0)
    spread over 0.20-0.24 on the CIFAR-10 ablation's proxies, as wide as the gaps the
    search must see; selection then rewards luck, and the best-so-far of any search is
    the largest of its noise draws."""
    return int(np.random.SeedSequence([search_seed, 0x5EED]).generate_state(1)[0])


def rung_seed(search_seed: int, k: int) -> int:
    """The k-th training seed of a rung: k = 0 is proxy_seed (the rung retrains exactly as
    the proxy did, only longer), the others are derived from the search's seed alone, so
    every candidate trained on several seeds draws the same ones: common random numbers
    hold seed by seed."""
    if k == 0:
        return proxy_seed(search_seed)
    return int(np.random.SeedSequence([search_seed, 0x5EED, k]).generate_state(1)[0])


def _proxy_config(config: SearchConfig, arch: str, steps: int | None = None) -> ProxyConfig:
    """The arch's recipe (optimizer, decay, warm-up, clipping) at the search's sizes;
    steps: a rung's length in place of the proxy's (the schedule spans it)."""
    recipe = (LM_PROXY if arch in TEXT_ARCHS else VIT_PROXY if arch in SEQUENCE_ARCHS
              else ProxyConfig())
    return dataclasses.replace(recipe, arch=arch, width=config.proxy_width,
                               steps=steps or config.proxy_steps,
                               batch_size=config.proxy_batch_size,
                               lr=config.proxy_lr, eval_size=config.proxy_eval_size,
                               placement=config.placement)


def _trainer(factory, config: SearchConfig, arch: str, data, steps: int | None = None,
             **kw) -> ProxyTrainer:
    cls = LMTrainer if arch in TEXT_ARCHS else ProxyTrainer
    return cls(factory, _proxy_config(config, arch, steps), data, **kw)


def evaluate_rung(payload: dict) -> dict:
    """A promoted candidate trained again from scratch for a rung's `steps` on `seeds`
    seeds (RungResult as a dict). The gates are not run again: the layer passed them, and
    the first seed's training begins as its proxy training did. Never raises for a bad
    layer: a divergence or the time limit is a result with no fitness and its reason."""
    from evonas.search.records import RungResult

    candidate = Candidate.from_dict(payload["candidate"])
    config = SearchConfig.from_dict(payload["config"])
    steps, seeds = int(payload["steps"]), int(payload["seeds"])
    start = time.perf_counter()
    deadline = time.monotonic() + config.eval_time_limit_s
    device = task_device(config.gpus_per_eval)
    on_gpu = device == "cuda"
    result = RungResult(candidate.candidate_id, steps, None, device="gpu" if on_gpu else "cpu",
                        share=config.gpus_per_eval if on_gpu else config.cpus_per_eval,
                        worker=worker_name())
    genome = Genome.from_dict(candidate.genome)
    factory = layer_factory(genome, groups=load_space(config.space).groups)
    data = load_dataset(config.dataset, config.data_dir, seed=config.seed)
    scores: dict[str, list[float]] = {arch: [] for arch in config.archs}
    for k in range(seeds):
        for arch in config.archs:
            trainer = _trainer(factory, config, arch, data, steps, seed=rung_seed(config.seed, k),
                               device=device, deadline=deadline)
            trainer.train_until(steps)
            if trainer.reason is not None:
                result.reason = f"{trainer.reason} on {arch}, seed {k}, at {steps} steps"
                result.seconds = time.perf_counter() - start
                return result.to_dict()
            score = trainer.evaluate(config.proxy_eval_size)
            scores[arch].append(lm_fitness(score) if arch in TEXT_ARCHS else score)
    result.scores = scores
    result.fitness = {arch: sum(v) / len(v) for arch, v in scores.items()}
    result.seconds = time.perf_counter() - start
    return result.to_dict()


def evaluate_candidate(payload: dict) -> dict:
    candidate = Candidate.from_dict(payload["candidate"])
    config = SearchConfig.from_dict(payload["config"])
    deadline = time.monotonic() + config.eval_time_limit_s
    # An evaluation that holds a GPU share and finds no CUDA fails here, loudly: on the
    # CPU it would run many times slower and be charged as GPU time it never used.
    device = task_device(config.gpus_per_eval)
    on_gpu = device == "cuda"
    ev = Evaluation(candidate.candidate_id, SURVIVOR, device="gpu" if on_gpu else "cpu",
                    share=config.gpus_per_eval if on_gpu else config.cpus_per_eval,
                    worker=worker_name())
    genome = Genome.from_dict(candidate.genome)
    groups = load_space(config.space).groups
    factory = layer_factory(genome, groups=groups)
    data = load_dataset(config.dataset, config.data_dir, seed=config.seed)
    seed = proxy_seed(config.seed)

    if not _stability(ev, factory, data, config, seed, device):
        return ev.to_dict()
    trainers = {arch: _trainer(factory, config, arch, data, seed=seed, device=device,
                               deadline=deadline) for arch in config.archs}
    if not _train_stage(ev, "quality", trainers, config.stages.quality_steps,
                        config.stages.quality_eval_size, config.stages.quality_threshold):
        return ev.to_dict()
    if not _train_stage(ev, "proxy", trainers, config.proxy_steps, config.proxy_eval_size, None):
        return ev.to_dict()
    ev.fitness = {arch: lm_fitness(ev.metrics[f"proxy_bpc.{arch}"]) if arch in TEXT_ARCHS
                  else ev.metrics[f"proxy_acc.{arch}"] for arch in config.archs}
    return ev.to_dict()


class _NextTokenLogits(nn.Module):
    """An LM whose logits come flat, (N*T, vocab), so that the stability check's
    cross-entropy against the flat next characters is the LM's training loss."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids).flatten(0, 1)


def _stability(ev: Evaluation, factory, data, config: SearchConfig, seed: int, device: str) -> bool:
    """The stability test on every proxy architecture, in order: a layer that is stable in
    a ResNet may still blow up in a network with depthwise convolutions or attention.
    Metrics per architecture (stability_peak_grad_norm.<arch>); the stage's seconds are
    the sum."""
    ev.stage_seconds["stability"] = 0.0
    for arch in config.archs:
        verdict = _stability_on(arch, factory, data, config, seed, device)
        ev.stage_seconds["stability"] += verdict.seconds
        ev.metrics.update({f"{k}.{arch}": v for k, v in verdict.metrics.items()})
        if not verdict.passed:
            ev.status, ev.reject_stage = REJECTED, "stability"
            ev.reject_reason = f"{verdict.reason} on {arch}"
            return False
    return True


def _stability_on(arch: str, factory, data, config: SearchConfig, seed: int, device: str):
    s = config.stages
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(arch, factory, config.proxy_width, num_classes=data.num_classes,
                            placement=config.placement).to(device)
    if arch in TEXT_ARCHS:
        # The first windows of the training text: fixed, so every candidate is probed alike.
        x, y = eval_windows(data.train, model.context, s.stability_batch)
        model, y = _NextTokenLogits(model), y.flatten()
    else:
        x, y = data.train_x[: s.stability_batch], data.train_y[: s.stability_batch]
    x, y = x.to(device), y.to(device)
    # The check differentiates the gradient norm; the fused attention kernels have no
    # second derivative, the math one does.
    attention = (sdpa_kernel(SDPBackend.MATH) if arch in SEQUENCE_ARCHS
                 else contextlib.nullcontext())
    with attention:
        return stability_check(model, x, y, steps=s.stability_steps, lr=s.stability_lr,
                               threshold=s.stability_threshold)


def _train_stage(ev: Evaluation, stage: str, trainers: dict, until: int, eval_size: int | None,
                 threshold: float | None) -> bool:
    """Train every architecture up to step `until`, score it, and apply the threshold:
    an accuracy below it rejects, for an LM bits per character above it."""
    start = time.perf_counter()
    try:
        for arch, trainer in trainers.items():
            trainer.train_until(until)
            lm = arch in TEXT_ARCHS
            score = (trainer.evaluate(eval_size) if trainer.reason is None
                     else float("inf") if lm else 0.0)
            if trainer.timed_out:  # says nothing of the layer: failed, not rejected
                ev.status, ev.reject_stage = FAILED, stage
                ev.reject_reason = f"evaluation time limit reached on {arch}"
                return False
            if trainer.diverged:
                ev.status, ev.reject_stage = REJECTED, stage
                ev.reject_reason = f"{trainer.reason} on {arch}"
                return False
            ev.metrics[f"{stage}_{'bpc' if lm else 'acc'}.{arch}"] = score
            if threshold is not None and (score > threshold if lm else score < threshold):
                ev.status, ev.reject_stage = REJECTED, stage
                ev.reject_reason = (f"{score:.3f} bits per character > {threshold:g}"
                                    if lm else f"accuracy {score:.3f} < {threshold:g}")
                ev.reject_reason += f" after {until} steps on {arch}"
                return False
        return True
    finally:
        ev.stage_seconds[stage] = time.perf_counter() - start
