"""Evaluation statistics: pass@1 with its standard error, unbiased pass@k, cons@k, paired bootstrap.

Used by the evaluate stage, the report and `thinkforge score`, so a number means the same everywhere.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021): 1 - C(n-c, k) / C(n, k), as a stable product."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n))."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


Equivalence = Callable[[Sequence[tuple[str, str, str]]], Sequence[bool]]
"""Judges (a, b, answer_type) pairs of extracted answers: is b equivalent to a?"""


def majority_correct(extracted: Sequence[str | None], correct: Sequence[bool],
                     equivalent: Equivalence | None = None, answer_type: str = "math") -> bool:
    """cons@k for one problem: does the largest class of equivalent answers hold a correct one?

    Samples without an answer do not vote. Answers vote by equivalence class, with the shared
    verifier's equivalence (`thinkforge.verify.equivalent_pairs`, or `equivalent`): `\\frac12` and
    `0.5` are one vote. Every correct answer matches the gold, so the correct ones form one class
    (no comparison needed); the wrong ones are grouped among themselves: answers that differ only
    in whitespace or `$` delimiters, or integers of the same value, without the verifier, the rest
    by it. Ties go to the class whose first answer came first.
    """
    return bool(majority_votes([extracted], [correct], equivalent, [answer_type])[0])


_INT = re.compile(r"[+-]?\d{1,60}")


def _vote_key(answer: str | None) -> str | None:
    if answer is None:
        return None
    key = "".join(answer.split()).strip("$")
    if _INT.fullmatch(key):
        key = str(int(key))
    return key or None


def majority_votes(extracted: Sequence[Sequence[str | None]], correct: Sequence[Sequence[bool]],
                   equivalent: Equivalence | None = None,
                   answer_types: Sequence[str] | None = None) -> list[bool]:
    """`majority_correct` for many problems at once: every comparison the verifier must make is
    sent in one batch (one worker pool for the whole benchmark)."""
    keys = [[_vote_key(a) for a in row] for row in extracted]
    types = list(answer_types) if answer_types is not None else ["math"] * len(keys)
    # the distinct wrong answers of each problem, in order of first appearance
    wrong = [list(dict.fromkeys(k for k, ok in zip(row, oks) if k and not ok)) for row, oks in zip(keys, correct)]
    pairs = [(i, a, b) for i, ws in enumerate(wrong) for x, a in enumerate(ws) for b in ws[x + 1:]
             if not (_INT.fullmatch(a) and _INT.fullmatch(b))]  # distinct integers differ: no need to ask
    same: dict[tuple[int, str, str], bool] = {}
    if pairs:
        judge = equivalent or _verifier_equivalence
        verdicts = judge([(a, b, types[i]) for i, a, b in pairs])
        same = {p: bool(v) for p, v in zip(pairs, verdicts)}
    out = []
    for i, (row, oks) in enumerate(zip(keys, correct)):
        # class of each voting sample: "correct" for correct answers, else a representative wrong key
        rep: dict[str, str] = {}
        for w in wrong[i]:
            rep[w] = next((r for r in dict.fromkeys(rep.values()) if same.get((i, r, w))), w)
        classes = [None if not k else "\x00correct" if ok else rep[k] for k, ok in zip(row, oks)]
        votes = Counter(c for c in classes if c)
        if not votes:
            out.append(False)
            continue
        top = max(votes.values())
        winner = next(c for c in classes if c and votes[c] == top)
        out.append(winner == "\x00correct")
    return out


def _verifier_equivalence(pairs: Sequence[tuple[str, str, str]]) -> list[bool]:
    """The shared verifier's equivalence, with its hard per-comparison timeout."""
    from thinkforge.verify import equivalent_pairs

    return equivalent_pairs(pairs)


def _vote_type(answer_type: Any) -> str:
    return "choice" if answer_type == "choice" else "math"  # integer votes are normalized integers


