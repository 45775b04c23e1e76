"""Agreement of the shared verifier with hand-labelled verdicts on answers as models write them.

`tests/data/verifier_agreement.jsonl` holds gold / prediction / expected-verdict cases in the forms
long reasoning models produce (R1-style `</think>` then a summary, "**Final Answer**" and a box,
"The answer is ...", minerva's "Final Answer: The final answer is $X$.", several boxes, multi-word
`\\text{}`, intervals, fractions/decimals/percent, sets, units, equations) with negative controls.
`benchmarks/verifier_agreement.py` prints the same numbers for strict mode and bare math-verify.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from thinkforge.verify import Verifier

SUITE = Path(__file__).parent / "data" / "verifier_agreement.jsonl"


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    return [json.loads(line) for line in SUITE.read_text().splitlines() if line.strip()]


def _judge(cases: list[dict], mode: str) -> list:
    with Verifier(workers=2, timeout=5.0, mode=mode) as v:
        return v.verify_many([(c["gold"], c["prediction"], c.get("answer_type", "math")) for c in cases])


def _miss(c: dict, v) -> str:
    return (f"{c['id']}: expected {c['expected']}, got {v.reason} (extracted {v.extracted!r} by {v.rule}); "
            f"gold {c['gold']!r}; prediction ...{c['prediction'][-100:]!r}")


def test_the_suite_is_big_and_has_negatives(cases):
    assert len(cases) >= 250
    assert sum(not c["expected"] for c in cases) >= 100
    assert len({c["id"] for c in cases}) == len(cases)
    assert all(isinstance(c["expected"], bool) and c["gold"] and c["prediction"] for c in cases)


def test_fallback_mode_agrees_with_the_labels(cases):
    verdicts = _judge(cases, "fallback")
    misses = [_miss(c, v) for c, v in zip(cases, verdicts) if v.correct != c["expected"]]
    agreement = 1 - len(misses) / len(cases)
    assert agreement >= 0.97, f"agreement {agreement:.1%}, {len(misses)} misses:\n" + "\n".join(misses)
    false_accepts = [_miss(c, v) for c, v in zip(cases, verdicts) if v.correct and not c["expected"]]
    assert not false_accepts, "false accepts:\n" + "\n".join(false_accepts)
    assert all(v.reason != "timeout" for v in verdicts)


def test_strict_mode_never_accepts_a_wrong_answer(cases):
    verdicts = _judge(cases, "strict")
    false_accepts = [_miss(c, v) for c, v in zip(cases, verdicts) if v.correct and not c["expected"]]
    assert not false_accepts, "false accepts:\n" + "\n".join(false_accepts)
