"""The one answer verifier: equivalence and verdicts, shared by filter, RL reward and evaluation.

So that "correct" means the same thing in every stage, all of them call this module:

- extraction (`thinkforge.answers.extract_answer`) pulls the final answer out of a completion;
- `is_equivalent` decides `gold == answer` with math-verify (gold wrapped in `$...$` so bare LaTeX
  parses; `verify(gold, answer)` in that order), in-process and without a timeout. Text answers
  (`\\text{Monday and Tuesday}`, `\\text{(B) blue}`) that are the same words are equal, whatever
  math-verify makes of them;
- `Verifier` does both for batches, with a HARD per-item timeout: the math-verify calls run in a
  `thinkforge.timeouts.HardTimeoutPool`; an item that overruns is marked "timeout" (incorrect,
  counted in `.timeouts`) and the rest carry on.

Quirks of math-verify worth knowing (see the tests for the full table): a percentage equals its
number (`10\\%` == 10 and == 0.1), `(3,4)` as gold (an open interval) accepts the set `3,4`, and
text answers that are not the same words compare as products of symbols, so an anagram of a
one-word `\\text{}` gold, or `\\text{Monday, Tuesday}` for `\\text{Monday and Tuesday}`, can pass.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from thinkforge.answers import (
    ANSWER_TYPES,
    MAX_ANSWER_CHARS,
    check_type_mode,
    choice_letter,
    clean_answer,
    extract_answer,
    final_segment,
    looks_like_bare_answer,
    strip_delims,
)
from thinkforge.timeouts import HardTimeoutPool, default_workers

log = logging.getLogger(__name__)

REASONS = ("correct", "wrong_answer", "no_answer", "unverifiable_gold", "timeout")
#: verdicts a Verifier remembers, keyed by (gold, extracted answer, answer type): RL and filter
#: batches repeat the same answer to the same problem many times
_CACHE_SIZE = 65_536


@dataclass(frozen=True)
class Verdict:
    correct: bool
    reason: str  # one of REASONS
    extracted: str | None  # the answer string pulled from the completion
    rule: str | None  # which extraction rule fired (answers.RULES); None when no answer or a bare answer was given


# --------------------------------------------------------------------------------------------
# equivalence (math-verify; runs inside workers for untrusted input)
# --------------------------------------------------------------------------------------------

_SPACING_RE = re.compile(r"\\[,;:!> ]|\\left(?![A-Za-z])|\\right(?![A-Za-z])|\s+")
_DEGREE_RE = re.compile(r"\^\{?\\circ\}?")
_INT_RE = re.compile(r"[+-]?\d{1,400}")


def _norm(s: str) -> str:
    """Cheap normalization for the exact-match fast path (never makes unequal things equal)."""
    s = strip_delims(s)
    s = _SPACING_RE.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DEGREE_RE.sub("", s)
    if _INT_RE.fullmatch(s):
        s = str(int(s))
    return s


def _fast_reason(gold: str | None, answer: str | None, answer_type: str, exact: bool = True) -> str | None:
    """A verdict reachable without math-verify (cheap, bounded), else None."""
    if gold is None or len(gold) > MAX_ANSWER_CHARS or not strip_delims(gold):
        return "unverifiable_gold"
    if answer is None or not answer.strip():
        return "no_answer"
    if answer_type == "choice":
        g = choice_letter(gold)
        if g is None:
            return "unverifiable_gold"
        return "correct" if choice_letter(answer) == g else "wrong_answer"
    if len(answer) > MAX_ANSWER_CHARS:
        return "wrong_answer"
    if exact and _norm(gold) == _norm(answer):
        return "correct"
    return None


_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mbox)\s*\{([^{}]*)\}")
_NOT_WORDS_RE = re.compile(r"[\\^_={}$]")
_WORD_RE = re.compile(r"[A-Za-z]{2,}")


def _is_words(s: str) -> bool:
    return not _NOT_WORDS_RE.search(s) and bool(_WORD_RE.search(s))


def _words(s: str) -> str | None:
    """The words of a text answer (`\\text{Monday and Tuesday}` -> "monday and tuesday"), else None."""
    s = strip_delims(s)
    if "\\" not in s or not _TEXT_CMD_RE.search(s):
        return None
    plain = _TEXT_CMD_RE.sub(lambda m: f" {m.group(1)} ", s)
    if not _is_words(plain):
        return None
    return " ".join(plain.lower().split()).rstrip(" .")


def _same_words(gold: str, answer: str) -> bool:
    """Both are text answers with the same words (case and spacing aside); an answer may drop `\\text{}`."""
    g = _words(gold)
    if g is None:
        return False
    a = _words(answer)
    if a is None and _is_words(strip_delims(answer)):
        a = " ".join(strip_delims(answer).lower().split()).rstrip(" .")
    return a == g


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
    return tuple(mv.parse(f"${strip_delims(gold)}$", parsing_timeout=None))


@lru_cache(maxsize=4096)
def _parse_answer(answer: str) -> tuple:
    mv = _math_verify()
    parsed = mv.parse(f"${strip_delims(answer)}$", parsing_timeout=None)
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
    if _same_words(gold, answer):  # math-verify reads words as products of symbols
        return "correct"
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
    check_type_mode(answer_type, "fallback")
    try:
        return _judge(gold, answer, answer_type) == "correct"
    except Exception:  # noqa: BLE001 - a comparison that crashes is not a match
        log.debug("comparison failed", exc_info=True)
        return False


def _warm_up() -> None:
    """A worker's warm-up: import and exercise sympy/latex2sympy before it says ready."""
    _judge("\\frac{1}{2}", "0.5")


# --------------------------------------------------------------------------------------------
# the Verifier
# --------------------------------------------------------------------------------------------


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
        check_type_mode("math", mode)
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
        self.timeouts = 0  # items judged "timeout" so far
        self._size = max(1, workers)
        self._new_pool()

    def _new_pool(self) -> None:
        self._owner = os.getpid()
        self._lock = threading.RLock()
        self._cache: OrderedDict[tuple[str, str, str], str] = OrderedDict()  # (gold, answer, type) -> reason
        self._pool = HardTimeoutPool(
            "thinkforge.verify:_judge", self._size, self.timeout, warmup="thinkforge.verify:_warm_up",
            timeout_result="timeout", error_result="wrong_answer",  # a comparison that crashes is not a match
        )

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
            self._new_pool()
            return
        with self._lock:
            self._pool.close()

    def __repr__(self) -> str:
        return (f"Verifier(workers={self.workers}, timeout={self.timeout}, mode={self.mode!r}, "
                f"live={len(self._pool.workers)})")

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
            check_type_mode(answer_type, self.mode)
            if isinstance(completion, str) and completion:
                answer, rule = extract_answer(completion, answer_type, self.mode)
            else:
                answer, rule = None, None
            prepared.append((_as_gold(gold), answer, rule, answer_type))
        return self._judge_prepared(prepared)

    # -- internals ----------------------------------------------------------------------------
    def _judge_prepared(self, prepared: list[tuple[str | None, str | None, str | None, str]]) -> list[Verdict]:
        if os.getpid() != self._owner:  # used in a forked child: workers (and a lock) of its own
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
                jobs = [(idxs[0], *key, self.fast_path) for key, idxs in groups.items()]
                results = self._pool.run(jobs)
                self.timeouts += sum(r == "timeout" for r in results.values())
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

    check_type_mode("math", mode)
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
            if looks_like_bare_answer(final_segment(answer)):
                seg = final_segment(answer)
                extracted = choice_letter(seg) if answer_type == "choice" else clean_answer(seg)
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
