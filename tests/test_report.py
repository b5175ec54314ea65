"""The search report (evonas/report.py, `evonas report`): its data against a hand-made run
folder whose answers are known, the page's self-containment, formulas for every zoo
layer and random layers, the full-training table, and the refresh by a running search.

`make_run` writes a run folder as the driver does (config.json, state.json, optionally
the MLflow record through the real Tracker) without training anything; test_browser.py
opens the same folder in Chromium.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from evonas.search import report
from evonas.layers import symbolic, zoo
from evonas.search.budget import Ledger, parse_budget
from evonas.cli import main
from evonas.runtime.backends import InlineBackend, Outcome
from evonas.layers.export import export_source
from evonas.layers.mutation import random_genome
from evonas.search.records import DUPLICATE, FAILED, REJECTED, SURVIVOR, Candidate, Evaluation
from evonas.search.runfolder import RunFolder
from evonas.search.config import SearchConfig
from evonas.search import state as records
from evonas.search.driver import Search
from evonas.search.state import Journal, SearchState
from evonas.search.results import load_run
from evonas.layers.space import load_space

ARCHS = ("resnet", "mobilenetv2")
DRIVER_S = {"static": 0.0, "numeric": 36.0, "duplicate": 0.0}  # charged at share 1 on a CPU
WORKER_S = {"stability": 36.0, "quality": 72.0, "proxy": 144.0}  # charged at the share held

# (id, zoo layer, parent, mutation, status, fitness, stage, reason, stage seconds, device,
# share): a lineage evonorm_s0 -> c4 -> c5, a front {c4, c5}, each funnel stage used once.
ROWS = [
    ("c1", "evonorm_s0", None, "zoo:evonorm_s0", SURVIVOR, (0.30, 0.40), None, None,
     {**DRIVER_S, **WORKER_S}, "cpu", 1.0),
    ("c2", "gn_relu", None, "zoo:gn_relu", SURVIVOR, (0.35, 0.30), None, None,
     {**DRIVER_S, **WORKER_S}, "gpu", 0.5),
    ("c3", "evonorm_s1", "c1", "op_change", REJECTED, None, "quality",
     "accuracy 0.10 < 0.12 after 6 steps on resnet", {**DRIVER_S, "stability": 36.0,
                                                      "quality": 72.0}, "cpu", 1.0),
    ("c4", "evonorm_s2", "c1", "node_insert", SURVIVOR, (0.38, 0.42), None, None,
     {**DRIVER_S, **WORKER_S}, "cpu", 1.0),
    ("c5", "in_relu", "c4", "node_remove", SURVIVOR, (0.45, 0.20), None, None,
     {**DRIVER_S, **WORKER_S}, "cpu", 1.0),
    ("c6", "evonorm_s2", "c5", "input_change", DUPLICATE, (0.38, 0.42), None, None,
     DRIVER_S, "cpu", 1.0),
    ("c7", "bn_relu", "c2", "op_change", REJECTED, None, "static", "op mean_NHW not in space",
     {"static": 0.0}, "cpu", 1.0),
    ("c8", "ln_relu", "c2", "node_insert", REJECTED, None, "numeric",
     "non-finite output at input scale 1e3", {"static": 0.0, "numeric": 36.0}, "cpu", 1.0),
    ("c9", "evonorm_b0", "c4", "op_change", REJECTED, None, "stability",
     "gradient norm 3.7e+10 > 1e+08", {**DRIVER_S, "stability": 36.0}, "cpu", 1.0),
    ("c10", "evonorm_b1", "c4", "node_insert", FAILED, None, None, "worker died: SIGKILL",
     {**DRIVER_S, "failed": 36.0}, "cpu", 1.0),
    ("c11", "evonorm_b2", "c5", "op_change", FAILED, None, "proxy", "non-finite fitness",
     {**DRIVER_S, **WORKER_S}, "cpu", 1.0),
]


def make_run(path: Path, *, mlflow: bool = False, controller: str = "evolution",
             rows=ROWS) -> Path:
    """A finished run folder holding `rows`, written as the driver writes one."""
    config = SearchConfig(space="norm_act", budget="20evals", dataset="synthetic",
                          archs=ARCHS, controller=controller)
    folder = RunFolder.create(path, config.to_dict())
    ledger = Ledger(parse_budget(config.budget))
    state = SearchState()
    tracker = None
    if mlflow:
        from evonas.search.tracking import SearchTracker

        tracker = SearchTracker(folder.tracking_uri,
                                artifact_location=str(folder.artifacts_dir / "mlflow"))
        state.parent_run_id = tracker.start_search(path.name, config.to_dict(),
                                                   {"evonas.run_folder": str(path)})
    for cid, name, parent, mutation, status, fitness, stage, reason, seconds, device, share in rows:
        genome = zoo.get(name)
        cand = Candidate(cid, genome.to_dict(), parent, mutation, genome.structural_hash,
                         "fp-" + name)
        ev = Evaluation(cid, status, dict(zip(ARCHS, fitness)) if fitness else None, stage,
                        reason, dict(seconds), device, share,
                        duplicate_of="c4" if status == DUPLICATE else None)
        state.add(cand, ev)
        ledger.count_evaluation(stage or status)
        if tracker is not None:
            tracker.log_candidate(state.parent_run_id, cand, ev, genome=genome,
                                  formula=symbolic.equation(genome), latex=symbolic.latex(genome),
                                  source=export_source(genome, "EvolvedNormAct"))
    journal = Journal(folder.journal_path, 0)
    for cid, ev in state.evaluations.items():
        journal.append(state.candidates[cid], ev)
    journal.close()
    records.write(folder, state, journal_bytes=journal.size, controller={},
                  ledger=ledger.to_state())
    if tracker is not None:
        tracker.end_search(state.parent_run_id)
    folder.release()
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("report") / "s1")


# --- the data -------------------------------------------------------------------------------


def test_front_is_the_survivors_no_other_beats(run_dir):
    evs, members = report.front(load_run(run_dir))
    assert [e.candidate_id for e in evs] == ["c1", "c2", "c4", "c5"]  # no duplicate
    assert sorted(evs[k].candidate_id for k in members) == ["c4", "c5"]


def test_progress_is_best_so_far_against_evaluations_and_device_hours(run_dir):
    run = load_run(run_dir)
    points = report.progress(run)
    assert [p.evaluations for p in points] == list(range(1, 12))
    best = [p.best for p in points]
    assert best[:3] == [pytest.approx(0.35)] * 3  # c1, then c2 is better; c3 rejected
    assert best[3] == pytest.approx(0.40) and best[-1] == pytest.approx(0.40)  # c4 stays best
    assert points[5].fitness is None  # a duplicate repeats c4's score; it is no new point
    # c1: 36 s of driver checks plus 252 s in a worker holding a whole CPU.
    assert points[0].device_hours == pytest.approx(288 / 3600)
    # c2 held half a GPU: counted on the GPU at half its seconds, its checks on the CPU.
    c2 = run.state.evaluations["c2"]
    assert report.charged_seconds(c2, "gpu") == pytest.approx(126.0)
    assert report.charged_seconds(c2, "cpu") == pytest.approx(36.0)
    assert report.charged_seconds(c2) == pytest.approx(162.0)
    assert report.progress(run, "gpu")[-1].device_hours == pytest.approx(126 / 3600)


def test_funnel_counts_every_candidate_once_in_pipeline_order(run_dir):
    rows = report.funnel(load_run(run_dir))
    got = {r.stage: (r.entered, r.rejected, r.failed, r.reused, r.passed) for r in rows}
    assert [r.stage for r in rows] == ["static", "numeric", "duplicate", "worker",
                                       "stability", "quality", "proxy"]
    assert got == {"static": (11, 1, 0, 0, 10), "numeric": (10, 1, 0, 0, 9),
                   "duplicate": (9, 0, 0, 1, 8), "worker": (8, 0, 1, 0, 7),
                   "stability": (7, 1, 0, 0, 6), "quality": (6, 1, 0, 0, 5),
                   "proxy": (5, 0, 1, 0, 4)}
    assert rows[-1].passed == len(report.survivors(load_run(run_dir)))
    assert rows[0].reasons == {"op mean_NHW not in space": 1}


def test_funnel_has_no_worker_row_without_unlocated_failures(tmp_path):
    run = load_run(make_run(tmp_path / "s", rows=[r for r in ROWS if r[0] != "c10"]))
    assert "worker" not in [r.stage for r in report.funnel(run)]


def test_lineage_runs_from_the_first_ancestor_to_the_layer(run_dir):
    chain = report.lineage(load_run(run_dir), "c5")
    assert [(c.candidate_id, c.mutation) for c, _ in chain] == [
        ("c1", "zoo:evonorm_s0"), ("c4", "node_insert"), ("c5", "node_remove")]


def test_lineage_stops_at_a_parent_the_state_lacks_and_at_a_cycle(tmp_path):
    rows = [("a", "evonorm_s0", "gone", "op_change", SURVIVOR, (0.3, 0.3), None, None, {},
             "cpu", 1.0),
            ("b", "evonorm_s1", "c", "op_change", SURVIVOR, (0.3, 0.3), None, None, {}, "cpu", 1.0),
            ("c", "evonorm_s2", "b", "op_change", SURVIVOR, (0.3, 0.3), None, None, {}, "cpu", 1.0)]
    run = load_run(make_run(tmp_path / "s", rows=rows))
    assert [c.candidate_id for c, _ in report.lineage(run, "a")] == ["a"]
    assert [c.candidate_id for c, _ in report.lineage(run, "c")] == ["b", "c"]


# --- formulas -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", zoo.names())
def test_every_zoo_formula_renders(name):
    shown = report.formula(zoo.get(name))
    assert shown.image and shown.image.startswith("data:image/svg+xml;base64,")
    assert shown.text.startswith("y = ")


def test_named_shared_nodes_render_line_by_line():
    tex = symbolic.latex(zoo.get("bn_silu"), name_shared=True)  # x-hat used twice
    assert r"\begin{aligned}" in tex
    assert report._mathtext(tex).count("$") == 2 * (tex.count(r"\\") + 1)
    assert report.formula_svg(tex) is not None


def test_random_layers_render_or_fall_back_never_fail():
    rng = np.random.default_rng(0)
    for space in ("norm_act", "norm_act_s", "act"):
        for _ in range(8):
            shown = report.formula(random_genome(load_space(space), rng))
            assert shown.text and (shown.image is None or shown.image.startswith("data:"))


def test_latex_mathtext_cannot_parse_falls_back_to_text():
    assert report.formula_svg(r"\frac{x") is None
    assert report.formula_svg(r"\unknowncommand{x}") is None


# --- the page -------------------------------------------------------------------------------


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _parse(html: str) -> list[tuple[str, dict]]:
    parser = _Collect()
    parser.feed(html)
    return parser.tags


def test_page_is_one_file_that_fetches_nothing(run_dir, tmp_path):
    html = report.build(load_run(run_dir))
    tags = _parse(html)
    names = {t for t, _ in tags}
    assert not names & {"script", "link", "iframe", "object", "embed"}
    for tag, attrs in tags:
        for key in ("src", "href", "srcset", "poster", "data"):
            value = attrs.get(key) or ""
            assert not value or value.startswith(("data:", "#")), (tag, key, value[:80])
    assert not re.search(r"url\(\s*['\"]?(?!data:)", html)  # no CSS fetch either
    ids = {a.get("id") for _, a in tags}
    assert {"pareto-plot", "progress-plot", "funnel-plot", "best-graph", "top-table",
            "lineage-table"} <= ids
    assert sum(1 for t, a in tags if t == "tr" and a.get("class") == "candidate") == 4
    assert sum(1 for t, a in tags if t == "img" and a.get("class") == "formula") >= 4 + 2 + 3


def test_page_shows_the_best_and_its_lineage(run_dir):
    html = report.build(load_run(run_dir))
    lineage = html[html.index('id="lineage-table"'):]
    lineage = lineage[:lineage.index("</table>")]
    assert [m for m in re.findall(r"<td>(c\d+)</td>", lineage)] == ["c1", "c4"]
    assert "node_insert" in lineage and "zoo:evonorm_s0" in lineage
    assert "evonas ui" in html and "--compare RUN2" in html


def test_compare_adds_the_second_run_to_the_progress_table(run_dir, tmp_path):
    other = make_run(tmp_path / "random", controller="random",
                     rows=[r for r in ROWS if r[0] in ("c1", "c3")])
    html = report.build(load_run(run_dir), compare=load_run(other))
    assert "evolution (s1)" in html and "random (random)" in html
    assert "--compare RUN2" not in html


def test_a_run_without_survivors_still_has_a_page(tmp_path):
    run = make_run(tmp_path / "none", rows=[r for r in ROWS if r[4] not in (SURVIVOR, DUPLICATE)])
    html = report.build(load_run(run))
    assert html.count("No survivor yet") == 3 and 'id="funnel-plot"' in html


def test_fulltrain_leaderboard_is_shown_when_present(tmp_path):
    run = make_run(tmp_path / "s")
    assert report.fulltrain(run) is None and 'id="fulltrain"' not in report.build(load_run(run))
    (run / "fulltrain").mkdir()
    rows = [{"layer": "evonorm_s0", "arch": "resnet", "batch_size": 128, "mean": 0.91,
             "std": 0.004, "n": 3},
            {"layer": "c4", "arch": "resnet", "batch_size": 128, "mean": 0.93, "std": 0.002,
             "n": 3},
            {"layer": "c5", "arch": "resnet", "batch_size": 128, "mean": None, "std": None,
             "n": 0}]
    (run / "fulltrain" / "leaderboard.json").write_text(json.dumps(rows))
    assert [r["layer"] for r in report.fulltrain(run)] == ["c4", "evonorm_s0", "c5"]
    html = report.build(load_run(run))
    table = html[html.index('id="fulltrain-table"'):]
    assert table.index(">c4<") < table.index(">evonorm_s0<") and "0.9300" in table
    assert "x*sigmoid(x) / rms_GHW(x)" in table  # c4 is a candidate: its formula is shown
    assert "no completed trial" in table


def test_a_malformed_fulltrain_file_is_named_on_the_page(tmp_path):
    run = make_run(tmp_path / "s")
    (run / "fulltrain").mkdir()
    (run / "fulltrain" / "leaderboard.json").write_text('[{"layer": "c4", "arch": "resnet"}]')
    with pytest.raises(Exception, match="row 0 needs 'batch_size'"):
        report.fulltrain(run)
    assert "row 0 needs &#39;batch_size&#39;" in report.build(load_run(run))


# --- the command ----------------------------------------------------------------------------


def test_cli_writes_the_report(run_dir, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", str(run_dir), "--out", str(out), "--compare", str(run_dir),
                 "-n", "2"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert out.read_text().count('class="candidate"') == 2


@pytest.mark.parametrize("args, message", [
    (["report", "{tmp}/missing"], "no such run folder"),
    (["report", "{run}", "--compare", "{tmp}"], "not a run folder"),
    (["report", "{run}", "--out", "{tmp}/no/such/dir/r.html"], "does not exist"),
    (["ui", "{tmp}"], "not a run folder"),
])
def test_cli_errors_are_one_line_and_exit_2(run_dir, tmp_path, capsys, args, message):
    argv = [a.format(tmp=tmp_path, run=run_dir) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_ui_names_a_tracking_server_instead_of_starting_one(tmp_path, capsys):
    config = SearchConfig(archs=ARCHS, tracking_uri="http://mlflow.example:5000")
    RunFolder.create(tmp_path / "s", config.to_dict()).release()
    assert main(["ui", str(tmp_path / "s")]) == 0
    assert "MLflow UI: http://mlflow.example:5000" in capsys.readouterr().out


def test_ui_without_a_store_says_so(run_dir, capsys):
    assert main(["ui", str(run_dir)]) == 2  # make_run without mlflow: no mlflow.db
    assert "no MLflow store yet" in capsys.readouterr().err


# --- the refresh by a running search --------------------------------------------------------


class CannedBackend(InlineBackend):
    """Every candidate survives at once with a score from its id: a search that trains
    nothing, so the loop and its report can be tested in seconds."""

    def wait(self, timeout=None):
        outcomes = []
        while self._pending:
            cid, _, _ = self._pending.pop(0)
            k = int(cid[1:])
            ev = Evaluation(cid, SURVIVOR, {a: (k * (i + 3)) % 7 / 10 for i, a in enumerate(ARCHS)},
                            stage_seconds={"stability": 0.1, "proxy": 0.2})
            outcomes.append(Outcome(cid, True, ev.to_dict(), 0.3))
        return outcomes


class NullTracker:
    """The Tracker's calls the driver makes, recorded instead of stored: a search without
    MLflow's start-up (seconds for a new database)."""

    def __init__(self):
        self.texts: list[str] = []

    def start_search(self, *args):
        return "parent"

    def log_artifact_text(self, parent_run_id, name, text):
        self.texts.append(name)

    def __getattr__(self, name):  # log_candidate, log_summary, end_search, ...
        return lambda *args, **kw: None


