"""The one answer verifier: extraction + equivalence, shared by filter, RL reward and evaluation.

So that "correct" means the same thing in every stage, all of them call this module:

- `extract_answer` pulls the final answer out of a completion (text after `</think>` when present):
  the last `\\boxed{}`/`\\fbox{}`, then "the answer is ..."/"Answer: ...", then (mode "fallback"
  only) a multiple-choice letter "(C)" or the last number in the text.
- `is_equivalent` decides `gold == answer` with math-verify (gold wrapped in `$...$` so bare LaTeX
  parses; `verify(gold, answer)` in that order), in-process and without a timeout.
- `Verifier` does both for batches, with a HARD per-item timeout: the math-verify calls run in a
  small pool of worker processes; the parent kills and replaces a worker whose item overruns, marks
  that item "timeout" (incorrect, counted in `.timeouts`) and carries on with the rest. It works
  from any thread (math-verify's own `signal.alarm` timeouts do not) and never uses signals in the
  parent.

Quirks of math-verify worth knowing (see the tests for the full table): a percentage equals its
number (`10\\%` == 10 and == 0.1), `(3,4)` as gold (an open interval) accepts the set `3,4`, and
text answers compare as products of symbols, so an anagram of a one-word `\\text{}` gold can pass.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as _wait_conns
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REASONS = ("correct", "wrong_answer", "no_answer", "unverifiable_gold", "timeout")
RULES = ("boxed", "answer_is", "choice", "last_number")
STRICT_RULES = ("boxed", "answer_is")  # the rules mode "strict" tries; "fallback" tries them first too
ANSWER_TYPES = ("math", "choice")
MODES = ("strict", "fallback")

#: extraction reads at most this many characters from the end of the final segment of a completion
MAX_SCAN_CHARS = 65_536
#: an extracted answer longer than this is judged wrong without parsing it (gold: unverifiable)
MAX_ANSWER_CHARS = 2_048
#: how many `\boxed` occurrences (from the last) are tried when the last one is unbalanced
_MAX_BOX_TRIES = 4
#: address-space cap of a worker process (a 10^(10^10) integer fails fast instead of eating RAM)
WORKER_MEMORY_BYTES = 4 << 30
#: time a new worker may take to import sympy/math-verify and warm up (not charged to any item)
WORKER_START_TIMEOUT = 120.0
#: batches smaller than this go to one worker as one chunk
SMALL_BATCH = 16
_MAX_CHUNK = 64
#: verdicts a Verifier remembers, keyed by (gold, extracted answer, answer type): RL and filter
#: batches repeat the same answer to the same problem many times
_CACHE_SIZE = 65_536


@dataclass(frozen=True)
class Verdict:
    correct: bool
    reason: str  # one of REASONS
    extracted: str | None  # the answer string pulled from the completion
    rule: str | None  # which extraction rule fired (RULES); None when no answer or a bare answer was given


# --------------------------------------------------------------------------------------------
# extraction (pure string work, linear time, bounded input)
# --------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BRACE_RE = re.compile(r"\\\\|\\[{}]|[{}]")
_BOX_BARE_RE = re.compile(r"[ \t]{1,64}([^\s${}\\]{1,64})")
# "answer" then "is", ":" or "=" (markdown bold allowed around); the content follows on the same line
_ANSWER_WORD_RE = re.compile(r"(?i)\banswer\b")
_ANSWER_TAIL_RE = re.compile(
    r"[ \t]{0,8}(?:\*\*|__)?[ \t]{0,8}(?:is\b[ \t]{0,8}(?:\*\*)?[ \t]{0,8}[:：]?|[:：=])"
    r"[ \t]{0,8}(?:\*\*|__)?[ \t]{0,8}([^\n]{1,400})"
)
_LAST_NUMBER_RE = re.compile(r"(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_CHOICE_PAREN_RE = re.compile(r"(?<![A-Za-z\\])\(([A-D])\)")
_CHOICE_LINE_RE = re.compile(r"(?m)^[ \t]{0,8}(?:\*\*)?\(?([A-D])\)?(?:\*\*)?\.?[ \t]{0,8}$")
_CHOICE_TEXT_CMDS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit|mbox)\s*\{")
_CHOICE_LETTER_RE = re.compile(r"^\(?([A-D])\)?(?:$|[.:)\s,])")
_CHOICE_LOWER_RE = re.compile(r"\(?([a-d])\)?\.?")
_PROSE_RE = re.compile(r"(?<![\\{A-Za-z])[A-Za-z]{2,}[ \t]+[A-Za-z]{2,}\b")


def _final_segment(text: str) -> str:
    """The part of a completion that holds the final answer: after the last `</think>` if any."""
    i = text.rfind("</think>")
    return text[i + len("</think>"):] if i >= 0 else text


def _tail(text: str) -> str:
    """What the line-based rules ("answer is", choice, last number) read: the last MAX_SCAN_CHARS."""
    return text[-MAX_SCAN_CHARS:] if len(text) > MAX_SCAN_CHARS else text


def _balanced_from(text: str, open_pos: int, limit: int) -> tuple[str | None, bool]:
    """(content, closed) of the brace group opening at text[open_pos] == '{'.

    Reads at most `limit` characters: a group still open after that returns its first `limit`
    characters with closed=False (an over-long answer); a group open at the end of the text
    returns (None, False) (a truncated completion).
    """
    depth = 0
    stop = min(len(text), open_pos + 1 + limit)
    for m in _BRACE_RE.finditer(text, open_pos, stop):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : m.start()], True
        # "\\" (a LaTeX line break) and escaped braces "\{" "\}" do not count
    if stop < len(text):
        return text[open_pos + 1 : stop], False
    return None, False


def _box_starts_from_end(text: str, max_looks: int = 16):
    """End offsets of `\\boxed` / `\\fbox` commands, last first (a few rfind calls, no full scan)."""
    hi = {"\\boxed": len(text), "\\fbox": len(text)}
    found = {k: text.rfind(k, 0, v) for k, v in hi.items()}
    for _ in range(max_looks):
        key = max(found, key=found.__getitem__)
        i = found[key]
        if i < 0:
            return
        m = _BOX_RE.match(text, i)
        if m:
            yield m.end()
        found[key] = text.rfind(key, 0, i)


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` in text (brace-balanced), else None.

    `\\boxed 5` (no braces) is accepted too. When the last box is unbalanced (a truncated
    completion) the previous one is tried, a few times at most. A box whose content runs past
    MAX_ANSWER_CHARS is returned cut to MAX_ANSWER_CHARS + 1 characters (so it is judged over-long),
    which keeps the cost bounded whatever the input.
    """
    if not text:
        return None
    n = len(text)
    for tries, end in enumerate(_box_starts_from_end(text)):
        if tries >= _MAX_BOX_TRIES:
            break
        j = end
        while j < n and j < end + 64 and text[j] in " \t":
            j += 1
        if j < n and text[j] == "{":
            content, closed = _balanced_from(text, j, MAX_ANSWER_CHARS + 1)
            if content is not None:
                return content.strip() if closed else content
        elif end < n and text[end] in " \t":
            m = _BOX_BARE_RE.match(text, end)
            if m:
                return m.group(1)
    return None


