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
# the README's five-minute first run on two cores evaluates about a hundred candidates.
SMOKE_PROXY = {"proxy_steps": 60, "proxy_batch_size": 64, "proxy_width": 8,
               "quality_steps": 30, "stability_steps": 5}

# The transformer proxies' defaults, by (family, dataset); family "lm" (a causal LM on
# text) or "vit" (a ViT on images), see proxy_family. The LM's recipe is LM_PROXY's
# (train_transformer.py): width 64, batch 32, AdamW at lr 1e-2, 300 steps, scored on 256
# validation windows of 64 characters. Its quality gate is a loss: a layer is rejected
# when its validation bits per character after quality_steps are above the threshold.
# The rule behind both thresholds: the gate passes a layer that has learnt half a bit per
# character beyond the symbol frequencies. On tiny Shakespeare the unigram entropy is
# 4.78 bits; DyT at GPT-2's initialisation stays there (4.80-4.83 bpc from step 30 to
# 300), while LayerNorm and RMSNorm are at 3.59 and 3.64 bpc after 100 steps
# (benchmarks/results/lm_proxy_norms.json), so 4.3 after 100 steps rejects the first
# with half a bit to spare and passes the others by 0.7 bits. The synthetic chain's
# unigram entropy is 3.37 bits; after 30 steps at the smoke sizes LayerNorm and RMSNorm
# score 1.39 and 1.40 bpc, the identity layer 2.46, DyT 3.30: the threshold is 2.9.
# The ViT's recipe is VIT_PROXY's (width 64, batch 128, AdamW at lr 1e-3); its gate is
# the paper's 20% accuracy, as the CNNs'.
LM_PROXY_SIZES = {"proxy_steps": 300, "proxy_batch_size": 32, "proxy_width": 64,
                  "proxy_lr": 1e-2, "proxy_eval_size": 256, "quality_steps": 100,
                  "quality_threshold": 4.3, "quality_eval_size": 64, "stability_steps": 20}
# Smoke-sized, as SMOKE_PROXY: about 1 s of a CPU core per candidate (0.9-2 s measured
# for LayerNorm, RMSNorm, DyT at 60 steps).
LM_SMOKE_SIZES = {**LM_PROXY_SIZES, "proxy_steps": 60, "proxy_batch_size": 16,
                  "proxy_width": 32, "proxy_eval_size": 64, "quality_steps": 30,
                  "quality_threshold": 2.9, "stability_steps": 5}
VIT_PROXY_SIZES = {"proxy_steps": 300, "proxy_batch_size": 128, "proxy_width": 64,
                   "proxy_lr": 1e-3}
TASK_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("conv", "synthetic"): SMOKE_PROXY,
    ("lm", "shakespeare"): LM_PROXY_SIZES,
    ("lm", "synthetic_text"): LM_SMOKE_SIZES,
    ("vit", "cifar10"): VIT_PROXY_SIZES,
    ("vit", "synthetic"): {**VIT_PROXY_SIZES, "proxy_steps": 60, "proxy_batch_size": 64,
                           "proxy_width": 32, "quality_steps": 30, "stability_steps": 5},
}
# The keys of TASK_DEFAULTS that are StageConfig fields.
STAGE_SIZES = ("quality_steps", "stability_steps", "quality_threshold", "quality_eval_size")


def proxy_family(archs) -> str:
    """"lm" when any architecture is a causal LM, "vit" when any other is a transformer,
    else "conv": which defaults a search's proxies take."""
    from evonas.proxy.models import SEQUENCE_ARCHS, TEXT_ARCHS

    if any(a in TEXT_ARCHS for a in archs):
        return "lm"
    return "vit" if any(a in SEQUENCE_ARCHS for a in archs) else "conv"


def default_archs(space) -> tuple[str, ...]:
    """The proxy architectures of a search that names none, by its space (a SearchSpace):
    the three CNNs for (N, C, H, W) layers, the LM for a causal sequence space, the ViT
    for a bidirectional one."""
    from evonas.proxy.models import PROXY_ARCHS

    if space.layout != "ntc":
        return PROXY_ARCHS
    return ("lm",) if space.causal else ("vit",)