def _search(path: Path, every: float, evals: int = 4, tracker=None) -> Search:
    config = SearchConfig(space="norm_act_s", budget=f"{evals}evals", dataset="synthetic",
                          archs=ARCHS, workers=0, population_size=3, tournament_size=2,
                          seed=1, seed_zoo=True, report_every_s=every)
    return Search.create(path, config, backend=CannedBackend(), tracker=tracker)


def test_a_search_writes_its_report_at_the_end_and_logs_it(tmp_path):
    search = _search(tmp_path / "s", every=3600.0)
    search.run()
    html = (tmp_path / "s" / "report.html").read_text()
    assert html.count('class="candidate"') >= 1
    client = search.tracker.client
    names = [a.path for a in client.list_artifacts(search.state.parent_run_id)]
    assert "report.html" in names
    logged = Path(client.download_artifacts(search.state.parent_run_id, "report.html",
                                            str(tmp_path)))
    assert logged.read_text() == html


def test_a_search_refreshes_at_most_every_report_every_s(tmp_path, monkeypatch):
    calls = []
    real = report.refresh
    monkeypatch.setattr(report, "refresh", lambda *a: calls.append(a) or real(*a))
    rare = NullTracker()
    _search(tmp_path / "rare", every=3600.0, tracker=rare).run()
    assert len(calls) == 1 and rare.texts.count("report.html") == 1  # the final one only
    calls.clear()
    often = NullTracker()
    _search(tmp_path / "often", every=1e-9, tracker=often).run()
    assert len(calls) >= 3  # after each turn of the loop, and at the end
    assert often.texts.count("report.html") == len(calls)
    path, tracker, parent = calls[-1]
    assert (path, parent) == (Path(tmp_path / "often").absolute(), "parent")