def _strip_delims(s: str) -> str:
    s = s.strip()
    for _ in range(4):
        for a, b in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**")):
            if len(s) >= len(a) + len(b) and s.startswith(a) and s.endswith(b):
                s = s[len(a) : len(s) - len(b)].strip()
                break
        else:
            break
    return s


def _clean(s: str) -> str:
    s = _strip_delims(s)
    t = s.rstrip(" \t.,;")
    if t.endswith("\\"):  # keep "\;" "\," spacing commands whole
        t = s
    return _strip_delims(t) if t else s


def _answer_is_content(raw: str) -> str:
    """The answer inside the rest of an "answer is ..." line."""
    raw = raw.strip()
    for a, b in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if raw.startswith(a):
            k = raw.find(b, len(a))
            if k > len(a):
                return _clean(raw[len(a) : k])
    # up to the end of the sentence: ". " or " (" or the end of line
    cut = len(raw)
    for stop in (". ", "; ", " because", " since"):
        k = raw.find(stop)
        if 0 <= k < cut:
            cut = k
    ans = _clean(raw[:cut])
    # "5 apples" -> "5": drop trailing plain words after a leading non-word answer
    if ans and not ans[0].isalpha():
        m = re.search(r"(?<![\\{A-Za-z])[ \t]+[A-Za-z]{3,}\b", ans)
        if m and m.start() > 0:
            ans = _clean(ans[: m.start()])
    return ans


