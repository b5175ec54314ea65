"""Where the full-training trials run: an embedded local Ray, or an existing cluster.

Where it sits: stage.run_full_training opens `ray_connection(config)` around the proxy
evaluations of the baselines and Tuner.fit. The choice follows the search's engine
(engine.RayBackend):

- a process already connected to Ray keeps its connection, and it stays open after;
- --ray-address or RAY_ADDRESS: connect through RayBackend, which checks that something
  answers there, passes the Ray auth token through, and turns connection failures into
  one line; the cluster keeps running when the stage ends;
- otherwise an embedded Ray, sized to the stage and shut down with it.

Security of the embedded Ray: every Ray process of it (GCS, raylet, workers, the
runtime-env agent) listens on 127.0.0.1 only, and Ray's token authentication stays on.
On Linux Ray binds its gRPC servers to all interfaces unless its node address is the
loopback one, and it turns a requested 127.0.0.1 into the machine's outward address
unless "clusters" are disabled (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray's switch for
single-machine use). `_loopback_only` sets that switch for the start-up, so the node
address stays 127.0.0.1, and the start fails closed if Ray still chose another address.
To serve other machines, start a cluster yourself (`ray start --head`, workers/README.md)
and pass --ray-address.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator

from evonas.runtime.backends import LOOPBACK, loopback_only
from evonas.errors import EvonasError
from evonas.fulltrain.config import FullTrainConfig

# Trial configs and results are small dicts; the object store's default (30% of RAM)
# would reserve shared memory the stage never uses, on machines shared by many.
_OBJECT_STORE_BYTES = 200 * 1024**2
# Tune's progress tables and Ray's INFO lines would bury the stage's own progress lines.
_QUIET = {"log_to_driver": False, "logging_level": "ERROR"}


def remote_address(config: FullTrainConfig) -> str | None:
    return config.ray_address or os.environ.get("RAY_ADDRESS") or None


@contextlib.contextmanager
def ray_connection(config: FullTrainConfig) -> Iterator[str]:
    """Connect for the length of the block; yields "existing", "remote" or "local"."""
    import ray

    if ray.is_initialized():
        yield "existing"
        return
    address = remote_address(config)
    if address is not None:
        with _remote(config, address):
            yield "remote"
        return
    start_local(config)
    try:
        yield "local"
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _remote(config: FullTrainConfig, address: str) -> Iterator[None]:
    from evonas.runtime.backends import RayBackend

    backend = RayBackend(address=address, workers=1, cpus_per_eval=config.cpus_per_trial,
                         gpus_per_eval=config.gpus_per_trial)
    backend.start()  # raises EvonasError in one line when nothing (or nobody) lets us in
    try:
        yield
    finally:
        backend.shutdown()


def local_cpus(config: FullTrainConfig) -> int:
    """CPUs of the embedded Ray: what `workers` trials hold, else the machine's."""
    if config.workers is not None:
        return max(1, math.ceil(config.workers * config.cpus_per_trial))
    return max(math.ceil(config.cpus_per_trial), os.cpu_count() or 1)


def start_local(config: FullTrainConfig) -> None:
    """Start the embedded Ray: loopback only, token authentication on, no dashboard."""
    import ray

    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        raise EvonasError(f"RAY_AUTH_MODE={mode} would start Ray without token "
                          f"authentication; unset it (evonas keeps Ray's tokens on)")
    with loopback_only():
        ray.init(address="local", _node_ip_address=LOOPBACK, num_cpus=local_cpus(config),
                 num_gpus=None if config.gpus_per_trial else 0,  # None: detect real GPUs
                 object_store_memory=_OBJECT_STORE_BYTES, include_dashboard=False, **_QUIET)
    _check_local(config)


def _check_local(config: FullTrainConfig) -> None:
    """Fail closed on a node that is not loopback-only, and fail at once when a trial
    could never be placed (Tune would otherwise wait for resources forever)."""
    import ray

    node_ip = ray.util.get_node_ip_address()
    problem = None
    if node_ip != LOOPBACK:
        problem = (f"the embedded Ray would listen on {node_ip}, not only on {LOOPBACK}; "
                   f"start a cluster yourself and pass --ray-address to accept that")
    elif os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        problem = "the embedded Ray started without token authentication"
    else:
        have = ray.cluster_resources()
        for kind, need in (("CPU", config.cpus_per_trial), ("GPU", config.gpus_per_trial)):
            if need > have.get(kind, 0.0):
                problem = (f"one trial needs {need:g} {kind}s but this machine has "
                           f"{have.get(kind, 0.0):g}: lower --{kind.lower()}s-per-trial or "
                           f"pass --ray-address of a cluster that has them")
                break
    if problem is not None:
        ray.shutdown()
        raise EvonasError(problem)


__all__ = ["ray_connection", "start_local", "remote_address", "local_cpus", "LOOPBACK"]
