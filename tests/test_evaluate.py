"""The evaluate stage and its benchmark catalog, run with scripted engines (no model): MATH-500's own
reference solutions, AIME's integer answers, GPQA's shuffled options and redaction, `thinkforge score`
through the same code, and the ablation table/report."""

import json
import logging
import random
from pathlib import Path

import pytest

from thinkforge.cli import main as cli_main
from thinkforge.config import Benchmark, Recipe, load_recipe
from thinkforge.engines import Completion
from thinkforge.evalsets import CATALOG, load_benchmark, parse_integer, resolve_k, shuffled_order
from thinkforge.records import RecordError, read_jsonl
from thinkforge.scoring import metrics_only
from thinkforge.stages import evaluate as evaluate_mod
from thinkforge.stages.evaluate import evaluate, integer_verdict, score_benchmark
from thinkforge.stages.report import (ablation, ablation_html, ablation_lines, ablation_markdown, ablation_plot,
                                      compare, markdown)

ROOT = Path(__file__).resolve().parents[1]


class ScriptedEngine:
    """Answers each problem text with `answers(text, n)`; records what it was asked."""

    def __init__(self, answers):
        self.answers = answers
        self.calls = []

    def generate(self, problems, params, progress=None):
        self.calls.append((list(problems), params))
        out = [[Completion(text=t, num_tokens=len(t.split()), finish_reason="stop") for t in self.answers(p, params.n)]
               for p in problems]
        if progress:
            progress(len(problems))
        return out

    def close(self):
        pass


def recipe(benchmarks, **evaluate):
    return Recipe.model_validate({"run": {"name": "eval-test"},
                                  "evaluate": {"benchmarks": benchmarks, "bootstrap_samples": 200, **evaluate}})


# --- MATH-500: the reference solutions as model outputs ------------------------------------------


@pytest.fixture(scope="module")
def math500_run(shared_data, tmp_path_factory):
    """MATH-500 scored through the evaluate stage twice in one call: as its own reference solutions,
    and with the solutions shuffled across problems."""
    rows = [json.loads(line) for line in (shared_data / "math500.jsonl").read_text().splitlines()]
    solution = {r["problem"].strip(): r["solution"] for r in rows}
    texts = list(solution)
    rng = random.Random(0)
    perm = list(range(len(texts)))
    while any(i == j for i, j in enumerate(perm)):  # a derangement: no problem keeps its own solution
        rng.shuffle(perm)
    shuffled = {texts[i]: solution[texts[j]] for i, j in enumerate(perm)}
    calls = {"n": 0}

    def answers(text, n):
        return [solution[text] if calls["n"] <= len(texts) else shuffled[text]] * n

    class Engine(ScriptedEngine):
        def generate(self, problems, params, progress=None):
            calls["n"] += len(problems)
            return super().generate(problems, params, progress)

    src = str(shared_data / "math500.jsonl")
    cfg = recipe([{"name": "math500", "source": src}, {"name": "math500-shuffled", "dataset": "math500", "source": src}],
                 k=1, pass_k=[1], extraction="strict")
    out = tmp_path_factory.mktemp("math500")
    return evaluate(cfg, "unused", out, label="reference", engine=Engine(answers)), out


def test_math500_reference_solutions_pass_and_shuffled_fail(math500_run):
    res, out = math500_run
    ref, shuf = res["benchmarks"]["math500"], res["benchmarks"]["math500-shuffled"]
    assert ref["n_problems"] == shuf["n_problems"] == 500
    assert ref["pass@1"] >= 0.99, ref["reasons"]
    assert shuf["pass@1"] <= 0.05  # only answers two problems happen to share (MATH has a few "2"s)
    assert set(ref["by_level"]) == {"1", "2", "3", "4", "5"} and len(ref["by_subject"]) == 7
    assert sum(ref["by_level_n"].values()) == 500
    assert res["benchmark_specs"]["math500"]["answer_type"] == "math"
    assert len(read_jsonl(out / "samples-math500.jsonl")) == 500