def test_refresh_warns_instead_of_failing_the_search(tmp_path, caplog):
    run = make_run(tmp_path / "s")
    (run / "state.json").write_text("{}")
    assert report.refresh(run) is None
    assert "not refreshed" in caplog.text and not (run / "report.html").exists()


def test_report_every_s_must_be_positive():
    with pytest.raises(Exception, match="--report-every must be a number > 0"):
        SearchConfig(report_every_s=0)


@pytest.mark.parametrize("archs", [("resnet",), ("resnet", "mobilenetv2", "efficientnet")])
def test_pareto_plot_for_one_and_for_three_architectures(run_dir, archs):
    import dataclasses

    run = load_run(run_dir)
    run.config = dataclasses.replace(run.config, archs=archs)
    for ev in run.state.evaluations.values():
        if ev.fitness:
            ev.fitness["efficientnet"] = ev.fitness["resnet"] / 2
    assert report.pareto_plot(run).startswith("data:image/svg+xml;base64,")
    assert 'class="candidate"' in report.build(run)


def test_best_and_top_agree_on_a_tie(tmp_path, capsys):
    """Two survivors of equal mean fitness: `RUN:best`, `evonas top` and the report name
    the same layer, the one found first (the lower id)."""
    tie = [("c1", "evonorm_s0", None, "zoo:evonorm_s0", SURVIVOR, (0.30, 0.40), None, None,
            {**DRIVER_S, **WORKER_S}, "cpu", 1.0),
           ("c2", "gn_relu", None, "zoo:gn_relu", SURVIVOR, (0.40, 0.30), None, None,
            {**DRIVER_S, **WORKER_S}, "cpu", 1.0)]
    run = load_run(make_run(tmp_path / "tie", rows=tie))
    assert run.candidate("best")[0].candidate_id == "c1"
    assert [c.candidate_id for c, _ in run.leaderboard(2)] == ["c1", "c2"]
    assert main(["top", str(tmp_path / "tie")]) == 0
    ranks = [line.split()[1] for line in capsys.readouterr().out.splitlines()[2:]]
    assert ranks == ["c1", "c2"]