def proxy_sizes(dataset: str, given: Mapping[str, Any], archs=("resnet",),
                calibrated: Mapping[str, Any] | None = None) -> tuple[dict, dict]:
    """(SearchConfig sizes, StageConfig sizes) of a search on `dataset` with these proxy
    architectures: the sizes given (None: not given) over a calibration's settings
    (`evonas calibrate`'s proxy_config.json, read by read_proxy_config) over the task's
    defaults (TASK_DEFAULTS); a size in none of them keeps its field's default."""
    defaults = TASK_DEFAULTS.get((proxy_family(archs), dataset), {})
    sizes = {**defaults, **(calibrated or {}),
             **{name: v for name, v in given.items() if v is not None}}
    stage = {name: sizes.pop(name) for name in STAGE_SIZES if name in sizes}
    return sizes, stage


# The settings a calibration chooses (calibrate/sweep.py), by their field names.
CALIBRATED = ("proxy_steps", "proxy_batch_size", "proxy_width", "proxy_lr", "quality_steps",
              "quality_threshold")


def read_proxy_config(path: str, dataset: str, archs: tuple[str, ...] | None
                      ) -> tuple[dict[str, Any], tuple[str, ...]]:
    """(settings, architectures) of `evonas calibrate`'s proxy_config.json, checked against
    the search it is given to: the same dataset, and the architectures it was calibrated
    on unless --archs names the same ones (another network ranks layers otherwise)."""
    import json

    flag = f"--proxy-config {path}"
    try:
        data = json.loads(Path(path).read_text())
        settings, file_archs = dict(data["settings"]), tuple(data["archs"])
        file_dataset = data["dataset"]
    except FileNotFoundError:
        raise EvonasError(f"{flag}: no such file; `evonas calibrate --out DIR` writes "
                          f"DIR/proxy_config.json") from None
    except (ValueError, KeyError, TypeError) as err:
        raise EvonasError(f"{flag} is not a calibration's proxy_config.json ({type(err).__name__}: "
                          f"{err}); write it with `evonas calibrate`") from None
    unknown = sorted(set(settings) - set(CALIBRATED))
    if unknown:
        raise EvonasError(f"{flag} sets {unknown[0]!r}, which is not a proxy setting; use "
                          f"{', '.join(CALIBRATED)}")
    if file_dataset != dataset:
        raise EvonasError(f"{flag} was calibrated on --dataset {file_dataset}, this search is "
                          f"on {dataset}: calibrate on {dataset} or search {file_dataset}")
    if archs and tuple(archs) != file_archs:
        raise EvonasError(f"{flag} was calibrated on --archs {','.join(file_archs)}: drop "
                          f"--archs, or calibrate with --archs {','.join(archs)}")
    return settings, file_archs


