"""The verifier's worker pool: hard timeouts, killed and hung workers, threads, clean shutdown.

Real processes and real math-verify. A hung worker is made with SIGSTOP (what a worker stuck in
C code looks like from outside), a crashed one with SIGKILL.
"""

from __future__ import annotations

import gc
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from thinkforge.verify import Verifier

TIMEOUT = 1.0
MARGIN = 1.5  # scheduling slack on a loaded 2-core machine; the grace before a hard kill is 0.25 s

# items that need real math-verify work (not settled by the exact-match fast path)
NORMAL = [
    (r"\frac{1}{2}", r"\boxed{0.5}", "math", True),
    (r"2\sqrt{2}", r"so \boxed{\sqrt{8}}", "math", True),
    ("033", "The answer is 33.", "math", True),
    (r"30^\circ", r"\boxed{30}", "math", True),
    ("[1,3)", r"\boxed{(1,3)}", "math", False),
    (r"x^2+1", r"\boxed{1+x^2}", "math", True),
    ("7", r"\boxed{8}", "math", False),
    (r"5\text{ cm}", r"\boxed{5}", "math", True),
]

ADVERSARIAL = {
    "power tower": ("1", r"\boxed{10^{10^{10^{10}}}}"),
    "power tower as gold": (r"10^{10^{10^{10}}}", r"\boxed{5}"),
    "factorial": ("1", r"\boxed{(10^{10})!}"),
    "nested braces in an answer": ("1", "The answer is $" + "{" * 150 + "1" + "}" * 150 + "$"),
    "5,000 nested braces": ("1", "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}"),
    "100 KB boxed sum": ("1", "\\boxed{" + "1+" * 50_000 + "1}"),
    "100 KB of prose": ("1", "word " * 20_000),
    "a megabyte after the box": ("1", "\\boxed{1}" + "a" * (1 << 20)),
    "a megabyte of digits": ("1", "9" * (1 << 20)),
    "a megabyte of open boxes": ("1", "\\boxed{" * 150_000),
}


