"""Settings of the full-training stage, validated before any work starts.

Where it sits: `evonas train RUN` (cli/train.py) and `evonas search --full-train-top N`
build a FullTrainConfig from their flags and hand it to stage.run_full_training. Every
check here runs in the driver, before Ray starts or a file is written, so a typo in an
architecture name or a GPU share that does not split a GPU fails in a second, not an hour
in. The module imports neither torch nor ray; checking names loads the zoo and the model
registry (torch), which the CLI does inside its handler.

What one stage trains: the top `top` survivors of the search plus the zoo `baselines`,
each on every architecture in `archs`, at every batch size in `batch_sizes`, for every
seed in `seeds`, with every optimizer in `optimizers`; each such group gets
`trials_per_layer` Optuna (TPE) trials over the learning rate and weight decay, so every
layer gets the same tuning effort under each optimizer.

A search over sequence (N, T, C) layers takes other defaults (SEQUENCE_DEFAULTS, through
search_defaults): the transformer baselines, the full-size LM or ViT, and two optimizers,
AdamW and SGD with momentum, reported side by side, so that a layer that trains well only
under one of them is seen to.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

from evonas.errors import EvonasError
from evonas.runtime import checks

DEFAULT_BASELINES = ("bn_relu", "gn_relu", "evonorm_b0", "evonorm_s0")
DEFAULT_ARCHS = ("resnet20", "mobilenetv2_full")
DEFAULT_BATCH_SIZES = (128, 8)
# Each optimizer's search ranges (at batch LR_REFERENCE_BATCH, log scale) and the point
# every group's study starts from: the standard recipe the baselines are usually given
# (SGD: the CIFAR ResNet recipe; AdamW: GPT-style decay 0.1 at lr 2e-3 for batch 128,
# i.e. 1e-3 at the ViT's batch 64 and 5e-4 at the LM's batch 32, the usual settings of
# small ViTs and character GPTs).
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "sgd": {"lr_range": (0.01, 1.0), "wd_range": (1e-5, 1e-3),
            "start": {"lr": 0.1, "weight_decay": 5e-4}},
    "adamw": {"lr_range": (2e-4, 2e-2), "wd_range": (1e-3, 0.3),
              "start": {"lr": 2e-3, "weight_decay": 0.1}},
}
# Defaults of a stage on a search over sequence layers, by the proxy family the search
# used (search.config.proxy_family); flags and --full-train-config override them. The
# LM: the 6-block, 256-context lm_full at width 256, batch 32 (its layers see no batch
# statistics: a causal space has none), 5,000 steps; the ViT: vit_full at width 192, at
# batch 128 and 8 as the CNNs (a bidirectional space has batch statistics).
SEQUENCE_BASELINES = ("layernorm", "rmsnorm", "dyt")
SEQUENCE_DEFAULTS: dict[str, dict[str, Any]] = {
    "lm": {"baselines": SEQUENCE_BASELINES, "archs": ("lm_full",), "width": 256,
           "batch_sizes": (32,), "epochs": None, "steps": 5000,
           "optimizers": ("adamw", "sgd")},
    "vit": {"baselines": SEQUENCE_BASELINES, "archs": ("vit_full",), "width": 192,
            "optimizers": ("adamw", "sgd")},
}
# The tuned learning rate is the one at this batch size; a trial at batch size b uses
# lr * b / LR_REFERENCE_BATCH (the linear scaling rule), so one search range suits the
# batch-128 and the batch-8 runs alike.
LR_REFERENCE_BATCH = 128
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")
# Settings that change what is trained, and so name the Tune experiment: a re-run with
# the same values resumes it. Budget, retries, connection and device placement are left
# out: a stage killed on one machine may resume with another budget or on another cluster.
_EXECUTION_ONLY = ("budget", "max_retries", "ray_address", "storage", "workers",
                   "cpus_per_trial", "gpus_per_trial", "device", "tracking_uri", "data_dir")


@dataclasses.dataclass(frozen=True)
class FullTrainConfig:
    """One full-training stage.

    Length: `epochs` passes over the training set, or `steps` SGD steps (exactly one of
    them); the trial reports validation accuracy and loss once per epoch, or `reports`
    times over `steps`. ASHA compares trials at those reports.
    lr_range is searched on a log scale at batch size 128 and scaled linearly with the
    batch size; wd_range on a log scale. None: each optimizer's own (OPTIMIZERS); given,
    they are the ranges of the one optimizer of the stage. The first trial of every group
    is the optimizer's standard recipe (SGD: lr 0.1, weight decay 5e-4) when it lies in
    the ranges.
    optimizers: "sgd" (momentum `momentum`) and/or "adamw"; each is a setting of its own,
    tuned alike and reported in its own leaderboard rows.
    groups: group count of grouped statistics for every layer (None: the search space's).
    placement: where a transformer's norms sit (proxy/transformer.py), the search's by
    default; CNNs take only "pre".
    device: "auto" (CUDA when the trial holds GPUs, else CPU), "cpu", "cuda" or "cuda:N".
    bf16: bfloat16 autocast for forward passes; channels_last: NHWC memory format.
    budget: one budget for search plus full training (see stage.py for the rule).
    """

    top: int = 5
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    archs: tuple[str, ...] = DEFAULT_ARCHS
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    seeds: tuple[int, ...] = (0, 1)
    trials_per_layer: int = 8
    epochs: int | None = 30
    steps: int | None = None
    reports: int = 10
    width: int = 16
    groups: int | None = None
    placement: str = "pre"
    lr_range: tuple[float, float] | None = None
    wd_range: tuple[float, float] | None = None
    optimizers: tuple[str, ...] = ("sgd",)
    momentum: float = 0.9
    warmup_fraction: float = 0.05
    asha_grace: int | None = None
    asha_reduction: int = 3
    eval_size: int | None = None
    dataset: str = "cifar10"
    data_dir: str | None = None
    device: str = "auto"
    bf16: bool = False
    channels_last: bool = False
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    workers: int | None = None
    max_retries: int = 1
    budget: str | None = None
    ray_address: str | None = None
    storage: str | None = None
    tracking_uri: str | None = None

    def __post_init__(self) -> None:
        for name in ("baselines", "archs", "batch_sizes", "seeds", "lr_range", "wd_range",
                     "optimizers"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        # A genome file's absolute path: the stage's config.json is read back on resume,
        # and the trials read the genome, from wherever they run.
        object.__setattr__(self, "baselines", tuple(
            os.path.abspath(b) if is_genome_file(b) else b for b in self.baselines))
        self._check_plan()
        self._check_length()
        self._check_hyperparameters()
        self._check_resources()
        self._check_names()

    # --- checks -----------------------------------------------------------------------

    def _check_plan(self) -> None:
        checks.whole("--top", self.top, minimum=0)
        if self.top == 0 and not self.baselines:
            raise EvonasError("nothing to train: --top 0 and no --baselines; train at least "
                              "one layer")
        if not self.archs:
            raise EvonasError("--archs needs at least one architecture, e.g. resnet20")
        if not self.batch_sizes:
            raise EvonasError("--batch-sizes needs at least one batch size, e.g. 128,8")
        for b in self.batch_sizes:
            checks.whole("--batch-sizes: a batch size", b, minimum=1)
        if not self.seeds:
            raise EvonasError("--seeds needs at least one seed, e.g. 2 (seeds 0 and 1)")
        for s in self.seeds:
            checks.whole("--seeds: a seed", s, minimum=0)
        if not self.optimizers:
            raise EvonasError("--optimizers needs at least one optimizer, e.g. sgd")
        for name in self.optimizers:
            checks.known("--optimizers", name, OPTIMIZERS, "optimizer")
        for flag, values in (("--archs", self.archs), ("--batch-sizes", self.batch_sizes),
                             ("--seeds", self.seeds), ("--baselines", self.baselines),
                             ("--optimizers", self.optimizers)):
            if len(set(values)) != len(values):
                raise EvonasError(f"{flag} lists a value twice: {','.join(map(str, values))}")
        checks.whole("--trials-per-layer", self.trials_per_layer, minimum=1)
        checks.whole("--max-retries", self.max_retries, minimum=0)

    def _check_length(self) -> None:
        if (self.epochs is None) == (self.steps is None):
            raise EvonasError("give the training length as --epochs or as --steps, not both")
        if self.epochs is not None:
            checks.whole("--epochs", self.epochs, minimum=1)
        else:
            checks.whole("--steps", self.steps, minimum=1)
            checks.whole("--reports", self.reports, minimum=1)
        checks.whole("--width", self.width, minimum=1)
        if self.groups is not None:
            checks.whole("--groups", self.groups, minimum=1)
        if self.eval_size is not None:
            checks.whole("--eval-size", self.eval_size, minimum=1)
        if self.asha_grace is not None:
            checks.whole("ASHA grace period", self.asha_grace, minimum=1)
        checks.whole("ASHA reduction factor", self.asha_reduction, minimum=2)

    def _check_hyperparameters(self) -> None:
        for flag, pair in (("--lr-range", self.lr_range), ("--wd-range", self.wd_range)):
            if pair is None:
                continue
            if len(self.optimizers) > 1:
                raise EvonasError(f"{flag} sets the range of one optimizer; with --optimizers "
                                  f"{','.join(self.optimizers)} each takes its own: drop {flag} "
                                  f"or give one optimizer")
            low, high = pair if len(pair) == 2 else (None, None)
            if not (checks.real(low) and checks.real(high) and 0 < low < high):
                raise EvonasError(f"{flag} must be two numbers 0 < low < high, got "
                                  f"{low!r},{high!r}")
        if not (checks.real(self.momentum) and 0 <= self.momentum < 1):
            raise EvonasError(f"momentum must lie in [0, 1), got {self.momentum!r}")
        if not (checks.real(self.warmup_fraction) and 0 <= self.warmup_fraction < 1):
            raise EvonasError(f"warmup fraction must lie in [0, 1), got {self.warmup_fraction!r}")

    def _check_resources(self) -> None:
        checks.positive("--cpus-per-trial", self.cpus_per_trial)
        checks.gpu_share("--gpus-per-trial", self.gpus_per_trial)
        if self.workers is not None:
            checks.whole("--workers", self.workers, minimum=1)
        if not isinstance(self.device, str) or not _DEVICE_RE.fullmatch(self.device):
            raise EvonasError(f"--device {self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.device.startswith("cuda") and self.gpus_per_trial == 0:
            raise EvonasError(f"--device {self.device} needs --gpus-per-trial > 0: Ray gives "
                              f"a trial no GPU unless it asks for one")
        if self.device == "cpu" and self.gpus_per_trial > 0:
            raise EvonasError("--device cpu with --gpus-per-trial > 0 would hold GPUs it never "
                              "uses; drop one of them")
        for flag, value in (("--bf16", self.bf16), ("--channels-last", self.channels_last)):
            if not isinstance(value, bool):
                raise EvonasError(f"{flag} is a switch (true or false), got {value!r}")

    def _check_names(self) -> None:
        """Architectures, zoo layers, dataset and budget exist (imports kept light), and
        the budget can be spent by these trials."""
        from evonas.layers import zoo
        from evonas.proxy.models import check_placement

        checks.archs("--archs", self.archs)
        check_placement(self.placement, self.archs)
        for name in self.baselines:
            if is_genome_file(name):
                baseline_genome(name)  # a malformed file fails here, in one line
            elif name not in zoo.names():
                raise EvonasError(f"--baselines: unknown zoo layer {name!r}; use any of "
                                  f"{', '.join(zoo.names())}, or a genome file NAME.json")
        checks.dataset("--dataset", self.dataset)
        if self.budget is not None:
            from evonas.search.budget import parse_budget

            check_stage_budget(parse_budget(self.budget), self.gpus_per_trial,
                               remote=self.ray_address)

    # --- derived values ---------------------------------------------------------------

    def ranges(self, optimizer: str) -> tuple[tuple[float, float], tuple[float, float], dict]:
        """(lr range, weight-decay range, first point) of the groups of an optimizer."""
        recipe = OPTIMIZERS[optimizer]
        return (self.lr_range or recipe["lr_range"], self.wd_range or recipe["wd_range"],
                dict(recipe["start"]))

    @property
    def num_reports(self) -> int:
        """Reports per trial: ASHA's max_t, the same for every trial of the stage."""
        return self.epochs if self.epochs is not None else min(self.reports, self.steps)

    @property
    def grace_period(self) -> int:
        # A quarter of the training before ASHA may stop a trial: earlier, learning-rate
        # warm-up and the first epochs say little about where a run ends.
        return self.asha_grace or max(1, self.num_reports // 4)

    @property
    def device_kind(self) -> str:
        """"gpu" when trials hold GPUs, else "cpu": the device the ledger charges."""
        return "gpu" if self.gpus_per_trial > 0 else "cpu"

    @property
    def device_share(self) -> float:
        """Share of one device a trial holds: what a second of it costs in the ledger."""
        return self.gpus_per_trial if self.gpus_per_trial > 0 else self.cpus_per_trial

    def plan_fields(self) -> dict[str, Any]:
        """The settings that decide what is trained (see _EXECUTION_ONLY)."""
        return training_plan(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FullTrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EvonasError(f"unknown full-training setting {unknown[0]!r}; known: "
                              f"{', '.join(sorted(known))}")
        return cls(**dict(data))


def training_plan(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that decide what is trained (see _EXECUTION_ONLY), of a stage's
    config.json as written, a setting it predates at its default. Not checked again as
    FullTrainConfig would: a genome file it trained may have moved since."""
    defaults = {f.name: f.default for f in dataclasses.fields(FullTrainConfig)}
    plan = {k: v for k, v in {**defaults, **settings}.items() if k not in _EXECUTION_ONLY}
    return json.loads(json.dumps(plan))  # tuples as lists, as a config.json read back has


def is_genome_file(name: str) -> bool:
    """A --baselines entry that names a genome file rather than a zoo layer."""
    return name.endswith(".json")


def baseline_genome(name: str):
    """A baseline's genome: a zoo layer by name, or a genome file (read as data, never
    run). Files let a stage train layers of no search, such as a calibration panel's
    random and found layers (evonas calibrate)."""
    from evonas.layers import zoo
    from evonas.layers.genome import Genome

    return Genome.load(name) if is_genome_file(name) else zoo.get(name)


def for_search(search_config: Any, budget: str | None = None, **overrides: Any) -> FullTrainConfig:
    """The stage `evonas search --full-train-top N` runs once its search ends.

    evonas train's defaults, on the search's dataset, devices, Ray cluster and MLflow
    store, for its `full_train_top` best layers; budget is the whole budget of search and
    full training (the run's --budget, or the one given to --resume), of which the
    search, run on Budget.split's share, leaves at least the rest to full training.
    Build it before the search starts too: a budget or device that cannot work fails then.
    """
    c = search_config
    settings = dict(top=c.full_train_top, dataset=c.dataset, data_dir=c.data_dir,
                    cpus_per_trial=c.cpus_per_eval, gpus_per_trial=c.gpus_per_eval,
                    workers=c.workers or None, ray_address=c.ray_address,
                    tracking_uri=c.tracking_uri, budget=budget or c.budget)
    chosen = dict(c.full_train or {})
    fixed = sorted(set(chosen) & _FROM_THE_SEARCH)
    if fixed:
        raise EvonasError(f"--full-train-config sets {fixed[0]!r}, which the search decides "
                          f"(--full-train-top, --budget, --dataset, --data-dir); drop it "
                          f"from the file")
    return FullTrainConfig.from_dict(over(search_defaults(c),
                                          {**settings, **chosen, **overrides}))


def search_defaults(search_config: Any) -> dict[str, Any]:
    """The settings whose defaults follow the search's layers: SEQUENCE_DEFAULTS and the
    proxies' norm placement for a search of transformer proxies, none (the dataclass's)
    for one of CNNs."""
    from evonas.search.config import proxy_family

    family = proxy_family(search_config.archs)
    if family not in SEQUENCE_DEFAULTS:
        return {}
    return {**SEQUENCE_DEFAULTS[family], "placement": search_config.placement}


def over(defaults: Mapping[str, Any], chosen: Mapping[str, Any]) -> dict[str, Any]:
    """Chosen settings over defaults, the training length as one setting: a length
    chosen in epochs drops a default one in steps, and the other way round."""
    merged = {**defaults, **chosen}
    for given, other in (("epochs", "steps"), ("steps", "epochs")):
        if chosen.get(given) is not None and other not in chosen:
            merged[other] = None
    return merged


# What `evonas search --full-train-top` takes from the search itself, never from the file.
_FROM_THE_SEARCH = frozenset({"top", "budget", "dataset", "data_dir"})


def load_overrides(path: str) -> dict[str, Any]:
    """--full-train-config FILE: a JSON object of FullTrainConfig settings, checked now
    (unknown names and bad values fail before the search starts)."""
    from evonas.search.runfolder import read_json

    data = read_json(path)
    if not isinstance(data, dict):
        raise EvonasError(f"{path}: expected a JSON object of full-training settings, e.g. "
                          f'{{"archs": ["resnet20"], "epochs": 10}}')
    for key in ("baselines", "archs", "batch_sizes", "seeds", "lr_range", "wd_range",
                "optimizers"):
        if key in data and not isinstance(data[key], list):
            raise EvonasError(f"{path}: {key!r} must be a list, e.g. \"{key}\": [...]")
    return data


def check_stage_budget(budget, gpus_per_trial: float, *, remote: str | None = None) -> None:
    """EvonasError when `budget` (a search.budget.Budget) cannot bound these trials: an
    evaluation count says nothing about how long training may take, and a device budget
    the trials never spend would not stop them (search/budget.py's check_spendable):
    GPU trials and a cpu-h budget, CPU trials and a gpu-h one, a gpu-h budget on an
    embedded Ray without GPUs. remote: the --ray-address, whose GPUs are checked once
    connected (stage.py)."""
    from evonas.runtime.cluster import remote_address
    from evonas.runtime.limits import local_gpus
    from evonas.search.budget import check_spendable

    if budget.kind == "evals":
        raise EvonasError(f"budget {budget} counts evaluations and cannot bound full "
                          f"training; give device-hours (2cpu-h, 10gpu-h) or wall time (3h)")
    counts = budget.kind == "device" and budget.device == "gpu" and gpus_per_trial > 0
    here = None if not counts or remote_address(remote) is not None else local_gpus()
    check_spendable(budget, gpus_per_trial, gpus=here, flag="--gpus-per-trial", tasks="trials")


def parse_seeds(text: str) -> tuple[int, ...]:
    """--seeds: a count ("2": seeds 0 and 1) or a comma-separated list ("0,3,7")."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise EvonasError(f"--seeds {text!r}: give a count (2) or a list of seeds "
                          f"(0,3,7)") from None
    if len(values) == 1 and "," not in str(text):
        if values[0] < 1:
            raise EvonasError(f"--seeds {text!r}: the count must be at least 1")
        return tuple(range(values[0]))
    return tuple(values)


__all__ = ["FullTrainConfig", "training_plan", "for_search", "search_defaults",
           "check_stage_budget", "parse_seeds", "OPTIMIZERS", "SEQUENCE_DEFAULTS",
           "LR_REFERENCE_BATCH", "DEFAULT_BASELINES", "DEFAULT_ARCHS", "DEFAULT_BATCH_SIZES"]
