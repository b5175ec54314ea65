"""The report and the MLflow UI in a real browser: headless Chromium (Debian's package,
which .ci/run installs) driven by playwright, as a user would open them.

Each page must load without console errors, show the candidates, the plots and a
rendered formula; the report must fetch nothing from the network. Screenshots go to
test-artifacts/ at the repository root, to look at after a run.

The run folder is test_report.make_run's hand-made search, with its MLflow record
written by the real Tracker; `evonas ui` serves it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from evonas.cli import main
from evonas.cli.dashboards import wait_for_health
from test_report import ROWS, make_run

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
# The network is closed here and must not be needed: no QUIC, no component updates,
# no sync, no first-run pages.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
UI_START_S = 150.0  # `evonas ui` until MLflow answers, on a busy two-core machine
PAGE_S = 90.0  # a page until what we look for is on it
# MLflow's own bundle asks the auth plugin's endpoint on every page, and the plain server
# (no --app-name basic-auth) answers 404, which Chromium logs as a console error. Nothing
# of ours: this one URL is all that is let through.
# The runs table's run-name cells, header included (MLflow 3's AG Grid column id).
NAME_CELLS = "[role=row] [col-id='attributes.`Run Name`']"
MLFLOW_OWN_ERRORS = re.compile(r"/ajax-api/2\.0/mlflow/users/current$")


def _playwright():
    if not os.path.exists(CHROMIUM):
        message = "Chromium missing: apt-get install chromium chromium-driver (as .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return pytest.importorskip("playwright.sync_api",
                               reason="pip install -e '.[test]' brings playwright")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A fresh Chromium profile for the module; one page per test."""
    api = _playwright()
    with api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("profile")), executable_path=CHROMIUM, headless=True,
            args=FLAGS, viewport={"width": 1360, "height": 900})
        context.set_default_timeout(PAGE_S * 1000)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("browser") / "s1", mlflow=True)


class Console:
    """Console errors, uncaught exceptions and requests of one page."""

    def __init__(self, page, allowed: re.Pattern | None = None):
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.allowed = allowed
        page.on("console", self._console)
        page.on("pageerror", lambda err: self.errors.append(f"uncaught: {err}"))
        page.on("request", lambda req: self.requests.append(req.url))

    def _console(self, msg) -> None:
        if msg.type != "error":
            return
        where = (msg.location or {}).get("url", "")
        if self.allowed is not None and self.allowed.search(where):
            return
        self.errors.append(f"{msg.text} ({where})")


def _loaded_images(page, selector: str) -> int:
    """How many images matching selector have loaded and decoded."""
    return page.eval_on_selector_all(
        selector, "imgs => imgs.filter(i => i.complete && i.naturalWidth > 0).length")


def _screenshot(page, name: str, full_page: bool = False) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=full_page)


# --- the report -----------------------------------------------------------------------------


@pytest.mark.slow
def test_report_in_chromium(browser, run_dir, tmp_path):
    out = tmp_path / "report.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    page = browser.new_page()
    console = Console(page)
    try:
        page.goto(out.as_uri())
        page.wait_for_load_state("load")
        survivors = sum(1 for row in ROWS if row[4] == "survivor")
        assert page.locator("#top-table tr.candidate").count() == survivors
        assert "c4" in page.locator("#top-table tr.candidate").first.inner_text()
        for plot in ("#pareto-plot", "#progress-plot", "#funnel-plot", "#best-graph"):
            assert _loaded_images(page, plot) == 1, plot
        assert _loaded_images(page, "#top-table img.formula") == survivors
        assert page.locator("#lineage-table tr").count() == 1 + 2  # header, c1, c4
        _screenshot(page, "report.png", full_page=True)
    finally:
        page.close()
    assert console.errors == []
    # The file itself and its data: pictures; nothing else, above all nothing remote.
    assert all(url.startswith(("file:", "data:")) for url in console.requests), console.requests