def _alive(pid: int) -> bool:
    """True if pid is a live process (a zombie waiting for its reaper counts as dead)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "\nState:\tZ" not in status


def _wait_dead(pids, within: float = 10.0) -> list[int]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        live = [p for p in pids if _alive(p)]
        if not live:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _worker_pids(v: Verifier) -> list[int]:
    return [w.pid for w in v._pool.workers]


@pytest.fixture(scope="module")
def pool():
    with Verifier(workers=2, timeout=TIMEOUT) as v:
        v.verify_many([(str(i), rf"\boxed{{{i}.0}}", "math") for i in range(40)])  # start both workers
        yield v


def test_adversarial_inputs_cost_at_most_the_timeout(pool):
    before = pool.timeouts
    expected_timeouts = 0
    for name, (gold, completion) in ADVERSARIAL.items():
        t0 = time.monotonic()
        verdict = pool.verify(gold, completion)
        elapsed = time.monotonic() - t0
        assert elapsed <= TIMEOUT + MARGIN, (name, elapsed, verdict)
        assert not verdict.correct or name == "a megabyte after the box", (name, verdict)
        expected_timeouts += verdict.reason == "timeout"
    assert expected_timeouts >= 4  # tower, tower gold, factorial, nested braces: really slow in math-verify
    assert pool.timeouts - before == expected_timeouts

    # the same inputs mixed into a batch: other items keep their answers, every timeout is counted
    items = []
    for adv in list(ADVERSARIAL.values())[:4]:
        items.append((*adv, "math"))
        items.extend((g, c, t) for g, c, t, _ in NORMAL[:3])
    before = pool.timeouts
    t0 = time.monotonic()
    verdicts = pool.verify_many(items)
    elapsed = time.monotonic() - t0
    assert [v.reason for v in verdicts[::4]] == ["timeout"] * 4
    assert all(v.correct for i, v in enumerate(verdicts) if i % 4)
    assert pool.timeouts - before == 4
    assert elapsed <= 4 * (TIMEOUT + 0.25) / 2 + 2 * MARGIN + 2  # two workers share the four timeouts


def test_normal_items_after_adversarial_ones_are_still_right(pool):
    verdicts = pool.verify_many([(g, c, t) for g, c, t, _ in NORMAL])
    assert [v.correct for v in verdicts] == [ok for *_, ok in NORMAL]


def test_hung_worker_is_killed_and_replaced():
    with Verifier(workers=1, timeout=TIMEOUT) as v:
        v.verify(*NORMAL[0][:3])
        (pid,) = _worker_pids(v)
        os.kill(pid, signal.SIGSTOP)  # hung: even its own timer cannot fire
        t0 = time.monotonic()
        verdicts = v.verify_many([(g, c, t) for g, c, t, _ in NORMAL])
        elapsed = time.monotonic() - t0
        # the item the stopped worker held (items are grouped by gold, so not necessarily the
        # first) timed out; every other item still got its answer from the replacement worker
        timed_out = [i for i, x in enumerate(verdicts) if x.reason == "timeout"]
        assert len(timed_out) == 1 and v.timeouts == 1
        assert [x.correct for i, x in enumerate(verdicts) if i not in timed_out] == [
            ok for i, (*_, ok) in enumerate(NORMAL) if i not in timed_out
        ]
        assert not _alive(pid)
        assert _worker_pids(v) and _worker_pids(v) != [pid]
        assert elapsed <= TIMEOUT + 0.25 + MARGIN + 3  # + starting the replacement worker


def test_worker_killed_mid_batch_loses_nothing_else():
    with Verifier(workers=1, timeout=3.0) as v:
        v.verify(*NORMAL[0][:3])
        (pid,) = _worker_pids(v)
        items = [(*ADVERSARIAL["power tower"], "math")] + [(g, c, t) for g, c, t, _ in NORMAL]
        killer = threading.Timer(0.5, os.kill, (pid, signal.SIGKILL))
        killer.start()
        t0 = time.monotonic()
        verdicts = v.verify_many(items)
        elapsed = time.monotonic() - t0
        killer.join()
        assert verdicts[0].reason == "timeout"
        assert [x.correct for x in verdicts[1:]] == [ok for *_, ok in NORMAL]
        assert v.timeouts == 1
        assert elapsed < 3.0 + MARGIN  # the crash was noticed at once, not after the timeout


def test_calls_from_several_threads(pool):
    # distinct pairs per thread (nothing comes from the verdict cache)
    jobs = {
        k: [(rf"\frac{{{k}}}{{{i + 2}}}", rf"\boxed{{{k / (i + 2)!r}}}", "math") for i in (0, 2, 3, 6)]
        + [(rf"{k}\sqrt{{2}}", rf"\boxed{{\sqrt{{{2 * k * k}}}}}", "math")]
        + [(rf"{k}\sqrt{{2}}", rf"\boxed{{\sqrt{{{2 * k * k + 1}}}}}", "math")]
        + [(str(100 + k), rf"The answer is {100 + k + 1}.", "math")]
        for k in range(1, 5)
    }
    expected = [True] * 5 + [False, False]
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            results[k] = [v.correct for v in pool.verify_many(jobs[k])]
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert results == {k: expected for k in jobs}


def test_small_batches_use_one_worker_and_workers_0_still_has_a_hard_timeout():
    with Verifier(workers=2, timeout=TIMEOUT) as v:
        assert v.verify_many([(g, c, t) for g, c, t, _ in NORMAL[:3]])[0].correct
        assert len(_worker_pids(v)) == 1
    with Verifier(workers=0, timeout=TIMEOUT) as v:
        t0 = time.monotonic()
        verdict = v.verify(*ADVERSARIAL["power tower"])
        assert verdict.reason == "timeout" and v.timeouts == 1
        assert time.monotonic() - t0 <= TIMEOUT + MARGIN + 3  # includes starting the worker
        assert len(_worker_pids(v)) == 1 and _worker_pids(v)[0] != os.getpid()


def test_close_stops_workers_and_the_verifier_restarts_on_demand():
    v = Verifier(workers=2, timeout=TIMEOUT)
    assert _worker_pids(v) == []  # lazy
    v.verify_many([(str(i), rf"\boxed{{{i}.0}}", "math") for i in range(40)])
    pids = _worker_pids(v)
    assert len(pids) == 2 and all(map(_alive, pids))
    v.close()
    assert _wait_dead(pids) == [] and _worker_pids(v) == []
    assert v.verify(*NORMAL[0][:3]).correct  # starts again
    pids = _worker_pids(v)
    del v
    gc.collect()
    assert _wait_dead(pids) == []  # garbage collection stops them too


def test_pickles_as_its_settings():
    v = Verifier(workers=1, timeout=2.5, mode="strict")
    w = pickle.loads(pickle.dumps(v))
    assert (w.workers, w.timeout, w.mode, w.timeouts, _worker_pids(w)) == (1, 2.5, "strict", 0, [])


@pytest.mark.parametrize("ending", ["return", "os._exit(0)", "SIGKILL"])
def test_no_worker_outlives_its_parent(tmp_path, ending):
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from thinkforge.verify import Verifier
        v = Verifier(workers=2, timeout=5)
        v.verify_many([(str(i), r"\\boxed{{%d.0}}" % i, "math") for i in range(40)])
        print(" ".join(str(w.pid) for w in v._pool.workers), flush=True)
        ending = {ending!r}
        if ending == "os._exit(0)":
            os._exit(0)  # no atexit, no finalizers
        if ending == "SIGKILL":
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2, proc.stderr
    assert _wait_dead(pids) == []


def test_a_forked_child_gets_workers_of_its_own_and_leaves_the_parents_alone():
    script = textwrap.dedent(
        r"""
        import os, sys
        from thinkforge.verify import Verifier
        item = lambda k: (r"\frac{1}{%d}" % k, r"\boxed{%r}" % (1 / k), "math")  # noqa: E731
        v = Verifier(workers=1, timeout=5)
        assert v.verify(*item(2)).correct
        parent_pids = [w.pid for w in v._pool.workers]
        child = os.fork()
        if child == 0:
            ok = v.verify(*item(4)).correct and [w.pid for w in v._pool.workers] not in ([], parent_pids)
            sys.exit(0 if ok else 3)  # a normal exit: atexit and finalizers run in the child
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        assert v.verify(*item(8)).correct and [w.pid for w in v._pool.workers] == parent_pids
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr


