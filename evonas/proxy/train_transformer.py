"""Proxy training of the transformers: the LM's trainer (bits per character) and the recipes.

Last step of the proxy flow for sequence layers (text -> transformer -> here), beside
train.py, whose ProxyTrainer this extends: LMTrainer keeps its schedule, its stop/score/go
on protocol, its divergence and deadline rules and its seeding (every candidate starts from
the same weights and sees the same windows: common random numbers), and changes only what
an LM does differently: it draws windows of the model's context from the training text
with the run's torch.Generator, predicts every next character, and scores the validation
loss in bits per character on fixed, non-overlapping windows of the validation text.

Fitness. bpc is lower-is-better; the search maximises, so an LM's fitness is -bpc
(lm_fitness). It stays in bits, so a gap of 0.05 bpc is the same gap everywhere on the
scale, and a quality threshold reads as "-bpc >= -t", i.e. bpc <= t. A diverged run scores
bpc = inf and is rejected by the search, never ranked.

The ViT needs no trainer of its own: it classifies images, so ProxyTrainer trains it with
VIT_PROXY's recipe and its fitness is validation accuracy, as for the CNNs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from evonas.errors import EvonasError
from evonas.proxy.models import TEXT_ARCHS
from evonas.proxy.text import TextDataset, check_windows, eval_windows, sample_windows
from evonas.proxy.train import ProxyConfig, ProxyTrainer, check_run
from evonas.proxy.transformer import NormLayer

# AdamW recipes. The LM's lr is the best of 3e-3, 1e-2 and 2e-2 for LayerNorm and RMSNorm
# after 300 steps on tiny Shakespeare (benchmarks/lm_proxy_norms.py); the ViT's is a usual
# setting for small ViTs on CIFAR-10, not tuned here, and keeps the CIFAR crop and flip.
LM_PROXY = ProxyConfig(arch="lm", width=64, steps=300, batch_size=32, lr=1e-2,
                       weight_decay=0.1, warmup_fraction=0.05, grad_clip=1.0, augment=False,
                       optimizer="adamw", eval_size=256, eval_batch_size=256)
VIT_PROXY = ProxyConfig(arch="vit", width=64, steps=300, batch_size=128, lr=1e-3,
                        weight_decay=0.05, warmup_fraction=0.1, grad_clip=1.0,
                        optimizer="adamw")

_BITS_PER_NAT = 1.0 / math.log(2.0)


def lm_fitness(bpc: float) -> float:
    """The search's higher-is-better fitness of an LM scored at `bpc` bits per character."""
    return -bpc


class LMTrainer(ProxyTrainer):
    """ProxyTrainer for a causal LM on a TextDataset; evaluate() returns validation bpc.

    config.eval_size caps the validation windows scored (all when None); config.augment and
    label_smoothing do not apply. The window length is the model's context.
    """

    def __init__(self, norm_layer: NormLayer, config: ProxyConfig, data: TextDataset, *,
                 seed: int, device: str | torch.device = "cpu",
                 deadline: float | None = None) -> None:
        if config.arch not in TEXT_ARCHS or not isinstance(data, TextDataset):
            raise EvonasError(f"the LM trainer trains {', '.join(TEXT_ARCHS)} on a text dataset, "
                              f"got {config.arch!r} on {getattr(data, 'name', data)!r}: pick an "
                              f"LM architecture and a text dataset")
        super().__init__(norm_layer, config, data, seed=seed, device=device, deadline=deadline)
        check_windows(data, self.model.context)

    def _batch_stream(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            x, y = sample_windows(self.data.train, self.config.batch_size, self.model.context,
                                  self.gen)
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())

    @torch.no_grad()
    def evaluate(self, eval_size: int | None = None) -> float:
        """Validation bits per character on the first eval_size windows (config.eval_size
        when None); inf with diverged set when the network outputs non-finite values."""
        size = self.config.eval_size if eval_size is None else eval_size
        x, y = eval_windows(self.data.val, self.model.context, size)
        was_training = self.model.training
        self.model.eval()
        try:
            nats = self._validation_nats(x, y)
        finally:
            self.model.train(was_training)
        return nats * _BITS_PER_NAT / y.numel()

    def _validation_nats(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Summed cross-entropy over the windows, or inf where the run stops scoring."""
        total, step = 0.0, self.config.eval_batch_size
        for lo in range(0, len(x), step):
            logits = self.model(x[lo:lo + step].to(self.device, non_blocking=True))
            if not bool(torch.isfinite(logits).all()):
                self.diverged, self.reason = True, "non-finite output at evaluation"
                return math.inf
            total += float(F.cross_entropy(logits.flatten(0, 1),
                                           y[lo:lo + step].flatten().to(self.device),
                                           reduction="sum"))
            if self._past_deadline() and lo + step < len(x):
                self.reason = "time limit"
                return math.inf
        return total


@dataclasses.dataclass
class LMResult:
    """Outcome of one LM proxy training: validation bpc (inf when the run diverged or hit
    max_seconds, with reason set), the mean training loss (nats) of every log_every steps."""

    bpc: float
    train_loss_curve: list[float]
    steps_done: int
    seconds: float
    diverged: bool = False
    reason: str | None = None

    @property
    def fitness(self) -> float:
        return lm_fitness(self.bpc)

    def to_dict(self) -> dict[str, Any]:
        # JSON has no inf: a run that did not finish has no bpc.
        return {**dataclasses.asdict(self), "bpc": self.bpc if math.isfinite(self.bpc) else None}


def train_lm(norm_layer: NormLayer, config: ProxyConfig, data: TextDataset, *, seed: int,
             device: str | torch.device = "cpu", num_threads: int | None = None,
             max_seconds: float | None = None) -> LMResult:
    """Train the LM config.arch built around norm_layer for config.steps AdamW (or SGD)
    steps on data.train; score validation bpc. LM_PROXY is the proxy's recipe."""
    start = time.monotonic()
    check_run(config, seed, num_threads, max_seconds)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    deadline = None if max_seconds is None else start + max_seconds
    trainer = LMTrainer(norm_layer, config, data, seed=seed, device=device, deadline=deadline)
    trainer.train_until(config.steps)
    bpc = trainer.evaluate() if trainer.reason is None else math.inf
    return LMResult(bpc=bpc if trainer.reason is None else math.inf,
                    train_loss_curve=trainer.curve, steps_done=trainer.steps_done,
                    seconds=time.monotonic() - start, diverged=trainer.diverged,
                    reason=trainer.reason)
