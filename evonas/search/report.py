"""The search report: one self-contained HTML page about a run folder.

Where it sits: `evonas report RUN` (cli/dashboards.py) writes it on demand, and the search
driver calls `refresh` every SearchConfig.report_every_s seconds and once at the end,
which writes <run>/report.html and logs it to the search's MLflow run. It reads only the
run folder (results.load_run, and fulltrain/leaderboard.json when the full-training stage
wrote one), never MLflow, so it works offline, on a copy of the folder, and while the
search runs.

The page holds the Pareto front of the survivors over the proxy architectures, the
best-so-far fitness against evaluations and against device-hours (beside a second run,
typically random search, with `--compare`), the rejection funnel, the top layers with
rendered formulas, the lineage of the best layer, the fidelity ladder (how many reached
each rung, their scores) and the full-training leaderboard.

Data first, pictures second: each section has a small function that turns a Run into
plain rows (tested on its own), and a function that draws them with matplotlib. The
pictures are SVG in data: URIs of <img> elements: each is a document of its own, so the
ids matplotlib gives glyphs and clip paths cannot clash between pictures, and the page
fetches nothing. matplotlib is used through Figure only, never pyplot (see drawing.py).
"""

from __future__ import annotations

import base64
import datetime
import io
import itertools
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure

from evonas import __version__
from evonas.search.budget import Ledger
from evonas.errors import EvonasError
from evonas.layers.genome import Genome
from evonas.search.pareto import pareto_front
from evonas.search.records import DUPLICATE, FAILED, REJECTED, STAGES, SURVIVOR, Candidate, Evaluation
from evonas.search.runfolder import RunFolder, atomic_write_text
from evonas.search.results import Run, load_run
from evonas.search.state import charges, mean_fitness

REPORT_FILE = "report.html"
FULLTRAIN_FILE = Path("fulltrain") / "leaderboard.json"
TEMPLATE = "report.html.j2"
TOP_N = 10

log = logging.getLogger(__name__)

# One colour per run in the progress plot (matplotlib's default cycle, named so the
# legend and the faint survivor dots of a run match).
_RUN_COLOURS = ("#1f77b4", "#ff7f0e")
_FRONT_COLOUR = "#d62728"


# --- what the page shows, as plain data ---------------------------------------------------


@dataclass
class ProgressPoint:
    """The search after its n-th finished evaluation."""

    evaluations: int
    device_hours: float  # charged so far, as the ledger charges it
    best: float | None  # best mean proxy fitness of a survivor so far
    fitness: float | None  # this evaluation's own mean fitness, when it survived


@dataclass
class FunnelRow:
    """One stage of the rejection funnel: how many reached it and how many it stopped."""

    stage: str
    entered: int
    rejected: int = 0
    failed: int = 0
    reused: int = 0  # duplicates of a survivor: its fitness reused, not trained again
    reasons: Counter = field(default_factory=Counter)

    @property
    def passed(self) -> int:
        return self.entered - self.rejected - self.failed - self.reused


@dataclass
class Formula:
    text: str
    tex: str
    image: str | None  # SVG data: URI, None where mathtext cannot render the LaTeX


def survivors(run: Run) -> list[Evaluation]:
    """Survivors in the order they finished. Duplicates are left out: they repeat the
    fitness of the survivor they equal."""
    return [e for e in run.state.evaluations.values() if e.status == SURVIVOR]


def front(run: Run) -> tuple[list[Evaluation], list[int]]:
    """The survivors and the indices of those on their Pareto front over the proxy
    architectures (every accuracy maximised)."""
    evs = survivors(run)
    return evs, pareto_front([ev.objectives(list(run.config.archs)) for ev in evs])


def budget_device(run: Run) -> str | None:
    """The device whose hours the progress plot counts: the budget's own for a device
    budget, None (every device) for wall-time and evaluation budgets."""
    budget = Ledger.from_state(_raw_state(run.path)["ledger"]).budget
    return budget.device if budget.kind == "device" else None


def charged_seconds(ev: Evaluation, device: str | None = None) -> float:
    """Device-seconds the ledger charged for an evaluation (state.charges), on `device`
    or on every device (None)."""
    return sum(seconds * share for _, seconds, share, where in charges(ev)
               if device is None or where == device)


def progress(run: Run, device: str | None = None) -> list[ProgressPoint]:
    """Best-so-far mean fitness after each finished evaluation, in finishing order
    (the journal keeps evaluations in the order the driver finished them)."""
    points, best, hours = [], None, 0.0
    for n, ev in enumerate(run.state.evaluations.values(), 1):
        hours += charged_seconds(ev, device) / 3600.0
        own = mean_fitness(ev) if ev.status == SURVIVOR else None
        if own is not None and (best is None or own > best):
            best = own
        points.append(ProgressPoint(n, hours, best, own))
    return points


