"""The search's record in MLflow: one parent run per search, one child run per candidate.

Where it sits: the search driver owns the only SearchTracker. It opens the parent run when
a search starts (or reopens it on --resume, then calls `reconcile`), logs each candidate
once its Evaluation is final, logs progress summaries as stepped metrics, and ends the
parent run. This module says what the runs hold; runtime/tracking.py writes them (child
runs, batches, MLflow's limits), the same way for full training's trial runs.

Run layout:

    search run     tags evonas.kind=search and the caller's tags; the configuration as
                   params (nested keys dotted) and as config.json; summary metrics per step
    candidate run  a child of the search run (the UI nests it under it), run name = the
                   formula; tags evonas.kind=candidate, evonas.candidate_id and the other
                   evonas.*; metrics fitness.<arch>, fitness.mean, on a fidelity ladder
                   fitness.<arch>.r<steps> and fitness.mean.r<steps> for each rung it
                   reached (logged at step <steps>, rung 0 with the run), cost.<stage>_s,
                   cost.total_s, cost.device_s, genome.nodes and the evaluation's own
                   metrics; artifacts genome.json, formula.txt, formula.tex, layer.py (when
                   exported), reject_reason.txt (when too long for its tag), and its
                   graph: graph.png for a survivor (unless pictures=False), else
                   graph.txt, the graph in Graphviz DOT (`dot -Tpng graph.txt`)

After a crash, `reconcile` leaves every finished evaluation exactly one FINISHED candidate
run. Safe to call from one background thread while the driver's thread writes reports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evonas.layers.genome import Genome
from evonas.runtime.tracking import FINISHED, MAX_TAG_VALUE, ChildKind, Draw, Tracker
from evonas.search.records import SURVIVOR, Candidate, Evaluation

SEARCH_KIND = "search"
CANDIDATES = ChildKind("candidate", "evonas.candidate_id")
# Trial runs carry it too: the candidate a trial trains.
CANDIDATE_TAG = CANDIDATES.key_tag


class SearchTracker:
    """Writes a search and its candidates to one MLflow experiment.

    Call order: start_search (or resume_search then reconcile), then log_candidate for
    each finished evaluation and log_summary now and then, and end_search.
    """

    def __init__(self, tracking_uri: str, experiment: str = "evonas", *,
                 artifact_location: str | None = None, pictures: bool = True):
        """Drawing graph.png is most of a candidate's logging time (about 100 of 150 ms on
        a SQLite store), so only survivors, the candidates a user opens, get the picture;
        the rejected, duplicate and failed ones (most of a search, arriving faster) get
        their graph as DOT text. pictures=False gives every candidate the text, and
        matplotlib is then never imported. artifact_location: see Tracker."""
        self.runs = Tracker(tracking_uri, experiment, artifact_location=artifact_location)
        self.pictures = pictures

    @property
    def client(self):
        """The MlflowClient, for reading runs back."""
        return self.runs.client

    @property
    def experiment_id(self) -> str:
        return self.runs.experiment_id

    @property
    def tracking_uri(self) -> str:
        return self.runs.tracking_uri

    # --- the search run -----------------------------------------------------------------

    def start_search(self, run_name: str, config: dict, tags: dict) -> str:
        """Create the search's parent run; returns its run id."""
        # The params are cut to MLflow's limit; the file keeps the whole configuration.
        texts = {"config.json": json.dumps(config, indent=2, default=str)}
        return self.runs.start_parent(run_name, SEARCH_KIND, tags=tags, params=config,
                                      texts=texts)

    def has_search(self, parent_run_id: str) -> bool:
        """Whether the store holds the search's parent run."""
        return self.runs.exists(parent_run_id)

    def resume_search(self, parent_run_id: str) -> None:
        """Mark the search's run RUNNING again (a resumed search continues the same run)."""
        self.runs.resume(parent_run_id)

    def log_summary(self, parent_run_id: str, metrics: dict[str, float], step: int) -> None:
        """Progress (best fitness so far, evaluated count, budget spent) at `step`: stepped
        metrics, so the UI plots them against the step."""
        self.runs.log_metrics(parent_run_id, metrics, step)

    def log_artifact_text(self, parent_run_id: str, name: str, text: str) -> None:
        self.runs.log_text(parent_run_id, name, text)

    def end_search(self, parent_run_id: str, status: str = FINISHED) -> None:
        """Close the search's run: FINISHED, FAILED or KILLED."""
        self.runs.end(parent_run_id, status)

    # --- candidate runs -----------------------------------------------------------------

    def log_candidate(self, parent_run_id: str, candidate: Candidate, evaluation: Evaluation,
                      *, genome: Genome, formula: str, latex: str, source: str | None,
                      rung_steps: int | None = None) -> str:
        """Log one candidate as a child run of the search; returns its run id.

        source is the exported layer (export.export_source), None where there is none
        (failed candidates). rung_steps: the ladder's first rung, whose score the
        fitness is (None: no ladder). The run is FINISHED only once everything is logged.
        """
        picture = self.pictures and evaluation.status == SURVIVOR
        texts = _candidate_texts(evaluation, genome, formula, latex, source)
        if not picture:
            texts["graph.txt"] = graph_dot(genome, evaluation.candidate_id)
        return self.runs.log_child(
            parent_run_id, CANDIDATES, candidate.candidate_id, formula,
            tags=_candidate_tags(candidate, evaluation, genome),
            metrics={**_candidate_metrics(evaluation, genome),
                     **(_rung_metrics(rung_steps, evaluation.fitness)
                        if rung_steps and evaluation.fitness else {})},
            texts=texts,
            draw=_picture(genome, evaluation.candidate_id) if picture else None)

    def log_rung(self, parent_run_id: str, candidate_id: str, steps: int,
                 fitness: dict[str, float]) -> None:
        """A promoted candidate's fitness at a rung of the ladder, on its run, at step
        `steps` (the driver logs each once: driver._reconcile_rungs)."""
        key = CANDIDATES.key_tag
        runs = self.runs.children(parent_run_id, CANDIDATES,
                                  f"tags.`{key}` = '{candidate_id}'")
        if not runs:
            raise LookupError(f"no MLflow run of candidate {candidate_id} to log rung "
                              f"{steps} to")
        self.runs.log_metrics(runs[0]["run_id"], _rung_metrics(steps, fitness), steps)

    def reconcile(self, parent_run_id: str, finished: set[str]) -> set[str]:
        """Make the candidate runs agree with the driver's state after a resume.

        finished: the candidate ids whose evaluations the driver's state counts as
        finished. Returns the ids in `finished` that now have exactly one FINISHED run;
        the driver logs the others. Other children (full training's trials) are left as
        they are.
        """
        return set(self.runs.reconcile(parent_run_id, CANDIDATES, finished))

    def candidates(self, parent_run_id: str, filter: str = "",
                   order_by: list[str] | None = None) -> list[dict[str, Any]]:
        """The search's candidate runs as flat dicts (Tracker.children), oldest first
        unless order_by says; filter e.g. "tags.`evonas.status` = 'survivor'"."""
        return self.runs.children(parent_run_id, CANDIDATES, filter, order_by)


