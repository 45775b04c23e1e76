"""Faults survived, each against real local servers: the real SFT stage function with its checkpoints
in a real S3 server on loopback (moto, tests/plugins/s3.py), reached directly or through a TCP proxy
that refuses connections and severs them mid-upload; the real evaluate stage SIGKILLed in a
subprocess; a NaN loss in a real Trainer run, reported to a real Pushgateway and Prometheus.

Covered elsewhere, not repeated here:
- a training stage SIGKILLed mid-epoch and on an epoch boundary resumes to identical weights:
  tests/test_resume.py (stage) and tests/test_checkpoints.py (bare Trainer);
- generation killed and rerun, teacher endpoint faults (garbage, truncated JSON, 500s, hangs):
  tests/test_generate.py, tests/test_openai_engine.py;
- storage primitives (checksums, manifest last, SlowDown, server back within the window):
  tests/test_storage.py.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from plugins.s3 import free_port
from reliability_helpers import MAX_STEPS, SAVE_STEPS, all_finite, recipe_with, same_weights, weights

from thinkforge.checkpoints import latest_complete, remote_checkpoints
from thinkforge.metrics import StageMetrics
from thinkforge.storage import IncompleteError, StorageError

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------ helpers


def on_step(step: int, event: str, action):
    """A Trainer callback that runs ``action(model)`` at ``event`` of optimizer step ``step``.

    Added before ``fit``'s own callbacks, so at ``on_save`` it runs before the checkpoint upload."""
    from transformers import TrainerCallback

    class At(TrainerCallback):
        pass

    def hook(self, args, state, control, model=None, **kw):
        if state.global_step == step:
            action(model)

    setattr(At, event, hook)
    return At()


@pytest.fixture
def inject(monkeypatch):
    """``inject(callback, ...)``: the SFT stage's next trainers get these callbacks (through ``fit``);
    ``inject()`` removes them again."""
    import thinkforge.stages.sft as sft_mod

    real_fit = sft_mod.fit
    active: list = []

    def fit(trainer, *a, **kw):
        for cb in active:
            trainer.add_callback(cb)
        return real_fit(trainer, *a, **kw)

    monkeypatch.setattr(sft_mod, "fit", fit)

    def install(*cbs):
        active[:] = cbs

    return install


def run_sft(cfg, tiny, out: Path, metrics=None):
    from thinkforge.stages.sft import sft

    return sft(cfg, tiny.model, tiny.data, out, metrics=metrics)


