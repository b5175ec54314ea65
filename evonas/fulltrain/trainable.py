"""One full-training trial: the Ray Tune function trainable and the training loop under it.

Where it sits: stage.py hands `train_layer` to a Tuner (through tune.with_resources);
Tune runs it in a worker process once per trial, with a config that names the layer
(a search candidate's genome or a zoo layer), the architecture, batch size, seed,
optimizer and the learning rate and weight decay Optuna proposed. The trial trains the
architecture around the layer with that optimizer (SGD with momentum, or AdamW), reports
validation accuracy and loss a fixed number of times (the points where ASHA may stop it),
checkpoints at every report, and scores the held-out test split at the end.

A language model (lm, lm_full) trains on windows of a text dataset at offsets drawn from
(seed, step), predicting every next character; its accuracy is that of the next
character, and it reports bits per character beside it (val_bpc, test_bpc). Transformers
clip the gradient norm at 1, as their proxy recipes do (proxy/train_transformer.py).

Resuming: the data order and augmentation of step t are functions of (seed, t) alone,
so a trial restored from its checkpoint (model, optimizer, step) after a crash, a killed
worker or a killed driver continues exactly where the uninterrupted run would have been.

`run_trial` is the loop without Tune (a Reporter carries reports and checkpoints), so
tests and debugging can run a trial in-process.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evonas.errors import EvonasError
from evonas.fulltrain.config import LR_REFERENCE_BATCH, FullTrainConfig
from evonas.proxy.data import load_cifar10_test, load_dataset
from evonas.proxy.models import SEQUENCE_ARCHS, build_model
from evonas.proxy.text import TEXT_DATASETS, eval_windows, sample_windows
from evonas.proxy.train import ProxyConfig, _make_optimizer, lr_at, random_crop_flip
from evonas.runtime.limits import limit_worker, task_device

_CHECKPOINT_FILE = "trial.pt"
# Synthetic data (smoke runs, tests): training images, and images held out, split in
# halves into the validation split (reports, tuning) and the test split (final score).
_SYNTHETIC_TRAIN = 2048
_SYNTHETIC_HELD_OUT = 1024
# CIFAR-10's validation split comes out of the training batches; the official test
# batch is the test split, which no tuning decision ever reads.
_CIFAR10_VAL = 5000
_CIFAR10_TRAIN = 50000
_EVAL_BATCH = 500


@dataclass(frozen=True)
class TrialSpec:
    """What one trial trains, read from the Tune config of the trial."""

    layer: str
    layer_spec: dict  # {"genome": dict, "zoo": name or None, "groups": int}
    arch: str
    batch_size: int
    seed: int
    lr: float  # at LR_REFERENCE_BATCH; see effective_lr
    weight_decay: float
    settings: FullTrainConfig
    optimizer: str = "sgd"

    @classmethod
    def from_config(cls, config: dict) -> TrialSpec:
        settings = FullTrainConfig.from_dict(config["settings"])
        return cls(layer=config["layer"], layer_spec=config["layer_spec"],
                   arch=config["arch"], batch_size=int(config["batch_size"]),
                   seed=int(config["seed"]), lr=float(config["lr"]),
                   weight_decay=float(config["weight_decay"]), settings=settings,
                   optimizer=config.get("optimizer", "sgd"))

    @property
    def effective_lr(self) -> float:
        return self.lr * self.batch_size / LR_REFERENCE_BATCH


class Reporter(Protocol):
    """Where a trial's reports and checkpoints go (Tune, or a test's list)."""

    def restore(self) -> dict | None:
        """The last checkpointed state, None for a fresh trial."""

    def report(self, metrics: dict, state: dict) -> None:
        """Report metrics with the state to resume from."""


# --- data ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Splits:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int


@dataclass(frozen=True)
class TextSplits:
    """Token ids of a text dataset: its training text, and its held-out text split in
    halves into the validation text (reports, tuning) and the test text (final score)."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    num_classes: int


def load_splits(settings: FullTrainConfig) -> Splits | TextSplits:
    """Training, validation and test splits of the stage's dataset (cached per process:
    a reused worker runs trial after trial on the same data)."""
    return _splits(settings.dataset, settings.data_dir)


