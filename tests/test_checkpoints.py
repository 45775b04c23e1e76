"""Checkpoints in object storage and resume after SIGKILL, with the real transformers Trainer on CPU
against a real S3 server on loopback (moto, tests/plugins/s3.py)."""

from __future__ import annotations

import importlib.util
import json
import os
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


def test_prune_keeps_newest_complete_and_drops_leftovers(object_store: ObjectStore, tmp_path: Path) -> None:
    for step in (1, 2, 3, 10):
        object_store.upload_dir(fake_checkpoint(tmp_path, step), f"r/ck/checkpoint-{step}")
    object_store.upload_file(tmp_path / "checkpoint-1" / "model.safetensors", "r/ck/checkpoint-11/model.safetensors")
    object_store.put_json("r/ck/not-a-checkpoint/x.json", {})
    deleted = prune(object_store, "r/ck", keep=2)
    assert sorted(deleted) == ["r/ck/checkpoint-1", "r/ck/checkpoint-11", "r/ck/checkpoint-2"]
    assert object_store.list_prefixes("r/ck") == ["r/ck/checkpoint-10", "r/ck/checkpoint-3", "r/ck/not-a-checkpoint"]


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
