"""Shared test settings, and the search run every full-training test file starts from.

Tests run on small tensors, where one thread is fastest and keeps parallel CI jobs from
fighting over cores (two 2-thread torch processes on 2 cores run 4x slower than one).
"""

import shutil
import subprocess
import sys

import pytest
import torch
from fulltrainrun import SEARCH, one_thread_env

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def search_run(tmp_path_factory):
    """A finished six-candidate search on synthetic data, for full-training stages."""
    out = tmp_path_factory.mktemp("search") / "s"
    done = subprocess.run([sys.executable, "-m", "evonas", "search", *SEARCH, "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=one_thread_env())
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture
def run_copy(search_run, tmp_path):
    """A test's own copy of search_run, without its lock or any stage."""
    dest = tmp_path / "run"
    shutil.copytree(search_run, dest, ignore=shutil.ignore_patterns("lock", "fulltrain"))
    return dest