@functools.lru_cache(maxsize=2)
def _splits(dataset: str, data_dir: str | None) -> Splits | TextSplits:
    if dataset in TEXT_DATASETS:
        text = load_dataset(dataset, data_dir)
        half = len(text.val) // 2
        return TextSplits(text.train, text.val[:half], text.val[half:], text.num_classes)
    if dataset == "synthetic":
        data = load_dataset("synthetic", n_train=_SYNTHETIC_TRAIN, n_val=_SYNTHETIC_HELD_OUT)
        half = len(data.val_y) // 2
        return Splits(data.train_x, data.train_y, data.val_x[:half], data.val_y[:half],
                      data.val_x[half:], data.val_y[half:], data.num_classes)
    data = load_dataset("cifar10", data_dir, val_size=_CIFAR10_VAL)
    test_x, test_y = load_cifar10_test(data_dir)
    return Splits(data.train_x, data.train_y, data.val_x, data.val_y, test_x, test_y,
                  data.num_classes)


def train_size(dataset: str) -> int:
    """Training images of a dataset's training split, known without loading it."""
    return _SYNTHETIC_TRAIN if dataset == "synthetic" else _CIFAR10_TRAIN - _CIFAR10_VAL


def total_steps(settings: FullTrainConfig, n_train: int, batch_size: int) -> int:
    """SGD steps of a trial: `steps`, or `epochs` passes of whole batches."""
    if settings.steps is not None:
        return settings.steps
    per_epoch = n_train // batch_size
    if per_epoch < 1:
        raise EvonasError(f"batch size {batch_size} exceeds the {n_train} training images")
    return settings.epochs * per_epoch


def report_steps(total: int, reports: int) -> list[int]:
    """The steps after which a trial reports: `reports` points spread evenly to `total`."""
    return sorted({max(1, round(total * k / reports)) for k in range(1, reports + 1)})


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of the minibatch at `step`: epochs of fresh permutations, ragged tails
    dropped, each permutation drawn from (seed, epoch) so any step is found directly."""
    per_epoch = n // batch_size
    epoch, k = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(_mix(seed, 1, epoch))
    perm = torch.randperm(n, generator=gen)
    return perm[k * batch_size:(k + 1) * batch_size]


def _mix(*values: int) -> int:
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0] >> 1)


# --- model and device ---------------------------------------------------------------


def pick_device(settings: FullTrainConfig) -> torch.device:
    """CUDA when the trial holds GPUs (Ray then makes its GPU the only visible one),
    unless --device names one; CPU otherwise. A trial that holds a GPU share on a host
    without CUDA fails (limits.task_device): on the CPU it would be charged GPU time."""
    kind = task_device(settings.gpus_per_trial)
    return torch.device(kind if settings.device == "auto" else settings.device)


def layer_norm_act(spec: TrialSpec, groups: int) -> Callable[..., nn.Module]:
    """The layer factory: the zoo's own defaults for a zoo layer, the genome otherwise."""
    from evonas.layers import zoo
    from evonas.layers.genome import Genome
    from evonas.layers.interpreter import layer_factory

    if spec.layer_spec.get("zoo"):
        return zoo.factory(spec.layer_spec["zoo"], groups=groups)
    return layer_factory(Genome.from_dict(spec.layer_spec["genome"]), groups=groups)


