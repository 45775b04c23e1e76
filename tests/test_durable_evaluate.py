"""Durable evaluation: with object storage configured, each finished benchmark of a model label is stored
(manifest last), and a retried task in a fresh work dir and a fresh pod skips those benchmarks, evaluates
only the rest, and writes the results.json an uninterrupted run writes. Stored results of another model,
protocol or problem set are ignored.

The S3 server is the real moto server on loopback (tests/plugins/s3.py). The fast tests drive the stage
with a scripted engine (it counts what it is asked); the slow test runs the real evaluate component on a
real tiny model in subprocesses and SIGKILLs the first attempt mid-way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from thinkforge.config import Recipe, load_recipe
from thinkforge.engines import Completion
from thinkforge.stages import evaluate as evaluate_mod
from thinkforge.stages.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes" / "smoke.yaml"
S3_VARS = ("THINKFORGE_S3_ENDPOINT", "THINKFORGE_S3_SECURE", "THINKFORGE_S3_ACCESS_KEY", "THINKFORGE_S3_SECRET_KEY")
BENCHES = [{"name": f"wp-{c}", "source": f"builtin:word-problems?split=test&seed={i}", "limit": 3}
           for i, c in enumerate("abc", 1)]


def _gold() -> dict[str, str]:
    from thinkforge.sources import load_problems

    return {p["problem"]: p["answer"] for b in BENCHES for p in load_problems(b["source"], limit=b["limit"])}


class ScriptedEngine:
    """Answers right in the first sample and wrong in the others; remembers which problems it was asked."""

    def __init__(self):
        self.asked: list[str] = []
        self.gold = _gold()

    def generate(self, problems, params, progress=None):
        self.asked.extend(problems)
        out = []
        for p in problems:
            g = int(self.gold.get(p, "0"))
            out.append([Completion(text=f"The answer is {g + i}.", num_tokens=5 + i, finish_reason="stop")
                        for i in range(params.n)])
        if progress:
            progress(len(problems))
        return out

    def close(self):
        pass


def recipe(bucket: str, **evaluate_over) -> Recipe:
    return Recipe.model_validate({"run": {"name": "durable-eval"}, "storage": {"bucket": bucket},
                                  "evaluate": {"benchmarks": BENCHES, "k": 2, "pass_k": [1, 2],
                                               "bootstrap_samples": 200, **evaluate_over}})


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)


def fake_model(path: Path, weights: bytes) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(weights)
    return path


def without_seconds(results: dict) -> str:
    return json.dumps({k: v for k, v in results.items() if k != "seconds"}, default=str)


def stored(store, label: str = "final") -> list[str]:
    """Benchmarks with a complete stored result under <prefix>/durable-eval/evaluate/<label>/."""
    base = f"runs/durable-eval/evaluate/{label}"
    return sorted(k[len(base) + 1:].split("/")[0] for k in store.list_keys(base) if k.endswith("/_MANIFEST.json"))


def test_a_rerun_in_a_fresh_dir_skips_finished_benchmarks(object_store, s3_env, tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="thinkforge")
    model = fake_model(tmp_path / "model", b"weights-1")
    cfg = recipe(object_store.bucket)

    with monkeypatch.context() as mp:  # the uninterrupted run, local only (today's behaviour)
        for key in S3_VARS:
            mp.delenv(key)
        ref = evaluate(cfg, model, tmp_path / "ref", label="final", engine=ScriptedEngine())
    assert object_store.list_keys("") == [], "nothing goes to storage without it configured"

    # attempt 1 dies while evaluating the third benchmark
    real = evaluate_mod._evaluate_one

    def dies_on_c(cfg, bench, *a, **kw):
        if bench.name == "wp-c":
            raise KeyboardInterrupt  # the pod is gone
        return real(cfg, bench, *a, **kw)

    with monkeypatch.context() as mp:
        mp.setattr(evaluate_mod, "_evaluate_one", dies_on_c)
        with pytest.raises(KeyboardInterrupt):
            evaluate(cfg, model, tmp_path / "pod-1", label="final", engine=ScriptedEngine())
    assert stored(object_store) == ["wp-a", "wp-b"]

    # attempt 2: a fresh work dir; only wp-c is sampled
    engine = ScriptedEngine()
    out = tmp_path / "pod-2"
    res = evaluate(cfg, model, out, label="final", engine=engine)
    assert len(engine.asked) == 3, "only wp-c's 3 problems"
    uri = f"s3://{object_store.bucket}/runs/durable-eval/evaluate/final"
    assert f"evaluate final: wp-a already done in {uri}/wp-a, skipped" in caplog.text
    assert f"evaluate final: wp-b already done in {uri}/wp-b, skipped" in caplog.text
    assert without_seconds(res) == without_seconds(ref)
    assert without_seconds(json.loads((out / "results.json").read_text())) == \
        without_seconds(json.loads((tmp_path / "ref" / "results.json").read_text()))
    for b in ("wp-a", "wp-b", "wp-c"):
        assert (out / f"samples-{b}.jsonl").read_bytes() == (tmp_path / "ref" / f"samples-{b}.jsonl").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "samples-wp-a.jsonl", "samples-wp-b.jsonl",
                                                     "samples-wp-c.jsonl"]
    assert stored(object_store) == ["wp-a", "wp-b", "wp-c"]

    # attempt 3: everything is stored, so no engine is even built (no model load)
    def no_engine(*a, **kw):
        raise AssertionError("an engine was built although every benchmark was stored")

    monkeypatch.setattr(evaluate_mod, "make_engine", no_engine)
    res = evaluate(cfg, model, tmp_path / "pod-3", label="final")
    assert without_seconds(res) == without_seconds(ref)


def test_stored_results_of_another_model_protocol_or_label_are_not_reused(object_store, s3_env, tmp_path, caplog):
    caplog.set_level("INFO", logger="thinkforge")
    model = fake_model(tmp_path / "model", b"weights-1")
    cfg = recipe(object_store.bucket)
    evaluate(cfg, model, tmp_path / "first", label="final", engine=ScriptedEngine())
    assert stored(object_store) == ["wp-a", "wp-b", "wp-c"]

    def asked(cfg, model, label="final", name="x"):
        engine = ScriptedEngine()
        evaluate(cfg, model, tmp_path / name, label=label, engine=engine)
        return len(engine.asked)

    # same shapes, same config, other weights (another RL run under the same run name)
    other = fake_model(tmp_path / "other", b"weights-2")
    assert asked(cfg, other, name="other-model") == 9
    assert "evaluate final: wp-a in s3://" in caplog.text and "is for another model; evaluating it again" in caplog.text
    # ... which replaced the stored results: the first model is now the "other" one
    assert asked(cfg, model, name="first-again") == 9
    assert asked(cfg, model, name="first-thrice") == 0

    caplog.clear()
    assert asked(recipe(object_store.bucket, temperature=0.7), model, name="hotter") == 9
    assert "is for another protocol; evaluating it again" in caplog.text
    caplog.clear()
    changed = [dict(BENCHES[0], limit=2), *BENCHES[1:]]  # other problems under the same benchmark name
    assert asked(recipe(object_store.bucket, benchmarks=changed, temperature=0.7), model, name="fewer") == 2
    assert "wp-a in s3://" in caplog.text and "is for another benchmark; evaluating it again" in caplog.text

    assert asked(cfg, model, label="base", name="base") == 9, "each label has its own results"
    assert stored(object_store, "base") == ["wp-a", "wp-b", "wp-c"]

    # a model behind a pointer (a skipped stage) is the model it points to
    from thinkforge.models import write_pointer

    write_pointer(tmp_path / "pointer", model)
    assert asked(cfg, tmp_path / "pointer", label="base", name="pointer") == 0


def test_an_interrupted_upload_is_evaluated_again(object_store, s3_env, tmp_path):
    model = fake_model(tmp_path / "model", b"weights-1")
    cfg = recipe(object_store.bucket)
    evaluate(cfg, model, tmp_path / "first", label="final", engine=ScriptedEngine())
    # the kill landed inside wp-b's upload: its files are there, its manifest (written last) is not
    object_store.delete_key("runs/durable-eval/evaluate/final/wp-b/_MANIFEST.json")
    engine = ScriptedEngine()
    res = evaluate(cfg, model, tmp_path / "again", label="final", engine=engine)
    assert len(engine.asked) == 3
    first = json.loads((tmp_path / "first" / "results.json").read_text())
    assert without_seconds(res) == without_seconds(first)


# --------------------------------------------------------------------- SIGKILL midway, real model, component

CHILD = r"""
import json, sys, time
from pathlib import Path
from types import SimpleNamespace
import thinkforge.stages.evaluate as ev
from thinkforge.components.common import evaluate_component

