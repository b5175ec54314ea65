"""Where evaluations run: the worker backends the search driver submits tasks to.

The controller (evolution.py) asks for candidates; the driver turns each into an
evaluation task (evaluate.py's module-level function and a JSON payload) and hands it to
a Backend here. The driver keeps up to `free_slots()` tasks in flight and tells the
controller about whatever finishes first (asynchronous ask/tell). A backend turns every
failure into data: an exception in the evaluation, a worker process that died, a task
past its time limit all come back as an Outcome with ok=False and a one-line reason, and
the backend stays usable for the next task. The driver turns outcomes into Evaluations
(records.py), a failed outcome into status FAILED.

Backends:
    RayBackend     evaluations as Ray tasks, on an embedded local Ray (the default) or an
                   existing cluster (address=, or RAY_ADDRESS)
    InlineBackend  evaluations in this process, one at a time, for debugging a layer
                   without Ray (`--workers 0`)

Call order (every Backend):
    start()
    submit(task_id, fn, payload)   any number of times while free_slots() > 0
    wait(timeout) -> [Outcome]     each finished task once, in completion order
    ... more submit / wait ...
    shutdown()                     cancels what is still in flight

`fn` is a module-level function `fn(payload: dict) -> dict`, importable on the workers
(evonas is installed on every worker), and both payload and result are JSON-safe dicts.
Ray is imported only when a RayBackend starts, so `import evonas` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from evonas.errors import EvonasError

EvalFn = Callable[[dict], dict]

# Reasons are shown in one line of the progress display and stored in the run folder.
_REASON_CHARS = 300
# Payloads and results are small JSON dicts; Ray's default object store (30% of RAM)
# would reserve shared memory that evaluations never use, on machines shared by many.
_OBJECT_STORE_BYTES = 200 * 1024**2
# The search's progress display owns the console: no worker output or Ray INFO lines on
# the driver. Worker errors still come back, in the outcomes.
_QUIET = {"log_to_driver": False, "logging_level": "ERROR"}
# Where `ray get-auth-token --generate` and a token-enabled ray.init() keep the token.
_DEFAULT_TOKEN_FILE = Path.home() / ".ray" / "auth_token"


@dataclass(frozen=True)
class Outcome:
    """What became of one submitted task.

    value: fn's return (a JSON-safe dict) when ok; error: a one-line reason otherwise
        ("ValueError: ...", "worker died: ...", "time limit 30s exceeded").
    seconds: the run time the worker measured around fn; for a worker that died or a
        task past its time limit, the driver's time from submit to detection.
    worker: "hostname:pid" of the process that ran fn; "" where it never reported.
    """

    task_id: str
    ok: bool
    value: dict | None = None
    error: str | None = None
    seconds: float = 0.0
    worker: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class Backend(ABC):
    """Runs evaluation tasks; see the module docstring for the call order."""

    def __enter__(self) -> "Backend":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @abstractmethod
    def start(self) -> None:
        """Connect to (or start) the workers. Raises EvonasError for a bad setup."""

    @abstractmethod
    def free_slots(self) -> int:
        """How many more tasks submit() accepts now."""

    @abstractmethod
    def submit(self, task_id: str, fn: EvalFn, payload: dict) -> None:
        """Start fn(payload) as task task_id; needs free_slots() > 0."""

    @abstractmethod
    def wait(self, timeout: float | None = None) -> list[Outcome]:
        """Block until a task finishes or `timeout` seconds pass (None: no limit, 0: poll);
        return every task that finished since the last call, each once, in completion
        order. Returns [] at once when nothing is in flight."""

    @abstractmethod
    def shutdown(self) -> None:
        """Cancel the tasks in flight and release the workers; safe to call twice."""

    @abstractmethod
    def resources_summary(self) -> dict[str, float]:
        """Total and available CPUs and GPUs: cpus_total, cpus_available, gpus_total,
        gpus_available."""


# ---------------------------------------------------------------------------- worker side


def run_task(fn: EvalFn, payload: dict, threads: int | None, gpu_share: float) -> dict:
    """Run one evaluation inside a worker and report it; never raises for fn's errors.

    Catching here rather than letting Ray wrap the exception keeps the reason one clean
    line and still tells the driver how long fn ran and where.
    """
    started = time.perf_counter()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    try:
        if threads is not None:
            _limit_worker(threads, gpu_share)
        value = fn(payload)
        _check_json_safe(value)
        result: dict[str, Any] = {"ok": True, "value": value}
    except (Exception, SystemExit) as err:  # sys.exit in a layer must not end the worker
        result = {"ok": False, "error": reason(err)}
    result.update(seconds=time.perf_counter() - started, worker=worker,
                  finished_at=time.time())
    return result


def _limit_worker(threads: int, gpu_share: float) -> None:
    """Keep a worker inside its share of the machine.

    Two 2-thread torch jobs on 2 cores run 4x slower than one alone (OpenMP threads spin
    against each other), so each worker uses as many threads as CPUs it holds. Ray's
    GPU fractions are logical only: a packed evaluation caps its own GPU memory.
    """
    import torch

    torch.set_num_threads(threads)
    if 0 < gpu_share < 1 and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(gpu_share)


def _check_json_safe(value: object) -> None:
    # Results go into the run folder's JSON state; a tensor or a numpy float slipping
    # through should fail this evaluation now, not the driver's next save.
    if not isinstance(value, dict):
        raise TypeError(f"evaluation returned {type(value).__name__}, expected a dict")
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise TypeError(f"evaluation returned a value that is not JSON-safe: {err}") from None


def probe(payload: dict) -> dict:
    """A no-op evaluation that reports where it ran: checks a cluster, measures the
    per-task overhead."""
    import torch

    return {"worker": f"{socket.gethostname()}:{os.getpid()}",
            "torch_threads": torch.get_num_threads(), "echo": payload}


def reason(err: BaseException) -> str:
    """One line for an exception: its type and the first line of its message, capped."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return _one_line(text)


