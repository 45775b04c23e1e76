"""A pool of worker processes that runs a function on items with a HARD per-item timeout.

`HardTimeoutPool(target, size, timeout)` runs `target(*args)` (a "module:function" the workers
import) for each job `(idx, *args)` in a few worker processes. Each worker's own interval timer
interrupts an item at `timeout` (pure-Python work); the parent kills and replaces a worker whose
item overruns `timeout` plus a small grace (C-level work such as a huge power), marks that item
timed out and carries on with the rest. It works from any thread (signal-based timeouts do not) and
never uses signals in the parent. Workers are fresh interpreters (safe whatever the parent has
loaded: torch, CUDA, threads; no re-import of the parent's `__main__` as multiprocessing's spawn
would do), capped in address space, and exit when the parent goes away.

Hand-written rather than `pebble`'s ProcessPool: pebble is not a dependency of the image, starts its
workers through multiprocessing (fork copies a training rank's CUDA/threads, spawn re-imports
`__main__`) and times out per future, which would cost one round trip per item instead of chunks.

`pod_cpus` / `default_workers` size a pool to this process's share of the pod's CPUs.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as _wait_conns
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: address-space cap of a worker process (a 10^(10^10) integer fails fast instead of eating RAM)
WORKER_MEMORY_BYTES = 4 << 30
#: time a new worker may take to import its target and warm up (not charged to any item)
WORKER_START_TIMEOUT = 120.0
#: batches smaller than this go to one worker as one chunk
SMALL_BATCH = 16
_MAX_CHUNK = 64

#: processes of one pod that each hold a pool (training ranks): torchrun and accelerate set it
ENV_LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"


# --------------------------------------------------------------------------------------------
# sizing
# --------------------------------------------------------------------------------------------


def pod_cpus(cgroup_root: str | Path = "/sys/fs/cgroup") -> int:
    """CPUs this pod may use: the cgroup CPU quota (a Kubernetes CPU limit; cgroup v2 ``cpu.max`` or
    v1 ``cpu.cfs_quota_us``), rounded up, capped by the CPUs the process may run on. A node's CPU
    count is not the pod's: a pod limited to 8 CPUs on a 96-core node sees all 96 in its affinity."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    root = Path(cgroup_root)
    quota = period = None
    with contextlib.suppress(OSError, ValueError):
        fields = (root / "cpu.max").read_text().split()  # "<quota|max> <period>"
        if fields and fields[0] != "max":
            quota, period = int(fields[0]), int(fields[1]) if len(fields) > 1 else 100_000
    if quota is None:
        with contextlib.suppress(OSError, ValueError):
            q1 = int((root / "cpu" / "cpu.cfs_quota_us").read_text().strip())
            p1 = int((root / "cpu" / "cpu.cfs_period_us").read_text().strip())
            if q1 > 0 and p1 > 0:
                quota, period = q1, p1
    if quota and period and quota > 0 and period > 0:
        cpus = min(cpus, max(1, math.ceil(quota / period)))
    return max(1, cpus)


