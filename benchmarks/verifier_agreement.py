"""Verifier agreement: the shared verifier against hand-labelled verdicts on answers as models write them.

The suite ``tests/data/verifier_agreement.jsonl`` holds gold / prediction / expected-verdict cases in
the forms long reasoning models produce (R1-style ``</think>`` then a summary, "**Final Answer**" and
a box, "The answer is ...", minerva's "Final Answer: The final answer is $X$. I hope it is correct.",
several boxes, multi-word ``\\text{}``, intervals, fractions/decimals/percent, sets, units, equations)
and negative controls (wrong or missing answers). Three judges read the same suite:

- the shared verifier in mode "fallback" (what filter, RL reward and evaluation use),
- the shared verifier in mode "strict" (no last-number fallback: ``Verifier(mode="strict")``),
- math-verify called directly: ``math_verify.verify(math_verify.parse(f"${gold}$"), math_verify.parse(prediction))``.

    python benchmarks/verifier_agreement.py [--suite PATH] [--misses] [--json out.json]

Prints, per judge, the agreement with the expected verdicts, false accepts (an expected-wrong case
judged correct), and per form; ``--misses`` lists every disagreement.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path

SUITE = Path(__file__).resolve().parent.parent / "tests" / "data" / "verifier_agreement.jsonl"


def load(path: Path = SUITE) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def judge_verifier(cases: list[dict], mode: str, timeout: float = 5.0) -> list[bool]:
    from thinkforge.verify import Verifier

    with Verifier(workers=2, timeout=timeout, mode=mode) as v:
        verdicts = v.verify_many([(c["gold"], c["prediction"], c.get("answer_type", "math")) for c in cases])
    return [x.correct for x in verdicts]


def judge_math_verify(cases: list[dict], timeout: int = 5) -> list[bool]:
    import math_verify

    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)
    out = []
    for c in cases:
        try:
            g = math_verify.parse(f"${c['gold']}$", parsing_timeout=timeout)
            a = math_verify.parse(c["prediction"], parsing_timeout=timeout)
            out.append(bool(math_verify.verify(g, a, timeout_seconds=timeout)))
        except Exception:  # noqa: BLE001 - a crash is not a match
            out.append(False)
    return out


def score(cases: list[dict], got: list[bool]) -> dict:
    misses = [c["id"] for c, g in zip(cases, got) if g != c["expected"]]
    negatives = [c for c in cases if not c["expected"]]
    false_accepts = [c["id"] for c, g in zip(cases, got) if g and not c["expected"]]
    per_form: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for c, g in zip(cases, got):
        per_form[c["form"]][0] += g == c["expected"]
        per_form[c["form"]][1] += 1
    return {
        "agreement": 1 - len(misses) / len(cases),
        "misses": misses,
        "false_accepts": false_accepts,
        "negatives": len(negatives),
        "per_form": {k: f"{a}/{n}" for k, (a, n) in sorted(per_form.items())},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", type=Path, default=SUITE)
    p.add_argument("--misses", action="store_true", help="list every disagreement")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    cases = load(args.suite)
    judges = {
        "fallback": judge_verifier(cases, "fallback"),
        "strict": judge_verifier(cases, "strict"),
        "math-verify": judge_math_verify(cases),
    }
    by_id = {c["id"]: c for c in cases}
    print(f"{len(cases)} cases ({sum(not c['expected'] for c in cases)} expected wrong) from {args.suite}")
    res = {}
    for name, got in judges.items():
        s = res[name] = score(cases, got)
        print(f"{name:12s} agreement {100 * s['agreement']:5.1f}%  misses {len(s['misses']):3d}  "
              f"false accepts {len(s['false_accepts'])}/{s['negatives']}")
    forms = sorted({c["form"] for c in cases})
    print(f"\n{'form':24s}" + "".join(f"{n:>14s}" for n in judges))
    for f in forms:
        print(f"{f:24s}" + "".join(f"{res[n]['per_form'][f]:>14s}" for n in judges))
    if args.misses:
        for name in judges:
            print(f"\n-- {name} misses")
            for i in res[name]["misses"]:
                c = by_id[i]
                print(f"{i}: expected {c['expected']}; gold {c['gold']!r}; prediction {c['prediction'][-120:]!r}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
