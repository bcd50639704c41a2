"""Tokenization never deadlocks: the worker pool is torn down safely on success, on an error and on Ctrl-C.

multiprocessing.Pool.terminate() hung for good in 2 of 13 runs after tokenizing a small source (an idle
worker held the task queue's lock); these tests run the same small-source tokenization many times, each
under pytest-timeout's watchdog, and check that no worker outlives its pool.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import signal
import threading
import time

import pytest

from moba_train.data import DataConfig, SourceConfig, embedded
from moba_train.data import tokenization
from moba_train.data.cache import open_source
from moba_train.data.worker_pool import WorkerError, WorkerPool


def small_source(tmp_path, n: int = 5):
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in embedded.lee_articles()[:n]))
    return SourceConfig(format="jsonl", path=str(path))


def live_children() -> list:
    return [p for p in multiprocessing.active_children() if p.is_alive()]


@pytest.fixture
def ctrl_c_after():
    """ctrl_c_after(seconds): SIGINT to this process's main thread then, unless the test is over by that time.

    CPython runs a signal's handler in the main thread at its next check, and a KeyboardInterrupt raised while
    that thread happens to be running a finalizer (a `__del__`, a weakref callback) is printed and dropped:
    after a thousand earlier tests the cyclic garbage collector, with finalizers to run, could fire at any
    allocation, and these tests twice saw no KeyboardInterrupt at all. So the collector runs before and is
    off during the test, and the signal goes to the main thread itself (it then also interrupts a blocking
    read there at once, as a terminal's Ctrl-C does). The test also starts from a fresh process's Ctrl-C
    disposition, Python's own handler installed and SIGINT unblocked: in a full CI run the tests still saw no
    KeyboardInterrupt with the two measures above, and a library loaded by an earlier test may set SIGINT's
    disposition in C, where `signal.getsignal` does not see it (not reproduced outside CI's whole run)."""
    timers = []
    main = threading.main_thread().ident

    def schedule(seconds: float) -> None:
        timers.append(threading.Timer(seconds, lambda: signal.pthread_kill(main, signal.SIGINT)))
        timers[-1].start()

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)    # sigaction in C, whatever was there
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    gc.collect()
    gc.disable()
    try:
        yield schedule
    finally:
        for timer in timers:
            timer.cancel()
        gc.enable()
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        signal.signal(signal.SIGINT, previous)


def slow_encode(texts):
    """Runs in the workers: slow enough for a Ctrl-C to land mid-tokenization."""
    time.sleep(0.2)
    return ORIGINAL_ENCODE(texts)


ORIGINAL_ENCODE = tokenization.encode_texts


@pytest.mark.timeout(120)
def test_tokenizing_a_small_source_many_times_never_hangs(lee_bpe, tmp_path):
    src = small_source(tmp_path)
    for i in range(40):
        started = time.perf_counter()
        tok = open_source("small", src, lee_bpe, DataConfig(num_proc=2), str(tmp_path / f"cache{i}"))
        assert tok.n_docs == 5
        assert time.perf_counter() - started < 20, f"run {i} took {time.perf_counter() - started:.1f} s"
        assert not live_children(), f"run {i} left workers behind: {live_children()}"


def _fail(x):
    raise ValueError(f"bad record {x}")


def _slow(x):
    time.sleep(30)
    return x


def test_a_failing_worker_task_raises_in_the_parent_and_the_pool_is_gone():
    with pytest.raises(WorkerError, match="ValueError: bad record 3"):
        with WorkerPool(2) as pool:
            handles = [pool.submit(_fail if x == 3 else abs, x) for x in range(6)]
            [pool.result(h) for h in handles]
    assert not live_children()


@pytest.mark.timeout(60)
def test_ctrl_c_while_workers_are_busy_kills_them_at_once(ctrl_c_after):
    started = time.perf_counter()
    ctrl_c_after(0.5)
    with pytest.raises(KeyboardInterrupt):
        with WorkerPool(2) as pool:
            handles = [pool.submit(_slow, x) for x in range(4)]
            [pool.result(h) for h in handles]
    assert time.perf_counter() - started < 10
    assert not live_children()


@pytest.mark.timeout(60)
def test_ctrl_c_during_tokenization_leaves_no_worker_and_no_cache_entry(lee_bpe, tmp_path, monkeypatch, ctrl_c_after):
    monkeypatch.setattr(tokenization, "BATCH_RECORDS", 1)
    monkeypatch.setattr(tokenization, "encode_texts", slow_encode)
    ctrl_c_after(1.0)
    with pytest.raises(KeyboardInterrupt):
        open_source("small", small_source(tmp_path, 60), lee_bpe, DataConfig(num_proc=2), str(tmp_path / "cache"))
    assert not live_children()
    done = [p for p in (tmp_path / "cache").rglob("meta.json")]
    assert not done                                   # an interrupted source is not taken for a tokenized one



def _echo(payload):
    return payload


@pytest.mark.timeout(60)
def test_large_tasks_and_results_in_flight_never_deadlock_the_pipes():
    """Tasks and results larger than a pipe's buffer, several in flight per worker (as the tokenizer keeps
    them): the parent sending a task must never wait on a worker that waits to send its result back
    (quality_code's real source files hung this way)."""
    payloads = [bytes([i]) * (1 << 20) for i in range(12)]
    received = []
    with WorkerPool(2) as pool:
        handles = [pool.submit(_echo, p) for p in payloads[:4]]
        for p in payloads[4:]:
            handles.append(pool.submit(_echo, p))
            received.append(pool.result(handles.pop(0)))
        received += [pool.result(h) for h in handles]
    assert received == payloads
    assert not live_children()


@pytest.mark.timeout(60)
def test_workers_of_a_killed_parent_exit_instead_of_lingering(tmp_path):
    """kill -9 of the parent (a cluster's OOM killer, a test's timeout) must not leave workers behind: each
    sees EOF on its pipe, which works only if no sibling holds a copy of the parent's end."""
    import subprocess
    import sys

    script = ("import time\n"
              "from moba_train.data.worker_pool import WorkerPool\n"
              "pool = WorkerPool(3)\n"
              "print(' '.join(str(p.pid) for p, _ in pool._workers), flush=True)\n"
              "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 3
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    lingering = [p for p in pids if _alive(p)]
    for p in lingering:
        os.kill(p, signal.SIGKILL)
    assert not lingering, f"workers {lingering} outlived their killed parent"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
