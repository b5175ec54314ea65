"""Browsing commands: `evonas ui RUN` (the MLflow UI on a run's store) and `evonas report
RUN` (the one-file HTML report, evonas/report.py).

`ui` runs `mlflow server` as a child process bound to 127.0.0.1, on the run folder's
SQLite store, with artifacts served from the run folder, prints the address once the
server answers, and stops the server on Ctrl-C or SIGTERM. A search logged to a tracking
server (`--tracking-uri`) already has its UI there: `ui` prints that address instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from evonas.errors import EvonasError

DEFAULT_PORT = 5000
HOST = "127.0.0.1"
# mlflow server starts in seconds, but on a busy machine its first import can take a minute.
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="MLflow UI on a search's run folder (every candidate)",
                       description="Start the MLflow UI on the run folder's store, bound to "
                       f"{HOST}, until Ctrl-C.")
    p.add_argument("run_dir", metavar="RUN", help="run folder")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port to listen on (default {DEFAULT_PORT})")
    p.set_defaults(run=run_ui, command="ui")

    p = sub.add_parser("report", help="one-file HTML report of a search (opens offline)",
                       description="Write the search's report: Pareto front, progress, "
                       "rejection funnel, top layers, lineage of the best, full training.")
    p.add_argument("run_dir", metavar="RUN", help="run folder")
    p.add_argument("--out", help="HTML file to write (default: RUN/report.html)")
    p.add_argument("--compare", metavar="RUN2",
                   help="a second run folder (e.g. --controller random) for the progress plot")
    p.add_argument("-n", type=int, default=10, help="how many top layers (default 10)")
    p.set_defaults(run=run_report, command="report")


# --- report -------------------------------------------------------------------------------


def run_report(args) -> int:
    from evonas.search import report

    from evonas.search.runfolder import RunFolder

    if args.n < 1:
        raise EvonasError(f"-n {args.n}: show at least one layer")
    for path in filter(None, (args.run_dir, args.compare)):
        RunFolder.open(path, lock=False)  # one line naming the path when it is no run
    out = Path(args.out) if args.out else Path(args.run_dir) / report.REPORT_FILE
    if not out.parent.is_dir():
        raise EvonasError(f"--out {out}: folder {out.parent} does not exist; create it first")
    path = report.write(args.run_dir, out, compare=args.compare, top_n=args.n)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB); open it in any browser")
    return 0


# --- ui -----------------------------------------------------------------------------------


def run_ui(args) -> int:
    from evonas.search.runfolder import RunFolder
    from evonas.search.config import SearchConfig

    folder = RunFolder.open(args.run_dir, lock=False)
    config = SearchConfig.from_dict(folder.read_config())
    if config.tracking_uri:
        print(f"MLflow UI: {config.tracking_uri} (this search logs to that tracking server)")
        return 0
    if not folder.mlflow_db_path.is_file():
        raise EvonasError(f"{folder.path}: no MLflow store yet ({folder.mlflow_db_path.name} "
                          f"missing); it appears once the search has started")
    _check_port(args.port)
    url = f"http://{HOST}:{args.port}"
    with tempfile.TemporaryFile(prefix="evonas-ui-") as log:
        server = _start_server(folder, args.port, log)
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            _wait_until_up(url, server, log)
            print(f"MLflow UI: {url} (Ctrl-C to stop)", flush=True)
            experiment = _experiment_id(folder.tracking_uri)
            if experiment is not None:
                print(f"candidates: {url}/#/experiments/{experiment}/runs", flush=True)
            code = server.wait()
            raise EvonasError(f"mlflow server stopped by itself (exit status {code}): "
                              f"{_last_line(log)}")
        except KeyboardInterrupt:
            return 0
        finally:
            signal.signal(signal.SIGTERM, previous)
            _stop(server)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise EvonasError(f"--port {port}: use a port between 1 and 65535")
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            raise EvonasError(f"port {port} on {HOST} is in use; choose another with "
                              f"--port") from None


def _server_command(folder, port: int) -> list[str]:
    # `mlflow server`, of which `mlflow ui` is an alias in MLflow 3. One worker: a single
    # user browses, and the store is one SQLite file. Artifacts: the run folder's
    # experiment records a file:// location (artifacts/mlflow), which the server reads
    # directly; --artifacts-destination keeps anything new there too, not in ./mlartifacts.
    artifacts = (folder.artifacts_dir / "mlflow").as_uri()
    return [sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", folder.tracking_uri,
            "--artifacts-destination", artifacts,
            "--host", HOST, "--port", str(port), "--workers", "1"]


def _start_server(folder, port: int, log) -> subprocess.Popen:
    # The job runner (huey consumers) serves MLflow's GenAI features, of no use here, and
    # telemetry would try the network; setdefault keeps a user's own choice.
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # A session of its own, so that stopping it reaches the uvicorn worker it starts.
    return subprocess.Popen(_server_command(folder, port), cwd=folder.path, env=env,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for_health(url: str, server: subprocess.Popen, timeout: float) -> str | None:
    """None once the MLflow server at url answers /health; else why not, in a few words
    (it exited, or it did not answer within timeout seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            return f"exited (status {server.returncode}) before answering"
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return None
        except OSError:
            pass
        time.sleep(0.5)
    return f"not answering at {url} after {timeout:.0f} s"


def _wait_until_up(url: str, server: subprocess.Popen, log) -> None:
    problem = wait_for_health(url, server, START_TIMEOUT_S)
    if problem is not None:
        raise EvonasError(f"mlflow server {problem}: {_last_line(log)}")


def _experiment_id(tracking_uri: str) -> str | None:
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name("evonas")
    return exp.experiment_id if exp is not None else None


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's session (its uvicorn worker included), SIGKILL if it
    lingers; then whatever of the session outlived its leader."""
    for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, STOP_TIMEOUT_S)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            break
        try:
            server.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _last_line(log) -> str:
    log.seek(0)
    lines = [line for line in log.read().decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"
