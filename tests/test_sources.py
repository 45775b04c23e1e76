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


def test_object_store_sources_jsonl_and_parquet(s3_server, object_store, monkeypatch, tmp_path):
    """s3:// and minio:// URIs download through thinkforge.storage (a real S3 server on loopback)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("THINKFORGE_CACHE", str(tmp_path / "cache"))
    rows = [{"id": f"s{i}", "question": f"What is {i} + 1?", "answer": i + 1} for i in range(5)]
    local = tmp_path / "p.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    object_store.upload_file(local, "prompts/p.jsonl")
    object_store.upload_file(tmp_path / "p.parquet", "prompts/p.parquet")
    a = load_problems(f"s3://{object_store.bucket}/prompts/p.jsonl")
    b = load_problems(f"minio://{object_store.bucket}/prompts/p.parquet?limit=3")
    assert [p["answer"] for p in a] == ["1", "2", "3", "4", "5"] and a[0]["problem"] == "What is 0 + 1?"
    assert [p["id"] for p in b] == ["s0", "s1", "s2"] and b == a[:3]
    with pytest.raises(Exception, match="no-such"):
        load_problems(f"s3://{object_store.bucket}/prompts/no-such.jsonl")


def test_hf_sources_from_local_datasets(tmp_path):
    """`hf:` loads through `datasets`: a saved data set directory (with splits) or a folder of data files.
    (The hub itself is out of reach here; the same call serves hub names on a connected machine.)"""
    import datasets

    rows = [{"problem": f"Compute {i} * 2.", "solution": f"It is \\boxed{{{2 * i}}}.", "unique_id": f"u{i}"}
            for i in range(4)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(tmp_path / "saved"))
    train = load_problems(f"hf:{tmp_path / 'saved'}")
    assert [p["answer"] for p in train] == ["0", "2", "4", "6"] and train[1]["id"] == "u1"
    assert len(load_problems(f"hf:{tmp_path / 'saved'}:test")) == 2
    with pytest.raises(RecordError, match="no split 'dev'"):
        load_problems(f"hf:{tmp_path / 'saved'}:dev")
    files = tmp_path / "files"
    files.mkdir()
    (files / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_problems(f"hf:{files}:train?limit=2")) == 2
    with pytest.raises(RecordError, match="hf:"):
        load_problems("hf:a:b:c")


def test_import_mode_carries_traces():
    probs = load_problems("builtin:word-problems?split=train&n=2&solutions=1")
    assert all("completion" in p for p in probs)
