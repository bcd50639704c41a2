"""A small pool of forked worker processes, one pipe each, results in submission order.

multiprocessing.Pool shares one task queue whose lock an idle worker holds while it waits; its
terminate() takes that lock, so tearing a pool down could hang for good (seen after tokenizing small
sources). Here every worker has its own pipe: nothing is shared, a worker is stopped by a sentinel on
success and killed on error or Ctrl-C, and teardown never waits on a lock. Workers ignore SIGINT, so a
Ctrl-C reaches only the parent, which tears them down.

A worker sends its results from a thread of its own, so it keeps reading tasks while a result waits for
the parent: with tasks and results larger than a pipe's buffer and several in flight, the parent sending a
task to a worker that was itself blocked sending a result deadlocked both (seen with real source files).
Each forked worker closes the parent's ends of every pipe it inherited, so a parent that dies (kill -9)
leaves its workers at EOF rather than orphaned forever.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import sys
import threading
import traceback
from collections import deque
from typing import Any, Callable

_STOP = None


def _serve(conn, initializer: Callable | None, initargs: tuple, inherited: list) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)            # the parent handles Ctrl-C and tears the pool down
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for parent_end in inherited:                            # a fork copies the parent's ends: drop them
        parent_end.close()
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    sender = threading.Thread(target=_send_results, args=(conn, outbox), daemon=True)
    sender.start()
    try:
        if initializer is not None:
            initializer(*initargs)
        while True:
            task = conn.recv()
            if task is _STOP:
                break
            fn, args = task
            try:
                outbox.put((True, fn(*args)))
            except Exception as e:                          # noqa: BLE001 - sent to the parent, which raises it
                outbox.put((False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return
    finally:
        outbox.put(_STOP)
        sender.join()
        conn.close()


def _send_results(conn, outbox: queue.SimpleQueue) -> None:
    while (result := outbox.get()) is not _STOP:
        try:
            conn.send(result)
        except (BrokenPipeError, OSError):                  # the parent is gone: nobody to tell
            return


class WorkerError(RuntimeError):
    """A task raised in a worker; the message carries the worker's traceback."""


class WorkerPool:
    """`submit(fn, *args)` -> a handle; `result(handle)` in any order; `close()` on success, `kill()` otherwise.

    Used as a context manager it closes on a clean exit and kills on any exception (KeyboardInterrupt too)."""

    def __init__(self, processes: int, initializer: Callable | None = None, initargs: tuple = ()):
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        ctx = multiprocessing.get_context(method)
        self._workers = []
        for _ in range(processes):
            parent, child = ctx.Pipe(duplex=True)
            inherited = [parent, *(c for _, c in self._workers)] if method == "fork" else []
            proc = ctx.Process(target=_serve, args=(child, initializer, initargs, inherited), daemon=True)
            proc.start()
            child.close()
            self._workers.append((proc, parent))
        self._next = 0
        self._outstanding = [deque() for _ in self._workers]   # per worker: handles sent, oldest first
        self._done: dict[int, Any] = {}
        self._count = 0

    def submit(self, fn: Callable, *args) -> int:
        index = self._next
        self._next = (self._next + 1) % len(self._workers)
        handle = self._count
        self._count += 1
        self._workers[index][1].send((fn, args))
        self._outstanding[index].append(handle)
        return handle

    def result(self, handle: int) -> Any:
        index = handle % len(self._workers)                # round-robin: the worker that got this handle
        while handle not in self._done:
            proc, conn = self._workers[index]
            try:
                ok, value = conn.recv()
            except EOFError:
                raise WorkerError(f"tokenizer worker {proc.pid} died (exit code {proc.exitcode})") from None
            self._done[self._outstanding[index].popleft()] = (ok, value)
        ok, value = self._done.pop(handle)
        if not ok:
            raise WorkerError(value)
        return value

    def close(self) -> None:
        """Stop every worker after its current task and wait for it."""
        for proc, conn in self._workers:
            try:
                conn.send(_STOP)
            except (BrokenPipeError, OSError):
                pass
        for proc, conn in self._workers:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()
        self._workers = []

    def kill(self) -> None:
        """Stop every worker at once (error or Ctrl-C): nothing to wait for, no lock to take."""
        for proc, conn in self._workers:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
        for proc, conn in self._workers:
            proc.join()
            conn.close()
        self._workers = []

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.kill()


__all__ = ["WorkerError", "WorkerPool"]
