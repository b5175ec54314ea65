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
The connection to Ray (cluster.py) and a worker's thread and GPU caps (limits.py) are
shared with full training, which scores its baselines through a RayBackend too.
Ray is imported only when a RayBackend starts, so `import evonas` stays fast.
"""

from __future__ import annotations

import json
import os
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

from evonas.runtime import checks
from evonas.runtime.cluster import Connection, Resources, TaskShape, connect, resources
from evonas.runtime.limits import limit_worker, worker_name
from evonas.runtime.reasons import one_line, reason

EvalFn = Callable[[dict], dict]


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


def run_all(backend: Backend, tasks: dict[str, tuple[EvalFn, dict]]) -> Iterator[Outcome]:
    """Run every task (task_id -> (fn, payload)) on a started backend, as many at once as
    it has slots; yield each outcome as it comes back."""
    queue = list(tasks.items())
    pending = len(queue)
    while pending:
        while queue and backend.free_slots() > 0:
            task_id, (fn, payload) = queue.pop(0)
            backend.submit(task_id, fn, payload)
        for outcome in backend.wait(timeout=None):
            pending -= 1
            yield outcome


# ---------------------------------------------------------------------------- worker side


def run_task(fn: EvalFn, payload: dict, threads: int | None, gpu_share: float) -> dict:
    """Run one evaluation inside a worker and report it; never raises for fn's errors.

    Catching here rather than letting Ray wrap the exception keeps the reason one clean
    line and still tells the driver how long fn ran and where. threads None: the caller's
    process (inline), left as it is; otherwise the worker is capped to its share, and a
    worker that holds a GPU share but sees no CUDA fails the task (limits.limit_worker).
    """
    started = time.perf_counter()
    try:
        if threads is not None:
            limit_worker(threads, gpu_share)
        value = fn(payload)
        _check_json_safe(value)
        result: dict[str, Any] = {"ok": True, "value": value}
    except (Exception, SystemExit) as err:  # sys.exit in a layer must not end the worker
        result = {"ok": False, "error": reason(err)}
    result.update(seconds=time.perf_counter() - started, worker=worker_name(),
                  finished_at=time.time())
    return result


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

    return {"worker": worker_name(), "torch_threads": torch.get_num_threads(), "echo": payload}


def _outcome(task_id: str, result: dict) -> Outcome:
    return Outcome(task_id, result["ok"], result.get("value"), result.get("error"),
                   result["seconds"], result["worker"])


# ---------------------------------------------------------------------------- inline


class InlineBackend(Backend):
    """Runs each evaluation in this process, at wait(), one at a time.

    For debugging a layer without Ray: same outcomes as RayBackend for a raising fn.
    A time limit cannot interrupt fn here; a run that overshoots it is still reported
    as "time limit Ns exceeded", so both backends judge a slow layer alike. The driver's
    torch thread count is left alone.
    """

    def __init__(self, time_limit_s: float | None = None):
        checks.time_limit("time limit", time_limit_s)
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
    (workers * cpus_per_eval CPUs), loopback only, without dashboard, shut down with the
    backend. address "auto", "host:port", "ray://host:port", or RAY_ADDRESS: connect to
    that cluster; shutdown() disconnects and leaves it running. A process already
    connected to Ray (ray.is_initialized()) keeps its connection: the backend uses it and
    leaves it open. cluster.py makes and checks the connection, for full training too.

    Each task holds cpus_per_eval CPUs and gpus_per_eval GPUs (0.25: four evaluations
    share a GPU) and is never retried by Ray: a crashed evaluation is reported and the
    search decides. time_limit_s counts from submit, so it includes queueing and the
    start of a fresh worker (about 1-2 s); past it the task is force-cancelled. env:
    environment variables for the evaluation workers (Ray runtime_env env_vars).
    admit: called with the cluster's resources once connected; it raises EvonasError to
    refuse a cluster the work cannot use (a gpu-h budget on a cluster without GPUs).
    noun, flag: how messages name a task and its flags ("trial", "--gpus-per-trial").
    """

    def __init__(self, address: str | None = None, workers: int = 1,
                 cpus_per_eval: float = 1, gpus_per_eval: float = 0,
                 time_limit_s: float | None = None, env: dict[str, str] | None = None,
                 admit: Callable[[Resources], None] | None = None,
                 noun: str = "evaluation", flag: str = "eval"):
        checks.whole("--workers", workers, minimum=1,
                     hint=" (use --workers 0 to run inline without Ray)")
        checks.positive(f"--cpus-per-{flag}", cpus_per_eval)
        checks.gpu_share(f"--gpus-per-{flag}", gpus_per_eval)
        checks.time_limit("time limit", time_limit_s)
        self.address = address
        self.workers = workers
        self.shape = TaskShape(cpus_per_eval, gpus_per_eval, noun, flag)
        self.time_limit_s = time_limit_s
        self.env = dict(env or {})
        self.admit = admit
        self._flights: dict[Any, _Flight] = {}  # ObjectRef -> flight
        self._task: Any = None  # the remote run_task, with this backend's options
        self._connection: Connection | None = None

    @property
    def cpus_per_eval(self) -> float:
        return self.shape.cpus

    @property
    def gpus_per_eval(self) -> float:
        return self.shape.gpus

    # -- lifecycle

    def start(self) -> None:
        if self._connection is not None:
            return
        import ray

        self._connection = connect(self.address, self.shape, workers=self.workers,
                                   admit=self.admit)
        self._task = ray.remote(run_task).options(
            num_cpus=self.cpus_per_eval, num_gpus=self.gpus_per_eval, max_retries=0,
            # per task, not per job: also applies on a connection this backend reuses
            runtime_env={"env_vars": self.env} if self.env else None)

    def shutdown(self) -> None:
        if self._connection is None:
            return
        import ray

        for ref in list(self._flights):
            _force_cancel(ray, ref)
        self._flights.clear()
        self._connection.close()
        self._connection = None

    # -- tasks

    def free_slots(self) -> int:
        return self.workers - len(self._flights) if self._connection is not None else 0

    def submit(self, task_id: str, fn: EvalFn, payload: dict) -> None:
        if self._connection is None:
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

    def resources_summary(self) -> dict[str, float]:
        return resources()


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
        return one_line(f"worker died: {str(err).strip() or name}")
    if name in _DEATHS:
        return one_line(f"worker died: {reason(err)}")
    if isinstance(err, ray.exceptions.RayTaskError) and err.cause is not None:
        return reason(err.cause)  # an error of the wrapper itself, e.g. fn not importable
    return reason(err)


def _limit_text(limit: float) -> str:
    return f"time limit {limit:g}s exceeded"


def _check_can_submit(backend: Backend, task_id: str, in_flight: list[str]) -> None:
    # Programming errors of the driver, not user input: plain exceptions.
    if backend.free_slots() <= 0:
        raise RuntimeError(f"submit({task_id!r}) with no free slot: wait() first")
    if task_id in in_flight:
        raise ValueError(f"task {task_id!r} is already in flight")


__all__ = ["Backend", "RayBackend", "InlineBackend", "Outcome", "run_all", "run_task", "probe"]