def test_score_cli_is_the_evaluate_stage(math500_run, tmp_path, capsys):
    """`thinkforge score` on samples written by the stage reproduces the stage's metrics."""
    _, out = math500_run
    verified = [s for name in ("math500", "math500-shuffled") for s in read_jsonl(out / f"samples-{name}.jsonl")]
    verified = [s for s in verified if s["problem_id"] < "test/c"]  # a slice, to keep re-verification quick
    stripped = tmp_path / "samples.jsonl"  # only what a user outside thinkforge would have
    keep = ("benchmark", "problem_id", "gold", "completion", "answer_type", "num_tokens", "finish_reason", "subject",
            "level")
    stripped.write_text("".join(json.dumps({k: s[k] for k in keep if k in s}) + "\n" for s in verified))
    js = tmp_path / "scores.json"
    assert cli_main(["score", str(stripped), "--k", "1", "--mode", "strict", "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    n = len({s["problem_id"] for s in verified})
    assert f"math500: {n} problems x 1 samples  pass@1 100.0 ± 0.0" in printed
    scored = json.loads(js.read_text())
    for name in ("math500", "math500-shuffled"):
        stage = score_benchmark([s for s in verified if s["benchmark"] == name], [1])
        stage.pop("per_problem")
        stage.pop("per_problem_by_reading")
        assert scored[name] == stage


# --- AIME: integer answers; the CLI and the stage agree on pass@k/cons@k -----------------------------


def test_aime_answers_compare_as_integers(shared_data, tmp_path):
    b = load_benchmark(Benchmark(name="aime24", source=str(shared_data / "aime24.jsonl")))
    assert b.answer_type == "integer" and b.k == CATALOG["aime24"].k == 16 and len(b.problems) == 30
    gold = {p["problem"]: p["answer"] for p in b.problems}

    def answers(text, n):
        g = gold[text]
        return [f"So the answer is \\boxed{{{g}}}.",  # right
                f"The answer is 0{g}.",  # right: leading zero, compared as an integer
                f"\\boxed{{\\frac{{{2 * int(g)}}}{{2}}}}",  # equal in value, but not an integer answer
                "\\boxed{1000}"][:n]  # wrong (AIME answers are 0-999)

    cfg = recipe([{"name": "aime24", "source": str(shared_data / "aime24.jsonl"), "k": 4}], pass_k=[1, 2, 4])
    res = evaluate(cfg, "unused", tmp_path / "eval", engine=ScriptedEngine(answers))
    m = res["benchmarks"]["aime24"]
    assert m["k"] == 4 and m["pass@1"] == pytest.approx(0.5) and m["pass@1_se"] == 0.0
    assert m["pass@2"] == pytest.approx(1 - 1 / 6) and m["pass@4"] == 1.0
    assert m["cons@4"] == 1.0  # "204" and "0204" are one vote for 204
    assert m["correct_by_rule"] == {"answer_is": 30, "boxed": 30}
    js = tmp_path / "cli.json"
    assert cli_main(["score", str(tmp_path / "eval" / "samples-aime24.jsonl"), "--k", "1,2,4", "--json", str(js)]) == 0
    assert json.loads(js.read_text())["aime24"] == {k: v for k, v in m.items() if not k.startswith("per_problem")}


@pytest.mark.parametrize("text, value", [("204", 204), ("033", 33), ("27.0", 27), ("1,000", 1000), ("$-5$", -5),
                                         ("\\text{12}", 12), ("\\frac{4}{2}", None), ("2.5", None), ("x", None),
                                         ("1e3", None), ("", None)])
def test_parse_integer(text, value):
    assert parse_integer(text) == value


def test_integer_verdict_reasons():
    assert integer_verdict("33", "\\boxed{033}", "strict")["correct"]
    assert integer_verdict("33", "no idea", "strict")["reason"] == "no_answer"
    assert integer_verdict("33", "\\boxed{33.5}", "strict")["reason"] == "wrong_answer"
    assert integer_verdict("x", "\\boxed{1}", "strict")["reason"] == "unverifiable_gold"


# --- the catalog ----------------------------------------------------------------------------------


def test_every_catalog_entry_declares_answer_type_and_k():
    assert {"math500", "aime24", "amc23", "gsm8k", "gpqa-diamond", "custom"} <= set(CATALOG)
    for spec in CATALOG.values():
        assert spec.answer_type in ("math", "integer", "choice") and spec.k >= 1
    assert CATALOG["gpqa-diamond"].redact and CATALOG["gpqa-diamond"].answer_type == "choice"


def test_k_precedence():
    assert resolve_k(Benchmark(name="aime24", k=3), default_k=8) == 3  # the benchmark's own
    assert resolve_k(Benchmark(name="aime24"), default_k=8) == 8  # evaluate.k
    assert resolve_k(Benchmark(name="aime24"), default_k=0) == 16  # the catalog's
    assert resolve_k(Benchmark(name="mine", source="x.jsonl"), default_k=0) == 4  # custom


def test_shared_sets_load_through_the_catalog(shared_data):
    amc = load_benchmark(Benchmark(name="amc23", source=str(shared_data / "amc23.jsonl")))
    assert len(amc.problems) == 40 and amc.problems[0]["answer"] == "27" and amc.k == 8
    gsm = load_benchmark(Benchmark(name="gsm8k", source=str(shared_data / "gsm8k_test.jsonl"), limit=5))
    assert len(gsm.problems) == 5 and gsm.problems[0]["answer"] == "18" and gsm.k == 1
    with pytest.raises(RecordError, match="unknown dataset 'nope'"):
        load_benchmark(Benchmark(name="x", dataset="nope", source="y"))
    with pytest.raises(RecordError, match="needs `source`"):
        load_benchmark(Benchmark(name="mine"))


def test_custom_jsonl_with_a_field_map(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps({"uid": f"q{i}", "q": f"What is {i} + {i}?", "final": 2 * i, "topic": "add",
                                     "difficulty": i % 2}) + "\n" for i in range(6)))
    b = load_benchmark(Benchmark(name="mine", source=str(f), answer_type="integer",
                                 fields={"problem": "q", "answer": "final", "id": "uid", "subject": "topic",
                                         "level": "difficulty"}))
    assert [p["id"] for p in b.problems] == [f"q{i}" for i in range(6)]
    assert b.problems[3] | {"source": None} == {"id": "q3", "problem": "What is 3 + 3?", "answer": "6",
                                                "answer_type": "integer", "subject": "add", "level": 1,
                                                "source": None}
    with pytest.raises(RecordError, match=r"mine.jsonl:1: missing field 'nope'"):
        load_benchmark(Benchmark(name="mine", source=str(f), fields={"problem": "nope"}))
    with pytest.raises(RecordError, match="unknown field map keys"):
        load_benchmark(Benchmark(name="mine", source=str(f), fields={"question_text": "q"}))


def test_custom_multiple_choice_options_are_shuffled(tmp_path):
    f = tmp_path / "mc.jsonl"
    f.write_text("".join(json.dumps({"id": f"m{i}", "question": f"Pick the prime #{i}", "options": ["4", "7", "9", "8"],
                                     "correct": "7"}) + "\n" for i in range(12)))
    b = load_benchmark(Benchmark(name="mc", source=str(f), answer_type="choice",
                                 fields={"choices": "options", "answer": "correct"}))
    for p in b.problems:
        assert f"({p['answer']}) 7\n" in p["problem"] and p["answer_type"] == "choice"
    assert len({p["answer"] for p in b.problems}) > 1


# --- GPQA-Diamond: fixed shuffle, and its text never leaves the process ----------------------------

SECRET = "QUOKKA-7781"  # stands in for GPQA question text: must appear in no log, file, report or error


def _gpqa_rows(n):
    return [{"Record ID": f"rec{i:03d}", "Question": f"{SECRET} question {i}: which gas is inert?",
             "Correct Answer": f"{SECRET} argon {i}", "Incorrect Answer 1": f"{SECRET} oxygen {i}",
             "Incorrect Answer 2": f"{SECRET} chlorine {i}", "Incorrect Answer 3": f"{SECRET} fluorine {i}",
             "Subdomain": "Chemistry (general)"} for i in range(n)]


def test_gpqa_shuffle_is_fixed_and_text_is_never_logged(tmp_path, capsys):
    src = tmp_path / "gpqa_diamond.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _gpqa_rows(12)))
    bench = Benchmark(name="gpqa-diamond", source=str(src))
    b = load_benchmark(bench)
    assert b.answer_type == "choice" and b.k == 8 and b.redact
    again = load_benchmark(bench.model_copy(update={"limit": 5}))
    assert [p["problem"] for p in again.problems] == [p["problem"] for p in b.problems[:5]]  # fixed, limit-proof
    assert len({p["answer"] for p in b.problems}) > 1  # the correct option is not always (A)
    for i, p in enumerate(b.problems):
        assert f"({p['answer']}) {SECRET} argon {i}\n" in p["problem"]
        assert shuffled_order(4, 0, p["id"]) == shuffled_order(4, 0, p["id"])
    other = load_benchmark(bench.model_copy(update={"seed": 1}))
    assert [p["answer"] for p in other.problems] != [p["answer"] for p in b.problems]

    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger("thinkforge")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        gold = {p["problem"]: p["answer"] for p in b.problems}
        cfg = recipe([bench.model_dump()], k=2, pass_k=[1, 2])
        res = evaluate(cfg, "unused", tmp_path / "eval", label="final",
                       engine=ScriptedEngine(lambda text, n: [f"\\boxed{{{gold[text]}}}", "(A)"][:n]))
        md = markdown(cfg, compare(cfg, res, res), {}, ablation(cfg, {"base": res, "final": res}))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    m = res["benchmarks"]["gpqa-diamond"]
    assert m["pass@1"] >= 0.5 and m["by_subject"] == {"Chemistry (general)": m["pass@1"]}
    cap = capsys.readouterr()
    logged = "\n".join(r.getMessage() for r in records) + cap.out + cap.err
    assert records and SECRET not in logged
    assert SECRET not in md and SECRET not in json.dumps(res)
    for f in (tmp_path / "eval").rglob("*"):
        assert SECRET not in f.read_text(), f

    bad = tmp_path / "bad.jsonl"
    rows = _gpqa_rows(2)
    del rows[1]["Correct Answer"]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecordError) as err:
        load_benchmark(Benchmark(name="gpqa-diamond", source=str(bad)))
    assert "bad.jsonl:2: missing field 'Correct Answer'" in str(err.value) and SECRET not in str(err.value)
    bad.write_text(f'{{"Question": "{SECRET}", oops\n')
    with pytest.raises(RecordError) as err:
        load_benchmark(Benchmark(name="gpqa-diamond", source=str(bad)))
    assert SECRET not in str(err.value)