def stage_prefix(cfg, tiny, store) -> str:
    """Where the stage keeps its checkpoints (under the recipe's storage.prefix, in ``store``'s bucket)."""
    from thinkforge.stages.train import checkpoint_prefix
    from thinkforge.storage import ObjectStore

    like_the_stage = ObjectStore(store.endpoint, store.bucket, secure=False, prefix=cfg.storage.prefix)
    return checkpoint_prefix(like_the_stage, cfg, "sft", tiny.model, tiny.data)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The stage run once without faults (and without object storage): the weights every survived
    fault must reproduce."""
    cfg = recipe_with(tiny.recipe, {"run.name": "reference"})
    out = tmp_path_factory.mktemp("reference")
    result = run_sft(cfg, tiny, out)
    assert result.steps == MAX_STEPS and result.extra["checkpoint_prefix"] is None
    return weights(out)


# -------------------------------------------------------------------------- object storage faults


def test_storage_down_at_stage_start_backs_off_then_fails_naming_the_endpoint(tiny, s3_credentials, caplog,
                                                                               tmp_path):
    """Nothing listens at the recipe's endpoint: the stage retries with exponential backoff, then fails
    with a message naming the endpoint and bucket (never the credentials), and writes no model."""
    dead = f"127.0.0.1:{free_port()}"
    cfg = recipe_with(tiny.recipe, {"run.name": "down-at-start", "storage.endpoint": dead,
                                    "storage.bucket": "ckpt-bucket"})
    caplog.set_level(logging.WARNING, logger="thinkforge.storage")
    t0 = time.monotonic()
    with pytest.raises(StorageError) as info:
        run_sft(cfg, tiny, tmp_path / "out")
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert dead in msg and "ckpt-bucket" in msg and "after 4 attempts" in msg and "unreachable" in msg, msg
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 3 and all(dead in r for r in retries), retries
    delays = [float(re.search(r"in ([0-9.]+)s$", r).group(1)) for r in retries]
    for i, d in enumerate(delays):  # backoff 0.05 s doubling, jittered to [0.5, 1] of it
        assert 0.05 * 2**i * 0.5 - 1e-3 <= d <= 0.05 * 2**i + 1e-3, delays
    assert elapsed >= sum(delays)
    secret = s3_credentials.secret_key
    assert secret not in msg and secret not in caplog.text
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_storage_outages_within_the_retry_window_are_survived(tiny, s3_credentials, flaky_proxy, bucket, inject,
                                                              reference, tmp_path):
    """The endpoint refuses the first connections of the stage, and later dies in the middle of a
    checkpoint upload (every connection severed, the next two refused): the uploads retry, the stage
    finishes, every checkpoint it left is complete and checksum-verified, and the weights equal a
    fault-free run's."""
    proxy = flaky_proxy()
    proxy.refuse(3)  # down at the start of the stage
    inject(on_step(4, "on_save", lambda model: proxy.cut_after(200_000, refuse=2)))  # dies mid-upload of step 4
    cfg = recipe_with(tiny.recipe, {"run.name": "flaky", "storage.endpoint": proxy.endpoint,
                                    "storage.bucket": bucket.bucket})
    m = StageMetrics.disabled("sft")
    result = run_sft(cfg, tiny, tmp_path / "out", metrics=m)
    assert proxy.refused == 5 and proxy.cuts == 1
    # every upload succeeded in the end (retried, not skipped with a warning)
    assert m.get("checkpoint_uploads_total") == MAX_STEPS // SAVE_STEPS
    assert not m.get("checkpoint_upload_failures_total")
    assert result.steps == MAX_STEPS and result.extra["resumed_from"] is None
    prefix = stage_prefix(cfg, tiny, bucket)
    ckpts = remote_checkpoints(bucket, prefix)
    assert [(s, ok) for s, _, ok in ckpts] == [(MAX_STEPS - SAVE_STEPS, True), (MAX_STEPS, True)]
    got = bucket.download_dir(f"{prefix}/checkpoint-{MAX_STEPS}", tmp_path / "dl")  # sha256-verified
    same_weights(weights(got), weights(tmp_path / "out"))
    same_weights(weights(tmp_path / "out"), reference)


def test_storage_dead_mid_upload_never_leaves_a_complete_looking_checkpoint(tiny, s3_credentials, flaky_proxy,
                                                                            bucket, inject, reference, tmp_path):
    """The endpoint dies for good in the middle of the step-4 checkpoint upload. The stage keeps
    training (a failed upload is retried at the next save) and stops after three failed uploads in a
    row. What it left of the interrupted uploads is never complete (no manifest): readers refuse it,
    and the retried stage resumes from the last complete checkpoint and ends with the fault-free
    run's weights."""
    proxy = flaky_proxy()
    inject(on_step(4, "on_save", lambda model: proxy.cut_after(200_000, refuse=10**9)))
    cfg = recipe_with(tiny.recipe, {"run.name": "dies", "storage.endpoint": proxy.endpoint,
                                    "storage.bucket": bucket.bucket})
    with pytest.raises(StorageError, match=rf"checkpoint upload at step {MAX_STEPS} failed \(3 in a row\)") as info:
        run_sft(cfg, tiny, tmp_path / "out1")
    assert proxy.endpoint in str(info.value)
    assert not (tmp_path / "out1" / "model.safetensors").exists()

    prefix = stage_prefix(cfg, tiny, bucket)
    ckpts = {s: ok for s, _, ok in remote_checkpoints(bucket, prefix)}
    assert ckpts.get(2) is True and not any(ok for s, ok in ckpts.items() if s > 2), ckpts
    assert latest_complete(bucket, prefix)[0] == 2
    partial = bucket.list_keys(f"{prefix}/checkpoint-4")
    assert partial, "the cut should leave some objects of checkpoint-4 behind"  # a real half upload ...
    with pytest.raises(IncompleteError, match="_MANIFEST.json"):  # ... that no reader takes as complete
        bucket.download_dir(f"{prefix}/checkpoint-4", tmp_path / "dl")
    assert not (tmp_path / "dl").exists()

    # The retried task (the endpoint is back): resumes from step 2, ignores the leftovers.
    again = recipe_with(cfg, {"storage.endpoint": s3_credentials.endpoint})
    result = run_sft(again, tiny, tmp_path / "out2")
    assert result.extra["resumed_from"] == 2 and result.steps == MAX_STEPS
    same_weights(weights(tmp_path / "out2"), reference)
    assert [s for s, _, ok in remote_checkpoints(bucket, prefix)] == [MAX_STEPS - SAVE_STEPS, MAX_STEPS]