def size_default(name: str, dataset: str = "cifar10", family: str = "conv") -> Any:
    """The default of a proxy setting (a TASK_DEFAULTS key) on `dataset` for `family`."""
    task = TASK_DEFAULTS.get((family, dataset), {})
    if name in task:
        return task[name]
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
        is rejected (the paper: 20% after 100 steps); for a language model the threshold
        is a loss, and a layer above quality_threshold validation bits per character is
        rejected (TASK_DEFAULTS says why 4.3 on tiny Shakespeare). The survivors' training goes on to
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
    # Empty: the space's default_archs (the CNNs, or the LM or ViT for a sequence space).
    archs: tuple[str, ...] = ()
    proxy_steps: int = 300
    proxy_batch_size: int = 128
    proxy_lr: float = 0.1
    proxy_width: int = 16
    proxy_eval_size: int | None = 2000
    # Where a transformer proxy's norms sit (proxy/transformer.py: pre, post, mixln); the
    # full training of the search's layers takes the same placement unless told otherwise.
    placement: str = "pre"
    # The fidelity ladder (driver.py): training lengths, strictly increasing, the first
    # the proxy's own (proxy_steps); empty: no ladder. A candidate whose mean fitness at a
    # rung is among the best promote_fraction of that rung's scores (once the rung holds
    # rung_min_population of them) trains again at the next rung; the top rung trains
    # top_rung_seeds seeds and scores their mean.
    rungs: tuple[int, ...] = ()
    promote_fraction: float = 0.25
    rung_min_population: int = 4
    top_rung_seeds: int = 1
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
    # The calibration (evonas calibrate's proxy_config.json, absolute path) the proxy's
    # settings came from, kept so the run folder says where its proxy came from.
    proxy_config: str | None = None
    stages: StageConfig = StageConfig()

    def __post_init__(self) -> None:
        object.__setattr__(self, "space", resolved_space(self.space))
        if not self.archs:
            from evonas.layers.space import load_space

            object.__setattr__(self, "archs", default_archs(load_space(self.space)))
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
        self._check_ladder()  # before the quality check, whose message names --proxy-steps
        if self.stages.quality_steps > self.proxy_steps:
            raise EvonasError(f"quality check at step {self.stages.quality_steps} comes after the "
                              f"proxy's {self.proxy_steps} steps; raise --proxy-steps")
        checks.positive("--cpus-per-eval", self.cpus_per_eval)
        checks.time_limit("--eval-time-limit", self.eval_time_limit_s)
        checks.positive("--report-every", self.report_every_s, example="300 (seconds)")
        checks.whole("--full-train-top", self.full_train_top, minimum=0)
        if isinstance(self.search_share, bool) or not isinstance(
                self.search_share, (int, float)) or not 0 < self.search_share < 1:
            raise EvonasError(f"--search-share must lie strictly between 0 and 1, got "
                              f"{self.search_share!r} (0.8: 80% search, the rest full training)")

    def _check_ladder(self) -> None:
        if isinstance(self.promote_fraction, bool) or not isinstance(
                self.promote_fraction, (int, float)) or not 0 < self.promote_fraction <= 1:
            raise EvonasError(f"--promote-fraction must lie in (0, 1], got "
                              f"{self.promote_fraction!r} (0.25: a rung's top quarter climbs)")
        checks.whole("--rung-min-population", self.rung_min_population, minimum=1)
        checks.whole("--top-rung-seeds", self.top_rung_seeds, minimum=1)
        if not self.rungs:
            return
        if len(self.rungs) < 2 or not all(isinstance(r, int) and not isinstance(r, bool)
                                          for r in self.rungs):
            raise EvonasError(f"--rungs {_listed(self.rungs)}: give two or more step counts, "
                              f"e.g. 300,1200,4800 (the first is the proxy's)")
        if any(b <= a for a, b in zip(self.rungs, self.rungs[1:])):
            raise EvonasError(f"--rungs {_listed(self.rungs)} must increase strictly, "
                              f"e.g. 300,1200,4800")
        if self.rungs[0] < self.stages.quality_steps:
            raise EvonasError(f"--rungs {_listed(self.rungs)} starts below the quality check's "
                              f"{self.stages.quality_steps} steps; start at or above it")
        if self.rungs[0] != self.proxy_steps:
            raise EvonasError(f"--rungs {_listed(self.rungs)} must start at the proxy's "
                              f"{self.proxy_steps} steps (--proxy-steps); drop --proxy-steps")

    @property
    def ladder(self) -> bool:
        return bool(self.rungs)

    @property
    def causal_proxy(self) -> bool:
        """Whether a proxy is a causal language model: its layers must not see later
        tokens, whatever the space (a layer that did would score on the answers)."""
        from evonas.proxy.models import TEXT_ARCHS

        return any(a in TEXT_ARCHS for a in self.archs)

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
        if "rungs" in data:
            data["rungs"] = tuple(data["rungs"])
        return cls(stages=StageConfig(**stages), **data)

    def validate_parts(self) -> None:
        """Check the named parts exist (space, architectures, dataset) and that the budget
        can be spent by these evaluations on this machine, so a typo or a budget that
        would never run out fails before Ray starts or a file is written, not an hour in."""
        from evonas.layers.space import load_space
        from evonas.proxy.models import check_placement

        space = load_space(self.space)
        checks.archs("--archs", self.archs)
        checks.dataset("--dataset", self.dataset)
        check_task(space, self.archs, self.dataset)
        check_placement(self.placement, self.archs)
        self._check_quality_threshold()
        self.check_budget()

    def _check_quality_threshold(self) -> None:
        """An accuracy for classifiers, bits per character for a language model: checked
        once the architectures are known to suit the dataset."""
        threshold = self.stages.quality_threshold
        if self.causal_proxy:
            # Below a bit per character no proxy gets within its steps (the synthetic
            # chain's entropy rate is 1.2): such a number is an accuracy given by mistake.
            if not (checks.real(threshold) and threshold >= 1):
                raise EvonasError(f"--quality-threshold {threshold!r}: for a language model it "
                                  f"is a loss in bits per character >= 1, e.g. 4.3 on "
                                  f"shakespeare (a layer above it is rejected)")
        elif not (checks.real(threshold) and 0 <= threshold < 1):
            raise EvonasError(f"--quality-threshold {threshold!r}: for a classifier it is an "
                              f"accuracy in [0, 1), e.g. 0.2")

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