# --- the protocol and the engine ----------------------------------------------------------------------


def test_protocol_and_endpoint_reach_the_engine(monkeypatch, tmp_path):
    made = {}

    def fake_make_engine(kind, model, template, **kw):
        made.update(kind=kind, model=model, **kw)
        return engine

    engine = ScriptedEngine(lambda text, n: ["The answer is \\boxed{3}."] * n)
    monkeypatch.setattr(evaluate_mod, "make_engine", fake_make_engine)
    cfg = recipe([{"name": "wp", "source": "builtin:word-problems?split=test", "limit": 3}], k=5, pass_k=[1, 4],
                 engine="openai", endpoint="http://hosted.example/v1", endpoint_model="baseline-7b",
                 max_new_tokens=1234)
    res = evaluate(cfg, "ignored", tmp_path)
    assert made["kind"] == "openai" and made["endpoint"] == "http://hosted.example/v1"
    assert made["endpoint_model"] == "baseline-7b" and made["seed"] == cfg.run.seed
    params = engine.calls[0][1]
    assert (params.n, params.temperature, params.top_p, params.max_new_tokens) == (5, 0.6, 0.95, 1234)
    assert res["model"] == "baseline-7b@http://hosted.example/v1"
    assert res["protocol"]["temperature"] == 0.6 and res["benchmarks"]["wp"]["k"] == 5
    assert "pass@4" in res["benchmarks"]["wp"] and "pass@5" in res["benchmarks"]["wp"]