def test_a_checkpoint_that_verifies_but_does_not_load_is_passed_over(tiny, s3_credentials, bucket, reference,
                                                                    caplog, tmp_path):
    """The newest complete checkpoint was written broken (its weights file cut in half) and uploaded as
    it was, so every sha256 matches its manifest. The retried stage does not crash on it (as every
    retry would): it says so, resumes from the previous complete checkpoint, ends with the fault-free
    weights, and rewrites the broken one."""
    cfg = recipe_with(tiny.recipe, {"run.name": "unloadable", "storage.endpoint": s3_credentials.endpoint,
                                    "storage.bucket": bucket.bucket})
    run_sft(cfg, tiny, tmp_path / "out1")
    prefix = stage_prefix(cfg, tiny, bucket)
    last, before = f"{prefix}/checkpoint-{MAX_STEPS}", MAX_STEPS - SAVE_STEPS
    assert [(s, ok) for s, _, ok in remote_checkpoints(bucket, prefix)] == [(before, True), (MAX_STEPS, True)]
    broken = bucket.download_dir(last, tmp_path / "broken")
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    bucket.upload_dir(broken, last)  # a fresh manifest: the broken file verifies
    bucket.download_dir(last, tmp_path / "verifies")

    caplog.set_level(logging.WARNING)
    result = run_sft(cfg, tiny, tmp_path / "out2")
    assert result.extra["resumed_from"] == before and result.steps == MAX_STEPS
    [skipped] = result.extra["unusable_checkpoints"]
    assert skipped["step"] == MAX_STEPS and "model.safetensors" in skipped["reason"]
    assert f"s3://{bucket.bucket}/{last} verifies but does not load" in caplog.text
    assert "falling back to the previous complete checkpoint" in caplog.text
    assert f"resuming from step {before} instead" in caplog.text
    same_weights(weights(tmp_path / "out2"), reference)
    from thinkforge.checkpoints import check_loadable

    check_loadable(bucket.download_dir(last, tmp_path / "rewritten"))  # the retry's own save replaced it


def test_single_object_upload_cut_mid_body_leaves_no_object(s3_server, flaky_proxy, bucket, tmp_path):
    """One file (a multipart upload) cut mid-body for good: no object appears under its key at all."""
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(7 << 20))
    proxy = flaky_proxy()
    via = s3_server.store(bucket.bucket, endpoint=proxy.endpoint, create=False, retries=2)
    via.exists("warm-up")
    proxy.cut_after(3 << 20, refuse=10**9)
    with pytest.raises(StorageError, match=proxy.endpoint):
        via.upload_file(src, "data/big.bin")
    assert not bucket.exists("data/big.bin")
    assert bucket.list_keys("data") == []


# ----------------------------------------------------------------------------------- NaN / inf loss


def poison(model) -> None:
    """Every weight of the first attention projection becomes +inf: the next forward pass is NaN."""
    import torch

    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.fill_(float("inf"))