def _answer_is(text: str) -> str | None:
    best = None
    for m in _ANSWER_WORD_RE.finditer(text):
        t = _ANSWER_TAIL_RE.match(text, m.end())
        if t:
            content = _answer_is_content(t.group(1))
            if content:
                best = content
    return best


def _choice_letter(s: str | None) -> str | None:
    """'C', '(C)', '\\text{(C)}', 'C) 42', 'c.' -> 'C'; anything else -> None."""
    if not s:
        return None
    s = _CHOICE_TEXT_CMDS.sub("", s[:200]).replace("}", "").replace("{", "")
    s = _strip_delims(s).strip().strip("*").strip()
    m = _CHOICE_LETTER_RE.match(s) or _CHOICE_LOWER_RE.fullmatch(s)  # lower case only alone: "a" is a word
    return m.group(1).upper() if m else None


def _last_number(text: str) -> str | None:
    last = None
    for m in _LAST_NUMBER_RE.finditer(text):
        last = m
    if last is None:
        return None
    return last.group().replace(",", "")


def extract_answer(text: str, answer_type: str = "math", mode: str = "fallback") -> tuple[str | None, str | None]:
    """Return (answer, rule) from a completion, or (None, None).

    Rules, in order: "boxed" (last `\\boxed{}`), "answer_is" ("the answer is X", "Answer: X");
    in mode "fallback" also "choice" (a last "(C)" or a line holding only a letter; choice items)
    or "last_number" (math items). For choice items the answer is the letter A-D.
    """
    _check_type_mode(answer_type, mode)
    if not text:
        return None, None
    seg = _final_segment(text)
    boxed = last_boxed(seg)
    if boxed is not None:
        ans = _choice_letter(boxed) if answer_type == "choice" else _clean(boxed)
        if ans:
            return ans, "boxed"
    seg = _tail(seg)
    said = _answer_is(seg)
    if said:
        ans = _choice_letter(said) if answer_type == "choice" else said
        if ans:
            return ans, "answer_is"
    if mode == "strict":
        return None, None
    if answer_type == "choice":
        best = None
        for rx in (_CHOICE_PAREN_RE, _CHOICE_LINE_RE):
            for m in rx.finditer(seg):
                if best is None or m.start() > best.start():
                    best = m
        return (best.group(1), "choice") if best else (None, None)
    num = _last_number(seg)
    return (num, "last_number") if num else (None, None)


def _check_type_mode(answer_type: str, mode: str) -> None:
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _looks_like_bare_answer(text: str) -> bool:
    """A short one-line string that is an answer rather than prose (for records that carry either)."""
    s = text.strip()
    return 0 < len(s) <= 120 and "\n" not in s and not _PROSE_RE.search(s)


# --------------------------------------------------------------------------------------------
# equivalence (math-verify; runs inside workers for untrusted input)
# --------------------------------------------------------------------------------------------

