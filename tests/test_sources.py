"""Prompt sources: real data set layouts map onto one problem format; bad files are named precisely."""

import json

import pytest

from thinkforge.records import RecordError, read_jsonl, write_jsonl
from thinkforge.sources import load_problems, word_problems


def test_shared_data_sets_load(shared_data):
    math500 = load_problems(str(shared_data / "math500.jsonl"))
    assert len(math500) == 500 and math500[0]["id"].startswith("test/")
    assert {"subject", "level"} <= set(math500[0])
    gsm = load_problems(str(shared_data / "gsm8k_test.jsonl"), limit=5)
    assert len(gsm) == 5 and all(p["answer"].lstrip("-").isdigit() for p in gsm)
    aime = load_problems(str(shared_data / "aime24.jsonl"))
    assert len(aime) == 30
    amc = load_problems(str(shared_data / "amc23.jsonl") + "?limit=3")
    assert len(amc) == 3 and all("." not in p["answer"] for p in amc)  # 27.0 -> "27"


def test_builtin_word_problems_are_deterministic_and_splits_disjoint():
    train, test = word_problems("train", 400), word_problems("test", 60)
    assert word_problems("train", 400) == train
    assert not {p["problem"] for p in train} & {p["problem"] for p in test}
    assert len({p["id"] for p in train}) == 400
    for p in test[:20]:
        assert p["answer"].isdigit() and int(p["answer"]) < 100


def test_builtin_solutions_import_mode():
    probs = load_problems("builtin:word-problems?split=train&n=3&solutions=1")
    assert all(p["completion"].endswith(f"\\boxed{{{p['answer']}}}.") for p in probs)
    assert "completion" not in load_problems("builtin:word-problems?split=train&n=3")[0]


@pytest.mark.parametrize("content, expected", [
    (b'{"problem": "1+1", "answer": "2"}\n{"problem": "x", \n', ":2: malformed JSON"),
    (b'{"problem": "1+1"}\n', ":1: missing field 'answer'"),
    (b'{"answer": "2"}\n', ":1: missing field 'problem'"),
    (b'["a list"]\n', ":1: expected a JSON object"),
    (b'{"problem": "caf\xe9", "answer": "1"}\n', ":1: not UTF-8"),
    (b"", "no problems (empty file)"),
    (b'{"id": "a", "problem": "1", "answer": "1"}\n{"id": "a", "problem": "2", "answer": "2"}\n',
     "duplicate problem id 'a'"),
])
def test_bad_sources_name_file_and_line(tmp_path, content, expected):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    with pytest.raises(RecordError) as err:
        load_problems(str(path))
    assert str(path) in str(err.value) and expected in str(err.value)


def test_unknown_sources():
    with pytest.raises(RecordError, match="unknown built-in source"):
        load_problems("builtin:nope")
    with pytest.raises(RecordError, match="prompt source not found"):
        load_problems("/nonexistent/file.jsonl")


def test_write_jsonl_is_atomic_and_versioned(tmp_path):
    path = tmp_path / "out.jsonl"

    def rows():
        yield {"a": 1}
        raise RuntimeError("producer died")

    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    assert not path.exists() and not list(tmp_path.iterdir()), "no half-written file left behind"
    write_jsonl(path, [{"a": 1}])
    assert read_jsonl(path) == [{"v": 1, "a": 1}]
    assert json.loads(path.read_text())["v"] == 1