# --- what a candidate run holds -----------------------------------------------------------


def _candidate_tags(candidate: Candidate, evaluation: Evaluation,
                    genome: Genome) -> dict[str, str | None]:
    return {
        "evonas.status": evaluation.status,
        "evonas.reject_stage": evaluation.reject_stage,
        "evonas.reject_reason": evaluation.reject_reason,
        "evonas.genome_hash": genome.structural_hash,
        "evonas.fingerprint": candidate.fingerprint,
        "evonas.parent_id": candidate.parent_id,
        "evonas.mutation": candidate.mutation,
        "evonas.duplicate_of": evaluation.duplicate_of,
        "evonas.device": evaluation.device,
        "evonas.worker": evaluation.worker,
    }


def _candidate_metrics(evaluation: Evaluation, genome: Genome) -> dict[str, float]:
    values: dict[str, float] = {}
    fitness = evaluation.fitness or {}
    for arch, value in fitness.items():
        values[f"fitness.{arch}"] = value
    if fitness:
        values["fitness.mean"] = sum(fitness.values()) / len(fitness)
    for stage, seconds in evaluation.stage_seconds.items():
        values[f"cost.{stage}_s"] = seconds
    values["cost.total_s"] = evaluation.seconds
    values["cost.device_s"] = evaluation.seconds * evaluation.share
    values["genome.nodes"] = len(genome)
    values.update(evaluation.metrics)
    return values


def _rung_metrics(steps: int, fitness: dict[str, float]) -> dict[str, float]:
    values = {f"fitness.{arch}.r{steps}": v for arch, v in fitness.items()}
    values[f"fitness.mean.r{steps}"] = sum(fitness.values()) / len(fitness)
    return values


def _candidate_texts(evaluation: Evaluation, genome: Genome, formula: str, latex: str,
                     source: str | None) -> dict[str, str]:
    texts = {"genome.json": genome.to_json() + "\n",
             "formula.txt": formula + "\n", "formula.tex": latex + "\n"}
    if source is not None:
        texts["layer.py"] = source
    reason = evaluation.reject_reason or ""
    if len(reason) > MAX_TAG_VALUE:
        texts["reject_reason.txt"] = reason  # the tag holds only its beginning
    return texts


def graph_dot(genome: Genome, title: str) -> str:
    """The genome's graph in Graphviz DOT: inputs as boxes, each node `id = op`, the
    output doubly outlined, edges labelled with the argument position they fill."""
    lines = [f"// {title}: render with `dot -Tpng graph.txt -o graph.png`",
             f'digraph "{title}" {{', "  rankdir=BT;"]
    lines += [f'  "{name}" [shape=box];' for name in sorted(genome.inputs_used)]
    for n in genome.nodes:
        ring = ", peripheries=2" if n.id == genome.output else ""
        lines.append(f'  "{n.id}" [label="{n.id} = {n.op}"{ring}];')
        lines += [f'  "{a}" -> "{n.id}" [label="{pos}"];' for pos, a in enumerate(n.inputs)]
    return "\n".join(lines + ["}"]) + "\n"


def _picture(genome: Genome, title: str) -> Draw:
    def draw(folder: Path) -> None:
        # Imported here: matplotlib loads only in a search that draws pictures.
        from evonas.layers.drawing import draw_genome

        draw_genome(genome, folder / "graph.png", title=title)
    return draw


__all__ = ["SearchTracker", "CANDIDATES", "CANDIDATE_TAG", "SEARCH_KIND", "graph_dot"]
