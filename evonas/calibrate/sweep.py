"""Proxy settings scored against the panel, and the search over them.

One setting (proxy steps, batch, width, learning rate, the quality gate's step and
threshold) is scored by running the search's own evaluation (search/evaluate.py: the
stability, quality and proxy stages, common random numbers) on every panel layer through
the search's backends (inline or Ray workers), then comparing the proxy's ranking with the
panel's (agreement.py). Its cost is the mean worker seconds per panel layer: what a
candidate costs a search at that setting, the cheap rejections included.

The quality gate's threshold is placed by the panel, not searched: every layer is
evaluated with the gate open (it stops a diverged training only), its quality scores
kept, and the threshold set halfway between chance and the weakest good panel layer's
score on its worst network. That is the strictest gate that keeps every good layer with
a margin as wide as the distance it keeps from chance: at a short proxy the good layers
are close to chance and the gate comes down with them, rather than rejecting them as a
threshold drawn at random does (the first CIFAR-10 calibration, BENCHMARKS.md). The
gate's effect on rank and cost is then computed from the kept evaluations: a layer it
rejects ranks below every kept one and costs its stability and quality stages only.
Today's defaults keep their own threshold.

The settings are searched by an Optuna study with two objectives (Kendall's tau up,
seconds per candidate down), stored in SQLite in the output folder: a calibration killed
at any moment resumes with every finished setting kept, and every finished layer of the
interrupted one (evaluations.jsonl). Today's defaults are the first setting scored, so
the report always says how they compare. calibration.json is rewritten after every
setting and on resuming; proxy_config.json is written once all the settings asked for
are scored.

The chosen setting: among the settings that reject none of the panel's good layers, the
cheapest whose tau is within one discordant pair of the best tau (a smaller difference is
below what the panel can resolve); with --min-tau, the cheapest whose tau reaches it: a
screening proxy for a fidelity ladder's first rung, whose longer rungs tell the best
candidates apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from evonas.calibrate.agreement import agreement
from evonas.errors import EvonasError
from evonas.search.config import SearchConfig

if TYPE_CHECKING:  # the panel's module reads genomes (torch): `evonas --help` stays light
    from evonas.calibrate.panel import Panel

# The settings a calibration varies: SearchConfig fields, then StageConfig fields.
SEARCH_FIELDS = ("proxy_steps", "proxy_batch_size", "proxy_width", "proxy_lr")
STAGE_FIELDS = ("quality_steps", "quality_threshold")
SETTING_FIELDS = SEARCH_FIELDS + STAGE_FIELDS


class CalibrationError(Exception):
    """A calibration that cannot go on (not the user's input: exit 1, and it resumes)."""


@dataclasses.dataclass(frozen=True)
class SweepSpace:
    """The values a calibration may choose; the CLI's --steps/--batches/--widths set them.
    quality_fractions: the quality gate's step as a fraction of the proxy's steps. (Its
    threshold is placed by the panel, the module's docstring says how.)"""

    steps: tuple[int, ...] = (50, 100, 200, 300, 600)
    batches: tuple[int, ...] = (32, 64, 128)
    widths: tuple[int, ...] = (4, 8, 16)
    lr: tuple[float, float] = (0.02, 0.4)
    quality_fractions: tuple[float, ...] = (0.25, 0.5, 1.0)

    def __post_init__(self) -> None:
        from evonas.runtime import checks

        for flag, values in (("--steps", self.steps), ("--batches", self.batches),
                             ("--widths", self.widths)):
            if not values:
                raise EvonasError(f"{flag} needs at least one value, e.g. 100,300")
            for v in values:
                checks.whole(f"{flag}: a value", v, minimum=1)

    def suggest(self, trial) -> dict:
        """A setting without its quality threshold (None: placed by the panel)."""
        steps = trial.suggest_categorical("proxy_steps", list(self.steps))
        fraction = trial.suggest_categorical("quality_fraction", list(self.quality_fractions))
        return {"proxy_steps": steps,
                "proxy_batch_size": trial.suggest_categorical("proxy_batch_size", list(self.batches)),
                "proxy_width": trial.suggest_categorical("proxy_width", list(self.widths)),
                "proxy_lr": trial.suggest_float("proxy_lr", *self.lr, log=True),
                "quality_steps": max(1, round(steps * fraction)), "quality_threshold": None}


def setting_of(config: SearchConfig) -> dict:
    """The calibrated fields of a config (today's defaults, when it is the default)."""
    return {**{f: getattr(config, f) for f in SEARCH_FIELDS},
            **{f: getattr(config.stages, f) for f in STAGE_FIELDS}}


def fixed_settings(config: SearchConfig) -> dict:
    """What else decides a panel layer's evaluation besides its setting: the gates' other
    sizes and thresholds, the evaluation size, the space (its group count), the placement
    and the seed (common random numbers). A calibration holds them as the search has them."""
    stages = {k: v for k, v in config.to_dict()["stages"].items() if k not in STAGE_FIELDS}
    return {"stages": stages, "proxy_eval_size": config.proxy_eval_size, "space": config.space,
            "placement": config.placement, "seed": config.seed}


def with_setting(config: SearchConfig, setting: Mapping) -> SearchConfig:
    return dataclasses.replace(
        config, **{f: setting[f] for f in SEARCH_FIELDS if f in setting},
        stages=dataclasses.replace(config.stages,
                                   **{f: setting[f] for f in STAGE_FIELDS if f in setting}))


def setting_key(setting: Mapping) -> str:
    """The key of a setting's evaluations: every field but the quality threshold, which
    is applied to them afterwards (evaluations run with the gate open)."""
    fields = {k: v for k, v in setting.items() if k != "quality_threshold"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


class EvaluationCache:
    """Finished panel evaluations, one JSON line each, keyed by setting and layer: a
    calibration resumed after a kill redoes none of them."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[tuple[str, str], dict] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # the last line of a killed write
                    continue
                self.done[(rec["setting"], rec["layer"])] = rec

    def add(self, rec: dict) -> None:
        self.done[(rec["setting"], rec["layer"])] = rec
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")


def score_setting(panel: Panel, config: SearchConfig, backend, cache: EvaluationCache,
                  progress: Callable[[str], None] = lambda line: None, *,
                  chance: float | None = None) -> dict:
    """Evaluate every panel layer at `config`'s setting with the quality gate open, then
    apply the gate: config's threshold, or, where `chance` (the quality score of a guess)
    is given, the one the panel places. Compare the ranking with the panel's."""
    recs = evaluate_panel(panel, config, backend, cache, progress)
    threshold = (config.stages.quality_threshold if chance is None
                 else placed_threshold(panel, recs, chance, config.archs))
    proxy, seconds = gate(recs, threshold, config.archs)
    return {"setting": {**setting_of(config), "quality_threshold": threshold},
            **agreement(panel.outcome, proxy),
            "seconds_per_candidate": sum(seconds.values()) / len(seconds), "layers": recs}


def gate(recs: Mapping[str, dict], threshold: float, archs) -> tuple[dict, dict]:
    """The quality gate of search/evaluate.py applied to evaluations made with it open:
    (layer -> proxy fitness, None when rejected; layer -> seconds it costs a search). A
    layer the gate stops costs its evaluation less the proxy stage it would not reach (an
    upper bound: the gate stops at the first network that fails, the open gate trained
    them all to the gate's step)."""
    lm = _lm_archs(archs)
    proxy, seconds = {}, {}
    for name, rec in recs.items():
        stopped = rec["quality"] is not None and not all(
            score <= threshold if arch in lm else score >= threshold
            for arch, score in rec["quality"].items())
        proxy[name] = None if stopped else rec["fitness"]
        seconds[name] = rec["seconds"] - (rec["stage_seconds"].get("proxy", 0.0) if stopped else 0.0)
    return proxy, seconds


def evaluate_panel(panel: Panel, config: SearchConfig, backend, cache: EvaluationCache,
                   progress: Callable[[str], None] = lambda line: None) -> dict[str, dict]:
    """Every panel layer's evaluation at config's setting with the quality gate open:
    from the cache, or run now (and cached)."""
    from evonas.runtime.backends import run_all
    from evonas.search.evaluate import evaluate_candidate
    from evonas.search.records import Candidate

    open_gate = with_setting(config, {"quality_threshold": _OPEN[bool(_lm_archs(config.archs))]})
    key = setting_key(setting_of(config))
    todo = {name: (evaluate_candidate,
                   {"candidate": Candidate(f"panel_{name}", genome, None, "panel").to_dict(),
                    "config": open_gate.to_dict()})
            for name, genome in sorted(panel.genomes.items()) if (key, name) not in cache.done}
    # An evaluation that returned no verdict (its worker died, or it raised) says nothing
    # of the layer: it is not kept, and runs once more; a setting scored with a hole in
    # the panel would rank the layer as rejected.
    for attempt in range(2):
        lost = {}
        for outcome in run_all(backend, todo):
            if outcome.ok:
                cache.add(_record(key, outcome))
                progress(f"  {outcome.task_id}: {cache.done[(key, outcome.task_id)]['verdict']}")
            else:
                lost[outcome.task_id] = outcome.error
                progress(f"  {outcome.task_id}: no verdict ({outcome.error}), "
                         f"{'runs again' if attempt == 0 else 'given up'}")
        todo = {name: todo[name] for name in lost}
    if lost:
        name, error = next(iter(lost.items()))
        raise CalibrationError(f"panel layer {name!r} could not be evaluated twice ({error}); "
                               f"fix its cause and rerun the same command, which resumes")
    return {name: cache.done[(key, name)] for name in panel.genomes}


# The gate open: no accuracy is below 0, no bits per character above infinity.
_OPEN = {False: 0.0, True: float("inf")}


def _lm_archs(archs) -> frozenset[str]:
    """The architectures whose quality score is bits per character (lower is better)."""
    from evonas.proxy.models import TEXT_ARCHS

    return frozenset(a for a in archs if a in TEXT_ARCHS)


def placed_threshold(panel: Panel, recs: Mapping[str, dict], chance: float, archs) -> float:
    """Halfway between chance and the weakest good layer's score on its worst network,
    rounded toward chance to three decimals; that score itself (rounded down for an
    accuracy) when it is no better than chance, where no gate both keeps the layer and
    stops a guess; chance when every good layer is rejected before the gate (no score to
    place it by)."""
    from evonas.calibrate.agreement import good_layers

    lm = _lm_archs(archs)
    worst = [max(q.values()) if lm else min(q.values())
             for q in (recs[name]["quality"] for name in good_layers(panel.outcome)) if q]
    if not worst:
        return chance
    weakest = max(worst) if lm else min(worst)
    beats_chance = weakest < chance if lm else weakest > chance
    half = chance + (weakest - chance) / 2 if beats_chance else weakest
    return math.ceil(half * 1000) / 1000 if lm else math.floor(half * 1000) / 1000


def chance_score(dataset: str, data_dir, archs) -> float:
    """The quality score of a guess: accuracy 1/classes, or log2(vocabulary) bits per
    character for an LM."""
    from evonas.proxy.data import load_dataset

    data = load_dataset(dataset, data_dir)
    return math.log2(data.num_classes) if _lm_archs(archs) else 1.0 / data.num_classes


def _record(key: str, outcome) -> dict:
    """One panel layer's evaluation: its mean proxy fitness (None: rejected, and why), its
    quality score on every network (None: stopped before the gate), and its stages'
    seconds."""
    from evonas.search.records import SURVIVOR, Evaluation
    from evonas.search.state import mean_fitness

    ev = Evaluation.from_dict(outcome.value)
    quality = {k.split(".", 1)[1]: v for k, v in ev.metrics.items()
               if k.startswith(("quality_acc.", "quality_bpc."))}
    rec = {"setting": key, "layer": outcome.task_id, "seconds": outcome.seconds,
           "stage_seconds": ev.stage_seconds, "quality": quality or None}
    if ev.status == SURVIVOR and ev.fitness:
        return {**rec, "fitness": mean_fitness(ev), "verdict": f"kept, {mean_fitness(ev):.4f}"}
    return {**rec, "fitness": None,
            "verdict": f"{ev.status} at {ev.reject_stage}: {ev.reject_reason}"}


def chosen(results: Sequence[dict], min_tau: float | None = None) -> dict | None:
    """The setting to search with (the module's docstring says the rule), or with
    `min_tau` the cheapest that loses no good layer and ranks the panel at that tau or
    better (a ladder's first rung: screening, the longer rungs telling the best apart);
    None when no setting qualifies."""
    ok = [r for r in results if not r["false_rejections"] and r["kendall_tau"] is not None]
    if min_tau is not None:
        ok = [r for r in ok if r["kendall_tau"] >= min_tau]
        return min(ok, key=lambda r: (r["seconds_per_candidate"], -r["kendall_tau"]),
                   default=None)
    if not ok:
        return None
    n = ok[0]["n"]
    resolution = 2 / (n * (n - 1) / 2)  # one discordant pair out of n(n-1)/2
    best = max(r["kendall_tau"] for r in ok)
    near = [r for r in ok if r["kendall_tau"] >= best - resolution - 1e-12]
    return min(near, key=lambda r: (r["seconds_per_candidate"], -r["kendall_tau"]))


def pareto_front(results: Sequence[dict]) -> list[dict]:
    """Settings no other setting beats on both tau (higher) and cost (lower)."""
    scored = [r for r in results if r["kendall_tau"] is not None]

    def dominated(r: dict) -> bool:
        return any(o["kendall_tau"] >= r["kendall_tau"]
                   and o["seconds_per_candidate"] <= r["seconds_per_candidate"]
                   and (o["kendall_tau"] > r["kendall_tau"]
                        or o["seconds_per_candidate"] < r["seconds_per_candidate"])
                   for o in scored)

    return sorted((r for r in scored if not dominated(r)), key=lambda r: r["seconds_per_candidate"])


def calibrate(panel: Panel, base: SearchConfig, out: Path, *, trials: int, space: SweepSpace,
              backend, seed: int = 0, min_tau: float | None = None,
              progress: Callable[[str], None] = lambda line: None) -> dict:
    """Score today's defaults and `trials` settings in all (finished ones count on resume);
    write out/calibration.json and out/proxy_config.json (chosen by `chosen`'s rule with
    min_tau; it may differ from the last run's, nothing is re-evaluated for that); return
    the calibration."""
    import optuna

    _same_calibration(out, {"dataset": panel.dataset, "archs": list(base.archs),
                            "fixed": fixed_settings(base),
                            "panel": dict(sorted(panel.outcome.items())),
                            "quality_gate": "evaluated open, placed by the panel"})
    cache = EvaluationCache(out / "evaluations.jsonl")
    chance = chance_score(panel.dataset, base.data_dir, base.archs)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="calibrate", storage=f"sqlite:///{out / 'study.db'}", load_if_exists=True,
        directions=["maximize", "minimize"])
    for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # a trial killed with the calibration: its finished layers are in the cache, and
        # the same setting is asked for again
        study.enqueue_trial(stale.params, user_attrs=dict(stale.user_attrs))
        study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
    done = lambda: _distinct(t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    if not study.trials:
        study.enqueue_trial({}, user_attrs={"defaults": True})
    while len(done()) < trials + 1:
        # Before every setting (the last one's result, or a resumed study's), so a
        # calibration stopped part way says what it has measured.
        if done():
            _write_json(out / "calibration.json",
                        _calibration(panel, base, done(), trials + 1, min_tau))
        # The k-th setting is drawn from a generator seeded by (seed, k): one seeded once
        # per process would draw again, after a resume, the settings the killed process
        # drew first, and a resumed calibration tries what an uninterrupted one does.
        study.sampler = optuna.samplers.TPESampler(seed=seed * 10_000 + len(done()))
        trial = study.ask()
        defaults = bool(trial.user_attrs.get("defaults"))
        setting = setting_of(base) if defaults else space.suggest(trial)
        progress(f"setting {trial.number}: {_describe(setting)}")
        started = time.monotonic()
        config = with_setting(base, {k: v for k, v in setting.items() if v is not None})
        result = score_setting(panel, config, backend, cache, progress,
                               chance=None if defaults else chance)
        trial.set_user_attr("result", {k: v for k, v in result.items() if k != "layers"})
        trial.set_user_attr("wall_seconds", time.monotonic() - started)
        tau = result["kendall_tau"]
        study.tell(trial, [-1.0 if tau is None else tau, result["seconds_per_candidate"]])
    calibration = _calibration(panel, base, done(), trials + 1, min_tau)
    _write_json(out / "calibration.json", calibration)
    if calibration["chosen"] is not None:
        pick = next(r for r in calibration["results"] if r["trial"] == calibration["chosen"])
        _write_json(out / "proxy_config.json", proxy_config_file(calibration, pick))
    else:  # an earlier run's choice, made by another rule, is not this one's
        (out / "proxy_config.json").unlink(missing_ok=True)
    return calibration


def _distinct(finished) -> list:
    """The finished trials, the first of each setting: a setting scored twice (a study
    resumed by an earlier evonas, which could draw a setting again) counts once."""
    seen, trials = set(), []
    for t in finished:
        key = setting_key(t.user_attrs["result"]["setting"])
        if key not in seen:
            seen.add(key)
            trials.append(t)
    return trials


def _same_calibration(out: Path, identity: dict) -> None:
    """A calibration folder holds one panel's evaluations under one set of fixed settings
    (out/calibrated_with.json, written when it is made): its cached evaluations and its
    study's results are keyed by the varied setting alone, so resuming it with another
    panel, other networks or other fixed settings would mix what they measured."""
    path = out / "calibrated_with.json"
    identity = json.loads(json.dumps(identity))
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        _write_json(path, identity)
        return
    held = json.loads(path.read_text())
    for key in identity:
        if held.get(key) != identity[key]:
            what = {"panel": "another panel", "archs": f"--archs {','.join(held['archs'])}"}
            raise EvonasError(f"{out} was calibrated with "
                              f"{what.get(key, f'other {key} settings')}; resume it as it was "
                              f"made, or calibrate into a new --out folder")


def _calibration(panel: Panel, base: SearchConfig, finished, planned: int,
                 min_tau: float | None) -> dict:
    """calibration.json: every finished setting's result, the Pareto front, the choice
    among them (and the rule it was made by), and how many of the planned settings they
    are."""
    results = [{"trial": t.number, "defaults": bool(t.user_attrs.get("defaults")),
                **t.user_attrs["result"]} for t in finished]
    pick = chosen(results, min_tau)
    return {"dataset": panel.dataset, "archs": list(base.archs), "fixed": fixed_settings(base),
            "panel": panel.source, "panel_layers": sorted(panel.outcome),
            "settings_finished": len(results), "settings_planned": planned, "results": results,
            "pareto_front": [r["trial"] for r in pareto_front(results)], "min_tau": min_tau,
            "chosen": None if pick is None else pick["trial"]}


def proxy_config_file(calibration: dict, pick: dict) -> dict:
    """What `evonas search --proxy-config FILE` reads: the settings, and how they were
    chosen, so a run folder's config says where its proxy came from."""
    return {"format": 1, "dataset": calibration["dataset"], "archs": calibration["archs"],
            "settings": pick["setting"], "kendall_tau": pick["kendall_tau"],
            "spearman": pick["spearman"], "false_rejections": pick["false_rejections"],
            "seconds_per_candidate": pick["seconds_per_candidate"],
            "min_tau": calibration["min_tau"],
            "panel": calibration["panel"], "panel_layers": calibration["panel_layers"]}


def _describe(setting: Mapping) -> str:
    threshold = setting["quality_threshold"]
    gate = "placed by the panel" if threshold is None else f"{threshold:.3g}"
    return (f"{setting['proxy_steps']} steps, batch {setting['proxy_batch_size']}, width "
            f"{setting['proxy_width']}, lr {setting['proxy_lr']:.3g}, quality gate {gate} "
            f"at step {setting['quality_steps']}")


def _write_json(path: Path, obj) -> None:
    from evonas.search.runfolder import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def format_results(calibration: dict) -> str:
    front = set(calibration["pareto_front"])
    lines = [f"{'':2}{'trial':>5} {'steps':>5} {'batch':>5} {'width':>5} {'lr':>7} {'q.step':>6} "
             f"{'q.thr':>6} {'tau':>7} {'rho':>7} {'rej':>4} {'lost':>4} {'s/cand':>8}"]
    for r in sorted(calibration["results"], key=lambda r: r["seconds_per_candidate"]):
        s = r["setting"]
        mark = ("*" if r["trial"] == calibration["chosen"] else "") + ("F" if r["trial"] in front else "")
        tau = "n/a" if r["kendall_tau"] is None else f"{r['kendall_tau']:+.3f}"
        rho = "n/a" if r["spearman"] is None else f"{r['spearman']:+.3f}"
        lines.append(f"{mark:2}{r['trial']:>5} {s['proxy_steps']:>5} {s['proxy_batch_size']:>5} "
                     f"{s['proxy_width']:>5} {s['proxy_lr']:>7.3g} {s['quality_steps']:>6} "
                     f"{s['quality_threshold']:>6.3f} {tau:>7} {rho:>7} {len(r['rejected']):>4} "
                     f"{len(r['false_rejections']):>4} {r['seconds_per_candidate']:>8.1f}"
                     + ("  (today's defaults)" if r["defaults"] else ""))
    lines.append("*: chosen; F: on the tau-vs-cost Pareto front; rej: panel layers the gates "
                 "rejected; lost: of them, layers in the panel's top half")
    return "\n".join(lines)


__all__ = ["CalibrationError", "SweepSpace", "calibrate", "chance_score", "chosen",
           "evaluate_panel", "fixed_settings", "format_results", "gate", "pareto_front",
           "placed_threshold", "proxy_config_file", "score_setting", "setting_of",
           "with_setting"]
