"""The worker backends against a real Ray: results, failures as outcomes, time limits,
shutdown, and a separate `ray start` head with token authentication.

One embedded RayBackend (2 CPUs, no dashboard, small object store) serves the module;
tests that need other settings open a second backend on the same connection. The
remote-cluster tests share one `ray start` head and run their drivers in subprocesses:
one process holds one Ray connection, and a fresh environment shows that the backend
itself passes the token on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from evonas.runtime.backends import InlineBackend, Outcome, RayBackend, probe
from evonas.errors import EvonasError

pytestmark = pytest.mark.slow

TESTS = str(Path(__file__).resolve().parent)
# The tasks below live in this module: workers import it by name, so they need its folder.
WORKER_ENV = {"PYTHONPATH": TESTS}


# -- tasks (module-level: workers import them)

def echo(payload: dict) -> dict:
    import torch

    return {"x": payload["x"], "threads": torch.get_num_threads()}


def explode(payload: dict) -> dict:
    raise ValueError("bad layer\nsecond line")


def die(payload: dict) -> dict:
    os._exit(1)


def nap(payload: dict) -> dict:
    time.sleep(payload["s"])
    return {}


def not_json(payload: dict) -> dict:
    return {"value": object()}


# -- helpers

def collect(backend, n: int, within: float = 60.0) -> list[Outcome]:
    """Wait until n outcomes came back (or fail after `within` seconds)."""
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + within
    while len(outcomes) < n and time.monotonic() < deadline:
        outcomes += backend.wait(timeout=deadline - time.monotonic())
    assert len(outcomes) == n, f"{len(outcomes)} of {n} outcomes after {within}s"
    return outcomes


def run_one(backend, task_id: str, fn, payload: dict) -> Outcome:
    backend.submit(task_id, fn, payload)
    (outcome,) = collect(backend, 1)
    assert outcome.task_id == task_id
    return outcome


def cluster_cpus_free(want: float, within: float = 15.0) -> bool:
    import ray

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= want:
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def backend():
    started = time.perf_counter()
    ray_backend = RayBackend(workers=2, env=WORKER_ENV)
    ray_backend.start()
    print(f"\nembedded ray.init: {time.perf_counter() - started:.2f}s")
    yield ray_backend
    ray_backend.shutdown()


# -- RayBackend

def test_six_tasks_come_back_once_each_with_their_worker(backend):
    assert backend.free_slots() == 2
    outcomes, submitted = [], 0
    while len(outcomes) < 6:
        while backend.free_slots() > 0 and submitted < 6:
            backend.submit(f"t{submitted}", echo, {"x": submitted})
            submitted += 1
        outcomes += backend.wait(timeout=60)
    assert sorted(o.task_id for o in outcomes) == [f"t{i}" for i in range(6)]
    for o in outcomes:
        assert o.ok and o.error is None
        assert o.value == {"x": int(o.task_id[1:]), "threads": 1}  # cpus_per_eval=1
        host, pid = o.worker.rsplit(":", 1)
        assert host and int(pid) != os.getpid() and o.seconds >= 0
    assert backend.free_slots() == 2


def test_a_raising_task_is_an_outcome_with_its_reason(backend):
    outcome = run_one(backend, "boom", explode, {})
    assert not outcome.ok and outcome.value is None
    assert outcome.error == "ValueError: bad layer"
    assert outcome.worker
    assert run_one(backend, "after-boom", echo, {"x": 1}).ok


def test_a_result_that_is_not_json_fails_the_task(backend):
    outcome = run_one(backend, "obj", not_json, {})
    assert not outcome.ok and outcome.error.startswith("TypeError: evaluation returned a value")


def test_a_dead_worker_is_reported_and_later_tasks_run(backend):
    outcome = run_one(backend, "exit", die, {})
    assert not outcome.ok and outcome.error.startswith("worker died: ")
    assert "\n" not in outcome.error
    for i in range(2):  # max_retries=0: the dead task is not re-run behind our back
        backend.submit(f"after-exit-{i}", echo, {"x": i})
    assert all(o.ok for o in collect(backend, 2))


def test_a_task_past_its_time_limit_is_cancelled_and_frees_its_slot(backend):
    limited = RayBackend(workers=1, time_limit_s=2, env=WORKER_ENV)  # shares the module's connection
    limited.start()
    try:
        limited.submit("slow", nap, {"s": 30})
        started = time.monotonic()
        (outcome,) = collect(limited, 1, within=15)
        assert time.monotonic() - started < 6
        assert not outcome.ok and outcome.error == "time limit 2s exceeded"
        assert 2 <= outcome.seconds < 6
        assert limited.free_slots() == 1
        assert cluster_cpus_free(2)  # the worker was killed, its CPU returned
    finally:
        limited.shutdown()
    assert run_one(backend, "after-limit", echo, {"x": 2}).ok


def test_shutdown_with_tasks_in_flight_returns_promptly(backend):
    other = RayBackend(workers=2, env=WORKER_ENV)  # shares the module's connection, which stays open
    other.start()
    for i in range(2):
        other.submit(f"nap{i}", nap, {"s": 60})
    time.sleep(1)
    started = time.perf_counter()
    other.shutdown()
    assert time.perf_counter() - started < 3
    assert other.free_slots() == 0 and other.wait(0) == []
    assert cluster_cpus_free(2)
    assert run_one(backend, "after-shutdown", echo, {"x": 3}).ok


def test_wait_with_nothing_in_flight_returns_at_once(backend):
    started = time.perf_counter()
    assert backend.wait(timeout=None) == []
    assert time.perf_counter() - started < 0.5


def test_resources_summary(backend):
    summary = backend.resources_summary()
    assert summary["cpus_total"] == 2 and summary["gpus_total"] == 0
    assert 0 <= summary["cpus_available"] <= 2


def test_per_task_overhead(backend):
    """Submit -> outcome of a no-op task, median of 20: how many workers a driver feeds."""
    run_one(backend, "warm", probe, {})
    times = []
    for i in range(20):
        started = time.perf_counter()
        assert run_one(backend, f"probe{i}", probe, {"i": i}).ok
        times.append(time.perf_counter() - started)
    median = statistics.median(times)
    print(f"\nno-op task submit->outcome: median {median * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms")
    assert median < 0.5


@pytest.mark.parametrize("share", [0.3, 0.7, 1.5, -1])
def test_gpu_share_that_does_not_split_evenly_is_rejected_in_one_line(share):
    with pytest.raises(EvonasError) as err:
        RayBackend(workers=4, gpus_per_eval=share)
    assert "\n" not in str(err.value) and f"{share:g}" in str(err.value)


def test_gpu_shares_that_split_evenly_are_accepted():
    for share in (0, 0.5, 0.25, 1 / 3, 0.125, 1, 2):
        RayBackend(workers=1, gpus_per_eval=share)


# -- InlineBackend

def test_inline_backend_has_the_same_outcomes():
    with InlineBackend() as inline:
        assert inline.free_slots() == 1
        inline.submit("a", echo, {"x": 5})
        assert inline.free_slots() == 0
        (ok,) = inline.wait()
        inline.submit("b", explode, {})
        (failed,) = inline.wait()
    assert ok.ok and ok.value["x"] == 5 and ok.worker.endswith(f":{os.getpid()}")
    assert not failed.ok and failed.error == "ValueError: bad layer"


def test_inline_backend_reports_a_time_limit_overshoot():
    inline = InlineBackend(time_limit_s=0.05)
    inline.submit("slow", nap, {"s": 0.2})
    (outcome,) = inline.wait()
    assert not outcome.ok and outcome.error.startswith("time limit 0.05s exceeded")


# Before the `ray start` head below comes up: it is a child of this process too, and
# listens on every interface, as a cluster serving other machines must.
def test_the_embedded_ray_listens_on_loopback_only(backend):
    from sockets import descendants, is_loopback, listening_addresses

    listening = listening_addresses(descendants(os.getpid()))
    assert listening and all(is_loopback(a) for a in listening), listening


# -- a separate Ray head (`ray start`), token authentication on

DRIVER = """
import json, sys, time
sys.path.insert(0, {tests!r})
from evonas.runtime.backends import RayBackend, probe
from test_engine import nap
backend = RayBackend(address={address!r}, workers=1, env={{"PYTHONPATH": {tests!r}}})
started = time.perf_counter()
backend.start()
init = time.perf_counter() - started
backend.submit("probe", probe, {{"hello": 1}})
outcomes = backend.wait(timeout=60)
backend.submit("nap", nap, {{"s": 60}})
time.sleep(1)
started = time.perf_counter()
backend.shutdown()
print(json.dumps({{"outcomes": [o.to_dict() for o in outcomes], "init": init,
                  "shutdown": time.perf_counter() - started}}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(home: str) -> dict[str, str]:
    """This environment without Ray's address and auth settings, with its own HOME:
    the real ~/.ray/auth_token stays out of the test."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    return dict(env, HOME=home)


def start_head(port: int, root: str, env: dict[str, str]) -> subprocess.Popen:
    ray_cli = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={root}/ray", "--object-store-memory=100000000"],
        env=env, stdout=open(f"{root}/head.log", "w"), stderr=subprocess.STDOUT,
        start_new_session=True)  # its own process group: stopped by id below
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and head.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return head
        except OSError:
            time.sleep(0.25)
    raise AssertionError(f"ray head did not come up: {Path(root, 'head.log').read_text()[-2000:]}")


def stop_head(head: subprocess.Popen) -> None:
    """Stop this head only. `ray stop --force` would kill every Ray on the machine,
    the module's embedded cluster and other users' included; `ray start --block`
    tears down its own processes on SIGTERM."""
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)  # anything of this head's group still there
    except ProcessLookupError:
        pass
    head.wait()


def test_an_address_where_nothing_listens_fails_at_once():
    # Ray itself retries such an address for about 14 minutes.
    code = ("from evonas.runtime.backends import RayBackend\n"
            f"RayBackend(address='127.0.0.1:{free_port()}', workers=1).start()")
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=clean_env(os.environ.get("HOME", "/tmp")))
    assert time.monotonic() - started < 30
    assert run.returncode == 1
    assert "EvonasError: nothing answers at Ray address 127.0.0.1:" in run.stderr


@pytest.fixture(scope="module")
def token_head():
    """A `ray start` head of one CPU and no GPU, token authentication on: (address, token,
    root folder)."""
    root = tempfile.mkdtemp(prefix="evx", dir="/tmp")  # short: Ray's socket paths must fit
    token = os.urandom(16).hex()
    port = free_port()
    head = start_head(port, root, dict(clean_env(root), RAY_AUTH_MODE="token",
                                       RAY_AUTH_TOKEN=token))
    try:
        yield f"127.0.0.1:{port}", token, root
    finally:
        stop_head(head)
        shutil.rmtree(root, ignore_errors=True)


def test_remote_cluster_with_token_authentication(backend, token_head):
    address, token, root = token_head
    # The driver has the token but not RAY_AUTH_MODE: Ray alone would not send it
    # to an explicit address and the connection would be refused.
    driver = subprocess.run(
        [sys.executable, "-c", DRIVER.format(tests=TESTS, address=address)],
        env=dict(clean_env(root), RAY_AUTH_TOKEN=token), cwd=root,
        capture_output=True, text=True, timeout=180)
    assert driver.returncode == 0, driver.stderr[-3000:]
    report = json.loads(driver.stdout.strip().splitlines()[-1])
    print(f"\nremote connect: {report['init']:.2f}s, shutdown with a task in flight: "
          f"{report['shutdown']:.2f}s")
    (outcome,) = report["outcomes"]
    assert outcome["ok"] and outcome["value"]["echo"] == {"hello": 1}
    assert outcome["value"]["torch_threads"] == 1
    assert report["shutdown"] < 5


GPU_BUDGET_DRIVER = """
from evonas.search.config import SearchConfig
from evonas.search.driver import make_backend
config = SearchConfig(budget="1gpu-h", gpus_per_eval=0.25, workers=1, ray_address={address!r})
make_backend(config).start()
"""


def test_a_gpu_budget_refuses_a_cluster_without_gpus_when_it_connects(token_head):
    """Its GPUs are unknown before connecting; a search on it would wait for ever."""
    address, token, root = token_head
    driver = subprocess.run(
        [sys.executable, "-c", GPU_BUDGET_DRIVER.format(address=address)],
        env=dict(clean_env(root), RAY_AUTH_TOKEN=token), cwd=root,
        capture_output=True, text=True, timeout=180)
    assert driver.returncode == 1, driver.stderr[-3000:]
    assert ("EvonasError: a gpu-h budget needs a GPU but the Ray cluster has none"
            in driver.stderr), driver.stderr[-3000:]