def test_nan_loss_stops_at_the_step_keeps_the_last_good_checkpoint_and_shows_in_prometheus(
        tiny, s3_credentials, bucket, inject, reference, prometheus, tmp_path):
    """Weights poisoned after step 5: step 6's loss is NaN. Training stops at once with a
    FloatingPointError naming the stage, step 6 and the last good checkpoint (step 4, still complete in
    object storage, all finite); no model is written; Prometheus shows the failed status, the NaN loss
    and the step. The retried task resumes from that checkpoint and ends with the fault-free weights."""
    run_id = f"nan-{uuid.uuid4().hex[:8]}"
    cfg = recipe_with(tiny.recipe, {"run.name": run_id, "storage.endpoint": s3_credentials.endpoint,
                                    "storage.bucket": bucket.bucket, "metrics.push_url": prometheus.pushgateway_url,
                                    "metrics.push_interval_s": 3600})
    inject(on_step(5, "on_step_end", poison))
    with pytest.raises(FloatingPointError) as info:
        with StageMetrics.for_recipe("sft", cfg) as m:  # what the component's run_stage does
            run_sft(cfg, tiny, tmp_path / "out1", metrics=m)
    msg = str(info.value)
    prefix = stage_prefix(cfg, tiny, bucket)
    assert msg.startswith("sft: non-finite loss nan") and "at step 6;" in msg, msg
    assert f"last good checkpoint: s3://{bucket.bucket}/{prefix}/checkpoint-4 (step 4)" in msg, msg
    assert not (tmp_path / "out1" / "model.safetensors").exists()
    assert [(s, ok) for s, _, ok in remote_checkpoints(bucket, prefix)] == [(2, True), (4, True)]
    assert all_finite(weights(bucket.download_dir(f"{prefix}/checkpoint-4", tmp_path / "ck4")))

    sel = f'run_id="{run_id}",stage="sft"'
    prometheus.wait_for(f'thinkforge_stage_status{{{sel},status="failed"}} == 1', timeout=20)
    assert prometheus.values(prometheus.query(f"thinkforge_stage_status{{{sel}}}"), "status") == {
        "running": 0.0, "success": 0.0, "failed": 1.0}
    assert [s["value"][1] for s in prometheus.query(f"thinkforge_train_loss{{{sel}}}")] == ["NaN"]
    assert [s["value"][1] for s in prometheus.query(f"thinkforge_train_step{{{sel}}}")] == ["6"]

    inject()  # the retried task, without the poison
    result = run_sft(cfg, tiny, tmp_path / "out2")
    assert result.extra["resumed_from"] == 4 and result.steps == MAX_STEPS
    same_weights(weights(tmp_path / "out2"), reference)


def test_non_finite_weights_at_a_save_are_never_uploaded(tiny, s3_credentials, bucket, inject, tmp_path):
    """Weights poisoned right before the step-4 save (its logged loss was still finite): the
    checkpoint upload is vetoed, the error names the parameter and step, step 2 stays the last one."""
    cfg = recipe_with(tiny.recipe, {"run.name": "inf-at-save", "storage.endpoint": s3_credentials.endpoint,
                                    "storage.bucket": bucket.bucket})
    inject(on_step(4, "on_step_end", poison))
    with pytest.raises(FloatingPointError, match=r"^sft: non-finite weights \(model\.layers\.0\.self_attn\.q_proj"
                                                 r"\.weight\); checkpoint not uploaded at step 4;") as info:
        run_sft(cfg, tiny, tmp_path / "out")
    assert "(step 2)" in str(info.value)
    prefix = stage_prefix(cfg, tiny, bucket)
    assert [(s, ok) for s, _, ok in remote_checkpoints(bucket, prefix)] == [(2, True)]


# ------------------------------------------------------------------------------ evaluation SIGKILL