def _one_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= _REASON_CHARS else line[: _REASON_CHARS - 3] + "..."


def _outcome(task_id: str, result: dict) -> Outcome:
    return Outcome(task_id, result["ok"], result.get("value"), result.get("error"),
                   result["seconds"], result["worker"])


# ---------------------------------------------------------------------------- inline


LOOPBACK = "127.0.0.1"
_SINGLE_MACHINE_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Start Ray's servers on 127.0.0.1 only (Ray binds every interface by default).

    Ray honours this only through its single-machine switch."""
    # Ray reads the switch into a module constant at import, and this process may have
    # imported Ray before (a search ran first): set both, for the start-up only, so that a
    # later connection to a real cluster from this process announces its real address.
    # The GCS, raylet and workers inherit the variable and keep to 127.0.0.1 too.
    from ray._private import ray_constants

    saved_env = os.environ.get(_SINGLE_MACHINE_VAR)
    saved_constant = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_MACHINE_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_env is None:
            os.environ.pop(_SINGLE_MACHINE_VAR, None)
        else:
            os.environ[_SINGLE_MACHINE_VAR] = saved_env


class InlineBackend(Backend):
    """Runs each evaluation in this process, at wait(), one at a time.

    For debugging a layer without Ray: same outcomes as RayBackend for a raising fn.
    A time limit cannot interrupt fn here; a run that overshoots it is still reported
    as "time limit Ns exceeded", so both backends judge a slow layer alike. The driver's
    torch thread count is left alone.
    """

    def __init__(self, time_limit_s: float | None = None):
        _check_time_limit(time_limit_s)
        self.time_limit_s = time_limit_s
        self._pending: list[tuple[str, EvalFn, dict]] = []

    def start(self) -> None:
        pass

    def free_slots(self) -> int:
        return 0 if self._pending else 1

    def submit(self, task_id: str, fn: EvalFn, payload: dict) -> None:
        _check_can_submit(self, task_id, [t for t, _, _ in self._pending])
        self._pending.append((task_id, fn, payload))

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        outcomes = []
        while self._pending:
            task_id, fn, payload = self._pending.pop(0)
            outcomes.append(self._overshoot(_outcome(task_id, run_task(fn, payload, None, 0))))
        return outcomes

    def _overshoot(self, outcome: Outcome) -> Outcome:
        if self.time_limit_s is None or outcome.seconds <= self.time_limit_s:
            return outcome
        error = f"{_limit_text(self.time_limit_s)} (took {outcome.seconds:.1f}s, not interrupted inline)"
        return Outcome(outcome.task_id, False, None, error, outcome.seconds, outcome.worker)

    def shutdown(self) -> None:
        self._pending.clear()

    def resources_summary(self) -> dict[str, float]:
        cpus = float(os.cpu_count() or 1)
        return {"cpus_total": cpus, "cpus_available": cpus, "gpus_total": 0.0,
                "gpus_available": 0.0}


# ---------------------------------------------------------------------------- Ray


@dataclass
class _Flight:
    task_id: str
    submitted: float  # time.monotonic() at submit


class RayBackend(Backend):
    """Evaluations as Ray tasks.

    address None and no RAY_ADDRESS: an embedded local Ray sized to the evaluations
    (workers * cpus_per_eval CPUs), without dashboard, shut down with the backend.
    address "auto", "host:port", "ray://host:port", or RAY_ADDRESS: connect to that
    cluster; shutdown() disconnects and leaves it running. A process already connected
    to Ray (ray.is_initialized()) keeps its connection: the backend uses it and leaves
    it open.

    Each task holds cpus_per_eval CPUs and gpus_per_eval GPUs (0.25: four evaluations
    share a GPU) and is never retried by Ray: a crashed evaluation is reported and the
    search decides. time_limit_s counts from submit, so it includes queueing and the
    start of a fresh worker (about 1-2 s); past it the task is force-cancelled. env:
    environment variables for the evaluation workers (Ray runtime_env env_vars).
    """

    def __init__(self, address: str | None = None, workers: int = 1,
                 cpus_per_eval: float = 1, gpus_per_eval: float = 0,
                 time_limit_s: float | None = None, env: dict[str, str] | None = None):
        _check_counts(workers, cpus_per_eval)
        _check_gpu_share(gpus_per_eval)
        _check_time_limit(time_limit_s)
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.workers = workers
        self.cpus_per_eval = cpus_per_eval
        self.gpus_per_eval = gpus_per_eval
        self.time_limit_s = time_limit_s
        self.env = dict(env or {})
        self._flights: dict[Any, _Flight] = {}  # ObjectRef -> flight
        self._task: Any = None  # the remote run_task, with this backend's options
        self._owns_ray = False
        self._started = False

    # -- lifecycle

    def start(self) -> None:
        if self._started:
            return
        import ray

        if not ray.is_initialized():
            self._connect(ray)
            self._owns_ray = True
        self._task = ray.remote(run_task).options(
            num_cpus=self.cpus_per_eval, num_gpus=self.gpus_per_eval, max_retries=0,
            # per task, not per job: also applies on a connection this backend reuses
            runtime_env={"env_vars": self.env} if self.env else None)
        self._started = True
        self._check_fits()

    def _connect(self, ray: Any) -> None:
        if self.address is None:
            self._start_local(ray)
        else:
            self._connect_remote(ray)

    def _start_local(self, ray: Any) -> None:
        # "local", not None: ray.init(None) would join a cluster that anyone on this
        # machine started with `ray start` (it reads /tmp/ray/ray_current_cluster).
        # Token authentication is Ray's default for local clusters since 2.59.
        with loopback_only():
            ray.init(address="local", _node_ip_address=LOOPBACK,
                     num_cpus=max(1, math.ceil(self.workers * self.cpus_per_eval)),
                     num_gpus=None if self.gpus_per_eval else 0,  # None: detect real GPUs
                     object_store_memory=_OBJECT_STORE_BYTES, include_dashboard=False, **_QUIET)

    def _connect_remote(self, ray: Any) -> None:
        _check_reachable(self.address)
        _pass_token_through()
        try:
            ray.init(address=self.address, **_QUIET)
        except Exception as err:  # Ray raises ConnectionError, RuntimeError, ...
            raise EvonasError(_connect_failure(self.address, err)) from err

    def shutdown(self) -> None:
        if not self._started:
            return
        import ray

        for ref in list(self._flights):
            _force_cancel(ray, ref)
        self._flights.clear()
        if self._owns_ray:
            ray.shutdown()
        self._started = self._owns_ray = False

    # -- tasks

    def free_slots(self) -> int:
        return self.workers - len(self._flights) if self._started else 0

    def submit(self, task_id: str, fn: EvalFn, payload: dict) -> None:
        if not self._started:
            raise RuntimeError("RayBackend.submit before start()")
        _check_can_submit(self, task_id, [f.task_id for f in self._flights.values()])
        threads = max(1, int(self.cpus_per_eval))
        ref = self._task.remote(fn, payload, threads, self.gpus_per_eval)
        self._flights[ref] = _Flight(task_id, time.monotonic())

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        if not self._flights:
            return []
        import ray

        refs = list(self._flights)
        ready, _ = ray.wait(refs, num_returns=1, timeout=self._wait_budget(timeout))
        if ready:  # collect everything else that is done too, without blocking
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        finished = sorted((self._collect(ray, ref) for ref in ready), key=lambda f: f[0])
        return [outcome for _, outcome in finished] + self._expire(ray)

    def _wait_budget(self, timeout: float | None) -> float | None:
        """Seconds ray.wait may block: the caller's timeout, cut at the next time limit."""
        if self.time_limit_s is None:
            return timeout
        first = min(f.submitted for f in self._flights.values())
        until_limit = max(0.0, first + self.time_limit_s - time.monotonic())
        return until_limit if timeout is None else min(timeout, until_limit)

    def _collect(self, ray: Any, ref: Any) -> tuple[float, Outcome]:
        """(finish time, outcome) of a finished task; Ray's errors become reasons."""
        flight = self._flights.pop(ref)
        try:
            result = ray.get(ref)
            return result["finished_at"], _outcome(flight.task_id, result)
        except ray.exceptions.RayError as err:
            seconds = time.monotonic() - flight.submitted
            return time.time(), Outcome(flight.task_id, False, None, _ray_reason(ray, err), seconds)

    def _expire(self, ray: Any) -> list[Outcome]:
        """Force-cancel the tasks past their time limit and report them."""
        if self.time_limit_s is None:
            return []
        now = time.monotonic()
        late = [r for r, f in self._flights.items() if now - f.submitted > self.time_limit_s]
        outcomes = []
        for ref in late:
            flight = self._flights.pop(ref)
            _force_cancel(ray, ref)  # kills the worker process, which frees its CPUs/GPU
            outcomes.append(Outcome(flight.task_id, False, None, _limit_text(self.time_limit_s),
                                    now - flight.submitted))
        return outcomes

    # -- cluster

    def resources_summary(self) -> dict[str, float]:
        import ray

        total, available = ray.cluster_resources(), ray.available_resources()
        return {"cpus_total": total.get("CPU", 0.0), "cpus_available": available.get("CPU", 0.0),
                "gpus_total": total.get("GPU", 0.0), "gpus_available": available.get("GPU", 0.0)}

    def _check_fits(self) -> None:
        """Fail when no evaluation could ever be scheduled, warn when fewer than
        `workers` can run at once. A remote cluster may still grow (autoscaler), so
        there only a warning."""
        have = self.resources_summary()
        for kind, need in (("cpus", self.cpus_per_eval), ("gpus", self.gpus_per_eval)):
            total = have[f"{kind}_total"]
            if need > total:
                message = (f"one evaluation needs {need:g} {kind[:-1].upper()}s but the Ray "
                           f"cluster has {total:g}: lower --{kind}-per-eval or add nodes")
                if self.address is None and self._owns_ray:
                    self.shutdown()
                    raise EvonasError(message)
                warnings.warn(message + " (waiting for the autoscaler)", RuntimeWarning, stacklevel=3)
            elif self.workers * need > total:
                warnings.warn(f"{self.workers} workers x {need:g} {kind[:-1].upper()}s exceed "
                              f"the cluster's {total:g}: at most {int(total // need)} "
                              f"evaluations will run at once", RuntimeWarning, stacklevel=3)


