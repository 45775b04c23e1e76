"""Fuzzing the two parsers that see untrusted text: the answer extractor and the record parser.

Thousands of generated cases each; the property is "returns or raises the documented error, quickly".
"""

import json
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thinkforge.records import RecordError, iter_jsonl
from thinkforge.sources import normalize_problem
from thinkforge.answers import RULES, extract_answer, last_boxed

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


# --- recipes: whatever YAML a user writes, the loader answers with a Recipe or a ConfigError -------

SECTION_NAMES = st.sampled_from(["run", "model", "sft", "rl", "evaluate", "cluster", "generate", "storage", "bogus"])
KEY_NAMES = st.sampled_from(["name", "seed", "learning_rate", "max_steps", "benchmarks", "stages", "defaults",
                             "pass_k", "temperature", "dtype", "endpoint", "enabled", "tolerations", "lr", ""])
RECIPE_DATA = st.one_of(
    JSON_VALUES,
    st.dictionaries(SECTION_NAMES, st.one_of(JSON_VALUES, st.dictionaries(KEY_NAMES, JSON_VALUES, max_size=4)),
                    max_size=4),
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(RECIPE_DATA)
def test_recipe_loader_accepts_or_names_the_problem(tmp_path_factory, data):
    import yaml

    from thinkforge.config import ConfigError, Recipe, load_recipe

    path = tmp_path_factory.getbasetemp() / "fuzz-recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        recipe = load_recipe(path)
    except ConfigError as e:
        for line in str(e).splitlines():  # every error on its own line, each naming the file
            assert line.startswith(f"{path}: "), line
        return
    assert isinstance(recipe, Recipe)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.text(max_size=40), max_size=4))
def test_set_flags_accept_or_name_the_flag(flags):
    from thinkforge.config import ConfigError, Recipe, apply_overrides, parse_set_flags, validate

    try:
        validate(apply_overrides(Recipe().model_dump(), parse_set_flags(flags)), origin="flags")
    except ConfigError as e:
        for line in str(e).splitlines():
            assert line.startswith(("--set ", "override: ", "flags: ")), str(e)