def test_an_endpoint_evaluation_streams_like_generation(tmp_path):
    """engine=openai in evaluation takes generate's client settings, streaming and its idle timeout too:
    a long reasoning answer must not hit the overall request deadline in evaluation either."""
    from thinkforge.engines.openai import OpenAIEngine

    cfg = recipe([{"name": "wp", "source": "builtin:word-problems?split=test", "limit": 3}], engine="openai",
                 endpoint="http://127.0.0.1:9/v1", endpoint_model="m")
    cfg = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={
        "stream": True, "stream_idle_timeout_s": 42.0, "request_timeout_s": 7.0, "concurrency": 3})})
    engine = evaluate_mod.build_engine(cfg, "ignored")
    try:
        assert isinstance(engine, OpenAIEngine)
        assert (engine.stream, engine.stream_idle_timeout_s) == (True, 42.0)
        assert (engine.request_timeout_s, engine.concurrency) == (7.0, 3)
    finally:
        engine.close()


def test_recipes_state_the_protocol():
    phi = load_recipe(ROOT / "recipes" / "phi4-mini-reasoning.yaml")
    assert (phi.evaluate.temperature, phi.evaluate.top_p, phi.evaluate.max_new_tokens) == (0.6, 0.95, 32768)
    assert phi.evaluate.per_stage and {b.name for b in phi.evaluate.benchmarks} == {"math500", "aime24", "gpqa-diamond"}
    assert load_recipe(ROOT / "recipes" / "smoke.yaml").evaluate.per_stage


