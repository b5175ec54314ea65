"""Connecting to Ray: one path for the search's evaluations and full training's trials.

Where it sits: backends.RayBackend.start() (search evaluations, and the baselines' proxy
runs of full training) and fulltrain/stage.py (around Tune) call `connect`, which picks
one of three connections and checks it the same way for both:

- "existing": this process is already connected to Ray; it keeps that connection, and
  close() leaves it open;
- "remote": an address (--ray-address, or RAY_ADDRESS): fail at once where nothing
  answers, pass the Ray auth token through, turn a refused connection into one line;
  close() disconnects and leaves the cluster running;
- "local": an embedded Ray sized to the work, without dashboard, shut down by close().

Security of the embedded Ray: every Ray process of it (GCS, raylet, workers, the
runtime-env agent) listens on 127.0.0.1 only, and Ray's token authentication stays on.
On Linux Ray binds its gRPC servers to all interfaces unless its node address is the
loopback one, and it turns a requested 127.0.0.1 into the machine's outward address
unless "clusters" are disabled (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray's switch for
single-machine use). `loopback_only` sets that switch for the start-up, so the node
address stays 127.0.0.1, and the start fails closed if Ray still chose another address
or started without tokens. To serve other machines, start a cluster yourself
(`ray start --head`, workers/README.md) and pass --ray-address.

Once connected, `connect` fails when one task could never be placed on the embedded Ray
(a remote cluster may grow: there only a warning), and hands the cluster's resources to
the caller's `admit` check (a gpu-h budget refuses a cluster without GPUs).
Ray is imported only inside these functions, so `import evonas` stays fast.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from evonas.errors import EvonasError
from evonas.runtime.reasons import one_line, reason

LOOPBACK = "127.0.0.1"
_SINGLE_MACHINE_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Payloads, results and trial configs are small; Ray's default object store (30% of RAM)
# would reserve shared memory that tasks never use, on machines shared by many.
_OBJECT_STORE_BYTES = 200 * 1024**2
# The search's progress display and the stage's own lines own the console: no worker
# output or Ray INFO lines on the driver. Task errors still come back, as data.
_QUIET = {"log_to_driver": False, "logging_level": "ERROR"}
# Where `ray get-auth-token --generate` and a token-enabled ray.init() keep the token.
_DEFAULT_TOKEN_FILE = Path.home() / ".ray" / "auth_token"

Resources = dict[str, float]


@dataclass(frozen=True)
class TaskShape:
    """What one task holds, and how messages name it: noun "evaluation" or "trial",
    flag the suffix of its resource flags (--cpus-per-eval, --gpus-per-trial)."""

    cpus: float
    gpus: float
    noun: str = "evaluation"
    flag: str = "eval"


@dataclass
class Connection:
    """This process's connection to Ray: "existing", "remote" or "local" ("closed" after
    close())."""

    how: str

    def close(self) -> None:
        """Disconnect (remote), shut the embedded Ray down (local), or leave it (existing);
        closing twice does nothing, so it never ends a later connection."""
        if self.how in ("remote", "local"):
            import ray

            ray.shutdown()
        self.how = "closed"


def remote_address(address: str | None) -> str | None:
    """The cluster to connect to: the one given, else $RAY_ADDRESS; None: embedded Ray."""
    return address or os.environ.get("RAY_ADDRESS") or None


def local_cpus(workers: int | None, cpus_per_task: float) -> int:
    """CPUs of the embedded Ray: what `workers` tasks hold, else the machine's."""
    if workers is not None:
        return max(1, math.ceil(workers * cpus_per_task))
    return max(math.ceil(cpus_per_task), os.cpu_count() or 1)


def connect(address: str | None, task: TaskShape, *, workers: int | None = None,
            admit: Callable[[Resources], None] | None = None) -> Connection:
    """Connect this process to Ray (see the module docstring); EvonasError in one line
    when it cannot, or when the cluster cannot run `task` (the connection is closed
    again). address: as given by the user (RAY_ADDRESS is read here); workers: tasks
    meant to run at once (None: what fits), which also sizes the embedded Ray."""
    import ray

    address = remote_address(address)
    if ray.is_initialized():
        connection = Connection("existing")
    elif address is not None:
        _connect_remote(ray, address)
        connection = Connection("remote")
    else:
        _start_local(ray, local_cpus(workers, task.cpus), wants_gpus=task.gpus > 0)
        connection = Connection("local")
    try:
        check_fits(task, workers, strict=connection.how == "local")
        if admit is not None:
            admit(resources())
    except BaseException:
        connection.close()
        raise
    return connection