cfg_path, model, pod, hold_at = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
real = ev._evaluate_one
def one(cfg, bench, *a, **kw):
    if bench.name == hold_at:  # earlier benchmarks are stored: wait here to be killed (the pod dies)
        print("HOLD", flush=True)
        while True:
            time.sleep(1)
    print("EVALUATING " + bench.name, flush=True)
    return real(cfg, bench, *a, **kw)
ev._evaluate_one = one

class Metrics:
    def log_metric(self, key, value):
        pass

art = lambda p: SimpleNamespace(path=str(p), uri="", metadata={})
evaluate_component(art(cfg_path), art(model), "final", art(pod / "results.json"), art(pod / "samples"), Metrics())
print("FINISHED", flush=True)
"""


@pytest.mark.slow
def test_sigkilled_evaluate_task_is_retried_on_a_fresh_pod(s3_server, object_store, tmp_path):
    from thinkforge.sources import load_problems
    from thinkforge.templates import system_message
    from tiny_models import tiny_model_dir

    base = load_recipe(SMOKE)
    data = base.model_dump(mode="json")
    data["run"]["name"] = "durable-eval"
    data["storage"]["bucket"] = object_store.bucket  # the endpoint and credentials come from the pod's env
    data["evaluate"].update(benchmarks=BENCHES, k=2, pass_k=[1, 2], max_new_tokens=8, batch_size=8)
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps(data))
    texts = [system_message(base.template)] + [p["problem"] for b in BENCHES
                                               for p in load_problems(b["source"], limit=3)]
    model = tiny_model_dir(tmp_path / "model", texts, vocab_size=300)
    (tmp_path / "child.py").write_text(CHILD)

    def start(name: str, *, s3: bool, hold_at: str = "") -> tuple[subprocess.Popen, Path]:
        pod = tmp_path / name  # each attempt its own "pod": cwd, HOME, TMPDIR (the work dir), caches
        for sub in ("home", "tmp"):
            (pod / sub).mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if k not in S3_VARS and not k.startswith("THINKFORGE_")}
        env.update(HOME=str(pod / "home"), TMPDIR=str(pod / "tmp"), THINKFORGE_CACHE=str(pod / "cache"),
                   THINKFORGE_PROGRESS="0", OMP_NUM_THREADS="1")
        if s3:
            env.update(s3_server.env())
        with open(pod / "log.txt", "w") as log:
            proc = subprocess.Popen([sys.executable, str(tmp_path / "child.py"), str(cfg_file), str(model), str(pod),
                                     hold_at], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=pod)
        return proc, pod

    def finish(proc: subprocess.Popen, pod: Path) -> str:
        assert proc.wait(timeout=300) == 0, (pod / "log.txt").read_text()[-3000:]
        return (pod / "log.txt").read_text()

    reference = start("reference", s3=False)
    victim, vpod = start("pod-1", s3=True, hold_at="wp-c")
    deadline = time.monotonic() + 240
    while "HOLD" not in (vpod / "log.txt").read_text():
        assert victim.poll() is None, f"evaluation ended before the kill: {(vpod / 'log.txt').read_text()[-3000:]}"
        assert time.monotonic() < deadline, "wp-c not reached within 240 s"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert stored(object_store) == ["wp-a", "wp-b"]
    assert not (vpod / "results.json").exists()

    retry, rpod = start("pod-2", s3=True)
    log = finish(retry, rpod)
    assert [x for x in log.splitlines() if x.startswith("EVALUATING")] == ["EVALUATING wp-c"], log[-3000:]
    assert "evaluate final: wp-a already done in s3://" in log and "evaluate final: wp-b already done in s3://" in log
    ref_log = finish(*reference)
    assert [x for x in ref_log.splitlines() if x.startswith("EVALUATING")] == [f"EVALUATING wp-{c}" for c in "abc"]
    ref_pod = reference[1]
    assert without_seconds(json.loads((rpod / "results.json").read_text())) == \
        without_seconds(json.loads((ref_pod / "results.json").read_text()))
    for b in ("wp-a", "wp-b", "wp-c"):
        assert (rpod / "samples" / f"samples-{b}.jsonl").read_bytes() == \
            (ref_pod / "samples" / f"samples-{b}.jsonl").read_bytes()
    assert stored(object_store) == ["wp-a", "wp-b", "wp-c"]