def _exit_stage(ev: Evaluation) -> str | None:
    """The stage where a candidate left the funnel; None for a survivor. A worker that
    died or ran out of time says no stage: "worker" then."""
    if ev.status == SURVIVOR:
        return None
    if ev.status == DUPLICATE:
        return "duplicate"
    return ev.reject_stage or "worker"


def funnel(run: Run) -> list[FunnelRow]:
    """The rejection funnel: every stage in pipeline order with the candidates that
    reached it and why those it stopped were stopped. A "worker" row (after the driver's
    checks) holds failures whose stage is unknown, and appears only when there are some."""
    evs = list(run.state.evaluations.values())
    order = list(STAGES)
    if not any("causal" in ev.stage_seconds for ev in evs):
        order.remove("causal")  # a search whose layers may see every token never runs it
    order.insert(order.index("duplicate") + 1, "worker")
    rows = {stage: FunnelRow(stage, 0) for stage in order}
    for ev in evs:
        stage = _exit_stage(ev)
        if stage is None:
            continue
        row = rows.setdefault(stage, FunnelRow(stage, 0))  # a stage newer than this code
        if ev.status == DUPLICATE:
            row.reused += 1
        elif ev.status == FAILED:
            row.failed += 1
        else:
            row.rejected += 1
        if ev.status in (REJECTED, FAILED) and ev.reject_reason:
            row.reasons[_short(ev.reject_reason)] += 1
    entered = len(evs)
    out = []
    for row in rows.values():
        row.entered = entered
        entered = row.passed
        if row.stage != "worker" or row.failed:
            out.append(row)
    return out


@dataclass
class LadderRow:
    """One rung of the fidelity ladder: how many candidates reached it (scored there),
    how many it promoted to the next, how many failed its training, and its scores."""

    steps: int
    reached: int
    promoted: int
    failed: int
    best: float | None
    median: float | None
    best_id: str | None