_SPACING_RE = re.compile(r"\\[,;:!> ]|\\left(?![A-Za-z])|\\right(?![A-Za-z])|\s+")
_DEGREE_RE = re.compile(r"\^\{?\\circ\}?")
_INT_RE = re.compile(r"[+-]?\d{1,400}")


def _norm(s: str) -> str:
    """Cheap normalization for the exact-match fast path (never makes unequal things equal)."""
    s = _strip_delims(s)
    s = _SPACING_RE.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DEGREE_RE.sub("", s)
    if _INT_RE.fullmatch(s):
        s = str(int(s))
    return s


def _fast_reason(gold: str | None, answer: str | None, answer_type: str, exact: bool = True) -> str | None:
    """A verdict reachable without math-verify (cheap, bounded), else None."""
    if gold is None or len(gold) > MAX_ANSWER_CHARS or not _strip_delims(gold):
        return "unverifiable_gold"
    if answer is None or not answer.strip():
        return "no_answer"
    if answer_type == "choice":
        g = _choice_letter(gold)
        if g is None:
            return "unverifiable_gold"
        return "correct" if _choice_letter(answer) == g else "wrong_answer"
    if len(answer) > MAX_ANSWER_CHARS:
        return "wrong_answer"
    if exact and _norm(gold) == _norm(answer):
        return "correct"
    return None


_mv: Any = None


def _math_verify() -> Any:
    """Import math-verify once, with its own (signal.alarm) timeouts' warnings silenced."""
    global _mv
    if _mv is None:
        import math_verify
        import math_verify.grader
        import math_verify.parser

        # we pass timeouts of None (the caller provides the hard timeout); skip the warning about it
        math_verify.parser.TIMEOUT_WARNING_SHOWN = True
        math_verify.grader.TIMEOUT_WARNING_SHOWN = True
        for name in ("math_verify", "latex2sympy2_extended"):
            logging.getLogger(name).setLevel(logging.ERROR)
        _mv = math_verify
    return _mv


def _has_expr(parsed: Sequence[Any]) -> bool:
    return any(not isinstance(p, str) for p in parsed)


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple:
    mv = _math_verify()
    return tuple(mv.parse(f"${_strip_delims(gold)}$", parsing_timeout=None))


@lru_cache(maxsize=4096)
def _parse_answer(answer: str) -> tuple:
    mv = _math_verify()
    parsed = mv.parse(f"${_strip_delims(answer)}$", parsing_timeout=None)
    if not _has_expr(parsed):  # "5 apples": let math-verify's own extraction find the expression
        raw = mv.parse(answer, parsing_timeout=None)
        if _has_expr(raw):
            return tuple(raw)
    return tuple(parsed)


def _judge(gold: str | None, answer: str | None, answer_type: str = "math", fast_path: bool = True) -> str:
    """Reason for one (gold, extracted answer) pair: correct / wrong_answer / no_answer / unverifiable_gold."""
    fast = _fast_reason(gold, answer, answer_type, exact=fast_path)
    if fast is not None:
        return fast
    assert gold is not None and answer is not None
    gp = _parse_gold(gold)
    if not _has_expr(list(gp)):
        return "unverifiable_gold"
    ap = _parse_answer(answer)
    if not ap:
        return "wrong_answer"
    ok = _math_verify().verify(list(gp), list(ap), timeout_seconds=None)
    return "correct" if ok else "wrong_answer"


def is_equivalent(gold: str, answer: str, answer_type: str = "math") -> bool:
    """True if the extracted `answer` matches `gold`. In-process and WITHOUT a timeout: use a
    `Verifier` for untrusted answers (an answer like `10^{10^{10^{10}}}` can run for ever)."""
    _check_type_mode(answer_type, "fallback")
    try:
        return _judge(gold, answer, answer_type) == "correct"
    except Exception:  # noqa: BLE001 - a comparison that crashes is not a match
        log.debug("comparison failed", exc_info=True)
        return False


