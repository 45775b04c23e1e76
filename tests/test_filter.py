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
    # dropped prompts are out, and so is the one whose reference answer does not parse
    assert set(pool) == {"apples", "apples-5", "geo0", "geo1", "geo2", "alg0"}, "dropped prompts are out"
    assert setup[1].rl_dropped == {"unverifiable_gold": 1, "unsolved": 0}
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
    cfg = load_recipe(SMOKE, {"dpo.enabled": False})  # only correct rollouts here: nothing for DPO
    rows = [ro(p["id"], p["problem"], p["answer"], 0, think("", p["answer"]), 5)
            for p in __import__("thinkforge.sources", fromlist=["x"]).load_problems(cfg.data.train)]
    write_jsonl(tmp_path / "r.jsonl", rows)
    result = filter_rollouts(cfg, tmp_path / "r.jsonl", tmp_path / "out")
    assert result.counts["contaminated"] == 0 and result.kept == len(rows)


POWER_TOWER = "<think>\nbig\n</think>\n\nThe answer is \\boxed{10^{10^{10^{10}}}}."  # the verifier times out


def _small_filter(tmp_path, rows, dpo=True, **overrides):
    write_jsonl(tmp_path / "r.jsonl", rows)
    cfg = load_recipe(SMOKE, {"template.think": True, "filter.decontaminate": False, "dpo.enabled": dpo,
                              "filter.dpo_pairs_per_prompt": 2, **{f"filter.{k}": v for k, v in overrides.items()}})
    return filter_rollouts(cfg, tmp_path / "r.jsonl", tmp_path / "out"), tmp_path / "out"


def _rl_and_dpo_rows():
    q1 = "A farmer has 9 cows and sells 2 of them on a rainy Monday. How many cows does the farmer keep?"
    q2 = "Lena reads 6 pages every evening for 5 evenings in a row. How many pages has Lena read in all?"
    q3 = "A train leaves at noon with 40 seats and 13 of them are taken. How many seats are still free?"
    return [
        # solo: one correct answer and no complete wrong one: nothing to pair it with
        ro("solo", q1, "7", 0, think("9 - 2 = 7", "7"), 10),
        ro("solo", q1, "7", 1, "<think>\n9 - 2 = 6\n</think>\n\nThe answer is \\boxed{6", 64, finish="length"),
        ro("solo", q1, "7", 2, POWER_TOWER, 12),
        ro("solo", q1, "7", 3, "<think>\n9 minus 2 is 8, so \\boxed{8}", 11),
        ro("solo", q1, "7", 4, "<think>\nhmm\n</think>\n\nI do not know.", 9),
        # mixed: the complete wrong answer is the rejected one, however close in length a truncated one is
        ro("mixed", q2, "30", 0, think("6 * 5 = 30", "30"), 20),
        ro("mixed", q2, "30", 1, "<think>\n6 * 5 = 35\n</think>\n\n\\boxed{35", 21, finish="length"),
        ro("mixed", q2, "30", 2, think("6 + 5 = 11", "11"), 90),
        # never: the teacher is wrong every time (a wrong reference, or a problem beyond it)
        ro("never", q3, "27", 0, think("40 - 13 = 17", "17"), 15),
        ro("never", q3, "27", 1, think("40 - 13 = 37", "37"), 15),
    ]


def test_dpo_rejected_samples_are_complete_wrong_answers_only(tmp_path):
    result, out = _small_filter(tmp_path, _rl_and_dpo_rows())
    verdicts = {(v["problem_id"], v["sample_index"]): v["reason"] for v in read_jsonl(out / "verdicts.jsonl")}
    assert [verdicts[("solo", i)] for i in range(5)] == ["correct", "truncated", "timeout", "unfinished_thinking",
                                                        "no_answer"]
    pairs = read_jsonl(out / "dpo.jsonl")
    assert [p["problem_id"] for p in pairs] == ["mixed"] and result.dpo_pairs == 1
    assert pairs[0]["rejected"] == think("6 + 5 = 11", "11")


