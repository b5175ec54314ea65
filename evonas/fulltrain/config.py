"""Settings of the full-training stage, validated before any work starts.

Where it sits: `evonas train RUN` (cli/train.py) and `evonas search --full-train-top N`
build a FullTrainConfig from their flags and hand it to stage.run_full_training. Every
check here runs in the driver, before Ray starts or a file is written, so a typo in an
architecture name or a GPU share that does not split a GPU fails in a second, not an hour
in. The module imports neither torch nor ray; checking names loads the zoo and the model
registry (torch), which the CLI does inside its handler.

What one stage trains: the top `top` survivors of the search plus the zoo `baselines`,
each on every architecture in `archs`, at every batch size in `batch_sizes`, for every
seed in `seeds`; each such group gets `trials_per_layer` Optuna (TPE) trials over the
learning rate and weight decay, so every layer gets the same tuning effort.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

from evonas.errors import EvonasError

DEFAULT_BASELINES = ("bn_relu", "gn_relu", "evonorm_b0", "evonorm_s0")
DEFAULT_ARCHS = ("resnet20", "mobilenetv2_full")
DEFAULT_BATCH_SIZES = (128, 8)
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
    batch size; wd_range on a log scale. The first trial of every group is the standard
    recipe (lr 0.1, weight decay 5e-4) when it lies in the ranges.
    groups: group count of grouped statistics for every layer (None: the search space's).
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
    lr_range: tuple[float, float] = (0.01, 1.0)
    wd_range: tuple[float, float] = (1e-5, 1e-3)
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
        for name in ("baselines", "archs", "batch_sizes", "seeds", "lr_range", "wd_range"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self._check_plan()
        self._check_length()
        self._check_hyperparameters()
        self._check_resources()
        self._check_names()

    # --- checks -----------------------------------------------------------------------

    def _check_plan(self) -> None:
        _whole("--top", self.top, minimum=0)
        if self.top == 0 and not self.baselines:
            raise EvonasError("nothing to train: --top 0 and no --baselines; train at least "
                              "one layer")
        if not self.archs:
            raise EvonasError("--archs needs at least one architecture, e.g. resnet20")
        if not self.batch_sizes:
            raise EvonasError("--batch-sizes needs at least one batch size, e.g. 128,8")
        for b in self.batch_sizes:
            _whole("--batch-sizes: a batch size", b, minimum=1)
        if not self.seeds:
            raise EvonasError("--seeds needs at least one seed, e.g. 2 (seeds 0 and 1)")
        for s in self.seeds:
            _whole("--seeds: a seed", s, minimum=0)
        for flag, values in (("--archs", self.archs), ("--batch-sizes", self.batch_sizes),
                             ("--seeds", self.seeds), ("--baselines", self.baselines)):
            if len(set(values)) != len(values):
                raise EvonasError(f"{flag} lists a value twice: {','.join(map(str, values))}")
        _whole("--trials-per-layer", self.trials_per_layer, minimum=1)
        _whole("--max-retries", self.max_retries, minimum=0)

    def _check_length(self) -> None:
        if (self.epochs is None) == (self.steps is None):
            raise EvonasError("give the training length as --epochs or as --steps, not both")
        if self.epochs is not None:
            _whole("--epochs", self.epochs, minimum=1)
        else:
            _whole("--steps", self.steps, minimum=1)
            _whole("--reports", self.reports, minimum=1)
        _whole("--width", self.width, minimum=1)
        if self.groups is not None:
            _whole("--groups", self.groups, minimum=1)
        if self.eval_size is not None:
            _whole("--eval-size", self.eval_size, minimum=1)
        if self.asha_grace is not None:
            _whole("ASHA grace period", self.asha_grace, minimum=1)
        _whole("ASHA reduction factor", self.asha_reduction, minimum=2)

    def _check_hyperparameters(self) -> None:
        for flag, (low, high) in (("--lr-range", self.lr_range), ("--wd-range", self.wd_range)):
            if not (_real(low) and _real(high) and 0 < low < high):
                raise EvonasError(f"{flag} must be two numbers 0 < low < high, got "
                                  f"{low!r},{high!r}")
        if not (_real(self.momentum) and 0 <= self.momentum < 1):
            raise EvonasError(f"momentum must lie in [0, 1), got {self.momentum!r}")
        if not (_real(self.warmup_fraction) and 0 <= self.warmup_fraction < 1):
            raise EvonasError(f"warmup fraction must lie in [0, 1), got {self.warmup_fraction!r}")

    def _check_resources(self) -> None:
        if not (_real(self.cpus_per_trial) and self.cpus_per_trial > 0):
            raise EvonasError(f"--cpus-per-trial must be > 0, got {self.cpus_per_trial!r}")
        check_gpu_share(self.gpus_per_trial)
        if self.workers is not None:
            _whole("--workers", self.workers, minimum=1)
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
        """Architectures, zoo layers, dataset and budget exist (imports kept light)."""
        from evonas.layers import zoo
        from evonas.proxy.data import DATASETS
        from evonas.proxy.models import ARCHS

        for arch in self.archs:
            if arch not in ARCHS:
                raise EvonasError(f"--archs: unknown architecture {arch!r}; use any of "
                                  f"{', '.join(ARCHS)}")
        for name in self.baselines:
            if name not in zoo.names():
                raise EvonasError(f"--baselines: unknown zoo layer {name!r}; use any of "
                                  f"{', '.join(zoo.names())}")
        if self.dataset not in DATASETS:
            raise EvonasError(f"--dataset {self.dataset!r}: use one of {', '.join(DATASETS)}")
        if self.budget is not None:
            stage_budget(self.budget, self.gpus_per_trial)

    # --- derived values ---------------------------------------------------------------

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
        return {k: v for k, v in self.to_dict().items() if k not in _EXECUTION_ONLY}

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
    return FullTrainConfig.from_dict({**settings, **chosen, **overrides})


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
    for key in ("baselines", "archs", "batch_sizes", "seeds", "lr_range", "wd_range"):
        if key in data and not isinstance(data[key], list):
            raise EvonasError(f"{path}: {key!r} must be a list, e.g. \"{key}\": [...]")
    return data


def check_gpu_share(share: Any) -> None:
    """A GPU share below 1 must split a GPU evenly; above 1 it must be whole.

    Ray's fractional GPUs are logical only: 0.3 would pack three trials on a GPU, each
    capping its memory at 30%, and leave a tenth of every GPU unused.
    """
    if not (_real(share) and share >= 0):
        raise EvonasError(f"--gpus-per-trial must be a number >= 0, got {share!r}")
    if 0 < share < 1 and abs(1 / share - round(1 / share)) > 1e-9:
        raise EvonasError(f"--gpus-per-trial {share:g} does not split a GPU evenly "
                          f"(1/{share:g} = {1 / share:.2f}); use 1/k such as 0.5, 0.25 or 0.125")
    if share > 1 and share != int(share):
        raise EvonasError(f"--gpus-per-trial {share:g}: above 1 use whole GPUs, e.g. "
                          f"{math.ceil(share)}")


def stage_budget(text: str, gpus_per_trial: float):
    """The Budget a --budget text gives full training, or EvonasError.

    Device-hours must name the device the trials hold (a CPU budget is never spent by
    GPU trials); wall time works either way; an evaluation count says nothing about how
    long training may take.
    """
    from evonas.search.budget import parse_budget

    budget = parse_budget(text)
    if budget.kind == "evals":
        raise EvonasError(f"--budget {text}: a count of evaluations cannot bound full "
                          f"training; give device-hours (2cpu-h, 10gpu-h) or wall time (3h)")
    device = "gpu" if gpus_per_trial > 0 else "cpu"
    if budget.kind == "device" and budget.device != device:
        raise EvonasError(f"--budget {text} counts {budget.device.upper()}-hours but the "
                          f"trials run on {device.upper()}s (--gpus-per-trial "
                          f"{gpus_per_trial:g}); give {budget.amount / 3600:g}{device}-h")
    return budget


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


def _whole(flag: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EvonasError(f"{flag} must be a whole number >= {minimum}, got {value!r}")


def _real(value: Any) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value))


__all__ = ["FullTrainConfig", "for_search", "check_gpu_share", "stage_budget", "parse_seeds",
           "LR_REFERENCE_BATCH", "DEFAULT_BASELINES", "DEFAULT_ARCHS", "DEFAULT_BATCH_SIZES"]