# --------------------------------------------------------------------------------------------
# worker process
# --------------------------------------------------------------------------------------------


class _SoftTimeout(BaseException):
    """Raised by the worker's own interval timer (a BaseException so math-verify cannot swallow it)."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _SoftTimeout()


def _worker_entry() -> None:
    """Entry point of a worker process: `python -c ... _worker_entry() IN_FD OUT_FD TIMEOUT MEMORY`."""
    in_fd, out_fd = int(sys.argv[1]), int(sys.argv[2])
    timeout, memory_bytes, fast_path = float(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
    inbox, outbox = Connection(in_fd, writable=False), Connection(out_fd, readable=False)
    _worker_main(inbox, outbox, timeout, memory_bytes, fast_path)
    os._exit(0)  # nothing to clean up; skip a slow interpreter teardown of sympy


def _watch_parent() -> None:
    """Exit as soon as the parent goes away (our stdin, a pipe the parent never writes, hits EOF)."""
    try:  # os.read on the raw fd: a daemon thread must not hold sys.stdin's lock at shutdown
        while os.read(0, 1 << 16):
            pass
    except OSError:
        pass
    os._exit(0)


def _worker_main(inbox: Any, outbox: Any, timeout: float, memory_bytes: int | None, fast_path: bool = True) -> None:
    """Loop: receive a chunk [(idx, gold, answer, answer_type), ...], send (idx, reason) per item.

    The worker's own interval timer interrupts an item at `timeout` (pure-Python work); the parent
    kills the whole process a little later if that did not help (C-level work such as a huge power).
    """
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
    with contextlib.suppress(Exception):
        _judge("\\frac{1}{2}", "0.5")  # import and warm up sympy/latex2sympy before saying ready
    outbox.send(("ready", os.getpid()))
    while True:
        try:
            chunk = inbox.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for idx, gold, answer, answer_type in chunk:
            try:
                signal.setitimer(signal.ITIMER_REAL, timeout)
                try:
                    reason = _judge(gold, answer, answer_type, fast_path)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except _SoftTimeout:
                reason = "timeout"
            except Exception:  # noqa: BLE001 - a comparison that crashes (MemoryError too) is not a match
                reason = "wrong_answer"
            try:
                outbox.send((idx, reason))
            except (BrokenPipeError, OSError):
                return


def _worker_env() -> dict[str, str]:
    """The parent's environment, with the folder that holds the thinkforge package on PYTHONPATH."""
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class _Worker:
    """One worker process, started with a fresh interpreter (safe whatever the parent has loaded:
    torch, CUDA, threads; and no re-import of the parent's __main__ as multiprocessing would do)."""

    def __init__(self, timeout: float, memory_bytes: int | None, fast_path: bool = True) -> None:
        c_in, p_out = os.pipe()  # parent -> child
        p_in, c_out = os.pipe()  # child -> parent
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from thinkforge.verify import _worker_entry; _worker_entry()",
                 str(c_in), str(c_out), repr(timeout), str(memory_bytes or 0), "1" if fast_path else "0"],
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
# the Verifier
# --------------------------------------------------------------------------------------------

