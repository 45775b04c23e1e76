"""Checkpoints in object storage and resume after SIGKILL, with the real transformers Trainer on CPU
against a real S3 server on loopback (moto, tests/plugins/s3.py)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import sys
from pathlib import Path

import pytest
from plugins.s3 import kill_at_first_checkpoint

from thinkforge.checkpoints import (
    CheckpointSync,
    checkpoint_step,
    latest_complete,
    prune,
    remote_checkpoints,
    restore_latest,
)
from thinkforge.storage import MANIFEST, ObjectStore, StorageError

# 8 examples, batch 2 -> 4 optimizer steps per epoch; 3 epochs -> 12 steps.
STEPS_PER_EPOCH = 4
FINAL_STEP = 12

# The training program: run in a subprocess (to be SIGKILLed) and imported here (reference and
# resumed runs), so every run executes the same code.
TRAIN_SCRIPT = r'''
import json, os, sys, time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments, set_seed

from thinkforge.checkpoints import CheckpointSync, restore_latest
from thinkforge.config import StorageConfig
from thinkforge.storage import ObjectStore


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n=8, length=16, vocab=128):
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


class Pace(TrainerCallback):
    """After the first save: `slow` seconds per step (room for the parent's SIGKILL mid-epoch), or
    `hold`: block right after the save (the kill lands exactly there)."""

    def __init__(self, slow=0.0, hold=False):
        self.slow, self.hold, self.saved = slow, hold, False

    def on_save(self, args, state, control, **kw):
        self.saved = True
        while self.hold:
            time.sleep(1)

    def on_step_end(self, args, state, control, **kw):
        if self.saved and self.slow:
            time.sleep(self.slow)


def train(store, prefix, out_dir, save_steps, resume=False, slow=0.0, hold=False, keep=2):
    torch.set_num_threads(1)
    set_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=128,
                                         max_position_embeddings=64))
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=2, num_train_epochs=3, learning_rate=3e-3,
        lr_scheduler_type="linear", warmup_steps=2, save_strategy="steps", save_steps=save_steps,
        logging_steps=1, use_cpu=True, report_to=[], dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    restored = restore_latest(store, prefix, os.path.join(str(out_dir), "restored")) if resume else None
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(),
                      callbacks=[CheckpointSync(store, prefix, keep=keep, on_error="raise"), Pace(slow, hold)])
    trainer.train(resume_from_checkpoint=str(restored) if restored else None)
    return trainer, restored


if __name__ == "__main__":
    bucket, prefix, out_dir, save_steps, slow, hold = sys.argv[1:7]
    # Endpoint and credentials come from THINKFORGE_S3_* in the environment, as in a real pod.
    store = ObjectStore.from_config(StorageConfig(bucket=bucket), retries=3, backoff=0.05)
    train(store, prefix, out_dir, int(save_steps), slow=float(slow), hold=hold == "1")
    print("FINISHED", flush=True)
'''


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt-script") / "train_tiny.py"
    path.write_text(TRAIN_SCRIPT)
    return path


@pytest.fixture(scope="module")
def prog(script: Path):
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("thinkforge_test_train_tiny", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bucket_store(s3_server):
    store = s3_server.store()
    yield store
    s3_server.drop_bucket(store.bucket)


@pytest.fixture(scope="module")
def reference(prog, bucket_store: ObjectStore, tmp_path_factory):
    """An uninterrupted run: save every 2 steps, keep 2 remote checkpoints."""
    trainer, _ = prog.train(bucket_store, "ref/ck", tmp_path_factory.mktemp("ref"), save_steps=2)
    return trainer


def final_weights(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), f"{k} differs by {(a[k] - b[k]).abs().max()}"


# --------------------------------------------------------------------------- no training needed


def fake_checkpoint(root: Path, step: int) -> Path:
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(os.urandom(256))
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return d


def test_checkpoint_step() -> None:
    assert checkpoint_step("checkpoint-12") == 12
    assert checkpoint_step("runs/a/checkpoint-3/") == 3
    assert checkpoint_step("checkpoint-x") is None and checkpoint_step("other") is None


def test_restore_skips_incomplete_and_corrupt(object_store: ObjectStore, s3_server, tmp_path: Path) -> None:
    import io

    assert restore_latest(object_store, "r/ck", tmp_path / "none") is None
    for step in (2, 4):
        object_store.upload_dir(fake_checkpoint(tmp_path / "local", step), f"r/ck/checkpoint-{step}")
    # a writer killed mid-upload of step 6: files without the marker
    d6 = fake_checkpoint(tmp_path / "local", 6)
    object_store.upload_file(d6 / "model.safetensors", "r/ck/checkpoint-6/model.safetensors")
    assert [(s, ok) for s, _, ok in remote_checkpoints(object_store, "r/ck")] == [(2, True), (4, True), (6, False)]
    assert latest_complete(object_store, "r/ck") == (4, "r/ck/checkpoint-4")

    got = restore_latest(object_store, "r/ck", tmp_path / "restore")
    assert got == tmp_path / "restore" / "checkpoint-4"
    assert json.loads((got / "trainer_state.json").read_text())["global_step"] == 4

    # corrupt step 4 behind the store's back: restore falls back to step 2
    s3_server.minio().put_object(object_store.bucket, "r/ck/checkpoint-4/model.safetensors", io.BytesIO(b"x" * 256), 256)
    got = restore_latest(object_store, "r/ck", tmp_path / "restore2")
    assert got == tmp_path / "restore2" / "checkpoint-2"


def test_prune_keeps_newest_complete_and_drops_own_leftovers(object_store: ObjectStore, tmp_path: Path) -> None:
    for step in (1, 2, 3, 10):
        object_store.upload_dir(fake_checkpoint(tmp_path, step), f"r/ck/checkpoint-{step}")
    for step in (11, 12):  # two uploads that never finished: 11 is the caller's own, 12 someone else's
        object_store.upload_file(tmp_path / "checkpoint-1" / "model.safetensors",
                                 f"r/ck/checkpoint-{step}/model.safetensors")
    object_store.put_json("r/ck/not-a-checkpoint/x.json", {})
    deleted = prune(object_store, "r/ck", keep=2, owned={"r/ck/checkpoint-11"})
    assert sorted(deleted) == ["r/ck/checkpoint-1", "r/ck/checkpoint-11", "r/ck/checkpoint-2"]
    assert object_store.list_prefixes("r/ck") == ["r/ck/checkpoint-10", "r/ck/checkpoint-12", "r/ck/checkpoint-3",
                                                  "r/ck/not-a-checkpoint"]


def test_two_writers_on_one_prefix_never_prune_each_others_uploads(s3_server, object_store: ObjectStore,
                                                                   tmp_path: Path) -> None:
    """Writer A is in the middle of uploading checkpoint-6 when writer B (same prefix: a second run of the
    same recipe, or a retried task while the old pod still runs) finishes checkpoint-4 and prunes. B
    leaves A's in-progress upload alone; A completes it and it downloads verified. Each writer still
    prunes its own failed uploads."""
    import threading

    a_store = s3_server.store(object_store.bucket, create=False)  # A's own client, like another pod
    a, b = CheckpointSync(a_store, "r/ck", keep=1), CheckpointSync(object_store, "r/ck", keep=1)
    ck6 = fake_checkpoint(tmp_path / "a", 6)
    for i in range(3):
        (ck6 / f"optimizer-{i}.pt").write_bytes(os.urandom(1024))
    started, go_on = threading.Event(), threading.Event()
    real_upload = a_store.upload_file

    def paused_upload(local, key, *args, **kwargs):  # A's first object lands, then A stalls
        real_upload(local, key, *args, **kwargs)
        if not started.is_set():
            started.set()
            assert go_on.wait(60)

    a_store.upload_file = paused_upload
    errors: list[BaseException] = []

    def run_a() -> None:
        try:
            a.sync(ck6, 6)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=run_a)
    t.start()
    try:
        assert started.wait(60)
        in_flight = object_store.list_keys("r/ck/checkpoint-6")
        assert in_flight and not object_store.is_complete("r/ck/checkpoint-6")
        b.sync(fake_checkpoint(tmp_path / "b", 4), 4)  # B's prune: keep=1 complete, and its own leftovers
        assert set(in_flight) <= set(object_store.list_keys("r/ck/checkpoint-6")), "B deleted A's upload"
    finally:
        go_on.set()
        t.join(60)
    assert not errors, errors
    got = object_store.download_dir("r/ck/checkpoint-6", tmp_path / "dl")  # complete and sha256-verified
    assert (got / "optimizer-2.pt").read_bytes() == (ck6 / "optimizer-2.pt").read_bytes()

    # B's own upload of step 8 fails midway; B's next successful save prunes that leftover, not A's.
    ck8 = fake_checkpoint(tmp_path / "b", 8)
    real_b = object_store.upload_file
    calls = []

    def failing(local, key, *args, **kwargs):
        calls.append(key)
        if len(calls) == 2:
            raise StorageError(f"upload {key} failed (injected)")
        return real_b(local, key, *args, **kwargs)

    object_store.upload_file = failing
    with pytest.raises(StorageError, match="injected"):
        b.sync(ck8, 8)
    del object_store.upload_file
    assert object_store.list_keys("r/ck/checkpoint-8") and not object_store.is_complete("r/ck/checkpoint-8")
    a_store.upload_file = real_upload
    a_store.upload_file(ck6 / "model.safetensors", "r/ck/checkpoint-9/model.safetensors")  # A, in flight
    b.sync(fake_checkpoint(tmp_path / "b", 10), 10)
    assert [(s, ok) for s, _, ok in remote_checkpoints(object_store, "r/ck")] == [(9, False), (10, True)]


def real_checkpoint(root: Path, step: int):
    """A checkpoint directory like the Trainer's (safetensors weights, trainer state, torch-saved optimizer
    and RNG state) of a tiny torch module; returns (dir, module)."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    module = torch.nn.Linear(4, 3)
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(d / "model.safetensors"))
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    torch.save({"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}, d / "optimizer.pt")
    torch.save({"python": (3, (1, 2), None), "cpu": torch.get_rng_state()}, d / "rng_state.pth")
    return d, module


def test_check_loadable_names_what_does_not_load(tmp_path: Path) -> None:
    import torch

    from thinkforge.checkpoints import CheckpointLoadError, check_loadable

    d, module = real_checkpoint(tmp_path, 2)
    check_loadable(d, module)
    bad = {
        "model.safetensors": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),  # truncated
        "optimizer.pt": lambda p: p.write_bytes(b"PK\x03\x04 not really a zip"),
        "trainer_state.json": lambda p: p.write_text('{"global_step": '),
    }
    for name, damage in bad.items():
        d2, _ = real_checkpoint(tmp_path / name, 2)
        damage(d2 / name)
        with pytest.raises(CheckpointLoadError, match=re.escape(str(d2 / name))):
            check_loadable(d2, module)
    with pytest.raises(CheckpointLoadError, match="has shape"):  # another architecture's weights
        check_loadable(d, torch.nn.Linear(4, 5))


def test_restore_falls_back_from_a_checkpoint_that_verifies_but_does_not_load(object_store: ObjectStore,
                                                                            tmp_path: Path, caplog) -> None:
    from thinkforge.checkpoints import check_loadable, restore

    for step in (2, 4):
        d, module = real_checkpoint(tmp_path / "local", step)
        if step == 4:  # written broken and uploaded as is: every sha256 matches the manifest
            (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
        object_store.upload_dir(d, f"r/ck/checkpoint-{step}")
    caplog.set_level(logging.ERROR, logger="thinkforge.checkpoints")
    got = restore(object_store, "r/ck", tmp_path / "restore", check=lambda p: check_loadable(p, module))
    assert got.step == 2 and got.path == tmp_path / "restore" / "checkpoint-2"
    assert [s["step"] for s in got.skipped] == [4] and "does not load" in got.skipped[0]["reason"]
    assert not (tmp_path / "restore" / "checkpoint-4").exists()  # no local rank can pick it up
    msg = caplog.text
    assert f"s3://{object_store.bucket}/r/ck/checkpoint-4 verifies but does not load" in msg
    assert "falling back to the previous complete checkpoint" in msg
    # without the check (today's restore) the broken one is what a retry would resume from
    assert restore_latest(object_store, "r/ck", tmp_path / "plain") == tmp_path / "plain" / "checkpoint-4"


def test_upload_failure_policy(s3_server, tmp_path: Path) -> None:
    from plugins.s3 import free_port
    from types import SimpleNamespace

    down = ObjectStore(f"127.0.0.1:{free_port()}", "ckpt-b", secure=False, retries=1)
    fake_checkpoint(tmp_path, 2)
    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=2, is_world_process_zero=True)
    warn = CheckpointSync(down, "r/ck", keep=2, on_error="warn", max_consecutive_failures=2)
    warn.on_save(args, state, None)  # logged, training goes on
    assert warn.failures == 1
    with pytest.raises(StorageError, match="2 in a row"):
        warn.on_save(args, state, None)
    with pytest.raises(StorageError, match="step 2"):
        CheckpointSync(down, "r/ck", on_error="raise").on_save(args, state, None)


# ------------------------------------------------------------------------ real Trainer runs


@pytest.mark.slow
def test_sync_keeps_the_two_latest_complete_checkpoints(reference, bucket_store: ObjectStore) -> None:
    assert reference.state.global_step == FINAL_STEP
    ckpts = remote_checkpoints(bucket_store, "ref/ck")
    assert [(s, ok) for s, _, ok in ckpts] == [(10, True), (12, True)]
    files = set(bucket_store.manifest("ref/ck/checkpoint-12")["files"])
    # everything resume needs: weights, optimizer, scheduler, RNG, trainer state (the data position)
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= files
    state = bucket_store.get_json("ref/ck/checkpoint-12/trainer_state.json")
    assert state["global_step"] == FINAL_STEP


def run_and_kill(script: Path, s3_server, store: ObjectStore, prefix: str, out_dir: Path, save_steps: int,
                 slow: float, hold: bool) -> int:
    """Start training in a subprocess, SIGKILL it as soon as the first complete remote checkpoint
    exists; returns the step of the newest complete remote checkpoint after the kill."""
    env = {**os.environ, **s3_server.env(), "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error"}
    argv = [sys.executable, str(script), store.bucket, prefix, str(out_dir), str(save_steps), str(slow),
            "1" if hold else "0"]
    return kill_at_first_checkpoint(argv, env, out_dir.parent / f"{out_dir.name}.log", store, prefix)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(prog, script, reference, s3_server,
                                                             bucket_store, tmp_path: Path) -> None:
    step = run_and_kill(script, s3_server, bucket_store, "killed/ck", tmp_path / "run1", save_steps=2,
                        slow=2.0, hold=False)  # the kill lands during step 3 or 4
    assert 0 < step < FINAL_STEP and step % STEPS_PER_EPOCH != 0  # a mid-epoch checkpoint

    # "the pod restarts": a fresh local dir, state only from object storage
    trainer, restored = prog.train(bucket_store, "killed/ck", tmp_path / "run2", save_steps=2, resume=True)
    assert restored is not None and checkpoint_step(restored.name) == step
    assert trainer.state.global_step == FINAL_STEP
    assert_same_weights(final_weights(trainer), final_weights(reference))
    # leftovers of the killed attempt are pruned like everything else
    assert [(s, ok) for s, _, ok in remote_checkpoints(bucket_store, "killed/ck")] == [(10, True), (12, True)]


@pytest.mark.slow
def test_sigkill_on_epoch_boundary_then_resume_matches_uninterrupted(prog, script, reference, s3_server,
                                                                     bucket_store, tmp_path: Path) -> None:
    # save_steps == steps per epoch, and the child blocks right after that save: the kill lands on
    # the epoch boundary (the verl #7401 case).
    step = run_and_kill(script, s3_server, bucket_store, "boundary/ck", tmp_path / "run1",
                        save_steps=STEPS_PER_EPOCH, slow=0.0, hold=True)
    assert step == STEPS_PER_EPOCH
    trainer, restored = prog.train(bucket_store, "boundary/ck", tmp_path / "run2", save_steps=STEPS_PER_EPOCH,
                                   resume=True)
    assert restored is not None and (restored / MANIFEST).is_file()
    state = json.loads((restored / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS_PER_EPOCH and state["epoch"] == pytest.approx(1.0)
    assert trainer.state.global_step == FINAL_STEP
    assert_same_weights(final_weights(trainer), final_weights(reference))
    assert [s for s, _, _ in remote_checkpoints(bucket_store, "boundary/ck")] == [8, 12]


@pytest.mark.parametrize("refusal", ["denied", "expired"])
def test_refused_credentials_stop_training_at_once_even_in_warn_mode(s3_server, refusal, tmp_path: Path) -> None:
    """A bare Trainer (tiny Llama, CPU) saving every 2 steps with CheckpointSync in "warn" mode (3 failures in
    a row allowed): a write the policy denies (PermissionDenied, first save) or an STS token that expired
    after the first upload (CredentialsError, second save) stops training at that save, with no retry
    budget spent on it and a message saying why; a transient failure would have let it go on."""
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from thinkforge.storage import CredentialsError, PermissionDenied

    lifetime, issued = 5, 0.0  # seconds the STS credentials of "expired" are valid; when they were issued

    class WaitForExpiry(TrainerCallback):
        def on_save(self, args, state, control, **kw):  # after CheckpointSync's upload of this save
            if refusal == "expired" and state.global_step == 2:
                time.sleep(max(0.0, issued + lifetime + 1.5 - time.monotonic()))

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=128,
                                         max_position_embeddings=64))
    data = [{"input_ids": t, "labels": t} for t in torch.randint(0, 128, (8, 16))]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=8,
                             save_strategy="steps", save_steps=2, use_cpu=True, report_to=[], disable_tqdm=True,
                             dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    bucket = s3_server.store().bucket  # created with the fixture's admin keys
    if refusal == "denied":
        creds = s3_server.add_user(deny={"s3:PutObject": [f"arn:aws:s3:::{bucket}/*"]})
        stop_step, error, last = 2, PermissionDenied, "none"
    else:  # issued last, so the first save comes well within its lifetime
        creds, issued = s3_server.assume_role(duration_s=lifetime), time.monotonic()
        stop_step, error, last = 4, CredentialsError, "checkpoint-2"
    store = s3_server.store(bucket, create=False, credentials=creds, retries=3)
    sync = CheckpointSync(store, "r/ck", keep=2, on_error="warn", max_consecutive_failures=3)
    trainer.add_callback(sync)
    trainer.add_callback(WaitForExpiry())  # runs after the upload
    try:
        with pytest.raises(error) as err:
            trainer.train()
        msg = str(err.value)
        assert trainer.state.global_step == stop_step and sync.failures == 1
        assert f"checkpoint upload at step {stop_step} refused" in msg and "Training stops" in msg, msg
        assert f"last uploaded checkpoint of this run: {last}" in msg, msg
        assert ("AccessDenied" if refusal == "denied" else "ExpiredToken") in msg, msg
        assert creds.secret_key not in msg and (creds.session_token or "\0") not in msg
        assert sync.uploaded == ([] if refusal == "denied" else [2])
    finally:
        s3_server.drop_bucket(bucket)