def test_identical_items_are_judged_once():
    with Verifier(workers=2, timeout=TIMEOUT) as v:
        t0 = time.monotonic()
        verdicts = v.verify_many([(*ADVERSARIAL["power tower"], "math")] * 6 + [(g, c, t) for g, c, t, _ in NORMAL])
        elapsed = time.monotonic() - t0
        assert [x.reason for x in verdicts[:6]] == ["timeout"] * 6 and v.timeouts == 6
        assert [x.correct for x in verdicts[6:]] == [ok for *_, ok in NORMAL]
        assert elapsed < 3 * TIMEOUT + MARGIN + 3  # one timeout, not six (+ starting the workers)
        # answers already judged come back from the verdict cache; timeouts are tried again
        t0 = time.monotonic()
        assert [x.correct for x in v.verify_many([(g, c, t) for g, c, t, _ in NORMAL])] == [ok for *_, ok in NORMAL]
        assert time.monotonic() - t0 < 0.5


def test_the_pool_runs_any_target_with_a_hard_timeout():
    """thinkforge.timeouts knows nothing of math-verify: any "module:function" runs in its workers."""
    from thinkforge.timeouts import HardTimeoutPool

    pool = HardTimeoutPool("math:sqrt", size=1, timeout=TIMEOUT, error_result="failed")
    try:
        assert pool.run([(0, 4.0), (1, -1.0), (2, 9.0)]) == {0: 2.0, 1: "failed", 2: 3.0}
        assert pool.timeouts == 0
    finally:
        pool.close()
    slow = HardTimeoutPool("time:sleep", size=1, timeout=TIMEOUT)
    try:
        t0 = time.monotonic()
        assert slow.run([(0, 30), (1, 0)]) == {0: "timeout", 1: None}
        assert time.monotonic() - t0 < 10 and slow.timeouts == 1
    finally:
        slow.close()
    assert _wait_dead([w.pid for w in slow.workers]) == []