#: processes of one pod that each hold a Verifier (training ranks): torchrun and accelerate set it
ENV_LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"


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
    """Worker processes of one Verifier by default: the pod's CPUs (`pod_cpus`) shared among the
    processes of the pod that verify (``LOCAL_WORLD_SIZE`` training ranks each hold one), so a pod
    runs about one worker per CPU in all, not ranks x CPUs. At least 1."""
    try:
        ranks = max(1, int(os.environ.get(ENV_LOCAL_WORLD_SIZE, "1") or 1))
    except ValueError:
        ranks = 1
    return max(1, pod_cpus(cgroup_root) // ranks)


class Verifier:
    """Batch verifier with a hard per-item timeout, safe to call from any thread.

    `workers` processes (default: `default_workers()`, this process's share of the pod's CPUs; 0
    means one worker, no parallelism) start on first use and are reused until `close()`. Concurrent
    calls from several threads are serialized; each call spreads its items over all workers. A
    worker that overruns an item by `timeout` (plus a small grace) is killed and replaced; that item
    becomes reason "timeout".
    """

    def __init__(
        self, workers: int | None = None, timeout: float = 5.0, mode: str = "fallback", *, fast_path: bool = True
    ):
        _check_type_mode("math", mode)
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self._requested = workers  # None: the pod's share, recomputed wherever the Verifier is unpickled
        if workers is None:
            workers = default_workers()
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.workers = workers
        self.timeout = float(timeout)
        self.mode = mode
        self.fast_path = fast_path  # False: every non-trivial pair goes to math-verify (benchmarks, tests)
        self.timeouts = 0
        self._size = max(1, workers)
        # the worker's own timer fires at `timeout`; the parent kills at `timeout + grace`
        self._grace = min(1.0, max(0.25, 0.1 * self.timeout))
        self._new_pool()

    def _new_pool(self) -> None:
        self._owner = os.getpid()
        self._lock = threading.RLock()
        self._cache: OrderedDict[tuple[str, str, str], str] = OrderedDict()  # (gold, answer, type) -> reason
        self._pool: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop_all, self._pool)

    # -- pickling: a reward object that holds a Verifier must survive being pickled -----------
    def __getstate__(self) -> dict:
        return {"workers": self._requested, "timeout": self.timeout, "mode": self.mode, "fast_path": self.fast_path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers. The Verifier can still be used: workers restart on demand."""
        if os.getpid() != self._owner:  # a forked child: the workers are the parent's
            self._finalizer.detach()
            self._new_pool()
            return
        with self._lock:
            _stop_all(self._pool)

    def __repr__(self) -> str:
        return f"Verifier(workers={self.workers}, timeout={self.timeout}, mode={self.mode!r}, live={len(self._pool)})"

    # -- public API ---------------------------------------------------------------------------
    def verify(self, gold: str, completion: str, answer_type: str = "math") -> Verdict:
        return self.verify_many([(gold, completion, answer_type)])[0]

    def verify_many(self, items: Sequence[tuple[str, str, str]]) -> list[Verdict]:
        """Verdicts for (gold, completion, answer_type) items, in order."""
        prepared = []
        for item in items:
            if len(item) == 2:  # (gold, completion): a math item
                (gold, completion), answer_type = item, "math"
            else:
                gold, completion, answer_type = item
            _check_type_mode(answer_type, self.mode)
            if isinstance(completion, str) and completion:
                answer, rule = extract_answer(completion, answer_type, self.mode)
            else:
                answer, rule = None, None
            prepared.append((_as_gold(gold), answer, rule, answer_type))
        return self._judge_prepared(prepared)

    # -- internals ----------------------------------------------------------------------------
    def _judge_prepared(self, prepared: list[tuple[str | None, str | None, str | None, str]]) -> list[Verdict]:
        if os.getpid() != self._owner:  # used in a forked child: workers (and a lock) of its own
            self._finalizer.detach()
            self._new_pool()
        reasons: list[str | None] = [None] * len(prepared)
        groups: dict[tuple[str, str, str], list[int]] = {}  # identical pairs are judged once
        with self._lock:
            for i, (gold, answer, _rule, answer_type) in enumerate(prepared):
                fast = _fast_reason(gold, answer, answer_type, exact=self.fast_path)
                if fast is not None:
                    reasons[i] = fast
                    continue
                key = (gold, answer, answer_type)
                cached = self._cache.get(key)
                if cached is not None:
                    self._cache.move_to_end(key)
                    reasons[i] = cached
                else:
                    groups.setdefault(key, []).append(i)  # type: ignore[arg-type]
            if groups:
                jobs = [(idxs[0], *key) for key, idxs in groups.items()]
                results = self._run(jobs)
                for key, idxs in groups.items():
                    reason = results[idxs[0]]
                    for i in idxs:
                        reasons[i] = reason
                    if reason == "timeout":
                        self.timeouts += len(idxs) - 1  # the copies did not run, but share the verdict
                    else:  # a timeout is not remembered: it may pass on a quieter machine
                        self._cache[key] = reason
                        if len(self._cache) > _CACHE_SIZE:
                            self._cache.popitem(last=False)
        out = []
        for (_gold, answer, rule, _t), reason in zip(prepared, reasons):
            assert reason in REASONS, reason
            out.append(Verdict(correct=reason == "correct", reason=reason, extracted=answer, rule=rule))
        return out

    def _spawn(self) -> _Worker:
        w = _Worker(self.timeout, WORKER_MEMORY_BYTES, self.fast_path)
        self._pool.append(w)
        return w

    def _retire(self, w: _Worker) -> None:
        w.kill()
        if w in self._pool:
            self._pool.remove(w)

    def _run(self, jobs: list[tuple]) -> dict[int, str]:
        with self._lock:
            try:
                return self._run_locked(jobs)
            except BaseException:
                # interrupted (Ctrl-C, an error): a worker still busy with this call's items would
                # answer the next call with stale results, so stop those workers
                for w in list(self._pool):
                    if w.inflight:
                        self._retire(w)
                raise

    def _run_locked(self, jobs: list[tuple]) -> dict[int, str]:
        n = len(jobs)
        # items with the same gold go to the same chunk: the worker parses that gold once (cache)
        jobs = sorted(jobs, key=lambda j: (j[1], j[2]))
        chunk = n if n < SMALL_BATCH else max(1, min(_MAX_CHUNK, math.ceil(n / (4 * self._size))))
        pending: deque[list] = deque(jobs[i : i + chunk] for i in range(0, n, chunk))
        want = min(self._size, len(pending))
        for w in list(self._pool):  # drop workers that died while idle
            if not w.alive():
                self._retire(w)
        while len(self._pool) < want:
            self._spawn()
        results: dict[int, str] = {}
        hard = self.timeout + self._grace
        failed_starts = 0

        def lost(w: _Worker, crashed: bool) -> None:
            """w is gone (killed for overrunning, or crashed): fail its running item, requeue the rest."""
            nonlocal failed_starts
            if not w.ready:
                failed_starts += 1
                if failed_starts > 3:
                    self._retire(w)
                    raise RuntimeError("verifier workers keep dying at start; see their stderr above")
            if w.inflight:
                idx = w.inflight.popleft()[0]
                results[idx] = "timeout"
                self.timeouts += 1
                if crashed:
                    log.warning("verifier worker %s died on an item; marked 'timeout'", w.pid)
                if w.inflight:
                    pending.appendleft(list(w.inflight))
                w.inflight.clear()
            self._retire(w)
            if pending and len(self._pool) < want:
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

        for w in list(self._pool):
            assign(w)
        while len(results) < n:
            if not self._pool:  # every worker was lost at once; start one
                self._spawn()
            waiting: dict[Any, _Worker] = {}
            soonest = math.inf
            for w in self._pool:
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
                        idx, reason = msg
                        head = w.inflight.popleft()
                        if head[0] != idx:
                            raise RuntimeError(f"verifier worker answered item {idx}, expected {head[0]}")
                        results[idx] = reason
                        if reason == "timeout":
                            self.timeouts += 1
                        w.deadline = time.monotonic() + hard
                except (EOFError, OSError):
                    lost(w, crashed=True)
            now = time.monotonic()
            for w in list(self._pool):
                if not w.ready and now > w.started_at + WORKER_START_TIMEOUT:
                    self._retire(w)
                    raise RuntimeError(f"a verifier worker did not start within {WORKER_START_TIMEOUT:.0f} s")
                if w.ready and w.inflight and now >= w.deadline:
                    lost(w, crashed=False)
            for w in list(self._pool):
                assign(w)
        return results


def equivalent_pairs(pairs: Sequence[tuple[str, str, str]], verifier: Verifier | None = None) -> list[bool]:
    """For (a, b, answer_type) pairs of extracted answers: is b equivalent to a (a taken as the gold)?
    The verifier's own equivalence with its hard timeout (a timeout or an `a` that does not parse is
    "not equivalent"). Used to group answers into vote classes (cons@k)."""
    if not pairs:
        return []
    own = verifier is None
    v = verifier or Verifier(workers=min(4, default_workers()))
    try:
        verdicts = v._judge_prepared([(_as_gold(a), b, None, t or "math") for a, b, t in pairs])
    finally:
        if own:
            v.close()
    return [x.correct for x in verdicts]


def _as_gold(gold: Any) -> str | None:
    if gold is None or isinstance(gold, bool):
        return None
    if isinstance(gold, float) and gold.is_integer():
        return str(int(gold))
    return str(gold)


# --------------------------------------------------------------------------------------------
# `thinkforge verify FILE`
# --------------------------------------------------------------------------------------------


def verify_file(in_path: str | Path, out_path: str | Path, mode: str = "fallback", timeout: float = 5.0) -> dict:
    """Verify a JSONL file of records with `gold` and `answer` (a bare final answer or a whole
    completion; optional `answer_type` "math"/"choice"). Writes each record back with `correct`,
    `reason`, `extracted`, `rule`; returns counts per reason (every reason present, zeros too).

    A bare answer (a short line that is not prose, e.g. `\\frac{1}{2}` or `C`) is compared as
    given (rule None) unless it holds a `\\boxed{}` or "the answer is"; anything else goes through
    `extract_answer` with `mode`. Bad lines raise RecordError naming `file:line`.
    """
    from thinkforge.records import RecordError, iter_jsonl_numbered, write_jsonl

    _check_type_mode("math", mode)
    records: list[dict] = []
    prepared = []
    for lineno, rec in iter_jsonl_numbered(in_path):
        where = f"{in_path}:{lineno}"
        if not isinstance(rec, dict):
            raise RecordError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        gold = rec.get("gold")
        if gold is None:
            raise RecordError(f"{where}: missing field 'gold' (expected a string)")
        if not isinstance(gold, (str, int, float)) or isinstance(gold, bool):
            raise RecordError(f"{where}: field 'gold' is {type(gold).__name__}, expected a string")
        answer = rec.get("answer")
        if answer is None:
            raise RecordError(f"{where}: missing field 'answer' (expected a string)")
        if not isinstance(answer, str):
            raise RecordError(f"{where}: field 'answer' is {type(answer).__name__}, expected a string")
        answer_type = rec.get("answer_type", "math")
        if answer_type not in ANSWER_TYPES:
            raise RecordError(f"{where}: field 'answer_type' is {answer_type!r}, expected one of {list(ANSWER_TYPES)}")
        extracted, rule = extract_answer(answer, answer_type, "strict")
        if extracted is None:
            if _looks_like_bare_answer(_final_segment(answer)):
                seg = _final_segment(answer)
                extracted = _choice_letter(seg) if answer_type == "choice" else _clean(seg)
                rule = None
            elif mode == "fallback":
                extracted, rule = extract_answer(answer, answer_type, mode)
        records.append(rec)
        prepared.append((_as_gold(gold), extracted, rule, answer_type))
    with Verifier(timeout=timeout, mode=mode) as verifier:
        verdicts = verifier._judge_prepared(prepared)
    counts = Counter({r: 0 for r in REASONS})
    out = []
    for rec, v in zip(records, verdicts):
        counts[v.reason] += 1
        out.append({**rec, "correct": v.correct, "reason": v.reason, "extracted": v.extracted, "rule": v.rule})
    write_jsonl(out_path, out)
    return dict(counts)
