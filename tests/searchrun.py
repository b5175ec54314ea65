"""What the tests of `evonas search` share: tiny proxy flags, the CLI as a subprocess,
and readers of a run folder's state and its MLflow store."""

import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

# Tiny proxies: a candidate costs about a second on one CPU thread.
TINY = ["--dataset", "synthetic", "--archs", "resnet", "--proxy-steps", "12",
        "--quality-steps", "6", "--quality-threshold", "0.05", "--proxy-batch", "32",
        "--proxy-width", "8", "--stability-steps", "2", "--population", "4", "--tournament", "2"]


def evonas(*args, check=True, timeout=600):
    out = subprocess.run([sys.executable, "-m", "evonas", *map(str, args)], capture_output=True,
                         text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def state(run: Path) -> dict:
    """state.json with the journal's records, as the first format held them."""
    from evonas.search.runfolder import RunFolder
    from evonas.search.state import read

    raw, finished = read(RunFolder.open(run, lock=False))
    return {**raw, "candidates": {k: c.to_dict() for k, c in finished.candidates.items()},
            "evaluations": {k: e.to_dict() for k, e in finished.evaluations.items()}}


def child_runs(run: Path, parent: str, where: str = ""):
    # A client of its own: mlflow.set_tracking_uri would leak into later tests.
    client = MlflowClient(f"sqlite:///{run.resolve()}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    query = f"tags.mlflow.parentRunId = '{parent}'" + (f" and {where}" if where else "")
    return client.search_runs(experiments, filter_string=query, max_results=10000)


def candidate_ids(runs) -> list[str]:
    return [r.data.tags["evonas.candidate_id"] for r in runs]