# --- the MLflow UI through `evonas ui` --------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_health(url: str, proc: subprocess.Popen) -> None:
    problem = wait_for_health(url, proc, UI_START_S)
    detail = proc.stderr.read()[-2000:] if proc.poll() is not None else ""
    assert problem is None, f"evonas ui {problem}: {detail}"


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def ui(run_dir):
    """`evonas ui RUN --port P` running; stopped with SIGTERM as a service manager would."""
    port = _free_port()
    command = [sys.executable, "-m", "evonas", "ui", str(run_dir), "--port", str(port)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_health(url, proc)
        yield url, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    # evonas ui stopped its server (a session of its own) before exiting.
    assert proc.returncode == 0 and _port_closed(port), proc.stderr.read()[-2000:]


def _search_row(page, name: str):
    return page.locator("[role=row]", has_text=name).first


@pytest.mark.slow
def test_mlflow_ui_shows_every_candidate(browser, run_dir, ui):
    from mlflow.tracking import MlflowClient

    url, proc = ui
    # What `evonas ui` prints: the address, then the experiment's runs page.
    printed = proc.stdout.readline() + proc.stdout.readline()
    assert f"MLflow UI: {url} (Ctrl-C to stop)" in printed
    runs_page = re.search(r"candidates: (\S+)", printed).group(1)

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    candidates = {r.data.tags["evonas.candidate_id"]: r for r in client.search_runs(
        [client.get_experiment_by_name("evonas").experiment_id],
        filter_string="tags.`evonas.kind` = 'candidate'")}
    assert len(candidates) == len(ROWS)

    page = browser.new_page()
    console = Console(page, allowed=MLFLOW_OWN_ERRORS)
    try:
        page.goto(runs_page)
        _search_row(page, run_dir.name).wait_for()
        _close_assistant(page)

        # The README's filter: the candidates the stability test rejected (c9 alone).
        _filter(page, "tags.`evonas.reject_stage` = 'stability'")
        unstable = candidates["c9"].info.run_name
        _unfold(page, run_dir.name, unstable)
        _wait_for_rows(page, 2)
        assert _names_shown(page) == {run_dir.name, unstable}
        _screenshot(page, "mlflow-filtered.png")

        _filter(page, "")
        names = {r.info.run_name for r in candidates.values()}
        _unfold(page, run_dir.name, candidates["c1"].info.run_name)
        _wait_for_rows(page, 1 + len(ROWS))
        assert _names_shown(page) == {run_dir.name} | names
        _screenshot(page, "mlflow-runs.png")

        # A rejected candidate's page: its verdict as tags, its costs as metrics.
        rejected = candidates["c9"]
        page.goto(f"{url}/#/experiments/{rejected.info.experiment_id}/runs/{rejected.info.run_id}")
        for text in ("evonas.status", "evonas.reject_reason", "gradient norm 3.7e+10",
                     "cost.stability_s"):
            page.get_by_text(text).first.wait_for()
        _screenshot(page, "mlflow-candidate.png", full_page=True)

        # A survivor's artifacts: its graph as a picture, served from the run folder.
        best = candidates["c4"]
        run_page = f"{url}/#/experiments/{best.info.experiment_id}/runs/{best.info.run_id}"
        page.goto(run_page)
        page.get_by_text("fitness.mobilenetv2").first.wait_for()
        page.goto(run_page + "/artifacts")
        for name in ("formula.txt", "formula.tex", "genome.json", "layer.py"):
            page.get_by_text(name, exact=True).first.wait_for()
        page.get_by_text("graph.png", exact=True).first.click()
        page.wait_for_function("() => Array.from(document.images)"
                               ".some(i => i.src.startsWith('blob:') && i.naturalWidth > 100)")
        _screenshot(page, "mlflow-artifacts.png")
        # formula.txt's preview repeats the formula the run is named by.
        page.get_by_text("formula.txt", exact=True).first.click()
        page.wait_for_function("f => document.body.innerText.split(f).length > 2",
                               arg=best.info.run_name)
    finally:
        page.close()
    assert console.errors == []


def _filter(page, query: str) -> None:
    """Type a query into the runs page's search box, as the README tells users to, and
    wait for the runs it asks the server for."""
    box = page.locator("input[data-testid='search-box']").first
    box.fill(query)
    with page.expect_response(lambda r: "/mlflow/runs/search" in r.url):
        box.press("Enter")


def _wait_for_rows(page, n: int) -> None:
    """Until the runs table draws n run rows (the search's and its candidates)."""
    page.wait_for_function("([cells, n]) => document.querySelectorAll(cells).length == n + 1",
                           arg=[NAME_CELLS, n])  # + the header row


def _unfold(page, parent: str, child: str) -> None:
    """Candidates are nested under the search's run, folded at first: unfold it unless
    `child` shows already (the UI keeps a run unfolded across filters)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    row = page.locator("[role=row]", has_text=child).first
    try:
        row.wait_for(timeout=3000)
    except PlaywrightTimeout:  # still folded
        _search_row(page, parent).locator("[col-id='attributes.`Run Name`'] button").first.click()
        row.wait_for()


def _names_shown(page) -> set[str]:
    cells = page.locator(NAME_CELLS).all_inner_texts()
    # A cell reads "#rrggbb\n<run name>": the colour chip's label, then the name.
    return {line for cell in cells[1:] for line in cell.splitlines()[1:]}


def _close_assistant(page) -> None:
    """MLflow 3.17 opens its "Assistant" side panel on first visit; close it so the runs
    table has the room (the screenshot is for people). Other versions may lack it: fine."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    close = page.locator("button[data-component-id='mlflow.assistant.chat_panel.close']").first
    try:
        close.click(timeout=5000)
    except PlaywrightTimeout:
        pass