def score_samples(samples: Sequence[dict[str, Any]], ks: Sequence[int] = (1,),
                  equivalent: Equivalence | None = None) -> dict[str, Any]:
    """Metrics of one benchmark from eval samples (fields problem_id, correct, extracted, optional vote,
    num_tokens, finish_reason, subject, level).

    pass@1 is the mean over problems of each problem's share of correct samples, with the standard
    error of that mean across problems; cons@k (k = the fewest samples any problem has) is a majority
    vote over extracted answers by equivalence class (`majority_correct`; `equivalent` judges pairs of
    answers, default the shared verifier); pass@k for each k in `ks` with 1 < k <= that k is the unbiased
    estimator; by_subject/by_level are pass@1 within each group; mean_tokens, truncation_rate
    (finish_reason "length") and error_rate (finish_reason "error") are over samples."""
    by_problem: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in samples:
        by_problem[str(s["problem_id"])].append(s)
    if not by_problem:
        raise ValueError("no samples to score")
    n_min = min(len(v) for v in by_problem.values())
    per_problem = {pid: sum(bool(s["correct"]) for s in v) / len(v) for pid, v in by_problem.items()}
    p1, se = mean_se(list(per_problem.values()))
    out: dict[str, Any] = {
        "n_problems": len(by_problem),
        "k": n_min,
        "pass@1": p1,
        "pass@1_se": se,
        f"cons@{n_min}": sum(majority_votes(
            [[s.get("vote", s.get("extracted")) for s in v] for v in by_problem.values()],
            [[bool(s["correct"]) for s in v] for v in by_problem.values()], equivalent,
            [_vote_type(v[0].get("answer_type")) for v in by_problem.values()])) / len(by_problem),
    }
    for k in sorted(set(ks)):
        if k == 1 or k > n_min:
            continue
        out[f"pass@{k}"] = sum(
            pass_at_k(len(v), sum(bool(s["correct"]) for s in v), k) for v in by_problem.values()
        ) / len(by_problem)
    lengths = [s["num_tokens"] for s in samples if "num_tokens" in s and s.get("finish_reason") != "error"]
    if lengths:
        out["mean_tokens"] = sum(lengths) / len(lengths)
    if any("finish_reason" in s for s in samples):
        out["truncation_rate"] = sum(s.get("finish_reason") == "length" for s in samples) / len(samples)
        # samples an engine could not produce (an endpoint's errors) count as wrong; say how many
        out["error_rate"] = sum(s.get("finish_reason") == "error" for s in samples) / len(samples)
    for key in ("subject", "level"):
        groups: dict[str, list[float]] = defaultdict(list)
        for pid, v in by_problem.items():
            if v[0].get(key) is not None:
                groups[str(v[0][key])].append(per_problem[pid])
        if groups:
            out[f"by_{key}"] = {g: sum(x) / len(x) for g, x in sorted(groups.items())}
            out[f"by_{key}_n"] = {g: len(x) for g, x in sorted(groups.items())}
    out["per_problem"] = per_problem
    return out


def metrics_only(results: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Each benchmark's metrics without its per-problem scores (`per_problem*`), for cards and manifests."""
    return {name: {k: v for k, v in m.items() if not k.startswith("per_problem")}
            for name, m in (results or {}).get("benchmarks", {}).items()}


def paired_bootstrap(base: dict[str, float], final: dict[str, float], samples: int = 2000,
                     seed: int = 0) -> dict[str, float]:
    """95% interval of mean(final - base) over problems scored by both, resampling problems."""
    ids = sorted(set(base) & set(final))
    if not ids:
        raise ValueError("paired bootstrap: no problem scored in both runs")
    diffs = [final[i] - base[i] for i in ids]
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    return {
        "delta": sum(diffs) / n,
        "ci_low": means[int(0.025 * samples)],
        "ci_high": means[min(samples - 1, int(0.975 * samples))],
        "n_problems": n,
    }