def _force_cancel(ray: Any, ref: Any) -> None:
    try:
        ray.cancel(ref, force=True)
    except Exception:
        pass  # finished meanwhile, or the cluster is already gone: nothing left to stop


# Errors that mean the process running the evaluation is gone, not that fn failed.
_DEATHS = ("WorkerCrashedError", "OutOfMemoryError", "NodeDiedError", "LocalRayletDiedError")


def _ray_reason(ray: Any, err: Exception) -> str:
    name = type(err).__name__
    if isinstance(err, ray.exceptions.WorkerCrashedError):
        return _one_line(f"worker died: {str(err).strip() or name}")
    if name in _DEATHS:
        return _one_line(f"worker died: {reason(err)}")
    if isinstance(err, ray.exceptions.RayTaskError) and err.cause is not None:
        return reason(err.cause)  # an error of the wrapper itself, e.g. fn not importable
    return reason(err)


def _limit_text(limit: float) -> str:
    return f"time limit {limit:g}s exceeded"


def _check_reachable(address: str) -> None:
    """Fail at once where nothing listens: ray.init retries an unreachable address for
    about 14 minutes (20 attempts of ~40 s) before it gives up."""
    if address == "auto":
        return  # Ray finds the cluster itself
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise EvonasError(f"Ray address {address!r} is not host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise EvonasError(f"nothing answers at Ray address {address} ({err.strerror or err}): "
                          f"check the address (`ray status` on the head) and that the "
                          f"cluster is up") from None


