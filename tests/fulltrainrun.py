"""What the tests of full training share: the small search that feeds their stages (run
once per test module by conftest's search_run), tiny stage settings, one thread per
process."""

import os

from searchrun import TINY as TINY_PROXY

# The search tests' tiny proxies: a candidate costs about a second on one CPU thread.
SEARCH = ["--space", "norm_act_s", "--budget", "6evals", "--workers", "0", *TINY_PROXY]
# Two layers (the search's best and a zoo baseline), ResNet-20 at width 4, a few steps.
TINY = dict(top=1, baselines=("bn_relu",), archs=("resnet20",), dataset="synthetic",
            epochs=None, steps=4, reports=2, width=4, workers=2)


def one_thread_env():
    # One thread per process: this machine's two cores are shared, and two 2-thread torch
    # processes on two cores run 4x slower than one.
    return {**os.environ, "OMP_NUM_THREADS": "1"}