def check_task(space, archs, dataset: str, *, search: bool = True) -> None:
    """EvonasError unless every architecture takes layers of the space's layout and reads
    the dataset: transformers take (N, T, C) layers and the CNNs (N, C, H, W) ones; a
    language model reads text and the others images. search: the message may suggest
    another --space (a new search), or only other --archs (full training of a search)."""
    from evonas.proxy.models import ARCHS, SEQUENCE_ARCHS, TEXT_ARCHS
    from evonas.proxy.text import TEXT_DATASETS

    for arch in archs:
        if (arch in SEQUENCE_ARCHS) != (space.layout == "ntc"):
            wanted = "ntc" if arch in SEQUENCE_ARCHS else "nchw"
            fitting = [a for a in ARCHS if (a in SEQUENCE_ARCHS) == (space.layout == "ntc")]
            other = (f"--space seq_causal or seq_bidirectional, or " if search and wanted == "ntc"
                     else "--space norm_act, norm_act_s or act, or " if search else "")
            raise EvonasError(f"--archs {arch} takes {wanted} layers, but space {space.name} "
                              f"holds {space.layout} layers: use {other}--archs of "
                              f"{', '.join(fitting)}")
        if (arch in TEXT_ARCHS) != (dataset in TEXT_DATASETS):
            if arch in TEXT_ARCHS:
                raise EvonasError(f"--archs {arch} is a language model and reads text, not "
                                  f"{dataset}: use --dataset {' or '.join(TEXT_DATASETS)}")
            lm = ("--space seq_causal, whose default is --archs lm" if search
                  else f"--archs {' or '.join(TEXT_ARCHS)}")
            raise EvonasError(f"--dataset {dataset} is text, which {arch} cannot read: the "
                              f"LM reads it ({lm}), or use an image dataset (cifar10, "
                              f"synthetic)")


def resolved_space(spec: str) -> str:
    """A built-in space's name as given, a space file's absolute path: the configuration
    travels to workers started in other folders, and to resumes started from elsewhere."""
    from importlib import resources

    if resources.files("evonas.search_spaces").joinpath(f"{spec}.json").is_file():
        return spec
    path = Path(spec)
    return str(path.resolve()) if path.is_file() else spec


def _listed(values) -> str:
    return ",".join(str(v) for v in values)


def _positive_int(flag: str, value: Any) -> None:
    checks.whole(flag, value, minimum=1)


def _check_gpu_share(share: float) -> None:
    checks.gpu_share("--gpus-per-eval", share)
