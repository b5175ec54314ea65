"""The reference panel: layers whose full-training outcome is known.

A panel is data: panel.json in a folder (benchmarks/panel/<dataset>/ for the shipped
one) holding, per layer, its genome, its full-training score and the leaderboard rows the
score came from. It is built from an `evonas train` run, whose machinery (Tune, Optuna's
LR search, seeds) trained the layers, so every calibration reuses one measurement:

    evonas train RUN --top 8 --baselines bn_relu,gn_relu,...   (the full trainings)
    evonas calibrate --panel DIR --panel-from RUN              (writes DIR/panel.json)

A panel too large for one stretch of machine time is trained as several runs with the
same settings, each a subset of the layers, and built with --panel-from RUN1,RUN2,...

A layer's score is the one `evonas train`'s own rank correlation ranks it by
(leaderboard.overall_means): the mean, over every setting the training planned, of its
seeds' mean test accuracy (a seed that diverged at accuracy 0); a layer missing a setting
is left out of the panel. The rows are computed again from the run's trial records
(fulltrain/trials.json), so a panel kept as data is scored by today's rules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from evonas.errors import EvonasError
from evonas.layers.genome import Genome

PANEL_FILE = "panel.json"
PANEL_FORMAT = 1


@dataclass(frozen=True)
class Panel:
    dataset: str
    genomes: dict[str, dict]  # layer name -> genome (plain dict)
    outcome: dict[str, float]  # layer name -> full-training score, higher is better
    rows: dict[str, list[dict]]  # layer name -> its leaderboard rows
    source: str  # what trained it: the `evonas train` run

    def to_dict(self) -> dict:
        return {"format": PANEL_FORMAT, "dataset": self.dataset, "source": self.source,
                "layers": {name: {"score": self.outcome[name], "genome": self.genomes[name],
                                  "rows": self.rows[name]} for name in sorted(self.outcome)}}


def panel_from_run(run_path: str | Path) -> Panel:
    """The layers an `evonas train RUN` trained fully, with their scores and genomes."""
    from evonas.fulltrain.config import baseline_genome, training_plan
    from evonas.fulltrain.leaderboard import leaderboard, overall_means
    from evonas.search.results import load_run

    run = load_run(run_path)
    stage = Path(run_path) / "fulltrain"
    summary_path = stage / "summary.json"
    if not summary_path.is_file():
        raise EvonasError(f"{run_path} has no full training yet ({summary_path} is missing); "
                          f"run `evonas train {run_path}` first")
    summary = json.loads(summary_path.read_text())
    plan = training_plan(json.loads((stage / "config.json").read_text()))
    board = leaderboard(json.loads((stage / "trials.json").read_text()),
                        [layer["layer"] for layer in summary["layers"]], plan["archs"],
                        plan["batch_sizes"], plan["optimizers"])
    outcome = overall_means(board)
    genomes, rows = {}, {}
    for layer in summary["layers"]:
        name, cid = layer["layer"], layer["candidate_id"]
        if name not in outcome:  # not trained in every setting
            continue
        # Summaries written before they held genomes: a baseline is "zoo:<name>" or
        # "file:<path>", as `evonas train --baselines` took it, else a search candidate.
        if "genome" in layer:
            genome = Genome.from_dict(layer["genome"], source=f"{summary_path}:{name}")
        elif cid.startswith(("zoo:", "file:")):
            genome = baseline_genome(cid.split(":", 1)[1])
        else:
            genome = Genome.from_dict(run.state.candidates[cid].genome)
        genomes[name] = genome.to_dict()
        rows[name] = [r for r in board if r["layer"] == name and r["mean"] is not None]
    if not outcome:
        raise EvonasError(f"{run_path}: full training completed no layer in every setting; "
                          f"resume `evonas train {run_path}`")
    return Panel(run.config.dataset, genomes, outcome, rows, str(Path(run_path).resolve()))


def panel_from_runs(run_paths) -> Panel:
    """One panel from the layers of several `evonas train` runs, so a panel can grow run
    by run (one stretch of machine time each). Their scores are comparable only when the
    runs trained alike: the same dataset and plan (networks, batch sizes, seeds, length,
    optimizers, tuning) are required, and a layer may be in one run only."""
    run_paths = list(run_paths)
    if not run_paths:
        raise EvonasError("--panel-from needs a run folder of `evonas train`")
    panels = [panel_from_run(path) for path in run_paths]
    plans = [_training_plan(path) for path in run_paths]
    genomes, outcome, rows = {}, {}, {}
    for path, panel, plan in zip(run_paths, panels, plans):
        for key in plans[0]:
            if plan[key] != plans[0][key]:
                raise EvonasError(
                    f"--panel-from: {path} trained with {key} {plan[key]!r}, {run_paths[0]} with "
                    f"{plans[0][key]!r}; a panel's layers must be trained alike (train the "
                    f"missing layers with the first run's settings)")
        twice = sorted(set(panel.outcome) & set(outcome))
        if twice:
            raise EvonasError(f"--panel-from: layer {twice[0]!r} is in {path} and an earlier "
                              f"run; give each layer one run")
        genomes.update(panel.genomes)
        outcome.update(panel.outcome)
        rows.update(panel.rows)
    if len(outcome) < 2:
        raise EvonasError(f"--panel-from: {len(outcome)} layer trained in every setting; a "
                          f"panel needs two or more (resume `evonas train`, or add a run)")
    return Panel(panels[0].dataset, genomes, outcome, rows, ",".join(p.source for p in panels))


def _training_plan(run_path) -> dict:
    """What decides a full training's scores (FullTrainConfig.plan_fields), less which
    layers it trained."""
    from evonas.fulltrain.config import training_plan

    plan = training_plan(json.loads((Path(run_path) / "fulltrain" / "config.json").read_text()))
    for key in ("top", "baselines"):
        plan.pop(key)
    return plan


def format_panel(panel: Panel) -> str:
    """The panel as `--panel-from` prints it, best first: each layer's score and, per
    setting it was trained in, its seeds' test accuracies (a diverged seed says so)."""
    settings = sorted({(r["arch"], r["batch_size"], r.get("optimizer", "sgd"))
                       for rows in panel.rows.values() for r in rows})
    head = "  ".join(f"{arch} b{bs} {opt}" for arch, bs, opt in settings)
    lines = [f"{'layer':<24} {'score':>6}  {head}"]
    for name in sorted(panel.outcome, key=lambda n: (-panel.outcome[n], n)):
        by_setting = {(r["arch"], r["batch_size"], r.get("optimizer", "sgd")): r
                      for r in panel.rows[name]}
        cells = [", ".join("diverged" if s.get("diverged") else f"{s['test_accuracy']:.4f}"
                           for s in by_setting[setting]["seeds"]) for setting in settings]
        lines.append(f"{name:<24} {panel.outcome[name]:>6.4f}  " + "  ".join(cells))
    return "\n".join(lines)