# --- the ablation table -------------------------------------------------------------------------------


def _results(label, values):
    return {"label": label, "benchmarks": {b: {"pass@1": v, "pass@1_se": 0.02, "k": 4, "n_problems": 50}
                                           for b, v in values.items()}}


def test_ablation_table_markdown_html_and_plot():
    cfg = recipe([{"name": "math500", "source": "x"}, {"name": "aime24", "source": "y"}])
    res = {"base": _results("base", {"math500": 0.3, "aime24": 0.1}),
           "midtrain": _results("midtrain", {"math500": 0.4, "aime24": 0.15}),
           "sft": {"label": "sft", "skipped": True, "reason": "sft stage off", "benchmarks": {}},
           "dpo": _results("dpo", {"math500": 0.5, "aime24": 0.2}),
           "final": _results("final", {"math500": 0.55, "aime24": 0.25})}
    table = ablation(cfg, res)
    assert [r["title"] for r in table["rows"]] == ["base", "+mid-train", "+DPO", "+RL"]
    assert table["skipped"] == {"sft": "sft stage off"}
    md = ablation_markdown(cfg, table)
    assert "| model | math500 pass@1 | aime24 pass@1 |" in md
    assert "| +DPO | 50.0 ± 2.0 | 20.0 ± 2.0 |" in md and "Not evaluated: sft (sft stage off)" in md
    assert "math500: base 71.8, midtrain 82.9" in md  # the paper's numbers beside ours
    png = ablation_plot(table)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    page = ablation_html(md, png)
    assert "data:image/png;base64," in page and "<table>" in page


def test_ablation_rows_carry_the_paired_step_from_the_row_above_and_the_boxed_reading():
    cfg = recipe([{"name": "toy", "source": "x"}])

    def res(label, per, boxed):
        return {"label": label, "benchmarks": {"toy": {
            "pass@1": sum(per) / len(per), "pass@1_se": 0.1, "k": 4, "n_problems": len(per),
            "per_problem": {f"p{i}": v for i, v in enumerate(per)}, "readings": {"strict": boxed, "boxed": boxed}}}}

    table = ablation(cfg, {"base": res("base", [0.0, 0.25, 0.0, 0.5], 0.0),
                           "midtrain": res("midtrain", [0.5, 0.5, 0.25, 0.75], 0.4),
                           "sft": {"label": "sft", "skipped": True, "reason": "sft stage off"},
                           "dpo": res("dpo", [0.5, 0.5, 0.25, 0.75], 0.5),
                           "final": res("final", [1.0, 0.75, 0.5, 1.0], 0.75)})
    steps = [r["benchmarks"]["toy"].get("vs_previous") for r in table["rows"]]
    assert steps[0] is None  # the base row has nothing above it
    assert [round(s["delta"], 4) for s in steps[1:]] == [0.3125, 0.0, 0.3125]  # +DPO against +mid-train (SFT off)
    assert steps[3]["ci_low"] > 0 and steps[2]["ci_low"] == steps[2]["ci_high"] == 0
    md = "\n".join(ablation_lines(table))
    assert "| model | toy pass@1 | toy change [95% CI] | toy boxed only |" in md
    assert "| +mid-train | 50.0 ± 10.0 | +31.2 [" in md and "| base | 18.8 ± 10.0 | - | 0.0 |" in md