@contextlib.contextmanager
def connected(address: str | None, task: TaskShape, *, workers: int | None = None,
              admit: Callable[[Resources], None] | None = None) -> Iterator[Connection]:
    """connect() for the length of a block."""
    connection = connect(address, task, workers=workers, admit=admit)
    try:
        yield connection
    finally:
        connection.close()


def resources() -> Resources:
    """Total and available CPUs and GPUs of the connected cluster."""
    import ray

    total, available = ray.cluster_resources(), ray.available_resources()
    return {"cpus_total": total.get("CPU", 0.0), "cpus_available": available.get("CPU", 0.0),
            "gpus_total": total.get("GPU", 0.0), "gpus_available": available.get("GPU", 0.0)}


def fitting(task: TaskShape) -> int:
    """How many such tasks the connected cluster runs at once (at least 1)."""
    have = resources()
    counts = [int(have[f"{kind}_total"] // need)
              for kind, need in (("cpus", task.cpus), ("gpus", task.gpus)) if need > 0]
    return max(1, min(counts, default=1))


def check_fits(task: TaskShape, workers: int | None, *, strict: bool) -> None:
    """Fail (strict: the embedded Ray, which cannot grow) or warn (a cluster, which an
    autoscaler may grow) when one task could never be placed; warn when fewer than
    `workers` tasks can run at once. Without this, Ray and Tune wait for resources
    forever."""
    have = resources()
    for kind, need in (("cpus", task.cpus), ("gpus", task.gpus)):
        total, unit = have[f"{kind}_total"], kind[:-1].upper()
        if need > total:
            where, fix = (("this machine", "pass --ray-address of a cluster that has them")
                          if strict else ("the Ray cluster", "add nodes"))
            message = (f"one {task.noun} needs {need:g} {unit}s but {where} has {total:g}: "
                       f"lower --{kind}-per-{task.flag} or {fix}")
            if strict:
                raise EvonasError(message)
            warnings.warn(message + " (waiting for the autoscaler)", RuntimeWarning, stacklevel=3)
        elif need > 0 and workers is not None and workers * need > total:
            warnings.warn(f"{workers} workers x {need:g} {unit}s exceed the cluster's {total:g}: "
                          f"at most {int(total // need)} {task.noun}s will run at once",
                          RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------------- embedded


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


def _start_local(ray: Any, cpus: int, *, wants_gpus: bool) -> None:
    """Start the embedded Ray: loopback only, token authentication on, no dashboard."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        raise EvonasError(f"RAY_AUTH_MODE={mode} would start Ray without token "
                          f"authentication; unset it (evonas keeps Ray's tokens on)")
    # "local", not None: ray.init(None) would join a cluster that anyone on this machine
    # started with `ray start` (it reads /tmp/ray/ray_current_cluster). Token
    # authentication is Ray's default for clusters that ray.init() starts since 2.59.
    with loopback_only():
        ray.init(address="local", _node_ip_address=LOOPBACK, num_cpus=cpus,
                 num_gpus=None if wants_gpus else 0,  # None: detect the real GPUs
                 object_store_memory=_OBJECT_STORE_BYTES, include_dashboard=False, **_QUIET)
    problem = _local_problem(ray)
    if problem is not None:
        ray.shutdown()
        raise EvonasError(problem)


def _local_problem(ray: Any) -> str | None:
    """Why the embedded Ray must not run (fail closed), or None."""
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:
        return (f"the embedded Ray would listen on {node_ip}, not only on {LOOPBACK}; "
                f"start a cluster yourself and pass --ray-address to accept that")
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return "the embedded Ray started without token authentication"
    return None


# ---------------------------------------------------------------------------- remote


def _connect_remote(ray: Any, address: str) -> None:
    _check_reachable(address)
    _pass_token_through()
    try:
        ray.init(address=address, **_QUIET)
    except Exception as err:  # Ray raises ConnectionError, RuntimeError, ...
        raise EvonasError(_connect_failure(address, err)) from err


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
    return one_line(f"cannot connect to Ray at {address} ({reason(err)}): check the "
                    f"address (`ray status` on the head) and that the cluster runs this "
                    f"Ray version")


__all__ = ["TaskShape", "Connection", "connect", "connected", "remote_address", "local_cpus",
           "resources", "fitting", "check_fits", "loopback_only", "LOOPBACK"]
