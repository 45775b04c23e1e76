"""Durable generation: with object storage configured, every finished shard goes to the store, and a
retried task on an EMPTY disk (a fresh pod: new shard directory, new HOME) restores them and samples
only the chunks no attempt finished, ending with the same file as an uninterrupted run.

The S3 server is the real moto server on loopback (tests/plugins/s3.py). The fast tests use the
loopback OpenAI-shaped server (deterministic: its answer is a function of the request's seed) and
interrupt the first attempt with a hook after N shards; the slow test SIGKILLs a real tiny model's
generation in a subprocess.
"""

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
from thinkforge.stages import generate as gen_mod
from thinkforge.stages.generate import generate

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes" / "smoke.yaml"
S3_VARS = ("THINKFORGE_S3_ENDPOINT", "THINKFORGE_S3_SECURE", "THINKFORGE_S3_ACCESS_KEY", "THINKFORGE_S3_SECRET_KEY")


@pytest.fixture
def server():
    s = FaultServer()
    yield s
    s.close()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Credentials and endpoint the way a pod gets them (environment, from Secrets)."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def no_s3_env(monkeypatch):
    for key in S3_VARS:
        monkeypatch.delenv(key, raising=False)


def http_cfg(url: str, bucket: str = "", **over: Any):
    """10 problems x 2 samples in chunks of 3 prompts: 4 shards (3, 3, 3, 1 prompts)."""
    o = {"run.name": "durable-gen", "data.train": "builtin:word-problems?split=train&n=10", "generate.engine": "openai",
         "generate.endpoint": url, "generate.endpoint_model": "m", "generate.samples_per_prompt": 2,
         "generate.shard_prompts": 3, "generate.concurrency": 2}
    if bucket:
        o["storage.bucket"] = bucket
    o.update(over)
    return load_recipe(SMOKE, o)


class Interrupted(BaseException):
    """Stands in for the pod dying: not an Exception, so nothing on the way catches it."""


def fail_after(monkeypatch, n: int) -> None:
    """The (n+1)-th shard write kills the attempt: n shards are written (and uploaded), the next chunk is lost."""
    real = gen_mod.ShardStore.add
    count = {"n": 0}

    def add(self, records):
        if count["n"] >= n:
            raise Interrupted()
        count["n"] += 1
        return real(self, records)

    monkeypatch.setattr(gen_mod.ShardStore, "add", add)


def remote_shards(store, run: str = "durable-gen") -> dict[str, list[str]]:
    """{shard set digest: [complete shard names]} under <prefix>/<run>/generate/shards."""
    base = f"runs/{run}/generate/shards"
    out: dict[str, list[str]] = {}
    for key in store.list_keys(base):
        digest, *rest = key[len(base) + 1:].split("/")
        out.setdefault(digest, [])
        if len(rest) == 2 and rest[1] == "_MANIFEST.json":
            out[digest].append(rest[0])
    return {d: sorted(v) for d, v in out.items()}