def default_workers(cgroup_root: str | Path = "/sys/fs/cgroup") -> int:
    """Worker processes of one pool by default: the pod's CPUs (`pod_cpus`) shared among the
    processes of the pod that verify (``LOCAL_WORLD_SIZE`` training ranks each hold one), so a pod
    runs about one worker per CPU in all, not ranks x CPUs. At least 1."""
    try:
        ranks = max(1, int(os.environ.get(ENV_LOCAL_WORLD_SIZE, "1") or 1))
    except ValueError:
        ranks = 1
    return max(1, pod_cpus(cgroup_root) // ranks)


# --------------------------------------------------------------------------------------------
# worker process
# --------------------------------------------------------------------------------------------


class _SoftTimeout(BaseException):
    """Raised by the worker's own interval timer (a BaseException so the target cannot swallow it)."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _SoftTimeout()


def _resolve(spec: str) -> Callable[..., Any]:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _worker_entry() -> None:
    """Entry point of a worker: `python -c ... _worker_entry() IN_FD OUT_FD TIMEOUT MEMORY TARGET [WARMUP]`."""
    in_fd, out_fd = int(sys.argv[1]), int(sys.argv[2])
    timeout, memory_bytes, target = float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    warmup = sys.argv[6] if len(sys.argv) > 6 and sys.argv[6] else None
    inbox, outbox = Connection(in_fd, writable=False), Connection(out_fd, readable=False)
    _worker_main(inbox, outbox, timeout, memory_bytes, _resolve(target), _resolve(warmup) if warmup else None)
    os._exit(0)  # nothing to clean up; skip a slow interpreter teardown (sympy)


def _watch_parent() -> None:
    """Exit as soon as the parent goes away (our stdin, a pipe the parent never writes, hits EOF)."""
    try:  # os.read on the raw fd: a daemon thread must not hold sys.stdin's lock at shutdown
        while os.read(0, 1 << 16):
            pass
    except OSError:
        pass
    os._exit(0)


def _worker_main(
    inbox: Any,
    outbox: Any,
    timeout: float,
    memory_bytes: int | None,
    target: Callable[..., Any],
    warmup: Callable[[], Any] | None = None,
) -> None:
    """Loop: receive a chunk [(idx, *args), ...], send (idx, status, value) per item; status is
    "ok" (value: what target returned), "timeout" or "error" (value None)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    threading.Thread(target=_watch_parent, name="watch-parent", daemon=True).start()
    if memory_bytes:
        try:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            cap = memory_bytes if hard == resource.RLIM_INFINITY else min(memory_bytes, hard)
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        except (ImportError, ValueError, OSError):
            pass
    signal.signal(signal.SIGALRM, _on_alarm)
    if warmup is not None:
        with contextlib.suppress(Exception):
            warmup()  # imports and caches before saying ready (not charged to any item)
    outbox.send(("ready", os.getpid()))
    while True:
        try:
            chunk = inbox.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for idx, *args in chunk:
            value = None
            try:
                signal.setitimer(signal.ITIMER_REAL, timeout)
                try:
                    value = target(*args)
                    status = "ok"
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except _SoftTimeout:
                status = "timeout"
            except Exception:  # noqa: BLE001 - MemoryError too: the item failed, the worker goes on
                status = "error"
            try:
                outbox.send((idx, status, value))
            except (BrokenPipeError, OSError):
                return


def _worker_env() -> dict[str, str]:
    """The parent's environment, with the folder that holds the thinkforge package on PYTHONPATH."""
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class _Worker:
    """One worker process, started with a fresh interpreter."""

    def __init__(self, timeout: float, memory_bytes: int | None, target: str, warmup: str | None) -> None:
        c_in, p_out = os.pipe()  # parent -> child
        p_in, c_out = os.pipe()  # child -> parent
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from thinkforge.timeouts import _worker_entry; _worker_entry()",
                 str(c_in), str(c_out), repr(timeout), str(memory_bytes or 0), target, warmup or ""],
                pass_fds=(c_in, c_out),
                stdin=subprocess.PIPE,  # the lifeline: the worker exits when this closes
                stdout=subprocess.DEVNULL,
                env=_worker_env(),
                close_fds=True,
            )
        except BaseException:
            for fd in (p_out, p_in):
                os.close(fd)
            raise
        finally:
            os.close(c_in)
            os.close(c_out)
        self.outbox = Connection(p_out, readable=False)
        self.inbox = Connection(p_in, writable=False)
        self.owner = os.getpid()  # a forked copy of the parent must leave this worker alone
        self.ready = False
        self.started_at = time.monotonic()
        self.inflight: deque = deque()  # items sent, not yet answered; inflight[0] is running
        self.deadline = math.inf

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _close_pipes(self) -> None:
        for c in (self.outbox, self.inbox, self.proc.stdin):
            with contextlib.suppress(Exception):
                c.close()  # type: ignore[union-attr]

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=5)
        self._close_pipes()

    def ask_to_stop(self) -> None:
        if self.alive() and not self.inflight:
            with contextlib.suppress(Exception):
                self.outbox.send(None)

    def finish_stop(self, deadline: float) -> None:
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        if self.alive():
            self.kill()
        else:
            self._close_pipes()


def _stop_all(workers: list[_Worker], wait: float = 1.0) -> None:
    """Ask every worker to exit, give them `wait` seconds together, kill the rest."""
    stopping = [w for w in workers if w.owner == os.getpid()]
    workers.clear()
    for w in stopping:
        w.ask_to_stop()
    deadline = time.monotonic() + wait
    for w in stopping:
        w.finish_stop(deadline)


# --------------------------------------------------------------------------------------------
# the pool
# --------------------------------------------------------------------------------------------


