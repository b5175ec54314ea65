"""Settings of a search, validated before any work starts.

A SearchConfig is written once to the run folder (config.json) and read back on
`--resume`, so a resumed search runs with the settings it started with. Defaults follow
METHOD.md where the paper states them (quality: 20% accuracy after 100 steps; stability:
gradient-norm ascent, reject above 1e8) and are sized for CPU workers elsewhere.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from evonas.errors import EvonasError
from evonas.runtime import checks

CONTROLLERS = ("evolution", "random")

# Proxy sizes of a search on the synthetic set, where no flag sets them; CIFAR-10 gets the
# StageConfig and SearchConfig defaults. The synthetic set is for smoke runs: 2,048 images
# that BN-ReLU proxies learn to 0.6-0.7 in 60 steps at batch 64, where CIFAR-10's proxies
# need hundreds of steps to rank layers. At this size a survivor of the three proxy
# architectures costs about 20 s of a CPU core, against 3-4 minutes at CIFAR-10's sizes:
# the README's five-minute first run on two cores evaluates over a hundred candidates.
SMOKE_PROXY = {"proxy_steps": 60, "proxy_batch_size": 64, "proxy_width": 8,
               "quality_steps": 30, "stability_steps": 5}
STAGE_SIZES = ("quality_steps", "stability_steps")  # the SMOKE_PROXY keys of StageConfig


def proxy_sizes(dataset: str, given: Mapping[str, int | None]) -> tuple[dict, dict]:
    """(SearchConfig sizes, StageConfig sizes) of a search on `dataset`: the sizes given
    (None: not given) over the dataset's defaults; a size in neither keeps its field's
    default."""
    defaults = SMOKE_PROXY if dataset == "synthetic" else {}
    sizes = {**defaults, **{name: v for name, v in given.items() if v is not None}}
    stage = {name: sizes.pop(name) for name in STAGE_SIZES if name in sizes}
    return sizes, stage


def size_default(name: str, dataset: str = "cifar10") -> int:
    """The default of a proxy size (a SMOKE_PROXY key) on `dataset`."""
    if dataset == "synthetic":
        return SMOKE_PROXY[name]
    owner = StageConfig if name in STAGE_SIZES else SearchConfig
    return {f.name: f.default for f in dataclasses.fields(owner)}[name]


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Thresholds and sizes of the rejection stages.

    numeric_scales: input scales of the numeric check (finite outputs and gradients).
    stability_steps / stability_lr / stability_threshold: the paper's stability test,
        gradient ascent on the network weights to maximise ||dL/dtheta||; a layer whose
        gradient norm passes the threshold within the steps is rejected.
    quality_steps / quality_threshold: after quality_steps of proxy training on each
        architecture, a layer below quality_threshold validation accuracy on any of them
        is rejected (the paper: 20% after 100 steps). The survivors' training goes on to
        the proxy's full step count: the quality check is a checkpoint, not a second run.
    """

    numeric_scales: tuple[float, ...] = (1e-3, 1.0, 1e3)
    stability_steps: int = 20
    stability_lr: float = 1.0
    stability_threshold: float = 1e8
    stability_batch: int = 16
    quality_steps: int = 100
    quality_threshold: float = 0.2
    quality_eval_size: int = 1000


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    space: str = "norm_act"
    budget: str = "2cpu-h"
    dataset: str = "cifar10"
    data_dir: str | None = None
    seed: int = 0
    controller: str = "evolution"
    seed_zoo: bool = False
    population_size: int = 50
    tournament_size: int = 10
    # Share of evolution's proposals that are random immigrants (evolution.py says why).
    random_fraction: float = 0.5
    archs: tuple[str, ...] = ("resnet", "mobilenetv2", "efficientnet")
    proxy_steps: int = 300
    proxy_batch_size: int = 128
    proxy_lr: float = 0.1
    proxy_width: int = 16
    proxy_eval_size: int | None = 2000
    workers: int = 1
    cpus_per_eval: float = 1.0
    gpus_per_eval: float = 0.0
    eval_time_limit_s: float = 1800.0
    ray_address: str | None = None
    tracking_uri: str | None = None
    # Seconds between rewrites of <run>/report.html while the search runs (it is also
    # written once at the end): a report costs the driver a few seconds of plotting.
    report_every_s: float = 300.0
    # After the search, train this many best layers and the baselines fully (fulltrain/);
    # the search then gets 80% of the budget (Budget.split).
    full_train_top: int = 0
    # With full_train_top, the share of --budget the search may spend; full training
    # gets what the whole budget has left when the search ends (Budget.split).
    search_share: float = 0.8
    # Settings of that full training that differ from `evonas train`'s defaults, by
    # FullTrainConfig field name (--full-train-config FILE); kept so a resume uses them.
    full_train: Mapping[str, Any] | None = None
    stages: StageConfig = StageConfig()

    def __post_init__(self) -> None:
        object.__setattr__(self, "space", resolved_space(self.space))
        if self.controller not in CONTROLLERS:
            raise EvonasError(f"--controller {self.controller!r}: use one of {', '.join(CONTROLLERS)}")
        checks.whole("--workers", self.workers, minimum=0, hint=" (0: in this process)")
        _check_gpu_share(self.gpus_per_eval)
        # Aging evolution needs two members to choose between (EvolutionConfig).
        checks.whole("--population", self.population_size, minimum=2,
                     hint=" (aging evolution needs two members to choose between)")
        _positive_int("--tournament", self.tournament_size)
        _positive_int("--proxy-steps", self.proxy_steps)
        _positive_int("--proxy-batch", self.proxy_batch_size)
        _positive_int("--proxy-width", self.proxy_width)
        if isinstance(self.random_fraction, bool) or not isinstance(
                self.random_fraction, (int, float)) or not 0 <= self.random_fraction < 1:
            raise EvonasError(f"--random-fraction must be a number in [0, 1), got "
                              f"{self.random_fraction!r} (0: every proposal a mutant)")
        if self.tournament_size > self.population_size:
            raise EvonasError(f"--tournament {self.tournament_size} is larger than --population "
                              f"{self.population_size}; use at most the population size")
        if self.stages.quality_steps > self.proxy_steps:
            raise EvonasError(f"quality check at step {self.stages.quality_steps} comes after the "
                              f"proxy's {self.proxy_steps} steps; raise --proxy-steps")
        if not self.archs:
            raise EvonasError("--archs needs at least one proxy architecture")
        checks.positive("--cpus-per-eval", self.cpus_per_eval)
        checks.time_limit("--eval-time-limit", self.eval_time_limit_s)
        checks.positive("--report-every", self.report_every_s, example="300 (seconds)")
        checks.whole("--full-train-top", self.full_train_top, minimum=0)
        if isinstance(self.search_share, bool) or not isinstance(
                self.search_share, (int, float)) or not 0 < self.search_share < 1:
            raise EvonasError(f"--search-share must lie strictly between 0 and 1, got "
                              f"{self.search_share!r} (0.8: 80% search, the rest full training)")
        if not 0 <= self.stages.quality_threshold < 1:
            raise EvonasError("the quality threshold is an accuracy in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SearchConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EvonasError(f"config.json: unknown setting {unknown[0]!r}; was it written by "
                              "another evonas version?")
        # Run folders written before random immigrants existed searched without them.
        data.setdefault("random_fraction", 0.0)
        stages = dict(data.pop("stages", {}))
        if "numeric_scales" in stages:
            stages["numeric_scales"] = tuple(stages["numeric_scales"])
        if "archs" in data:
            data["archs"] = tuple(data["archs"])
        return cls(stages=StageConfig(**stages), **data)

    def validate_parts(self) -> None:
        """Check the named parts exist (space, architectures, dataset) and that the budget
        can be spent by these evaluations on this machine, so a typo or a budget that
        would never run out fails before Ray starts or a file is written, not an hour in."""
        from evonas.layers.space import load_space

        load_space(self.space)
        checks.archs("--archs", self.archs)
        checks.dataset("--dataset", self.dataset)
        self.check_budget()

    def check_budget(self, text: str | None = None) -> None:
        """EvonasError when the budget (`text`, e.g. a resume's new --budget; None: this
        config's) cannot be spent by these evaluations here (search.budget.check_spendable)."""
        from evonas.runtime.cluster import remote_address
        from evonas.runtime.limits import local_gpus
        from evonas.search.budget import check_spendable, parse_budget

        budget = parse_budget(self.budget if text is None else text)
        # A cluster's GPUs are known once connected (driver.make_backend checks them there).
        remote = self.workers > 0 and remote_address(self.ray_address) is not None
        check_spendable(budget, self.gpus_per_eval, inline=self.workers == 0,
                        gpus=None if remote else local_gpus())


def resolved_space(spec: str) -> str:
    """A built-in space's name as given, a space file's absolute path: the configuration
    travels to workers started in other folders, and to resumes started from elsewhere."""
    from importlib import resources

    if resources.files("evonas.search_spaces").joinpath(f"{spec}.json").is_file():
        return spec
    path = Path(spec)
    return str(path.resolve()) if path.is_file() else spec


def _positive_int(flag: str, value: Any) -> None:
    checks.whole(flag, value, minimum=1)


def _check_gpu_share(share: float) -> None:
    checks.gpu_share("--gpus-per-eval", share)