def test_retry_on_an_empty_disk_samples_only_the_missing_shards(server, object_store, s3_env, tmp_path, monkeypatch,
                                                                caplog):
    # the uninterrupted run, local only (today's behaviour)
    with monkeypatch.context() as mp:
        for key in S3_VARS:
            mp.delenv(key)
        whole = tmp_path / "whole" / "rollouts.jsonl"
        ref = generate(http_cfg(server.url), whole)
    assert ref.shards == 4 and ref.rollouts == 20
    assert object_store.list_keys("") == [], "nothing goes to storage without it configured"

    # attempt 1: killed after two shards
    cfg = http_cfg(server.url, object_store.bucket)
    with monkeypatch.context() as mp:
        fail_after(mp, 2)
        with pytest.raises(Interrupted):
            generate(cfg, tmp_path / "pod-1" / "rollouts.jsonl")
    sets = remote_shards(object_store)
    assert len(sets) == 1 and list(sets.values())[0] == ["shard-00000", "shard-00001"], sets

    # attempt 2: a fresh pod, nothing of attempt 1 on its disk
    monkeypatch.setenv("HOME", str(tmp_path / "home-2"))
    caplog.set_level("INFO", logger="thinkforge")
    out = tmp_path / "pod-2" / "rollouts.jsonl"
    assert not out.parent.exists()
    before = len(server.requests)
    res = generate(cfg, out)
    assert res.restored == 2 and res.resumed == 12 and res.shards == 2
    assert len(server.requests) - before == 4, "only the 4 prompts of the 2 unfinished chunks are sampled"
    assert out.read_bytes() == whole.read_bytes()
    uri = f"s3://{object_store.bucket}/runs/durable-gen/generate/shards/{list(sets)[0]}"
    assert f"generate: restored 2 shard(s) from {uri}; 2 of 4 chunks already done (12 of 20 samples)" in caplog.text
    assert list(remote_shards(object_store).values())[0] == ["shard-00000", "shard-00001", "shard-00002",
                                                             "shard-00003"]

    # attempt 3 (a retry after the merge, before KFP uploaded the output): nothing is sampled at all
    before = len(server.requests)
    res = generate(cfg, tmp_path / "pod-3" / "rollouts.jsonl")
    assert res.restored == 4 and res.shards == 0 and len(server.requests) == before
    assert (tmp_path / "pod-3" / "rollouts.jsonl").read_bytes() == whole.read_bytes()


def test_an_interrupted_upload_is_not_used_and_other_settings_get_their_own_shards(server, object_store, s3_env,
                                                                                   tmp_path, monkeypatch, caplog):
    cfg = http_cfg(server.url, object_store.bucket)
    with monkeypatch.context() as mp:
        fail_after(mp, 3)
        with pytest.raises(Interrupted):
            generate(cfg, tmp_path / "pod-1" / "r.jsonl")
    (digest, names), = remote_shards(object_store).items()
    assert names == ["shard-00000", "shard-00001", "shard-00002"]
    # the kill landed inside shard 2's upload: its file is there, its manifest (written last) is not
    object_store.delete_key(f"runs/durable-gen/generate/shards/{digest}/shard-00002/_MANIFEST.json")

    before = len(server.requests)
    res = generate(cfg, tmp_path / "pod-2" / "r.jsonl")
    assert res.restored == 2 and res.resumed == 12 and res.shards == 2
    assert len(server.requests) - before == 4

    # other sampling settings under the same run name: their own shard set, nothing restored
    caplog.set_level("INFO", logger="thinkforge")
    before = len(server.requests)
    res = generate(http_cfg(server.url, object_store.bucket, **{"generate.temperature": 0.3}),
                   tmp_path / "pod-3" / "r.jsonl")
    assert res.restored == 0 and res.resumed == 0 and len(server.requests) - before == 10
    assert len(remote_shards(object_store)) == 2
    assert "shard set(s) of other settings or data" in caplog.text

    # other data behind the same settings (fewer problems): its own shard set as well
    before = len(server.requests)
    res = generate(http_cfg(server.url, object_store.bucket, **{"data.train_limit": 7}),
                   tmp_path / "pod-4" / "r.jsonl")
    assert res.restored == 0 and len(server.requests) - before == 7


def test_local_shards_are_uploaded_too(server, object_store, s3_env, tmp_path, monkeypatch):
    """Shards a run wrote without storage (or whose upload failed) go up when the stage next starts."""
    out = tmp_path / "r.jsonl"
    with monkeypatch.context() as mp:
        for key in S3_VARS:
            mp.delenv(key)
        fail_after(mp, 2)
        with pytest.raises(Interrupted):
            generate(http_cfg(server.url, object_store.bucket), out)
    assert object_store.list_keys("") == []
    with monkeypatch.context() as mp:
        fail_after(mp, 0)  # the next start dies before writing anything new
        with pytest.raises(Interrupted):
            generate(http_cfg(server.url, object_store.bucket), out)
    (names,) = remote_shards(object_store).values()
    assert names == ["shard-00000", "shard-00001"]