class HardTimeoutPool:
    """`size` worker processes running `target` ("module:function") with a hard per-item timeout.

    Workers start on first use and are reused until `close()` (after which they restart on demand).
    `run(jobs)` maps each job `(idx, *args)` to `target(*args)`, or to `timeout_result` (the item
    overran; counted in `.timeouts`) or `error_result` (it raised, or its worker crashed). Calls from
    several threads are serialized. A forked child that uses the pool gets workers of its own and
    leaves the parent's alone.
    """

    def __init__(
        self,
        target: str,
        size: int,
        timeout: float,
        *,
        warmup: str | None = None,
        memory_bytes: int | None = WORKER_MEMORY_BYTES,
        timeout_result: Any = "timeout",
        error_result: Any = "error",
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.target, self.warmup = target, warmup
        self.size = max(1, size)
        self.timeout = float(timeout)
        self.memory_bytes = memory_bytes
        self.timeout_result, self.error_result = timeout_result, error_result
        self.timeouts = 0
        # the worker's own timer fires at `timeout`; the parent kills at `timeout + grace`
        self._grace = min(1.0, max(0.25, 0.1 * self.timeout))
        self._reset()

    def _reset(self) -> None:
        self._owner = os.getpid()
        self._lock = threading.RLock()
        self.workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop_all, self.workers)

    def _check_fork(self) -> None:
        if os.getpid() != self._owner:  # a forked child: the workers (and the lock) are the parent's
            self._finalizer.detach()
            self._reset()

    def close(self) -> None:
        """Stop the workers (they restart on demand)."""
        if os.getpid() != self._owner:
            self._check_fork()
            return
        with self._lock:
            _stop_all(self.workers)

    def __repr__(self) -> str:
        return f"HardTimeoutPool({self.target!r}, size={self.size}, timeout={self.timeout}, live={len(self.workers)})"

    def _spawn(self) -> _Worker:
        w = _Worker(self.timeout, self.memory_bytes, self.target, self.warmup)
        self.workers.append(w)
        return w

    def _retire(self, w: _Worker) -> None:
        w.kill()
        if w in self.workers:
            self.workers.remove(w)

    def run(self, jobs: list[tuple]) -> dict[int, Any]:
        """{idx: result} for jobs (idx, *args); jobs with equal args go to the same chunk."""
        self._check_fork()
        if not jobs:
            return {}
        with self._lock:
            try:
                return self._run_locked(jobs)
            except BaseException:
                # interrupted (Ctrl-C, an error): a worker still busy with this call's items would
                # answer the next call with stale results, so stop those workers
                for w in list(self.workers):
                    if w.inflight:
                        self._retire(w)
                raise

    def _run_locked(self, jobs: list[tuple]) -> dict[int, Any]:
        n = len(jobs)
        jobs = sorted(jobs, key=lambda j: tuple(str(a) for a in j[1:3]))  # a worker's caches see repeats together
        chunk = n if n < SMALL_BATCH else max(1, min(_MAX_CHUNK, math.ceil(n / (4 * self.size))))
        pending: deque[list] = deque(jobs[i : i + chunk] for i in range(0, n, chunk))
        want = min(self.size, len(pending))
        for w in list(self.workers):  # drop workers that died while idle
            if not w.alive():
                self._retire(w)
        while len(self.workers) < want:
            self._spawn()
        results: dict[int, Any] = {}
        hard = self.timeout + self._grace
        failed_starts = 0

        def lost(w: _Worker, crashed: bool) -> None:
            """w is gone (killed for overrunning, or crashed): fail its running item, requeue the rest."""
            nonlocal failed_starts
            if not w.ready:
                failed_starts += 1
                if failed_starts > 3:
                    self._retire(w)
                    raise RuntimeError("pool workers keep dying at start; see their stderr above")
            if w.inflight:
                idx = w.inflight.popleft()[0]
                results[idx] = self.timeout_result
                self.timeouts += 1
                if crashed:
                    log.warning("worker %s died on an item; marked as timed out", w.pid)
                if w.inflight:
                    pending.appendleft(list(w.inflight))
                w.inflight.clear()
            self._retire(w)
            if pending and len(self.workers) < want:
                self._spawn()

        def assign(w: _Worker) -> None:
            if pending and w.ready and not w.inflight:
                part = pending.popleft()
                try:
                    w.outbox.send(part)
                except OSError:  # died while idle: nothing of this chunk ran
                    pending.appendleft(part)
                    lost(w, crashed=True)
                    return
                w.inflight.extend(part)
                w.deadline = time.monotonic() + hard

        for w in list(self.workers):
            assign(w)
        while len(results) < n:
            if not self.workers:  # every worker was lost at once; start one
                self._spawn()
            waiting: dict[Any, _Worker] = {}
            soonest = math.inf
            for w in self.workers:
                if not w.ready:
                    waiting[w.inbox] = w
                    soonest = min(soonest, w.started_at + WORKER_START_TIMEOUT)
                elif w.inflight:
                    waiting[w.inbox] = w
                    soonest = min(soonest, w.deadline)
            _wait_conns(list(waiting), timeout=max(0.0, soonest - time.monotonic()) if waiting else 0.01)
            for conn, w in waiting.items():  # drain every answer that has arrived before judging deadlines
                try:
                    while conn.poll():
                        msg = conn.recv()
                        if not w.ready:
                            w.ready = True
                            failed_starts = 0
                            continue
                        idx, status, value = msg
                        head = w.inflight.popleft()
                        if head[0] != idx:
                            raise RuntimeError(f"pool worker answered item {idx}, expected {head[0]}")
                        if status == "ok":
                            results[idx] = value
                        elif status == "timeout":
                            results[idx] = self.timeout_result
                            self.timeouts += 1
                        else:
                            results[idx] = self.error_result
                        w.deadline = time.monotonic() + hard
                except (EOFError, OSError):
                    lost(w, crashed=True)
            now = time.monotonic()
            for w in list(self.workers):
                if not w.ready and now > w.started_at + WORKER_START_TIMEOUT:
                    self._retire(w)
                    raise RuntimeError(f"a pool worker did not start within {WORKER_START_TIMEOUT:.0f} s")
                if w.ready and w.inflight and now >= w.deadline:
                    lost(w, crashed=False)
            for w in list(self.workers):
                assign(w)
        return results
