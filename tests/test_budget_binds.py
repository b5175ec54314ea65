"""Budgets that bind: a device budget the work could never spend is refused before any
file is written, and a task that holds a GPU share but finds no CUDA fails loudly instead
of running on the CPU (where a gpu-h budget would never be charged and never run out).

The CLI cases run the real `evonas search` command from an empty folder, in a process of
its own with a time limit: a budget that does not bind runs until killed. The GPU cases
need a machine without CUDA, which is what CI and this project's CPU machines are, and
are skipped on a GPU machine.
"""

import os
import re
import subprocess
import sys

import pytest
import torch

NO_GPU = pytest.mark.skipif(torch.cuda.device_count() > 0, reason="needs a machine without CUDA")
TINY = ["--dataset", "synthetic", "--archs", "resnet", "--proxy-steps", "12",
        "--quality-steps", "6", "--proxy-batch", "32", "--proxy-width", "8",
        "--stability-steps", "2", "--population", "4", "--tournament", "2"]
LOUD = re.compile(r"asked for 0\.25 GPU but CUDA is not available on [^:\s]+:\d+")


def refused(tmp_path, *flags: str) -> str:
    """Run `evonas search FLAGS --out run` in tmp_path, on no cluster from the
    environment; assert exit 2 and nothing written; return the line it printed."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "evonas", "search", *flags, "--out", "run"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "run").exists() and os.listdir(tmp_path) == []
    return done.stderr


@pytest.mark.parametrize("flags, fix", [
    # CPU evaluations are charged CPU time: "spent 0 gpu-h" until killed, before.
    (["--budget", "0.0005gpu-h", "--workers", "0"],
     "a gpu-h budget needs evaluations that hold a GPU: pass --gpus-per-eval 0.25"),
    (["--budget", "0.0005gpu-h", "--workers", "0", "--gpus-per-eval", "0.25"],
     "never spent with --workers 0"),
    (["--budget", "1cpu-h", "--gpus-per-eval", "0.25"],
     "a cpu-h budget is never spent by evaluations that hold a GPU"),
])
def test_a_device_budget_the_evaluations_never_spend_is_refused(tmp_path, flags, fix):
    err = refused(tmp_path, *flags, *TINY)
    assert fix in err and ("cpu-h or wall time" in err or "budget in gpu-h" in err), err


@NO_GPU
def test_a_gpu_budget_on_a_machine_without_gpu_is_refused(tmp_path):
    err = refused(tmp_path, "--budget", "1gpu-h", "--gpus-per-eval", "0.25",
                  "--workers", "1", *TINY)
    assert "a gpu-h budget needs a GPU but this machine has none" in err
    assert "--ray-address" in err and "cpu-h or wall time" in err


@NO_GPU
def test_the_first_command_of_the_readme_with_a_gpu_budget_stops_at_once(tmp_path):
    err = refused(tmp_path, "--space", "norm_act", "--budget", "200gpu-h")
    assert "--gpus-per-eval 0.25" in err


@NO_GPU
def test_a_resume_with_a_gpu_budget_on_a_machine_without_gpu_is_refused(tmp_path):
    """--resume RUN --budget 1gpu-h of a CPU search: refused before anything is written,
    where before the new budget replaced the old one and the search ran on uncharged."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    made = subprocess.run([sys.executable, "-m", "evonas", "search", *TINY, "--budget", "1evals",
                           "--workers", "0", "--out", "run"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()
              and p.suffix == ".json"}
    done = subprocess.run([sys.executable, "-m", "evonas", "search", "--resume", "run",
                           "--budget", "1gpu-h"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and "gpu-h" in done.stderr, done.stderr
    assert {p: p.read_bytes() for p in before} == before


def test_cpu_and_wall_budgets_still_pass_the_check(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    from evonas.search.config import SearchConfig

    for budget in ("0.01cpu-h", "45m", "5evals"):
        SearchConfig(budget=budget, dataset="synthetic", workers=0).validate_parts()


# --- a GPU share without CUDA fails the task -------------------------------------------


def evaluation(gpus_per_eval: float) -> dict:
    from evonas.layers import zoo
    from evonas.search.config import SearchConfig, StageConfig
    from evonas.search.records import Candidate

    config = SearchConfig(space="norm_act_s", budget="1evals", dataset="synthetic",
                          archs=("resnet",), proxy_steps=4, proxy_batch_size=16, proxy_width=4,
                          workers=0, gpus_per_eval=gpus_per_eval,
                          stages=StageConfig(stability_steps=1, quality_steps=2))
    return {"candidate": Candidate("c000001", zoo.get("bn_relu").to_dict(), None,
                                   "random").to_dict(), "config": config.to_dict()}


@NO_GPU
def test_an_evaluation_holding_a_gpu_share_without_cuda_comes_back_failed():
    from evonas.runtime.backends import InlineBackend
    from evonas.search.evaluate import evaluate_candidate

    with InlineBackend() as inline:
        inline.submit("gpu", evaluate_candidate, evaluation(0.25))
        (outcome,) = inline.wait()
        inline.submit("cpu", evaluate_candidate, evaluation(0))
        (on_cpu,) = inline.wait()
    assert not outcome.ok and LOUD.search(outcome.error), outcome.error
    assert outcome.error.startswith("RuntimeError: ")
    assert on_cpu.ok and on_cpu.value["device"] == "cpu"


@NO_GPU
def test_a_ray_worker_holding_a_gpu_share_without_cuda_fails_the_task():
    """run_task as a Ray worker runs it (threads capped, a GPU share held), on a task that
    would happily run on the CPU: the worker refuses it before it starts."""
    from evonas.runtime.backends import probe, run_task

    threads = torch.get_num_threads()
    try:
        result = run_task(probe, {}, 1, 0.25)
    finally:
        torch.set_num_threads(threads)
    assert not result["ok"] and LOUD.search(result["error"]), result


@NO_GPU
def test_a_trial_holding_a_gpu_share_without_cuda_fails():
    from evonas.fulltrain.config import FullTrainConfig
    from evonas.fulltrain.trainable import TrialSpec, run_trial
    from evonas.layers import zoo

    settings = FullTrainConfig(top=0, baselines=("bn_relu",), archs=("resnet20",),
                               dataset="synthetic", epochs=None, steps=2, width=4,
                               gpus_per_trial=0.5)
    spec = TrialSpec("bn_relu", {"genome": zoo.get("bn_relu").to_dict(), "zoo": "bn_relu",
                                 "groups": 2}, "resnet20", 8, 0, 0.1, 5e-4, settings)
    with pytest.raises(RuntimeError, match=r"asked for 0\.5 GPU but CUDA is not available on"):
        run_trial(spec, reporter=None)


# --- the embedded Ray of both stages keeps token authentication ----------------------------


def test_the_search_backend_refuses_to_start_ray_without_tokens(tmp_path):
    code = "from evonas.runtime.backends import RayBackend\nRayBackend(workers=1).start()"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=dict(env, RAY_AUTH_MODE="disabled"))
    assert done.returncode == 1
    assert ("EvonasError: RAY_AUTH_MODE=disabled would start Ray without token "
            "authentication") in done.stderr