def test_rl_pool_leaves_out_unsolved_problems_unless_asked(tmp_path):
    result, out = _small_filter(tmp_path / "a", _rl_and_dpo_rows())
    assert {r["id"] for r in read_jsonl(out / "rl_prompts.jsonl")} == {"solo", "mixed"}
    assert result.rl_dropped == {"unverifiable_gold": 0, "unsolved": 1} and result.rl_prompts == 2
    assert "left out: 1 unsolved" in html_report(result)
    bad_gold = ro("bad", "What is the color of the number nine?", "\\frac{", 0, think("blue", "blue"), 9)
    result, out = _small_filter(tmp_path / "b", _rl_and_dpo_rows() + [bad_gold], rl_keep_unsolved=True)
    pool = {r["id"]: r for r in read_jsonl(out / "rl_prompts.jsonl")}
    assert set(pool) == {"solo", "mixed", "never"} and pool["never"]["pass_rate"] == 0
    assert result.rl_dropped == {"unverifiable_gold": 1, "unsolved": 0}
    result, out = _small_filter(tmp_path / "c", [bad_gold, *_rl_and_dpo_rows()[:1]], dpo=False,
                                rl_keep_unverifiable_gold=True)
    assert {r["id"] for r in read_jsonl(out / "rl_prompts.jsonl")} == {"solo", "bad"}


def test_r1_completions_without_the_opening_think_tag_are_normalized_before_filtering(tmp_path):
    q = "Sam bakes 4 trays of 6 rolls for the fair on Sunday. How many rolls does Sam bake?"
    rows = [
        # DeepSeek-R1 through a chat API: the <think> opening sat in the prompt, the answer follows </think>
        ro("r1", q, "24", 0, "Okay, 4 trays of 6 rolls. The answer is 25? No: 4 * 6 = 24.\n</think>\n\n"
           "The answer is \\boxed{24}.", 30),
        ro("r1", q, "24", 1, "4 * 6 = 26, the answer is 26.\n</think>\n\n\\boxed{26}", 20),
    ]
    result, out = _small_filter(tmp_path, rows)
    sft = read_jsonl(out / "sft.jsonl")
    assert sft[0]["completion"].startswith("<think>\nOkay, 4 trays") and sft[0]["completion"].count("<think>") == 1
    mid = read_jsonl(out / "midtrain.jsonl")
    assert all(r["completion"].startswith("<think>\n") for r in mid)
    pair = read_jsonl(out / "dpo.jsonl")[0]
    assert pair["chosen"].startswith("<think>\n") and pair["rejected"].startswith("<think>\n4 * 6 = 26")
    assert result.kept == 1 and result.normalized_think == 2
    assert json.loads((out / "summary.json").read_text())["normalized_think"] == 2


def test_no_dpo_pairs_fails_in_the_filter_with_the_reasons(tmp_path):
    """Only truncated wrong rollouts: DPO would have nothing to reject. The filter says so, with the
    counts and what to change, instead of the DPO task failing later on an empty file."""
    from thinkforge.config import load_recipe
    from thinkforge.records import EmptyDataError, write_jsonl
    from thinkforge.stages.filter import filter_rollouts

    cfg = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "smoke.yaml")
    rows = []
    for i in range(3):
        base = {"problem_id": f"p{i}", "problem": f"What is {i} + 2?", "answer": str(i + 2), "source": "t",
                "answer_type": "math", "teacher": "t", "num_tokens": 8}
        rows.append({**base, "sample_index": 0, "completion": f"The answer is \\boxed{{{i + 2}}}.",
                     "finish_reason": "stop"})
        rows.append({**base, "sample_index": 1, "completion": "Let me think about", "finish_reason": "length"})
    src = tmp_path / "rollouts.jsonl"
    write_jsonl(src, rows)
    with pytest.raises(EmptyDataError, match=r"no DPO pairs .* truncated=3 .* dpo.enabled=false"):
        filter_rollouts(cfg, src, tmp_path / "out")
    off = cfg.model_copy(update={"dpo": cfg.dpo.model_copy(update={"enabled": False})})
    assert filter_rollouts(off, src, tmp_path / "out2").dpo_pairs == 0


def test_strict_filter_keeps_stated_answers_only(tmp_path):
    """filter.extraction=strict (the cpu-demo's): a bare trailing number is not a verified final answer."""
    q = "A farmer has 9 cows and sells 2 of them on a rainy Monday. How many cows does the farmer keep?"
    rows = [ro("cows", q, "7", 0, think("9 - 2 = 7", "7"), 10),
            ro("cows", q, "7", 1, "<think>\n9 - 2\n</think>\n\nThe farmer keeps 9 - 2 = 7", 12)]
    reasons = {}
    for mode in ("fallback", "strict"):
        (tmp_path / mode).mkdir()
        _small_filter(tmp_path / mode, rows, dpo=False, extraction=mode)
        reasons[mode] = [v["reason"] for v in read_jsonl(tmp_path / mode / "out" / "verdicts.jsonl")]
    assert reasons == {"fallback": ["correct", "correct"], "strict": ["correct", "no_answer"]}
