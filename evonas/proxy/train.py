"""Proxy training: a short SGD run that scores one candidate normalization-activation layer.

Last step of the proxy flow (data -> models -> train): train_proxy builds the architecture
named in a ProxyConfig around the candidate's layer factory, trains it for a fixed number of
steps on a Dataset and returns the validation accuracy as a ProxyResult. The rejection stages
and the search call it for every candidate; a layer that diverges or runs out of time is an
outcome recorded in the result (diverged / reason), not an exception, so a search never
stops because one candidate is bad.

Everything random is drawn from the seed: model initialisation and any randomness inside the
model run under a forked, seeded global RNG (the caller's RNG state is left untouched), and
minibatch sampling and augmentation use an explicit torch.Generator. On CPU the same seed,
config, data and thread count give bitwise the same result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evonas.errors import EvonasError
from evonas.runtime import checks
from evonas.proxy.data import Dataset
from evonas.proxy.models import ARCHS, NormAct, build_model, check_placement

_PAD = 4  # random-crop padding, as in the standard CIFAR augmentation
# "sgd": with config.momentum, for the CNNs; "adamw": betas (0.9, 0.95), the usual setting
# of GPT-style transformers, for the LM and ViT recipes (train_transformer.py).
OPTIMIZERS = ("sgd", "adamw")


@dataclasses.dataclass(frozen=True)
class ProxyConfig:
    """Hyperparameters of one proxy training; validated on creation.

    The learning rate warms up linearly over warmup_fraction of the steps, then follows a
    cosine decay towards 0. Weight decay applies to conv and linear weights only: the
    candidate layer's own parameters are left undecayed, as BatchNorm's usually are.
    eval_size caps how many validation images are scored (all when None);
    train_loss_curve in the result holds the mean loss of every log_every steps.
    placement is where a transformer's norms sit (transformer.py); CNNs take only "pre".
    """

    arch: str = "resnet"
    width: int = 16
    steps: int = 100
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.05
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    augment: bool = True
    optimizer: str = "sgd"
    eval_size: int | None = None
    eval_batch_size: int = 500
    log_every: int = 10
    placement: str = "pre"

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or self.arch not in ARCHS:
            raise EvonasError(f"proxy arch {self.arch!r} is unknown: use one of "
                              f"{', '.join(ARCHS)}")
        for name in ("width", "steps", "batch_size", "eval_batch_size", "log_every"):
            checks.whole(f"proxy {name}", getattr(self, name), minimum=1)
        if self.eval_size is not None:
            checks.whole("proxy eval_size", self.eval_size, minimum=1)
        self._check_float("lr", low=0.0, low_open=True)
        self._check_float("momentum", low=0.0, high=1.0)
        self._check_float("weight_decay", low=0.0)
        self._check_float("warmup_fraction", low=0.0, high=1.0)
        self._check_float("label_smoothing", low=0.0, high=1.0)
        if self.grad_clip is not None:
            self._check_float("grad_clip", low=0.0, low_open=True)
        if not isinstance(self.augment, bool):
            raise EvonasError(f"proxy augment must be true or false, got {self.augment!r}")
        if self.optimizer not in OPTIMIZERS:
            raise EvonasError(f"proxy optimizer {self.optimizer!r} is unknown: use one of "
                              f"{', '.join(OPTIMIZERS)}")
        check_placement(self.placement, (self.arch,))

    def _check_float(self, name: str, *, low: float, high: float | None = None,
                     low_open: bool = False) -> None:
        """Check a real number in [low, high) (or (low, high)) and store it as a float."""
        value = getattr(self, name)
        ok = (not isinstance(value, bool) and isinstance(value, (int, float))
              and math.isfinite(value) and (value > low if low_open else value >= low)
              and (high is None or value < high))
        if not ok:
            bounds = f"{'>' if low_open else '>='} {low}" + ("" if high is None else
                                                              f" and < {high}")
            raise EvonasError(f"proxy {name} must be a number {bounds}, got {value!r}")
        # Frozen dataclass: store JSON ints given for float fields as floats, so to_dict
        # round-trips to an equal config.
        object.__setattr__(self, name, float(value))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, for run records and the search's config files."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProxyConfig:
        """Build from to_dict's output (missing keys take their defaults)."""
        if not isinstance(data, Mapping):
            raise EvonasError(f"proxy config must be a mapping of settings, got "
                              f"{type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise EvonasError(f"unknown proxy setting {unknown[0]!r}: use {', '.join(known)}")
        return cls(**data)


@dataclasses.dataclass
class ProxyResult:
    """Outcome of one proxy training.

    accuracy is the validation accuracy in [0, 1], and 0.0 when the run diverged (non-finite
    loss or output) or hit max_seconds (reason "time limit"); reason is None for a complete,
    finite run. seconds is the wall time of the whole call, model construction included.
    """

    accuracy: float
    train_loss_curve: list[float]
    steps_done: int
    seconds: float
    diverged: bool = False
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def train_proxy(norm_act: NormAct, config: ProxyConfig, data: Dataset, *, seed: int,
                device: str | torch.device = "cpu", num_threads: int | None = None,
                max_seconds: float | None = None) -> ProxyResult:
    """Train config.arch built around norm_act for config.steps SGD steps; score on data.val."""
    start = time.monotonic()
    _check_call(config, data, seed, num_threads, max_seconds)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    deadline = None if max_seconds is None else start + max_seconds
    trainer = ProxyTrainer(norm_act, config, data, seed=seed, device=device, deadline=deadline)
    trainer.train_until(config.steps)
    accuracy = 0.0
    if trainer.reason is None:
        accuracy = trainer.evaluate()
    return ProxyResult(accuracy=accuracy if trainer.reason is None else 0.0,
                       train_loss_curve=trainer.curve, steps_done=trainer.steps_done,
                       seconds=time.monotonic() - start, diverged=trainer.diverged,
                       reason=trainer.reason)


def _check_call(config: ProxyConfig, data: Dataset, seed: int, num_threads: int | None,
                max_seconds: float | None) -> None:
    check_run(config, seed, num_threads, max_seconds)
    if config.batch_size > len(data.train_y):
        raise EvonasError(f"proxy batch_size {config.batch_size} exceeds the "
                          f"{len(data.train_y)} training images of {data.name}: lower it")
    if len(data.val_y) == 0:
        raise EvonasError(f"dataset {data.name} has no validation images to score on")


def check_run(config: ProxyConfig, seed: int, num_threads: int | None,
              max_seconds: float | None) -> None:
    """Check the arguments of a proxy training that do not depend on its data."""
    if not isinstance(config, ProxyConfig):
        raise EvonasError(f"train_proxy needs a ProxyConfig, got {type(config).__name__}")
    checks.whole("seed", seed, minimum=0)
    if num_threads is not None:
        checks.whole("num_threads", num_threads, minimum=1)
    checks.time_limit("max_seconds", max_seconds)


@contextlib.contextmanager
def _seeded_global_rng(seed: int, dev: torch.device) -> Iterator[None]:
    """Seed the global RNGs for model init and in-model randomness, restoring them after."""
    devices = [dev.index if dev.index is not None else torch.cuda.current_device()] \
        if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class ProxyTrainer:
    """One proxy training that can stop at any step, be scored, and go on.

    The search's quality check trains every architecture to the check's step, scores it
    on a slice of the validation set, and only then trains the survivors on to the end:
    the check costs no second run. Scoring leaves the training state untouched (model,
    optimizer, data order), so a run scored half-way ends exactly as one that was not.
    deadline is a time.monotonic() value; past it the run stops with reason "time limit".
    What a step reads and minimises are _batch_stream and _loss, so another task changes
    only those (train_transformer.LMTrainer: text windows, next-character loss).
    """

    def __init__(self, norm_act: NormAct, config: ProxyConfig, data: Dataset, *, seed: int,
                 device: str | torch.device = "cpu", deadline: float | None = None) -> None:
        self.config, self.data = config, data
        self.device = torch.device(device)
        self.deadline = deadline
        model_seed, data_seed = (int(s.generate_state(1, np.uint64)[0] >> 1)
                                 for s in np.random.SeedSequence(seed).spawn(2))
        with _seeded_global_rng(model_seed, self.device):
            self.model = build_model(config.arch, norm_act, config.width,
                                     num_classes=data.num_classes,
                                     placement=config.placement).to(self.device)
        self.optimizer = _make_optimizer(self.model, config)
        self.gen = torch.Generator().manual_seed(data_seed)
        self._batches = self._batch_stream()
        self._window: list[float] = []
        self.curve: list[float] = []
        self.steps_done = 0
        self.diverged = False
        self.reason: str | None = None

    @property
    def timed_out(self) -> bool:
        return self.reason == "time limit"

    def _past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def train_until(self, step: int) -> None:
        """Train on to `step` (at most config.steps) unless the run already stopped."""
        cfg = self.config
        self.model.train()
        while self.steps_done < min(step, cfg.steps) and self.reason is None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(self.steps_done, cfg)
            loss = self._loss(*next(self._batches))
            value = loss.item()
            if not math.isfinite(value):
                self.diverged, self.reason = True, f"non-finite loss at step {self.steps_done + 1}"
                break
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.steps_done += 1
            self._log_loss(value)
            if self._past_deadline() and self.steps_done < cfg.steps:
                self.reason = "time limit"
        # The last, partial window still says where the loss was going.
        if self._window and (self.reason is not None or self.steps_done == cfg.steps):
            self.curve.append(sum(self._window) / len(self._window))
            self._window = []

    def _batch_stream(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless (x, y) training minibatches on the device, drawn from self.gen."""
        data, cfg, dev = self.data, self.config, self.device
        for idx in _minibatches(len(data.train_y), cfg.batch_size, self.gen):
            x, y = data.train_x[idx], data.train_y[idx]
            if cfg.augment:
                x = random_crop_flip(x, self.gen)
            yield x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(x), y, label_smoothing=self.config.label_smoothing)

    def _log_loss(self, value: float) -> None:
        self._window.append(value)
        if len(self._window) == self.config.log_every:
            self.curve.append(sum(self._window) / len(self._window))
            self._window = []

    @torch.no_grad()
    def evaluate(self, eval_size: int | None = None) -> float:
        """Validation accuracy on the first eval_size images (config.eval_size when None);
        0.0 with diverged set when the network outputs non-finite values."""
        cfg, dev, data = self.config, self.device, self.data
        size = cfg.eval_size if eval_size is None else eval_size
        n = len(data.val_y) if size is None else min(size, len(data.val_y))
        was_training = self.model.training
        self.model.eval()
        correct = 0
        try:
            for lo in range(0, n, cfg.eval_batch_size):
                hi = min(n, lo + cfg.eval_batch_size)
                logits = self.model(data.val_x[lo:hi].to(dev, non_blocking=True))
                # NaN logits would still give argmax answers and a chance-level score.
                if not bool(torch.isfinite(logits).all()):
                    self.diverged, self.reason = True, "non-finite output at evaluation"
                    return 0.0
                correct += int((logits.argmax(dim=1).cpu() == data.val_y[lo:hi]).sum())
                if self._past_deadline() and hi < n:
                    self.reason = "time limit"
                    return 0.0
        finally:
            self.model.train(was_training)
        return correct / n


def lr_at(step: int, config: ProxyConfig) -> float:
    """Learning rate at 0-based step: linear warmup, then cosine decay towards 0."""
    warmup = round(config.warmup_fraction * config.steps)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return 0.5 * config.lr * (1.0 + math.cos(math.pi * progress))


def _make_optimizer(model: nn.Module, config: ProxyConfig) -> torch.optim.Optimizer:
    decayed = {id(m.weight): m.weight for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))}
    rest = [p for p in model.parameters() if id(p) not in decayed]
    groups = [{"params": list(decayed.values()), "weight_decay": config.weight_decay}]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


def _minibatches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless index batches: a fresh permutation per epoch, the ragged tail dropped."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for lo in range(0, n - batch_size + 1, batch_size):
            yield perm[lo:lo + batch_size]


def random_crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = _PAD) -> torch.Tensor:
    """Random crop of each (N,C,H,W) image from its zero-padded copy, and a random h-flip.

    Zero padding in normalised space is padding with the mean colour. One gather does both
    the crop and the flip, with offsets and flips drawn from gen.
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    top = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    left = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    cols = torch.arange(w)
    cols = left[:, None] + torch.where(flip[:, None], w - 1 - cols, cols)
    rows = top[:, None] + torch.arange(h)
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]
