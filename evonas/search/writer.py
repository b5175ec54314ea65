"""The search's MLflow writes, run beside the driver's loop in the order they were given.

Where it sits: the driver (driver.py) hands it each finished candidate's logging (child
run, graph picture, exported code: tens of milliseconds, against the few the driver may
spend per candidate) once the run folder has recorded the candidate, and goes on with the
next one. The run folder stays the truth: a kill loses at most the queued writes, and the
resume's reconcile logs again what MLflow lacks and deletes what it holds twice or half.

Each write is a call fn(tracker, *args) of a module-level function. Two ways to run them:
- in a process of its own (`WriterProcess`, the search's own tracker): its own
  interpreter, so the writes, picture drawing included, take nothing from the driver's
  thread but a pickled message; the process builds its tracker from a picklable factory;
- in a thread (`WriterThread`, a tracker object the caller built): for trackers that
  live in the caller's process.
Either runs one write at a time, in order (a candidate's run before the summary that
counts it). A write that raises stops the writer, and the error is raised in the driver
at its next put or at close, so a broken store ends the search as it did when the
writes were made in line.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
from typing import Any, Callable

from evonas.errors import EvonasError

Write = Callable[..., Any]  # fn(tracker, *args)


class WriterThread:
    """Runs the writes on `tracker` in a thread of this process."""

    def __init__(self, tracker: Any):
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, args=(tracker,),
                                         name="evonas-mlflow-writer", daemon=True)
        self._thread.start()

    def put(self, fn: Write, *args: Any) -> None:
        """Queue fn(tracker, *args) behind every write queued before it."""
        if self._error is not None:
            raise self._error
        self._queue.put((fn, args))

    def close(self, *, drain: bool = True) -> None:
        """Stop after the queued writes (drain) or after the running one."""
        if not drain:
            _discard(self._queue)
        self._queue.put(None)
        self._thread.join()
        if drain and self._error is not None:
            raise self._error

    def _loop(self, tracker: Any) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    item[0](tracker, *item[1])
                except BaseException as err:  # noqa: BLE001 - raised in the driver's thread
                    self._error = err


class WriterProcess:
    """Runs the writes in a process of its own, on the tracker factory() builds there."""

    def __init__(self, factory: Callable[[], Any]):
        context = multiprocessing.get_context("spawn")  # no fork of torch's or Ray's threads
        self._inbox = context.Queue()
        self._errors = context.Queue()
        self._process = context.Process(target=_serve, name="evonas-mlflow-writer",
                                        args=(factory, self._inbox, self._errors, os.getpid()),
                                        daemon=True)
        self._process.start()

    def put(self, fn: Write, *args: Any) -> None:
        """Queue fn(tracker, *args) behind every write queued before it (never blocks)."""
        self._raise(block=False)
        self._inbox.put((fn, args))

    def close(self, *, drain: bool = True) -> None:
        """Stop after the queued writes (drain) or at once: a write cut short is a crash
        of the writer, which the next resume's reconcile repairs."""
        if drain:
            self._inbox.put(None)
            self._process.join()
            self._raise(block=False)
        else:
            self._process.terminate()
            self._process.join()
        self._inbox.cancel_join_thread()  # messages left to a dead process: dropped
        self._inbox.close()

    def _raise(self, *, block: bool) -> None:
        try:
            message = self._errors.get(block=block)
        except queue.Empty:
            return
        raise EvonasError(f"MLflow: {message}; the run folder holds every finished "
                          f"evaluation, and --resume logs what MLflow lacks")


def _serve(factory: Callable[[], Any], inbox, errors, parent: int) -> None:
    """The writer process: build the tracker, run writes until None, report one error."""
    tracker = factory()
    while (item := inbox.get()) is not None:
        if os.getppid() != parent:  # the driver died: its resume reconciles from here on
            return
        try:
            item[0](tracker, *item[1])
        except Exception as err:  # noqa: BLE001 - reported to the driver, which stops
            errors.put(f"{type(err).__name__}: {' '.join(str(err).split())[:300]}")
            return


def _discard(q: queue.Queue) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


__all__ = ["WriterProcess", "WriterThread"]
