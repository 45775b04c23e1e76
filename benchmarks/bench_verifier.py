"""Verifier throughput: the shared verifier (worker pool, hard timeouts) vs sequential math-verify.

Both judge the same N (gold, completion) items, a deterministic mix of integers, fractions vs
decimals, radicals, intervals, polynomials, degrees, wrong and missing answers, and a few adversarial
completions (``\\boxed{10^{10^{10^{10}}}}``, a 100 KB answer, 5,000 nested braces). The baseline is
what a script would do without thinkforge: ``math_verify.parse`` on gold and completion and
``math_verify.verify`` in one process, with math-verify's own (signal-based) timeouts set to the same
per-item timeout. The pool is timed twice: as used (extraction + exact-match fast path + workers) and
with the fast path off (every non-trivial pair through math-verify: the parallelism alone).

    python benchmarks/bench_verifier.py [--n 10000] [--workers W] [--timeout 2] [--json out.json]

Prints answers/s of each, the ratio pool / sequential (baseline measured in the same run), worker
start-up time (not in the timed section), verdict agreement with the baseline and timeouts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from collections import Counter


def make_items(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    items: list[tuple[str, str, str]] = []
    adversarial = [
        "The answer is \\boxed{10^{10^{10^{10}}}}.",
        "So \\boxed{" + "9" * 100_000 + "}",
        "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",
        "\\boxed{(((((((((((((((((((((((((x+1)))))))))))))))))))))))))^{99999}}",
    ]
    for i in range(n):
        r = rng.random()
        wrong = rng.random() < 0.3
        a, b = rng.randint(1, 999), rng.randint(2, 99)
        if i % 500 == 499:  # 0.2% adversarial
            items.append((str(a), adversarial[(i // 500) % len(adversarial)], "math"))
            continue
        if r < 0.40:
            gold, ans = str(a), str(a + 1 if wrong else a)
        elif r < 0.55:
            gold, ans = f"\\frac{{{a}}}{{{b * 2}}}", (f"{a / (b * 2) + 1:.6g}" if wrong else f"{a / (b * 2):.10g}")
            if not wrong and len(ans) > 8:  # a repeating decimal: give the fraction another way
                ans = f"{a}/{b * 2}"
        elif r < 0.65:
            k = rng.randint(2, 9)
            gold, ans = f"{k}\\sqrt{{2}}", f"\\sqrt{{{2 * k * k + (1 if wrong else 0)}}}"
        elif r < 0.75:
            gold, ans = f"({a}, {a + b}]", f"({a},{a + b + (1 if wrong else 0)}]"
        elif r < 0.85:
            gold, ans = f"x^2+{2 * b}x+{b * b}", f"(x+{b + (1 if wrong else 0)})^2"
        elif r < 0.92:
            gold, ans = f"{a}^\\circ", f"{a + (1 if wrong else 0)}"
        elif r < 0.96:
            gold, ans = f"{a}\\text{{ cm}}", f"{a + (1 if wrong else 0)}"
        else:
            items.append((str(a), "I could not finish this one.", "math"))
            continue
        completion = f"<think>\nworking on it ({i})\n</think>\n\nThe final answer is $\\boxed{{{ans}}}$."
        items.append((gold, completion, "math"))
    return items


def sequential_math_verify(items: list[tuple[str, str, str]], timeout: float) -> tuple[list[bool], float]:
    import math

    import math_verify

    timeout = max(1, math.ceil(timeout))  # math-verify's signal.alarm takes whole seconds
    for name in ("math_verify", "latex2sympy2_extended"):  # it logs every timeout with the whole input
        logging.getLogger(name).setLevel(logging.CRITICAL)
    out = []
    t0 = time.perf_counter()
    for gold, completion, _ in items:
        try:
            g = math_verify.parse(f"${gold}$", parsing_timeout=timeout)
            a = math_verify.parse(completion, parsing_timeout=timeout)
            ok = bool(math_verify.verify(g, a, timeout_seconds=timeout))
        except BaseException as e:  # noqa: BLE001 - a timeout or a parser crash counts as incorrect
            if isinstance(e, KeyboardInterrupt):
                raise
            ok = False
        out.append(ok)
    return out, time.perf_counter() - t0


def pooled(items: list[tuple[str, str, str]], workers: int, timeout: float, fast_path: bool) -> dict:
    from thinkforge.verify import Verifier

    with Verifier(workers=workers, timeout=timeout, fast_path=fast_path) as v:
        t0 = time.perf_counter()
        v.verify_many([("7", "\\boxed{x+y}", "math")] * max(1, v._size) * 2)  # start and warm every worker
        startup = time.perf_counter() - t0
        v.timeouts = 0
        t0 = time.perf_counter()
        verdicts = v.verify_many(items)
        seconds = time.perf_counter() - t0
        return {"verdicts": [x.correct for x in verdicts], "seconds": seconds, "startup_s": startup,
                "timeouts": v.timeouts, "reasons": dict(Counter(x.reason for x in verdicts))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--timeout", type=float, default=2.0, help="per-item timeout, both sides (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args(argv)

    items = make_items(args.n, args.seed)
    print(f"{len(items)} items ({sum(1 for i in range(len(items)) if i % 500 == 499)} adversarial), "
          f"{args.workers} workers, timeout {args.timeout:g} s", flush=True)
    pool = pooled(items, args.workers, args.timeout, fast_path=True)
    pool_mv = pooled(items, args.workers, args.timeout, fast_path=False)
    base, base_s = sequential_math_verify(items, args.timeout)
    n = len(items)
    res = {
        "n": n, "workers": args.workers, "timeout_s": args.timeout, "cpus": os.cpu_count(),
        "pool_answers_per_s": n / pool["seconds"], "pool_seconds": pool["seconds"],
        "pool_startup_s": pool["startup_s"], "pool_timeouts": pool["timeouts"], "pool_reasons": pool["reasons"],
        "pool_no_fast_path_answers_per_s": n / pool_mv["seconds"], "pool_no_fast_path_seconds": pool_mv["seconds"],
        "pool_no_fast_path_timeouts": pool_mv["timeouts"],
        "sequential_answers_per_s": n / base_s, "sequential_seconds": base_s,
        "ratio": base_s / pool["seconds"], "ratio_no_fast_path": base_s / pool_mv["seconds"],
        "agreement_with_sequential": sum(a == b for a, b in zip(pool["verdicts"], base)) / n,
        "correct_pool": sum(pool["verdicts"]), "correct_sequential": sum(base),
    }
    print(f"verifier pool (as used):      {res['pool_answers_per_s']:8.0f} answers/s  ({pool['seconds']:.1f} s, "
          f"start-up {pool['startup_s']:.1f} s not counted, {pool['timeouts']} timeouts)")
    print(f"verifier pool (no fast path): {res['pool_no_fast_path_answers_per_s']:8.0f} answers/s  "
          f"({pool_mv['seconds']:.1f} s, {pool_mv['timeouts']} timeouts)")
    print(f"sequential math-verify:       {res['sequential_answers_per_s']:8.0f} answers/s  ({base_s:.1f} s)")
    print(f"ratio pool / sequential: {res['ratio']:.2f}x (no fast path: {res['ratio_no_fast_path']:.2f}x); "
          f"verdict agreement {100 * res['agreement_with_sequential']:.1f}% "
          f"(correct: pool {res['correct_pool']}, sequential {res['correct_sequential']})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