def ladder(run: Run) -> list[LadderRow]:
    """The ladder's rungs in order; empty for a search without one. Rung 0's scores are
    the survivors' proxy fitness (duplicates left out: they repeat their original's)."""
    rungs = run.config.rungs
    rows = []
    for k, steps in enumerate(rungs):
        if k == 0:
            scores = {e.candidate_id: mean_fitness(e) for e in survivors(run)
                      if e.duplicate_of is None}
            failed = 0
        else:
            results = [r[steps] for r in run.state.rungs.values() if steps in r]
            scores = {r.candidate_id: sum(r.fitness.values()) / len(r.fitness)
                      for r in results if r.fitness}
            failed = sum(1 for r in results if not r.fitness)
        promoted = (sum(1 for _, s in run.state.promoted if s == rungs[k + 1])
                    if k + 1 < len(rungs) else 0)
        ordered = sorted(scores.values())
        median = (None if not ordered else ordered[len(ordered) // 2] if len(ordered) % 2
                  else (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2)
        best_id = min(scores, key=lambda c: (-scores[c], c)) if scores else None
        rows.append(LadderRow(steps, len(scores), promoted, failed,
                              scores[best_id] if best_id else None, median, best_id))
    return rows


def lineage(run: Run, cid: str) -> list[tuple[Candidate, Evaluation]]:
    """The candidate and its ancestors, the first ancestor (a zoo layer or a random one)
    first; each candidate's `mutation` made it from the one before."""
    chain, seen = [], set()
    while cid is not None and cid in run.state.candidates and cid not in seen:
        seen.add(cid)
        cand = run.state.candidates[cid]
        chain.append((cand, run.state.evaluations[cid]))
        cid = cand.parent_id
    return chain[::-1]


_FULLTRAIN_FIELDS = {"layer": str, "arch": str, "batch_size": int, "mean": float, "std": float,
                     "n": int}


def fulltrain(run_path: str | Path) -> list[dict] | None:
    """Rows of fulltrain/leaderboard.json (written by the full-training stage), best mean
    first within each architecture and batch size; None when the file is absent."""
    path = Path(run_path) / FULLTRAIN_FILE
    if not path.is_file():
        return None
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EvonasError(f"{path}: not readable as JSON ({err})") from None
    if not isinstance(rows, list):
        raise EvonasError(f"{path}: expected a list of rows, found {type(rows).__name__}")
    for i, row in enumerate(rows):
        _check_fulltrain_row(path, i, row)
    # Rows without a completed trial (mean None) last in their block.
    return sorted(rows, key=lambda r: (r["arch"], r["batch_size"], r["mean"] is None,
                                       -(r["mean"] or 0.0), r["layer"]))


def _check_fulltrain_row(path: Path, i: int, row) -> None:
    if not isinstance(row, dict):
        raise EvonasError(f"{path}: row {i} is not an object")
    for name, kind in _FULLTRAIN_FIELDS.items():
        value = row.get(name)
        # bool is an int to Python but never a count here; ints are fine where floats are;
        # mean and std are None for a layer with no completed trial.
        ok = (isinstance(value, kind) or (kind is float and isinstance(value, int))
              or (kind is float and value is None and name in row)) \
            and not isinstance(value, bool)
        if not ok:
            raise EvonasError(f"{path}: row {i} needs {name!r} as {kind.__name__}, "
                              f"got {value!r}")


# --- pictures ---------------------------------------------------------------------------


def _svg_uri(fig: Figure, **savefig) -> str:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="svg", **savefig)
    finally:
        fig.clear()
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasSVG(fig)
    return fig


def _mathtext(tex: str) -> str:
    """sympy's LaTeX as matplotlib mathtext: one $...$ per line, since mathtext has no
    aligned environment (symbolic.latex names shared nodes in one)."""
    body = tex.strip()
    if body.startswith(r"\begin{aligned}"):
        body = body[len(r"\begin{aligned}"):body.rindex(r"\end{aligned}")]
        lines = [line.replace("&=", "=").strip() for line in body.split(r"\\")]
        return "\n".join(f"${line}$" for line in lines if line)
    return f"${body}$"


@lru_cache(maxsize=512)
def formula_svg(tex: str) -> str | None:
    """The formula rendered by matplotlib's mathtext as an SVG data: URI, or None when
    mathtext cannot parse it (the page then shows the readable text formula)."""
    fig = Figure()
    FigureCanvasSVG(fig)
    fig.text(0, 0, _mathtext(tex), fontsize=13)
    try:
        return _svg_uri(fig, bbox_inches="tight", pad_inches=0.04, transparent=True)
    except ValueError as err:  # mathtext's parse errors
        log.info("formula not rendered (%s): %s", err, tex)
        return None


def formula(genome: Genome) -> Formula:
    from evonas.layers import symbolic

    tex = symbolic.equation(genome, tex=True)
    return Formula(symbolic.equation(genome), tex, formula_svg(tex))


def pareto_plot(run: Run) -> str | None:
    """Every pair of proxy architectures as a scatter of the survivors' accuracies, the
    Pareto front (over all architectures) marked; None before the first survivor."""
    evs, members = front(run)
    if not evs:
        return None
    archs = list(run.config.archs)
    on_front = set(members)
    pairs = list(itertools.combinations(range(len(archs)), 2)) or [(0, None)]
    fig = _figure(4.6 * len(pairs), 4.0)
    for ax, (i, j) in zip(fig.subplots(1, len(pairs), squeeze=False)[0], pairs):
        xs = [ev.fitness[archs[i]] for ev in evs]
        ys = [ev.fitness[archs[j]] for ev in evs] if j is not None else list(range(1, len(evs) + 1))
        rest = [k for k in range(len(evs)) if k not in on_front]
        ax.scatter([xs[k] for k in rest], [ys[k] for k in rest], s=22, color="#7f7f7f",
                   alpha=0.7, label="survivor")
        ax.scatter([xs[k] for k in members], [ys[k] for k in members], s=40,
                   color=_FRONT_COLOUR, label="Pareto front", zorder=3)
        for k in members:
            ax.annotate(evs[k].candidate_id, (xs[k], ys[k]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel(f"{archs[i]} accuracy")
        ax.set_ylabel(f"{archs[j]} accuracy" if j is not None else "survivor (order found)")
        ax.margins(0.12)  # room for the labels of points at the edge
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    return _svg_uri(fig)


def progress_plot(runs: list[tuple[str, list[ProgressPoint]]], device: str | None) -> str:
    """Best-so-far mean fitness against evaluations and against device-hours, one line
    per run; each survivor's own mean fitness as a faint dot."""
    fig = _figure(10.0, 3.8)
    axes = fig.subplots(1, 2, sharey=True)
    for (label, points), colour in zip(runs, itertools.cycle(_RUN_COLOURS)):
        for ax, x in zip(axes, ("evaluations", "device_hours")):
            best = [(getattr(p, x), p.best) for p in points if p.best is not None]
            if best:
                ax.step(*zip(*best), where="post", color=colour, label=label, lw=1.8)
            own = [(getattr(p, x), p.fitness) for p in points if p.fitness is not None]
            if own:
                ax.scatter(*zip(*own), s=10, color=colour, alpha=0.3)
    axes[0].set_xlabel("evaluations finished")
    axes[1].set_xlabel(f"{device or 'device'}-hours spent"
                       + ("" if device else " (all devices)"))
    axes[0].set_ylabel("best mean proxy accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
    if any(p.best is not None for _, points in runs for p in points):
        axes[0].legend(fontsize=8, loc="lower right")
    return _svg_uri(fig)


def funnel_plot(rows: list[FunnelRow]) -> str:
    """Horizontal bars: the candidates entering each stage, and the survivors."""
    labels = [r.stage for r in rows] + ["survivors"]
    counts = [r.entered for r in rows] + [rows[-1].passed if rows else 0]
    fig = _figure(7.0, 0.42 * len(labels) + 1.0)
    ax = fig.subplots()
    bars = ax.barh(labels, counts, color=["#9ecae1"] * len(rows) + ["#31a354"])
    notes = [f"{r.entered}" + (f"  (-{r.entered - r.passed})" if r.entered > r.passed else "")
             for r in rows] + [str(counts[-1])]
    ax.bar_label(bars, notes, padding=3, fontsize=8)
    ax.invert_yaxis()  # pipeline order, top to bottom
    ax.set_xlabel("candidates entering the stage")
    ax.set_xlim(0, max(counts + [1]) * 1.25)
    ax.grid(axis="x", alpha=0.3)
    return _svg_uri(fig)


def graph_picture(genome: Genome, title: str) -> str:
    """The genome's graph (drawing.py draws its networkx form) as an SVG data: URI."""
    from evonas.layers.drawing import genome_figure

    # Tight: drawing.py's legend can be wider than a small graph's figure.
    return _svg_uri(genome_figure(genome, title=title), bbox_inches="tight", pad_inches=0.1)


# --- the page -----------------------------------------------------------------------------


def build(run: Run, *, compare: Run | None = None, top_n: int = TOP_N) -> str:
    """The report of `run` as one HTML page; `compare` adds a second run (e.g. random
    search) to the progress plot."""
    from jinja2 import Environment, StrictUndefined

    text = resources.files("evonas.dashboards").joinpath(TEMPLATE).read_text(encoding="utf-8")
    env = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True,
                      lstrip_blocks=True)
    return env.from_string(text).render(**context(run, compare=compare, top_n=top_n))


def context(run: Run, *, compare: Run | None = None, top_n: int = TOP_N) -> dict:
    """Everything the template shows, as plain values."""
    archs = list(run.config.archs)
    device = budget_device(run)
    runs = [(_run_label(run), progress(run, device))]
    if compare is not None:
        runs.append((_run_label(compare), progress(compare, device)))
    best = run.state.best()
    statuses = Counter(e.status for e in run.state.evaluations.values())
    rows = funnel(run)
    return {
        "title": f"evonas report: {run.path.name}",
        "version": __version__,
        "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "run": _summary(run, statuses),
        "compare": _run_label(compare) if compare is not None else None,
        "archs": archs,
        "best": _layer(run, best.candidate_id) if best is not None else None,
        "best_graph": (graph_picture(run.genome(best.candidate_id), best.candidate_id)
                       if best is not None else None),
        "pareto_plot": pareto_plot(run),
        "front": _front_rows(run),
        "progress_plot": progress_plot(runs, device),
        "progress": [{"label": label, **_progress_summary(points)} for label, points in runs],
        "funnel_plot": funnel_plot(rows),
        "funnel": [_funnel_row(r) for r in rows],
        "top": [_layer(run, cand.candidate_id) for cand, _ in run.leaderboard(top_n)],
        "lineage": [_layer(run, cand.candidate_id)
                    for cand, _ in (lineage(run, best.candidate_id) if best else [])],
        "fulltrain": _fulltrain_section(run),
        "ladder": ({"rows": ladder(run), "fraction": run.config.promote_fraction,
                    "min_population": run.config.rung_min_population}
                   if run.config.ladder else None),
    }


def _summary(run: Run, statuses: Counter) -> dict:
    c = run.config
    ledger = Ledger.from_state(_raw_state(run.path)["ledger"])
    budget = ledger.budget
    return {"folder": str(run.path.resolve()), "name": run.path.name,
            "controller": c.controller, "space": c.space, "dataset": c.dataset,
            "archs": ", ".join(c.archs), "seed": c.seed,
            "budget": f"{budget.format_amount(ledger.spent)} of {budget}",
            "evaluated": len(run.state.evaluations),
            "statuses": ", ".join(f"{statuses[s]} {s}" for s in
                                  (SURVIVOR, DUPLICATE, REJECTED, FAILED) if statuses[s])}


def _layer(run: Run, cid: str) -> dict:
    cand, ev = run.candidate(cid)
    shown = formula(Genome.from_dict(cand.genome))
    return {"id": cid, "status": ev.status, "mutation": cand.mutation,
            "parent": cand.parent_id or "", "formula": shown.text, "tex": shown.tex,
            "image": shown.image,
            "mean": mean_fitness(ev) if ev.fitness else None,
            "fitness": [ev.fitness.get(a) if ev.fitness else None for a in run.config.archs],
            "reason": f"{ev.reject_stage}: {ev.reject_reason}" if ev.reject_stage else ""}


def _front_rows(run: Run) -> list[dict]:
    evs, members = front(run)
    rows = [_layer(run, evs[k].candidate_id) for k in members]
    return sorted(rows, key=lambda r: -r["mean"])


def _progress_summary(points: list[ProgressPoint]) -> dict:
    last = points[-1] if points else None
    first_best = next((p for p in points if p.best is not None and last and p.best == last.best),
                      None)
    return {"evaluations": last.evaluations if last else 0,
            "device_hours": last.device_hours if last else 0.0,
            "best": last.best if last else None,
            "best_at": first_best.evaluations if first_best else None}


def _funnel_row(row: FunnelRow) -> dict:
    parts = [f"{n} {what}" for n, what in ((row.rejected, "rejected"), (row.failed, "failed"),
                                           (row.reused, "equal to a survivor, its score reused"))
             if n]
    common = row.reasons.most_common(1)
    return {"stage": row.stage, "entered": row.entered, "passed": row.passed,
            "stopped": ", ".join(parts), "reason": common[0][0] if common else "",
            "reason_count": common[0][1] if common else 0}


def _fulltrain_section(run: Run) -> dict | None:
    try:
        rows = fulltrain(run.path)
    except EvonasError as err:
        # Another stage's file: a bad one is shown, not a reason to fail the whole page.
        return {"error": str(err), "rows": []}
    if rows is None:
        return None
    shown = []
    for row in rows:
        known = row["layer"] in run.state.candidates
        shown.append({**row, "formula": (formula(run.genome(row["layer"])).text
                                         if known else "")})
    return {"error": None, "rows": shown}


def _run_label(run: Run) -> str:
    return f"{run.config.controller} ({run.path.name})"


def _raw_state(path: Path) -> dict:
    raw = RunFolder.open(path, lock=False).read_state()
    if raw is None:
        raise EvonasError(f"{path}: holds no search state yet")
    return raw


def _short(reason: str, limit: int = 120) -> str:
    line = " ".join(reason.split())
    return line if len(line) <= limit else line[:limit - 1] + "\u2026"


# --- writing it ---------------------------------------------------------------------------


def write(run_path: str | Path, out: str | Path, *, compare: str | Path | None = None,
          top_n: int = TOP_N) -> Path:
    """Build the report of the run folder at run_path and write it atomically to out."""
    run = load_run(run_path)
    other = load_run(compare) if compare is not None else None
    html = build(run, compare=other, top_n=top_n)
    out = Path(out)
    atomic_write_text(out, html)
    return out


def refresh(folder_path: str | Path, tracker=None, parent_run_id: str | None = None) -> Path | None:
    """Rewrite <run>/report.html and log it to the search's MLflow run: what the driver
    calls every report_every_s seconds and at the end. Returns the path, or None when the
    report could not be built: the report is a view, and a failing view must never end a
    search that has spent hours, so the error is logged as a warning instead."""
    path = Path(folder_path) / REPORT_FILE
    try:
        html = build(load_run(folder_path))
        atomic_write_text(path, html)
        if tracker is not None and parent_run_id is not None:
            tracker.log_artifact_text(parent_run_id, REPORT_FILE, html)
    except Exception as err:  # noqa: BLE001 - see the docstring
        log.warning("evonas: %s not refreshed (%s: %s)", path, type(err).__name__, err)
        return None
    return path


__all__ = ["REPORT_FILE", "FunnelRow", "ProgressPoint", "Formula", "build", "context",
           "formula", "formula_svg", "front", "fulltrain", "funnel", "ladder", "LadderRow", "lineage",
           "progress",
           "refresh", "survivors", "write"]