EVAL_CHILD = r'''
import json, sys, time
from thinkforge.config import validate
from thinkforge.engines import hf
from thinkforge.stages.evaluate import evaluate

cfg_path, model, out, pace = sys.argv[1:5]
real = hf.HFEngine.generate

def generate(self, problems, params, progress=None):
    def paced(n):  # after every batch: tell the parent, then give it time to pick its moment
        if progress is not None:
            progress(n)
        print("BATCH", n, flush=True)
        time.sleep(float(pace))
    return real(self, problems, params, progress=paced)

hf.HFEngine.generate = generate
cfg = validate(json.load(open(cfg_path)))
evaluate(cfg, model, out, label="final")
print("FINISHED", flush=True)
'''

EVAL_BATCHES = 6  # 2 benchmarks x 6 problems, k=2, batch_size 4 -> 2 prompts per forward pass


def eval_child(tmp: Path, cfg, model, out: Path, pace: float, kill_after: int | None = None) -> subprocess.Popen:
    """Run the evaluate stage in a fresh process (a KFP task); SIGKILL it after ``kill_after`` batches."""
    script, cfg_file = tmp / "eval_child.py", tmp / "eval_cfg.json"
    script.write_text(EVAL_CHILD)
    cfg_file.write_text(json.dumps(cfg.model_dump()))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(cfg_file), str(model), str(out), str(pace)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    lines, batches = [], 0
    deadline = time.monotonic() + 240
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("BATCH"):
                batches += 1
                if kill_after is not None and batches == kill_after:
                    proc.send_signal(signal.SIGKILL)
                    break
            assert time.monotonic() < deadline, "".join(lines[-40:])
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    proc.log = "".join(lines)  # type: ignore[attr-defined]
    proc.batches = batches  # type: ignore[attr-defined]
    return proc


def test_evaluate_sigkilled_at_a_random_batch_then_rerun_equals_an_uninterrupted_run(tiny, tmp_path):
    """The evaluate stage is SIGKILLed after a random batch (of 6, over 2 benchmarks) and run again in
    a fresh process into the same directory, like a retried task: it leaves no results.json behind when
    killed, and the rerun's results and per-sample files equal an uninterrupted run's (fixed seeds)."""
    cfg = recipe_with(tiny.recipe, {
        "run.name": "eval-kill", "evaluate.k": 2, "evaluate.pass_k": [1, 2], "evaluate.batch_size": 4,
        "evaluate.max_new_tokens": 12, "evaluate.temperature": 0.8, "evaluate.dtype": "float32",
        "evaluate.benchmarks": [
            {"name": "wp-a", "source": "builtin:word-problems?split=test&n=12", "limit": 6},
            {"name": "wp-b", "source": "builtin:word-problems?split=test&n=12&seed=1", "limit": 6},
        ]})
    ref = eval_child(tmp_path, cfg, tiny.model, tmp_path / "ref", pace=0.0)
    assert ref.returncode == 0 and ref.batches == EVAL_BATCHES and "FINISHED" in ref.log, ref.log[-3000:]

    kill_after = random.randint(1, EVAL_BATCHES - 1)
    why = f"killed after batch {kill_after} of {EVAL_BATCHES}"
    out = tmp_path / "out"
    killed = eval_child(tmp_path, cfg, tiny.model, out, pace=0.5, kill_after=kill_after)
    assert killed.returncode == -signal.SIGKILL and "FINISHED" not in killed.log, why
    assert not (out / "results.json").exists(), why
    for f in out.glob("samples-*.jsonl"):  # only whole benchmarks, never a half-written file
        assert f.read_bytes() == (tmp_path / "ref" / f.name).read_bytes(), why

    rerun = eval_child(tmp_path, cfg, tiny.model, out, pace=0.0)
    assert rerun.returncode == 0, rerun.log[-3000:]
    for name in ("samples-wp-a.jsonl", "samples-wp-b.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), f"{name} differs ({why})"
    got, want = (json.loads((d / "results.json").read_text()) for d in (out, tmp_path / "ref"))
    got.pop("seconds"), want.pop("seconds")
    assert got == want, why
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["results.json", "samples-wp-a.jsonl", "samples-wp-b.jsonl"]