# --------------------------------------------------------------------- SIGKILL midway, real model

CHILD = r"""
import json, logging, sys, time
import thinkforge.stages.generate as gen_mod
from thinkforge.config import load_recipe

logging.basicConfig(level=logging.INFO, stream=sys.stdout)
recipe, out, overrides, hold = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4] == "1"
if hold:  # after the first shard is safely in the store, wait to be killed (a pod dying mid-run)
    real_push = gen_mod.RemoteShards.push
    def push(self, path):
        real_push(self, path)
        print("HOLD", flush=True)
        while True:
            time.sleep(1)
    gen_mod.RemoteShards.push = push
r = gen_mod.generate(load_recipe(recipe, overrides), out)
print("RESULT " + json.dumps(r.__dict__), flush=True)
"""


@pytest.mark.slow
def test_sigkilled_generation_resumes_from_object_storage_on_a_fresh_disk(s3_server, object_store, tmp_path):
    from thinkforge.config import load_recipe as load
    from thinkforge.sources import load_problems
    from thinkforge.templates import system_message
    from tiny_models import tiny_model_dir, word_problem_texts

    problems = load_problems("builtin:word-problems?split=train&n=12")
    teacher = tiny_model_dir(tmp_path / "teacher",
                             word_problem_texts(problems, system_message(load(SMOKE).template)), vocab_size=300)
    overrides = {"run.name": "durable-kill", "data.train": "builtin:word-problems?split=train&n=12",
                 "generate.teacher": str(teacher), "generate.samples_per_prompt": 2, "generate.max_new_tokens": 8,
                 "generate.shard_prompts": 3, "generate.batch_size": 6, "generate.sample_imported": False,
                 "storage.bucket": object_store.bucket}
    (tmp_path / "child.py").write_text(CHILD)

    def start(name: str, *, s3: bool, hold: bool = False) -> tuple[subprocess.Popen, Path]:
        pod = tmp_path / name  # each attempt its own empty "pod": cwd, HOME, caches, output
        (pod / "home").mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if k not in S3_VARS and not k.startswith("THINKFORGE_")}
        env.update(HOME=str(pod / "home"), THINKFORGE_CACHE=str(pod / "cache"), THINKFORGE_PROGRESS="0",
                   OMP_NUM_THREADS="1")
        if s3:
            env.update(s3_server.env())
        log = open(pod / "log.txt", "w")
        proc = subprocess.Popen([sys.executable, str(tmp_path / "child.py"), str(SMOKE), str(pod / "rollouts.jsonl"),
                                 json.dumps(overrides), "1" if hold else "0"], stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=pod)
        log.close()
        return proc, pod

    def result(proc: subprocess.Popen, pod: Path) -> dict:
        assert proc.wait(timeout=300) == 0, (pod / "log.txt").read_text()[-3000:]
        line = next(x for x in (pod / "log.txt").read_text().splitlines() if x.startswith("RESULT "))
        return json.loads(line.removeprefix("RESULT "))

    reference = start("reference", s3=False)
    victim, vpod = start("pod-1", s3=True, hold=True)
    deadline = time.monotonic() + 240
    while "HOLD" not in (vpod / "log.txt").read_text():
        assert victim.poll() is None, f"generation ended before the kill: {(vpod / 'log.txt').read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no shard uploaded within 240 s"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert not (vpod / "rollouts.jsonl").exists()
    (names,) = remote_shards(object_store, "durable-kill").values()
    assert names == ["shard-00000"]

    retry, rpod = start("pod-2", s3=True)
    again = result(retry, rpod)
    assert again["restored"] == 1 and again["resumed"] == 6 and again["shards"] == 3, again
    assert "generate: restored 1 shard(s) from s3://" in (rpod / "log.txt").read_text()
    ref = result(*reference)
    assert ref["rollouts"] == again["rollouts"] == 24 and ref["restored"] == 0
    assert (rpod / "rollouts.jsonl").read_bytes() == (reference[1] / "rollouts.jsonl").read_bytes()