def build(spec: TrialSpec, num_classes: int, device: torch.device) -> nn.Module:
    """The architecture around the layer, initialised from the trial's seed alone."""
    groups = spec.layer_spec.get("groups") or 8
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state stays untouched
        torch.manual_seed(_mix(spec.seed, 0))
        model = build_model(spec.arch, layer_norm_act(spec, groups), spec.settings.width,
                            num_classes=num_classes,
                            placement=spec.settings.placement)
    model = model.to(device)
    if spec.settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def autocast(settings: FullTrainConfig, device: torch.device):
    """bfloat16 autocast when asked; the layers compute their statistics in float32."""
    if not settings.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def to_device(x: torch.Tensor, settings: FullTrainConfig, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if settings.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


# --- the loop -----------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: FullTrainConfig,
             device: torch.device, limit: int | None = None) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on the first `limit` images; (0, inf) when the
    network outputs non-finite values."""
    n = len(y) if limit is None else min(limit, len(y))
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    try:
        for lo in range(0, n, _EVAL_BATCH):
            hi = min(n, lo + _EVAL_BATCH)
            with autocast(settings, device):
                logits = model(to_device(x[lo:hi], settings, device)).float()
            if not bool(torch.isfinite(logits).all()):
                return 0.0, math.inf
            target = y[lo:hi].to(device)
            loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(dim=1) == target).sum())
    finally:
        model.train(was_training)
    return correct / n, loss_sum / n


_EVAL_WINDOWS = 32  # text windows per forward pass at evaluation


@torch.no_grad()
def evaluate_text(model: nn.Module, ids: torch.Tensor, settings: FullTrainConfig,
                  device: torch.device, limit: int | None = None) -> tuple[float, float]:
    """(next-character accuracy, mean cross-entropy in nats) over the first `limit`
    non-overlapping windows of `ids`; (0, inf) when the network outputs non-finite values."""
    x, y = eval_windows(ids, model.context, limit)
    if len(x) == 0:
        raise EvonasError(f"the held-out text ({len(ids)} characters) is shorter than the "
                          f"LM's context {model.context}: use a longer text or a smaller LM")
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    try:
        for lo in range(0, len(x), _EVAL_WINDOWS):
            with autocast(settings, device):
                logits = model(x[lo:lo + _EVAL_WINDOWS].to(device)).float().flatten(0, 1)
            if not bool(torch.isfinite(logits).all()):
                return 0.0, math.inf
            target = y[lo:lo + _EVAL_WINDOWS].flatten().to(device)
            loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(dim=1) == target).sum())
    finally:
        model.train(was_training)
    return correct / y.numel(), loss_sum / y.numel()


class _Run:
    """The state of one trial's training: model, optimizer, step, and what it reported."""

    def __init__(self, spec: TrialSpec, data: Splits | TextSplits, device: torch.device):
        self.spec, self.data, self.device = spec, data, device
        s = spec.settings
        self.model = build(spec, data.num_classes, device)
        self.text = isinstance(data, TextSplits)
        # An LM's epoch is a pass over its training text in windows of its context.
        n_train = len(data.train) // self.model.context if self.text else len(data.train_y)
        self.steps = total_steps(s, n_train, spec.batch_size)
        self.steps_per_epoch = n_train / spec.batch_size
        self.report_at = report_steps(self.steps, s.num_reports)
        # The proxy's recipe (warm-up then cosine, decay on conv and linear weights only),
        # so full training differs from the proxy in length and tuning, not in method.
        self.recipe = ProxyConfig(arch=spec.arch, width=s.width, steps=self.steps,
                                  batch_size=spec.batch_size, lr=spec.effective_lr,
                                  momentum=s.momentum, weight_decay=spec.weight_decay,
                                  warmup_fraction=s.warmup_fraction, optimizer=spec.optimizer,
                                  grad_clip=1.0 if spec.arch in SEQUENCE_ARCHS else None)
        self.optimizer = _make_optimizer(self.model, self.recipe)
        self.step = 0
        self.last_metrics: dict | None = None

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.last_metrics = state.get("metrics")

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "metrics": self.last_metrics}

    def train_to(self, until: int) -> float | None:
        """Train on to step `until`; the mean training loss, None when it diverged."""
        s, data = self.spec.settings, self.data
        self.model.train()
        losses: list[float] = []
        while self.step < until:
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(self.step, self.recipe)
            x, y = self._batch()
            with autocast(s, self.device):
                logits = self.model(x)
            loss = F.cross_entropy(logits.float().flatten(0, -2), y.flatten())
            value = loss.item()
            if not math.isfinite(value):
                return None
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.recipe.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.grad_clip)
            self.optimizer.step()
            self.step += 1
            losses.append(value)
        return sum(losses) / max(1, len(losses))

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The minibatch of this step, a function of (seed, step) alone."""
        s, data, spec = self.spec.settings, self.data, self.spec
        if self.text:
            gen = torch.Generator().manual_seed(_mix(spec.seed, 1, self.step))
            x, y = sample_windows(data.train, spec.batch_size, self.model.context, gen)
            return x.to(self.device), y.to(self.device)
        idx = batch_indices(len(data.train_y), spec.batch_size, spec.seed, self.step)
        gen = torch.Generator().manual_seed(_mix(spec.seed, 2, self.step))
        x = random_crop_flip(data.train_x[idx], gen)
        return to_device(x, s, self.device), data.train_y[idx].to(self.device)

    def _score(self, split: str, limit: int | None = None) -> tuple[float, float]:
        s, data = self.spec.settings, self.data
        if self.text:
            return evaluate_text(self.model, getattr(data, split), s, self.device, limit)
        return evaluate(self.model, getattr(data, f"{split}_x"), getattr(data, f"{split}_y"), s,
                        self.device, limit)

    def metrics(self, train_loss: float | None, seconds: float) -> dict:
        s, data = self.spec.settings, self.data
        done = self.step >= self.steps
        if train_loss is None:
            val_acc, val_loss = 0.0, math.inf
        else:
            val_acc, val_loss = self._score("val", s.eval_size)
        diverged = train_loss is None or not math.isfinite(val_loss)
        out = {"step": self.step, "epoch": self.step / self.steps_per_epoch,
               "val_accuracy": val_acc, "val_loss": _finite(val_loss),
               "train_loss": _finite(train_loss), "lr": lr_at(max(0, self.step - 1), self.recipe),
               "train_seconds": seconds, "diverged": diverged, "completed": done or diverged}
        if self.text:
            out["val_bpc"] = _finite(val_loss / math.log(2))
        if done and not diverged:
            out["test_accuracy"], test_loss = self._score("test")
            if self.text:
                out["test_bpc"] = _finite(test_loss / math.log(2))
        return out


def _finite(x: float | None) -> float:
    # Tune's result files and MLflow both take plain finite floats best; a diverged run
    # reports a loss far above any real one instead of infinity or NaN.
    return 1e9 if x is None or not math.isfinite(x) else float(x)


def run_trial(spec: TrialSpec, reporter: Reporter, *, data: Splits | None = None) -> dict:
    """Train one trial to its end (or until the reporter's caller stops it); returns the
    last metrics. A diverged run reports accuracy 0 once and ends: a result, not an error."""
    device = pick_device(spec.settings)
    limit_worker(int(spec.settings.cpus_per_trial), spec.settings.gpus_per_trial,
                 device if device.type == "cuda" else None)
    data = data or load_splits(spec.settings)
    run = _Run(spec, data, device)
    state = reporter.restore()
    if state is not None:
        run.load(state)
        if run.step >= run.steps and run.last_metrics is not None:
            # Killed between its last checkpoint and Tune recording it: say it again.
            reporter.report(run.last_metrics, run.state())
            return run.last_metrics
    for until in (t for t in run.report_at if t > run.step):
        start = time.perf_counter()
        loss = run.train_to(until)
        run.last_metrics = run.metrics(loss, time.perf_counter() - start)
        reporter.report(run.last_metrics, run.state())
        if run.last_metrics["completed"]:
            break
    return run.last_metrics


# --- Tune ---------------------------------------------------------------------------


class TuneReporter:
    """Reports through ray.tune, with the trial state as a Tune checkpoint."""

    def restore(self) -> dict | None:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return torch.load(os.path.join(folder, _CHECKPOINT_FILE), map_location="cpu",
                              weights_only=True)

    def report(self, metrics: dict, state: dict) -> None:
        from ray import tune

        with tempfile.TemporaryDirectory(prefix="evonas-trial-") as folder:
            torch.save(state, os.path.join(folder, _CHECKPOINT_FILE))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def train_layer(config: dict) -> None:
    """The Tune function trainable: one trial from its config (see TrialSpec)."""
    run_trial(TrialSpec.from_config(config), TuneReporter())


__all__ = ["TrialSpec", "Splits", "TextSplits", "Reporter", "run_trial", "train_layer", "load_splits",
           "train_size", "total_steps", "report_steps", "batch_indices", "pick_device"]
