"""What a worker process may use of its machine, for search evaluations and full-training
trials alike.

Where it sits: backends.run_task calls limit_worker before a search evaluation, the
full-training trial (fulltrain/trainable.py) before it trains; search/evaluate.py and
the trial pick their torch device with task_device. A task that holds a GPU share runs
on CUDA or fails: falling back to the CPU would train at a fraction of the speed and be
charged to the GPU budget as if it had used the GPU it never touched.
"""

from __future__ import annotations

import os
import socket


def worker_name() -> str:
    """"hostname:pid" of this process, as outcomes and records name a worker."""
    return f"{socket.gethostname()}:{os.getpid()}"


def task_device(gpu_share: float) -> str:
    """"cuda" for a task that holds a GPU share, "cpu" otherwise; RuntimeError naming the
    host when the task holds a GPU share but this process sees no CUDA device."""
    import torch

    if gpu_share <= 0:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(f"asked for {gpu_share:g} GPU but CUDA is not available on "
                           f"{worker_name()} (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); run it on "
                           f"a machine with a GPU or ask for no GPU")
    return "cuda"


def limit_worker(threads: int, gpu_share: float, device=None) -> None:
    """Keep a worker inside its share of the machine.

    Two 2-thread torch jobs on 2 cores run 4x slower than one alone (OpenMP threads spin
    against each other), so each worker uses as many threads as CPUs it holds. Ray's
    GPU fractions are logical only: a task holding 0.25 of a GPU caps its own memory at
    a quarter. A task holding a GPU share on a host without CUDA fails here (task_device).
    device: the CUDA device whose memory to cap (None: the current one).
    """
    import torch

    torch.set_num_threads(max(1, threads))
    task_device(gpu_share)
    if 0 < gpu_share < 1:
        torch.cuda.set_per_process_memory_fraction(gpu_share, device)


def local_gpus() -> int:
    """CUDA devices this process sees: what an embedded Ray would offer its tasks."""
    import torch

    return torch.cuda.device_count()


__all__ = ["worker_name", "task_device", "limit_worker", "local_gpus"]