def test_report_states_what_strict_extraction_would_read(tmp_path):
    """The fallback report's strict line equals a real strict-mode evaluation of the same completions."""
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"id": f"p{i}", "problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                           for i in range(6)))

    def answers(text, n):
        i = int(text.split()[2])
        return [f"So \\boxed{{{i + 1}}}.", f"The answer is {i + 1}.", f"I count {i + 1}", f"I count {i}"][:n]

    scores = {}
    for mode in ("fallback", "strict"):
        cfg = recipe([{"name": "toy", "source": str(src)}], k=4, pass_k=[1], extraction=mode)
        scores[mode] = evaluate(cfg, "unused", tmp_path / mode, label="final", engine=ScriptedEngine(answers))
    fb, st = scores["fallback"]["benchmarks"]["toy"], scores["strict"]["benchmarks"]["toy"]
    assert (fb["pass@1"], st["pass@1"]) == (0.75, 0.5)
    assert fb["correct_by_rule"] == {"answer_is": 6, "boxed": 6, "last_number": 6}
    cfg = recipe([{"name": "toy", "source": str(src)}], k=4, pass_k=[1], extraction="fallback")
    md = markdown(cfg, compare(cfg, scores["fallback"], scores["fallback"]), {})
    assert "correct answers by rule: base answer_is 6, boxed 6, last_number 6; final answer_is 6" in md
    # the stricter readings of the fallback verdicts are what a strict evaluation of the same text reads
    assert fb["readings"] == {"strict": st["pass@1"], "boxed": 0.25}
    assert st["readings"] == {"strict": 0.5, "boxed": 0.25}
    assert "pass@1 by how answers are read (a stricter reading counts fewer answers): strict 50.0 -> 50.0 " \
           "(+0.0 [+0.0, +0.0]); boxed 25.0 -> 25.0 (+0.0 [+0.0, +0.0])" in md
    assert "per_problem_by_reading" not in metrics_only(scores["fallback"])["toy"]  # cards, manifests


def test_stage_rows_show_the_first_and_last_quarter_of_a_noisy_curve():
    cfg = recipe([{"name": "toy", "source": "x"}])
    rewards = [-1.0, 0.0, -0.5, 0.5, 0.25, 1.0, 0.5, 1.0]
    history = [{"reward": r, "step": i + 1} for i, r in enumerate(rewards)] + [{"train_runtime": 9.0, "step": 8}]
    rl_summary = {"steps": 8, "examples": 16, "metric": "reward", "first": -1.0, "last": 1.0, "seconds": 9.0,
                  "history": history}
    md = markdown(cfg, [], {"rl": rl_summary})
    assert "| rl | 8 steps on 16 examples, reward -1.000 -> 1.000 (mean of the first 2 steps -0.500, " \
           "of the last 2 0.750), 9s |" in md
    check = {"prompts": 24, "samples": 4, "temperature": 0.6, "before": 0.5, "after": 0.625, "delta": 0.125,
             "ci_low": 0.02, "ci_high": 0.23, "n_problems": 24}
    md = markdown(cfg, [], {"rl": {**rl_summary, "extra": {"reward_check": check}}})
    assert "of the last 2 0.750); its 24 prompts at T=0.6 pass 50.0 before, 62.5 after (+12.5 points, " \
           "95% [+2.0, +23.0]), 9s |" in md
