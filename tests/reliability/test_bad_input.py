"""Bad input, table-driven: every bad recipe, prompt source or record file gets a one-line error that
names the file, the line or field, and what was expected, with no traceback.

- recipes: through the real CLI in a subprocess (``python -m thinkforge.cli config``), so the asserted
  text is exactly what a user sees on stderr, with its exit code;
- prompt sources: through ``thinkforge.sources.load_problems`` (what the generate stage calls), and one
  case end to end through ``thinkforge run``, where the message surfaces in the failed task's log;
- record files (eval samples, verifier input): through ``thinkforge score`` / ``thinkforge verify``
  subprocesses, which read JSONL with the same reader as every stage.

Fuzzing of the same parsers: tests/reliability/test_fuzz.py. Verifier inputs built to be slow or huge
(nested LaTeX, giant exponents, megabyte strings): tests/test_verify_pool.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from thinkforge.records import MAX_PROBLEM_CHARS, RecordError
from thinkforge.sources import load_problems

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run([sys.executable, "-m", "thinkforge.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """stderr as lines; the first carries the ``thinkforge: error: `` prefix, which is dropped here."""
    lines = proc.stderr.splitlines()
    assert lines and lines[0].startswith("thinkforge: error: "), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return [lines[0].removeprefix("thinkforge: error: "), *lines[1:]]


# ------------------------------------------------------------------------------------------ recipes

# (id, recipe text or bytes, extra CLI args, expected stderr lines as regexes; {f} = the recipe path)
RECIPES = [
    ("unknown-key", "sft:\n  bogus: 1\n", [],
     [r"{f}: sft\.bogus: unknown key \(expected one of: enabled, learning_rate, .*\)"]),
    ("misspelt-key", "sft:\n  learnin_rate: 1.0e-5\n", [],
     [r"{f}: sft\.learnin_rate: unknown key \(did you mean learning_rate\?\)"]),
    ("unknown-section", "foo:\n  lr: 1\n", [],
     [r"{f}: foo: unknown key \(expected a section: run, model, .*cluster\)"]),
    ("nested-unknown-key", "evaluate:\n  benchmarks:\n    - name: a\n      limt: 3\n", [],
     [r"{f}: evaluate\.benchmarks\.0\.limt: unknown key \(did you mean limit\?\)"]),
    ("out-of-range-low", "generate:\n  samples_per_prompt: 0\n", [],
     [r"{f}: generate\.samples_per_prompt: Input should be greater than or equal to 1 \(got 0\)"]),
    ("out-of-range-high", "rl:\n  learning_rate: 3\n", [],
     [r"{f}: rl\.learning_rate: Input should be less than or equal to 1 \(got 3\)"]),
    ("negative-seed", "run:\n  seed: -1\n", [],
     [r"{f}: run\.seed: Input should be greater than or equal to 0 \(got -1\)"]),
    ("wrong-type", "sft:\n  learning_rate: fast\n", [],
     [r"{f}: sft\.learning_rate: Input should be a valid number.* \(got 'fast'\)"]),
    ("bad-choice", "model:\n  dtype: float8\n", [],
     [r"{f}: model\.dtype: Input should be 'float32', 'bfloat16' or 'float16' \(got 'float8'\)"]),
    ("inconsistent", "rl:\n  prompt_min_pass_rate: 0.9\n  prompt_max_pass_rate: 0.1\n", [],
     [r"{f}: rl: Value error, prompt_min_pass_rate must not exceed prompt_max_pass_rate \(got a mapping\)"]),
    ("section-not-a-mapping", "sft: 3\n", [],
     [r"{f}: sft: Input should be a valid dictionary or instance of SFTConfig \(got 3\)"]),
    ("invalid-yaml", "sft:\n  learning_rate: [1e-5\nrl: {}\n", [],
     [r"{f}: line \d+: invalid YAML \(.+\)"]),
    ("not-a-mapping", "- sft\n- rl\n", [],
     [r"{f}: expected a mapping of sections at the top level, got list"]),
    ("not-utf8", b"run:\n  name: caf\xe9\n", [],
     [r"{f}: not UTF-8 text \(invalid continuation byte at byte 16\)"]),
    ("all-errors-at-once", "sft:\n  bogus: 1\n  epochs: -1\ndpo:\n  beta: 0\n", [],
     [r"{f}: sft\.bogus: unknown key .*", r"{f}: sft\.epochs: Input should be greater than 0 \(got -1\)",
      r"{f}: dpo\.beta: Input should be greater than 0 \(got 0\)"]),
    ("set-unknown-key", "", ["--set", "rl.lr=3"],
     [r"{f}: rl\.lr: unknown key \(expected one of: .*learning_rate.*\)"]),
    ("set-out-of-range", "", ["--set", "evaluate.temperature=5"],
     [r"{f}: evaluate\.temperature: Input should be less than or equal to 2 \(got 5\)"]),
    ("set-without-value", "", ["--set", "sft.learning_rate"],
     [r"--set sft\.learning_rate: expected <section>\.<field>=<value>"]),
    ("set-unknown-section", "", ["--set", "nosuch.x=1"],
     [r"override: nosuch\.x: expected <section>\.<field> with section one of run, model, .*cluster"]),
]


@pytest.mark.parametrize("text, args, expected", [c[1:] for c in RECIPES], ids=[c[0] for c in RECIPES])
def test_bad_recipe_one_line_per_error_through_the_cli(tmp_path, text, args, expected):
    path = tmp_path / "recipe.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text or "run:\n  name: ok\n")
    proc = cli("config", "--recipe", str(path), *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = error_lines(proc)
    assert len(lines) == len(expected), lines
    for pattern in expected:  # every error on a line of its own, in any order
        regex = pattern.format(f=re.escape(str(path)))
        assert sum(bool(re.fullmatch(regex, line)) for line in lines) == 1, f"{lines!r}: no line ~ {pattern!r}"


def test_missing_recipe_file_through_the_cli(tmp_path):
    proc = cli("config", "--recipe", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert error_lines(proc) == [f"{tmp_path / 'nope.yaml'}: recipe file not found"]


# ----------------------------------------------------------------------------------- prompt sources

GOOD = b'{"id": "a", "problem": "What is 1 + 1?", "answer": "2"}\n'
LONG = "x" * (MAX_PROBLEM_CHARS + 1)

# (id, file name, content, expected message as a regex; {f} = the file's path)
SOURCES = [
    ("malformed-json-line", "p.jsonl", GOOD + b'{"problem": "x", \n',
     r"{f}:2: malformed JSON at column \d+: Expecting property name enclosed in double quotes"),
    ("truncated-line", "p.jsonl", GOOD + b'{"problem": "2+2", "answer": "4"',
     r"{f}:2: malformed JSON at column \d+: Expecting ',' delimiter"),
    ("not-an-object", "p.jsonl", GOOD + b'["What is 2 + 2?", "4"]\n', r"{f}:2: expected a JSON object, got list"),
    ("missing-answer", "p.jsonl", b'{"problem": "1+1"}\n',
     r"{f}:1: missing field 'answer': expected the reference final answer"),
    ("missing-problem", "p.jsonl", b'{"answer": "2"}\n',
     r"{f}:1: missing field 'problem' \(or 'question'\): expected the problem text"),
    ("problem-wrong-type", "p.jsonl", GOOD + b'{"problem": 12, "answer": "2"}\n',
     r"{f}:2: field 'problem' is int, expected a string \(the problem text\)"),
    ("question-wrong-type", "p.jsonl", b'{"question": {"text": "1+1"}, "answer": "2"}\n',
     r"{f}:1: field 'question' is dict, expected a string \(the problem text\)"),
    ("non-utf8", "p.jsonl", GOOD + b'{"problem": "caf\xe9 costs 3", "answer": "3"}\n',
     r"{f}:2: not UTF-8 \(byte 16: b'\\xe9'\)"),
    ("utf16-file", "p.jsonl", GOOD.decode().encode("utf-16"), r"{f}:1: not UTF-8 \(byte 0: b'\\xff'\)"),
    ("empty-file", "p.jsonl", b"", r"{f}: no problems \(empty file\)"),
    ("blank-lines-only", "p.jsonl", b"\n  \n\n", r"{f}: no problems \(empty file\)"),
    ("duplicate-ids", "p.jsonl", GOOD + b'{"id": "b", "problem": "2+2", "answer": "4"}\n' + GOOD,
     r"{f}:3: field 'id': duplicate problem id 'a' \(first at {f}:1\)"),
    ("absurdly-long-problem", "p.jsonl", GOOD + json.dumps({"problem": LONG, "answer": "1"}).encode() + b"\n",
     r"{f}:2: field 'problem' is 65,537 characters, expected at most 65,536 "
     r"\(thinkforge\.records\.MAX_PROBLEM_CHARS\)"),
    ("json-absurdly-long-problem", "p.json", json.dumps([{"problem": LONG, "answer": "1"}]).encode(),
     r"{f}:item 1: field 'problem' is 65,537 characters, expected at most 65,536 "
     r"\(thinkforge\.records\.MAX_PROBLEM_CHARS\)"),
    ("answer-is-a-list", "p.jsonl", b'{"problem": "1+1", "answer": ["2"]}\n',
     r"{f}:1: field 'answer' is a list, expected one reference final answer \(a string or a number\)"),
    ("json-not-a-list", "p.json", b'{"problem": "1+1", "answer": "2"}', r"{f}: expected a JSON list of problems"),
    ("json-item-missing-answer", "p.json", b'[{"problem": "1+1", "answer": "2"}, {"problem": "2+2"}]',
     r"{f}:item 2: missing field 'answer': expected the reference final answer"),
]


@pytest.mark.parametrize("name, content, expected", [c[1:] for c in SOURCES], ids=[c[0] for c in SOURCES])
def test_bad_prompt_source_one_line_naming_file_line_and_field(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(RecordError) as err:
        load_problems(str(path))
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400, msg
    assert re.fullmatch(expected.format(f=re.escape(str(path))), msg), f"{msg!r} !~ {expected!r}"


def test_a_problem_at_the_cap_is_accepted(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"problem": "y" * MAX_PROBLEM_CHARS, "answer": "1"}) + "\n")
    assert len(load_problems(str(path))[0]["problem"]) == MAX_PROBLEM_CHARS


@pytest.mark.slow
def test_bad_source_through_thinkforge_run_names_file_and_line(tmp_path):
    """End to end: `thinkforge run` on a recipe whose training data has a broken line stops before any
    task starts, with one line naming the file and the line, exit code 2 (bad input)."""
    data = tmp_path / "train.jsonl"
    data.write_bytes(GOOD + b'{"problem": "x", \n')
    proc = cli("run", "--recipe", str(ROOT / "recipes" / "smoke.yaml"), "--set", f"data.train={data}",
               "--pipeline-root", str(tmp_path / "root"), cwd=tmp_path, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith(f"thinkforge: error: {data}:2: malformed JSON at column"), last
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").iterdir()), "no task ran"


# ---------------------------------------------------------------------------------- record files

SAMPLE = {"problem_id": "p1", "gold": "2", "completion": "1 + 1 = \\boxed{2}"}

# (id, command, content, expected stderr line as a regex; {f} = the file's path)
RECORDS = [
    ("score-malformed", "score", json.dumps(SAMPLE).encode() + b"\n{oops\n",
     r"{f}:2: malformed JSON at column 2: Expecting property name enclosed in double quotes"),
    ("score-missing-field", "score", b'{"problem_id": "p1", "gold": "2"}\n',
     r"{f}:1: missing field 'completion' \(expected a string\)"),
    ("score-wrong-type", "score", json.dumps({**SAMPLE, "completion": ["a", "b"]}).encode() + b"\n",
     r"{f}:1: field 'completion' is list, expected a string"),
    ("score-non-utf8", "score", b'{"problem_id": "p\xff", "gold": "2", "completion": "2"}\n',
     r"{f}:1: not UTF-8 \(byte 17: b'\\xff'\)"),
    ("score-empty", "score", b"", r"{f}: no samples"),
    ("verify-missing-gold", "verify", b'{"answer": "2"}\n', r"{f}:1: missing field 'gold' \(expected a string\)"),
    ("verify-wrong-type", "verify", b'{"gold": ["2"], "answer": "2"}\n',
     r"{f}:1: field 'gold' is list, expected a string"),
    ("verify-not-an-object", "verify", b'"2"\n', r"{f}:1: expected a JSON object, got str"),
]


@pytest.mark.parametrize("command, content, expected", [c[1:] for c in RECORDS], ids=[c[0] for c in RECORDS])
def test_bad_record_file_through_the_cli(tmp_path, command, content, expected):
    path = tmp_path / "records.jsonl"
    path.write_bytes(content)
    proc = cli(command, str(path), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1 and re.fullmatch(expected.format(f=re.escape(str(path))), lines[0]), \
        f"{lines!r} !~ {expected!r}"
