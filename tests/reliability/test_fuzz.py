"""Fuzzing the two parsers that see untrusted text: the answer extractor and the record parser.

Thousands of generated cases each; the property is "returns or raises the documented error, quickly".
"""

import json
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thinkforge.records import RecordError, iter_jsonl
from thinkforge.sources import normalize_problem
from thinkforge.verify import RULES, extract_answer, last_boxed

LATEX_BITS = st.sampled_from(["\\boxed{", "}", "{", "\\frac{", "\\sqrt", "$", "The answer is ", "Answer:", "(C)",
                              "</think>", "<think>", "\\text{", "^", "-", "12", "3.5", " ", "\n", "\\fbox{", "\\\\"])
TEXT = st.one_of(st.text(max_size=400), st.lists(LATEX_BITS, max_size=200).map("".join))
FAST = settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(TEXT, st.sampled_from(["math", "choice"]), st.sampled_from(["strict", "fallback"]))
def test_extractor_never_crashes_or_stalls(text, answer_type, mode):
    start = time.perf_counter()
    answer, rule = extract_answer(text, answer_type, mode)
    assert time.perf_counter() - start < 1.0
    assert (answer is None) == (rule is None)
    assert rule is None or rule in RULES
    if mode == "strict":
        assert rule != "last_number"
    boxed = last_boxed(text)
    assert boxed is None or isinstance(boxed, str)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
                           max_leaves=12)
RECORDS = st.dictionaries(st.sampled_from(["id", "problem", "question", "answer", "solution", "completion", "x"]),
                          JSON_VALUES, max_size=6)


@FAST
@given(RECORDS)
def test_record_parser_accepts_or_names_the_problem(rec):
    try:
        out = normalize_problem(rec, "fuzz.jsonl:1", "fuzz", 0)
    except RecordError as e:
        assert str(e).startswith("fuzz.jsonl:1: ")
        return
    assert out["problem"] and out["answer"] and isinstance(out["id"], str)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(RECORDS.map(json.dumps).map(str.encode), st.binary(max_size=60)), min_size=1, max_size=5))
def test_jsonl_reader_accepts_or_names_file_and_line(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("fuzz") / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    try:
        for rec in iter_jsonl(path):
            assert isinstance(rec, (dict, list, str, int, float, bool, type(None)))
    except RecordError as e:
        assert str(e).startswith(f"{path}:")