# ---------------------------------------------------------------------------- tokens


def _pass_token_through() -> None:
    """Let this driver present the Ray auth token to a cluster it connects to.

    Ray 2.60 turns token authentication on by default for clusters that ray.init()
    starts, and `ray start` turns it on when a token exists (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token). A driver connecting to an explicit
    address sends the token only with RAY_AUTH_MODE=token, so with a token at hand and
    no mode chosen we choose token: a cluster without authentication ignores it.
    """
    if os.environ.get("RAY_AUTH_MODE"):
        return  # the user decided
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
            or _DEFAULT_TOKEN_FILE.is_file()):
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    _reload_ray_auth_config()


def _reload_ray_auth_config() -> None:
    # Ray reads RAY_AUTH_MODE into its C++ config once, at import: reload it the way
    # Ray's own ray.init() does when it enables tokens for a local cluster.
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError):
        pass  # another Ray version; the connect error then says to set RAY_AUTH_MODE


def _connect_failure(address: str, err: BaseException) -> str:
    chain, cause = [], err
    while cause is not None:
        chain.append(str(cause))
        cause = cause.__cause__
    text = " ".join(chain)
    if any(mark in text for mark in ("Unauthenticated", "InvalidAuthToken", "AuthenticationError")):
        return (f"Ray at {address} refused this driver: token authentication failed; set "
                f"RAY_AUTH_TOKEN to the cluster's token (`ray get-auth-token` on the head)")
    return _one_line(f"cannot connect to Ray at {address} ({reason(err)}): check the "
                     f"address (`ray status` on the head) and that the cluster runs this "
                     f"Ray version")