def write_panel(panel: Panel, folder: str | Path) -> Path:
    from evonas.search.runfolder import atomic_write_text

    path = Path(folder) / PANEL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(panel.to_dict(), indent=1) + "\n")
    return path


def load_panel(folder: str | Path) -> Panel:
    """The panel in folder/panel.json; its genomes are read as data (Genome.from_dict:
    op names from the op table, never code)."""
    path = Path(folder) / PANEL_FILE
    if not path.is_file():
        raise EvonasError(f"--panel {folder}: no {PANEL_FILE} there; build one with "
                          f"`evonas calibrate --panel {folder} --panel-from RUN`")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != PANEL_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {PANEL_FORMAT}")
        layers = data["layers"]
        genomes = {n: Genome.from_dict(v["genome"], source=f"{path}:{n}").to_dict()
                   for n, v in layers.items()}
        outcome = {n: float(v["score"]) for n, v in layers.items()}
        rows = {n: list(v.get("rows", [])) for n, v in layers.items()}
        panel = Panel(str(data["dataset"]), genomes, outcome, rows, str(data.get("source", "")))
    except EvonasError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise EvonasError(f"{path} is not a panel file ({type(err).__name__}: {err}); "
                          f"rebuild it with `evonas calibrate --panel-from RUN`") from None
    if len(panel.outcome) < 2:
        raise EvonasError(f"{path} holds {len(panel.outcome)} layer(s); a panel needs two or more")
    return panel


__all__ = ["Panel", "format_panel", "load_panel", "panel_from_run", "panel_from_runs",
           "write_panel"]
