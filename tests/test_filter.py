"""The filter stage on hand-made rollouts that hit every verdict reason, with the real verifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from thinkforge.config import load_recipe
from thinkforge.metrics import StageMetrics
from thinkforge.records import read_jsonl, write_jsonl
from thinkforge.stages.filter import (
    REJECT_ORDER,
    ContaminationIndex,
    NearDuplicateIndex,
    filter_rollouts,
    html_report,
    repeated_ngram_fraction,
)

SMOKE = Path(__file__).resolve().parents[1] / "recipes" / "smoke.yaml"

BENCH = [
    {"id": "b1", "problem": "Let f(x) = 3x^2 - 5x + 2. Find the sum of all real values of x for which f(x) equals "
                            "the value of f at x = 4, and express your answer as a common fraction.", "answer": "5/3"},
    {"id": "b2", "problem": "A regular hexagon has side length 6 centimeters. What is the area of the hexagon, "
                            "in square centimeters, expressed in simplest radical form?", "answer": "54\\sqrt{3}"},
]
EXTRA = [{"id": "x1", "problem": "Compute the number of ordered pairs of integers (a, b) with 1 <= a, b <= 50 "
                                 "such that a^2 + b^2 is divisible by 7.", "answer": "49"}]

APPLES = "Tom has 3 apples and buys 4 more apples at the market today. How many apples does Tom have now?"
LOOP = "<think>" + "I add three and four to get seven apples again. " * 30 + "</think> \\boxed{7}"


def ro(pid: str, problem: str, answer: str, idx: int, completion: str, tokens: int, finish: str = "stop",
       **extra) -> dict:
    return {"problem_id": pid, "sample_index": idx, "problem": problem, "answer": answer, "answer_type": "math",
            "completion": completion, "finish_reason": finish, "num_tokens": tokens, "teacher": "t", **extra}


def think(body: str, answer: str) -> str:
    return f"<think>\n{body}\n</think>\n\nThe answer is \\boxed{{{answer}}}."


def rollouts() -> list[dict]:
    rows = [
        # p-apples: every completion-level reason once, plus two correct and two wrong
        ro("apples", APPLES, "7", 0, think("3 + 4 = 7", "7"), 10, subject="add"),
        ro("apples", APPLES, "7", 1, think("Three plus four is seven, checking twice: 3 + 4 = 7.", "7"), 30,
           subject="add"),
        ro("apples", APPLES, "7", 2, think("3 + 4 = 8", "8"), 12, subject="add"),
        ro("apples", APPLES, "7", 3, think("3 * 4 = 12, hmm, that is what they want", "12"), 29, subject="add"),
        ro("apples", APPLES, "7", 4, "<think>\n3 + 4\n</think>\n\nThe sum of 3 and", 64, finish="length",
           subject="add"),
        ro("apples", APPLES, "7", 5, LOOP, 60, subject="add"),
        ro("apples", APPLES, "7", 6, "<think>\n3 + 4 = 7, so the answer is 7", 40, subject="add"),
        ro("apples", APPLES, "7", 7, "", 0, finish="error", error="connection: refused", subject="add"),
        ro("apples", APPLES, "7", 8, "<think>\nBen is confused.\n</think>\n\nI cannot tell.", 15, subject="add"),
        ro("apples", APPLES, "7", 9, think("x" * 10, "7"), 500, subject="add"),  # over_length (cap 100)
        # duplicates of it: the same text re-spaced and re-cased; a near copy with the same answer
        ro("apples-copy", "  tom HAS 3 apples and buys 4 more apples at the market today.   How many apples "
           "does Tom have now?", "7", 0, think("7", "7"), 5, subject="add"),
        ro("apples-near", APPLES.replace("now?", "now, in total?"), "7", 0, think("7", "7"), 5, subject="add"),
        # a different number: a different problem, kept
        ro("apples-5", APPLES.replace("3 apples", "5 apples"), "9", 0, think("5 + 4 = 9", "9"), 9, subject="add"),
        ro("apples-5", APPLES.replace("3 apples", "5 apples"), "9", 1, think("5 + 4 = 10", "10"), 9, subject="add"),
        # contaminated: a benchmark problem with one number changed, and one from the extra source
        ro("leak", BENCH[0]["problem"].replace("x = 4", "x = 5"), "2", 0, think("...", "2"), 50, subject="algebra"),
        ro("leak2", "Warm-up first. " + EXTRA[0]["problem"], "49", 0, think("...", "49"), 50, subject="nt"),
        ro("bad-gold", "What is the color of the number nine?", "\\frac{", 0, think("blue", "blue"), 9,
           subject="misc"),
    ]
    # domain balance: 3 geometry and 1 algebra problems with different pass rates
    for k, rate in enumerate((0.25, 0.5, 0.75)):
        pid = f"geo{k}"
        text = f"A square has side {k + 2}. What is its perimeter, given a polygon with {k + 7} corners nearby?"
        ans = str(4 * (k + 2))
        for i in range(4):
            ok = i < rate * 4
            rows.append(ro(pid, text, ans, i, think(f"4 * {k + 2}", ans if ok else "1"), 20 + i, subject="geometry"))
    for i in range(4):
        rows.append(ro("alg0", "Solve 2y + 6 = 10 for y when the sun shines over the quiet valley.", "2", i,
                       think("y = 2", "2" if i < 2 else "3"), 20 + i, subject="algebra"))
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("filter")
    write_jsonl(d / "bench.jsonl", BENCH)
    write_jsonl(d / "extra.jsonl", EXTRA)
    write_jsonl(d / "rollouts.jsonl", rollouts())
    cfg = load_recipe(SMOKE, {
        "template.think": True,
        "evaluate.benchmarks": [{"name": "mini", "source": str(d / "bench.jsonl")}],
        "filter.decontaminate_extra": [str(d / "extra.jsonl")],
        "filter.max_completion_tokens": 100,
        "filter.sft_per_prompt": 1,
        "filter.sft_max_examples": 3,
        "filter.dpo_pairs_per_prompt": 2,
    })
    m = StageMetrics.disabled("filter")
    result = filter_rollouts(cfg, d / "rollouts.jsonl", d / "out", metrics=m)
    return cfg, result, d / "out", m


def test_every_reason_is_counted_once(setup):
    _, result, out, m = setup
    c = result.counts
    assert set(c) == {"correct", *REJECT_ORDER} and sum(c.values()) == result.rollouts == len(rollouts())
    expected = {"engine_error": 1, "contaminated": 2, "duplicate_prompt": 1, "near_duplicate_prompt": 1,
                "unverifiable_gold": 1, "repetition": 1, "unfinished_thinking": 1, "truncated": 1,
                "no_answer": 1, "over_length": 1}
    for reason, n in expected.items():
        assert c[reason] == n, (reason, c)
    verdicts = {(v["problem_id"], v["sample_index"]): v for v in read_jsonl(out / "verdicts.jsonl")}
    assert verdicts[("apples", 5)]["reason"] == "repetition"
    assert verdicts[("apples", 6)]["reason"] == "unfinished_thinking"
    assert verdicts[("apples", 8)]["reason"] == "no_answer"
    assert verdicts[("apples", 2)]["reason"] == verdicts[("apples", 3)]["reason"] == "wrong_answer"
    assert verdicts[("apples-5", 0)]["reason"] == "correct", "a changed number is a new problem"
    assert verdicts[("leak", 0)]["matched"] == "mini:b1" and verdicts[("leak2", 0)]["matched"] == "extra:x1"
    assert verdicts[("apples-copy", 0)]["matched"] == verdicts[("apples-near", 0)]["matched"] == "apples"
    assert result.contamination == {"extra": 1, "mini": 1}
    assert m.get("filter_dropped_total", reason="contaminated") == 2
    assert m.get("filter_kept_total") == result.kept == c["correct"]


def test_rl_pool_has_pass_rate_length_spread_and_tags(setup):
    _, _, out, _ = setup
    pool = {r["id"]: r for r in read_jsonl(out / "rl_prompts.jsonl")}
    assert set(pool) == {"apples", "apples-5", "bad-gold", "geo0", "geo1", "geo2", "alg0"}, "dropped prompts are out"
    apples = pool["apples"]
    assert apples["n_samples"] == 9, "the engine error says nothing about the problem"
    # the answer verifies in 5 of 9 (0, 1, and the looping, unfinished and over-long ones): pass rate
    # measures the teacher's answers, whatever else kept a rollout out of training
    assert apples["pass_rate"] == pytest.approx(5 / 9)
    assert apples["length_std"] > 0 and apples["length_cv"] == pytest.approx(apples["length_std"] / apples["mean_length"])
    assert pool["geo0"]["difficulty"] == "hard" and pool["geo1"]["difficulty"] == "medium"
    assert pool["geo2"]["difficulty"] == "easy" and pool["geo0"]["domain"] == "geometry"


def test_sft_subset_follows_the_documented_rule(setup):
    _, result, out, _ = setup
    sft = read_jsonl(out / "sft.jsonl")
    assert len(sft) == result.sft == 3
    # round-robin over domains (add, algebra, geometry), hardest first within each (apples-5: pass rate
    # 1/2 < apples: 5/9), its shortest accepted rollout first
    assert [r["problem_id"] for r in sft] == ["apples-5", "alg0", "geo0"]
    assert sft[0]["completion"] == think("5 + 4 = 9", "9")
    mid = read_jsonl(out / "midtrain.jsonl")
    assert len(mid) == result.kept


def test_dpo_pairs_are_balanced_and_length_matched(setup):
    _, result, out, _ = setup
    pairs = read_jsonl(out / "dpo.jsonl")
    assert len(pairs) == result.dpo_pairs
    per = {}
    for p in pairs:
        per[p["problem_id"]] = per.get(p["problem_id"], 0) + 1
        assert p["chosen"] != p["rejected"] and p["rejected"]
    assert max(per.values()) <= 2 and "apples-copy" not in per and "leak" not in per
    apples = [p for p in pairs if p["problem_id"] == "apples"]
    # shortest correct (10 tokens) meets the closest complete wrong answer (12), the next (30) meets 29
    assert [(p["chosen"], p["rejected"]) for p in apples] == [
        (think("3 + 4 = 7", "7"), think("3 + 4 = 8", "8")),
        (think("Three plus four is seven, checking twice: 3 + 4 = 7.", "7"),
         think("3 * 4 = 12, hmm, that is what they want", "12"))]
    assert all(p["rejected"] for p in pairs)


def test_report_shows_counts_and_both_histograms(setup):
    _, result, out, _ = setup
    page = html_report(result)
    for text in ("Rollouts by verdict", "Problems by pass rate", "Completion length", "near_duplicate_prompt",
                 "Contaminated problems by benchmark"):
        assert text in page
    assert sum(result.length_histogram) == sum(1 for r in rollouts() if r["num_tokens"] > 0)
    assert sum(result.pass_rate_histogram) == 7
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["repetition"] == 1 and summary["length_bin_edges"][0] == 0


def test_repetition_measure():
    assert repeated_ngram_fraction("The answer is 5. " * 40) > 0.9
    prose = ("First compute the total number of apples by adding three and four which gives seven then "
             "check the result by counting up from three four times to reach seven so the final count is seven")
    assert repeated_ngram_fraction(prose) == 0.0
    long_then_loop = prose + " " + "wait let me recount the apples once more " * 40
    assert repeated_ngram_fraction(long_then_loop) > 0.5
    assert repeated_ngram_fraction("7 7 7 7") == 0.0, "too short to call a loop"


def test_near_duplicates_are_deterministic_and_need_the_same_answer():
    texts = [("a", APPLES, "7"), ("b", APPLES.replace("now?", "now, in total?"), "7"),
             ("c", APPLES.replace("now?", "now, in total?"), "8"), ("d", "Something else entirely, about trains.", "7"),
             ("e", APPLES.replace("today", "this morning"), "7")]  # Jaccard 0.68 on 3-shingles: kept
    for _ in range(2):
        idx = NearDuplicateIndex(0.8)
        assert [idx.add(k, t, a) for k, t, a in texts] == [None, "a", None, None, None]


def test_contamination_threshold_and_short_benchmark_problems():
    idx = ContaminationIndex(n=8, threshold=0.7)
    idx.add("b", "b1", BENCH[0]["problem"])
    idx.add("b", "short", "What is 17 times 23?")
    assert idx.match(BENCH[0]["problem"]) == ("b", "b1")
    assert idx.match("Introduction. " + BENCH[0]["problem"] + " Show your work.") == ("b", "b1")
    assert idx.match("Please answer: what is 17 times 23? Be brief.") == ("b", "short")
    assert idx.match("Let f(x) = 3x^2 - 5x + 2. What is f(10)?") is None
    strict = ContaminationIndex(n=8, threshold=0.0)
    strict.add("b", "b1", BENCH[0]["problem"])
    assert strict.match("Find the sum of all real values of x for which a cubic vanishes.") == ("b", "b1")


def test_default_benchmark_source_decontaminates_the_smoke_set(tmp_path):
    cfg = load_recipe(SMOKE)
    rows = [ro(p["id"], p["problem"], p["answer"], 0, think("", p["answer"]), 5)
            for p in __import__("thinkforge.sources", fromlist=["x"]).load_problems(cfg.data.train)]
    write_jsonl(tmp_path / "r.jsonl", rows)
    result = filter_rollouts(cfg, tmp_path / "r.jsonl", tmp_path / "out")
    assert result.counts["contaminated"] == 0 and result.kept == len(rows)