# ---------------------------------------------------------------------------- checks


def _check_counts(workers: int, cpus_per_eval: float) -> None:
    if not isinstance(workers, int) or workers < 1:
        raise EvonasError(f"--workers {workers!r} must be a whole number >= 1 "
                          f"(use --workers 0 to run inline without Ray)")
    if not cpus_per_eval > 0:
        raise EvonasError(f"--cpus-per-eval {cpus_per_eval:g} must be > 0, e.g. 1")


def _check_gpu_share(share: float) -> None:
    """A GPU share below 1 must split a GPU evenly (Ray does not enforce fractions, so
    0.3 would pack three evaluations and leave a tenth of the memory cap unaccounted);
    above 1 it must be whole."""
    if share < 0:
        raise EvonasError(f"--gpus-per-eval {share:g} must be >= 0")
    if 0 < share < 1 and abs(1 / share - round(1 / share)) > 1e-6:
        raise EvonasError(f"--gpus-per-eval {share:g} does not split a GPU evenly "
                          f"(1/{share:g} = {1 / share:.2f}): use 1/k, e.g. 0.5, 0.25, 0.2 or 0.125")
    if share > 1 and share != int(share):
        raise EvonasError(f"--gpus-per-eval {share:g}: above 1 use whole GPUs, e.g. {math.ceil(share)}")


def _check_time_limit(limit: float | None) -> None:
    if limit is not None and not limit > 0:
        raise EvonasError(f"time limit {limit:g}s must be > 0 seconds, or none")


def _check_can_submit(backend: Backend, task_id: str, in_flight: list[str]) -> None:
    # Programming errors of the driver, not user input: plain exceptions.
    if backend.free_slots() <= 0:
        raise RuntimeError(f"submit({task_id!r}) with no free slot: wait() first")
    if task_id in in_flight:
        raise ValueError(f"task {task_id!r} is already in flight")
