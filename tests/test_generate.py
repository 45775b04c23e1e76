"""Resumable generation: shards, resume after SIGKILL, settings changes, import mode."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_openai_engine import FaultServer

from thinkforge.config import load_recipe
from thinkforge.records import read_jsonl
from thinkforge.stages.generate import GenerationError, generate

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes" / "smoke.yaml"


@pytest.fixture
def server():
    s = FaultServer()
    yield s
    s.close()


def http_cfg(url: str, **over: Any):
    """A deterministic engine over HTTP: the loopback server's answer is a function of the request's seed."""
    o = {"data.train": "builtin:word-problems?split=train&n=10", "generate.engine": "openai",
         "generate.endpoint": url, "generate.endpoint_model": "m", "generate.samples_per_prompt": 2,
         "generate.shard_prompts": 3, "generate.concurrency": 2, "generate.keep_shards": True}
    o.update(over)
    return load_recipe(SMOKE, o)


def shards(out: Path) -> list[Path]:
    return sorted(out.with_name(out.name + ".shards").glob("shard-*.jsonl"))


def test_shards_resume_to_the_same_final_file(server, tmp_path):
    full = tmp_path / "full.jsonl"
    res = generate(http_cfg(server.url), full)
    assert res.shards == 4 and res.rollouts == 20 and len(shards(full)) == 4
    rows = read_jsonl(full)
    assert [(r["problem_id"], r["sample_index"]) for r in rows][:4] == [
        (rows[0]["problem_id"], 0), (rows[0]["problem_id"], 1), (rows[2]["problem_id"], 0), (rows[2]["problem_id"], 1)]

    # an interrupted run: two chunks done, one half-written temp file left by the kill
    part = tmp_path / "part.jsonl"
    sdir = part.with_name("part.jsonl.shards")
    sdir.mkdir()
    for p in shards(full)[:2]:
        (sdir / p.name).write_bytes(p.read_bytes())
    (sdir / "manifest.json").write_bytes((full.with_name("full.jsonl.shards") / "manifest.json").read_bytes())
    (sdir / ".shard-00002.jsonl.abc.tmp").write_text('{"half": ')
    before = len(server.requests)
    res = generate(http_cfg(server.url, **{"generate.keep_shards": False}), part)
    assert res.resumed == 12 and res.shards == 2
    assert len(server.requests) - before == 4, "only the 4 prompts of the 2 missing chunks are requested"
    assert part.read_bytes() == full.read_bytes()
    assert not sdir.exists(), "shards are removed once merged"


def test_changed_settings_discard_old_shards_and_more_samples_add_only_new_indices(server, tmp_path, caplog):
    out = tmp_path / "r.jsonl"
    generate(http_cfg(server.url), out)
    n = len(server.requests)
    generate(http_cfg(server.url, **{"generate.samples_per_prompt": 3}), out)
    new = server.requests[n:]
    assert len(new) == 10 and all(b["n"] == 1 for _, b, _ in new), "only sample index 2 of each problem"
    rows = read_jsonl(out)
    assert len(rows) == 30 and sorted({r["sample_index"] for r in rows}) == [0, 1, 2]

    n = len(server.requests)
    generate(http_cfg(server.url, **{"generate.temperature": 0.3}), out)
    assert len(server.requests) - n == 10 and "other generation settings" in caplog.text
    assert all(b["temperature"] == 0.3 for _, b, _ in server.requests[n:])


def test_one_writer_per_shard_directory(server, tmp_path):
    import fcntl

    out = tmp_path / "r.jsonl"
    sdir = tmp_path / "r.jsonl.shards"
    sdir.mkdir()
    with open(sdir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(GenerationError, match="another generation is writing"):
            generate(http_cfg(server.url), out)


def test_import_mode_needs_no_engine(tmp_path):
    src = tmp_path / "cot.jsonl"
    src.write_text("".join(json.dumps({"id": f"c{i}", "question": f"What is {i}+1?", "answer": str(i + 1),
                                       "trace": f"<think>{i}+1</think> \\boxed{{{i + 1}}}"}) + "\n" for i in range(3)))
    cfg = load_recipe(SMOKE, {"data.train": str(src), "generate.sample_imported": False,
                              "generate.engine": "openai", "generate.endpoint": "http://127.0.0.1:9/v1"})
    res = generate(cfg, tmp_path / "r.jsonl")
    assert res.imported == 3 and res.rollouts == 3 and res.output_tokens == 0
    rows = read_jsonl(tmp_path / "r.jsonl")
    assert [r["completion"] for r in rows][0] == "<think>0+1</think> \\boxed{1}"
    assert all(r["teacher"] == "imported" and r["sample_index"] == 0 for r in rows)


# --------------------------------------------------------------------- SIGKILL midway, real model

SCRIPT = """
import json, sys
from thinkforge.config import load_recipe
from thinkforge.stages.generate import generate
cfg = load_recipe(sys.argv[1], json.loads(sys.argv[3]))
r = generate(cfg, sys.argv[2])
print("RESULT " + json.dumps(r.__dict__))
"""

KILL_OVERRIDES = {"data.train": "builtin:word-problems?split=train&n=12", "generate.samples_per_prompt": 2,
                  "generate.max_new_tokens": 8, "generate.shard_prompts": 3, "generate.batch_size": 6,
                  "generate.sample_imported": False}


def _start(out: Path) -> subprocess.Popen:
    env = {**os.environ, "THINKFORGE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(SMOKE), str(out), json.dumps(KILL_OVERRIDES)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _result(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.slow
def test_sigkill_midway_then_rerun_equals_an_uninterrupted_run(tmp_path):
    whole = tmp_path / "whole.jsonl"
    killed = tmp_path / "killed.jsonl"
    reference = _start(whole)
    victim = _start(killed)
    sdir = killed.with_name("killed.jsonl.shards")
    deadline = time.monotonic() + 240
    while not list(sdir.glob("shard-*.jsonl")):
        assert victim.poll() is None, f"generation ended before the kill: {victim.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "no shard written within 240 s"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    done_before = sorted(p.name for p in sdir.glob("shard-*.jsonl"))
    assert 1 <= len(done_before) < 4, done_before
    assert not killed.exists(), "no final file from a killed run"
    for p in sdir.glob("shard-*.jsonl"):  # every shard on disk is whole
        assert all(json.loads(line)["problem_id"] for line in p.read_text().splitlines())

    again = _result(_start(killed))
    assert again["resumed"] == 6 * len(done_before) and again["shards"] == 4 - len(done_before)
    assert _result(reference)["rollouts"] == again["rollouts"] == 24
    assert killed.read_bytes() == whole.read_bytes()
