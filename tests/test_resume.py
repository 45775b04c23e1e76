"""A training STAGE survives SIGKILL: the real SFT stage function runs in a subprocess with checkpoints
going to a real S3 server on loopback (moto, tests/plugins/s3.py), is killed, and is started again
like a retried KFP task or a rescheduled pod (a fresh local directory, state only from object storage).
The resumed stage reaches the same final step and the same final weights as an uninterrupted run,
also when the kill lands exactly on an epoch boundary (verl #7401's case).

tests/test_checkpoints.py does the same for a bare transformers Trainer; this is the stage wiring
(thinkforge.stages.train.fit: prefix, restore_latest, CheckpointSync, resume_from_checkpoint).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from plugins.s3 import kill_at_first_checkpoint

from thinkforge.checkpoints import remote_checkpoints

pytestmark = pytest.mark.slow

# 16 examples, batch 4 -> 4 optimizer steps per epoch; 3 epochs -> 12 steps.
STEPS_PER_EPOCH = 4
FINAL_STEP = 12

# The stage, run in a child process. A pacing callback is added to the stage's own trainer (through
# `fit`, which every stage calls) so the parent can kill it at a chosen point: `slow` seconds per step
# after the first save (a kill mid-epoch), or `hold`: block right after the first save.
CHILD = r'''
import json, sys, time
from transformers import TrainerCallback
import thinkforge.stages.sft as sft_mod
from thinkforge.config import validate

cfg_path, model, data, out, slow, hold = sys.argv[1:7]
slow, hold = float(slow), hold == "1"

class Pace(TrainerCallback):
    def __init__(self):
        self.saved = False
    def on_save(self, args, state, control, **kw):
        self.saved = True
    def on_step_end(self, args, state, control, **kw):
        if self.saved and hold:
            while True:
                time.sleep(1)
        if self.saved and slow:
            time.sleep(slow)

real_fit = sft_mod.fit
def fit(trainer, *a, **kw):
    trainer.add_callback(Pace())  # after CheckpointSync: the upload is complete before the pause
    return real_fit(trainer, *a, **kw)
sft_mod.fit = fit

cfg = validate(json.load(open(cfg_path)))
sft_mod.sft(cfg, model, data, out)
print("FINISHED", flush=True)
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory, s3_server, s3_env, request):
    from thinkforge.config import load_recipe
    from thinkforge.records import write_jsonl
    from thinkforge.sources import load_problems
    from thinkforge.templates import system_message
    from tiny_models import tiny_model_dir, word_problem_texts

    d = tmp_path_factory.mktemp("resume")
    store = s3_server.store()
    problems = load_problems("builtin:word-problems?split=train&n=16&solutions=1")
    base = load_recipe(request.config.rootpath / "recipes" / "smoke.yaml", {
        "sft.epochs": 3, "sft.max_steps": -1, "sft.batch_size": 4, "sft.learning_rate": 3e-3,
        "sft.warmup_ratio": 0.1, "sft.save_steps": 2, "sft.keep_checkpoints": 2,
        "storage.endpoint": s3_server.endpoint, "storage.secure": False, "storage.bucket": store.bucket,
    })
    model = tiny_model_dir(d / "tiny", word_problem_texts(problems, system_message(base.template)), vocab_size=400)
    data = d / "sft.jsonl"
    write_jsonl(data, [{"problem_id": p["id"], "problem": p["problem"], "completion": p["completion"]}
                       for p in problems])
    (d / "child.py").write_text(CHILD)
    yield base, model, data, d, store
    s3_server.drop_bucket(store.bucket)


@pytest.fixture(scope="module", autouse=True)
def s3_env(s3_server):
    """THINKFORGE_S3_* credentials for the stages run in this process (module scope: the reference too)."""
    with s3_server.environment():
        yield


def weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), f"{k} differs by {(a[k] - b[k]).abs().max()}"


@pytest.fixture(scope="module")
def reference(setup):
    """An uninterrupted run of the stage (same settings, its own run name, so its own prefix)."""
    from thinkforge.stages.sft import sft

    base, model, data, d, store = setup
    cfg = base.model_copy(update={"run": base.run.model_copy(update={"name": "ref"})})
    result = sft(cfg, model, data, d / "ref-out")
    return result, weights(d / "ref-out")


def kill_stage(cfg, model, data, work: Path, store, s3_server, *, slow: float, hold: bool) -> int:
    """Start the stage in a child, SIGKILL it once the first complete remote checkpoint exists."""
    prefix = stage_prefix(cfg, model, data)
    cfg_file = work / f"{cfg.run.name}.json"
    cfg_file.write_text(json.dumps(cfg.model_dump()))
    log_path = work / f"{cfg.run.name}.log"
    env = {**os.environ, **s3_server.env(), "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error"}
    argv = [sys.executable, str(work / "child.py"), str(cfg_file), str(model), str(data),
            str(work / f"{cfg.run.name}-out1"), str(slow), "1" if hold else "0"]
    # With hold, let the child reach its hold right after the save before the kill.
    return kill_at_first_checkpoint(argv, env, log_path, store, prefix, settle=0.5 if hold else 0.0)


def stage_prefix(cfg, model, data) -> str:
    """Where the stage puts its checkpoints (a store built like the stage builds it: config prefix too)."""
    from thinkforge.stages.train import checkpoint_prefix
    from thinkforge.storage import ObjectStore

    return checkpoint_prefix(ObjectStore.from_config(cfg.storage), cfg, "sft", model, data)


def named(base, name):
    return base.model_copy(update={"run": base.run.model_copy(update={"name": name})})


def test_sigkill_mid_epoch_then_resume(setup, reference, s3_server):
    from thinkforge.stages.sft import sft

    base, model, data, d, store = setup
    cfg = named(base, "killed")
    step = kill_stage(cfg, model, data, d, store, s3_server, slow=1.0, hold=False)
    assert 0 < step < FINAL_STEP and step % STEPS_PER_EPOCH != 0  # a mid-epoch checkpoint

    result = sft(cfg, model, data, d / "killed-out2")  # the retried task: a fresh local directory
    assert result.extra["resumed_from"] == step
    assert result.extra["checkpoint_prefix"].startswith(f"s3://{store.bucket}/runs/killed/sft/checkpoints/")
    ref_result, ref_weights = reference
    assert result.steps == ref_result.steps == FINAL_STEP
    same_weights(weights(d / "killed-out2"), ref_weights)
    prefix = stage_prefix(cfg, model, data)
    assert [s for s, _, ok in remote_checkpoints(store, prefix) if ok] == [10, 12]  # keep_checkpoints=2


def test_sigkill_on_epoch_boundary_then_resume(setup, reference, s3_server):
    from thinkforge.stages.sft import sft

    base, model, data, d, store = setup
    cfg = named(base, "boundary").model_copy(
        update={"sft": base.sft.model_copy(update={"save_steps": STEPS_PER_EPOCH})})
    step = kill_stage(cfg, model, data, d, store, s3_server, slow=0.0, hold=True)
    assert step == STEPS_PER_EPOCH
    result = sft(cfg, model, data, d / "boundary-out2")
    assert result.extra["resumed_from"] == STEPS_PER_EPOCH
    epochs = [h["epoch"] for h in result.history if "loss" in h]
    assert epochs[STEPS_PER_EPOCH - 1] == pytest.approx(1.0)
    assert result.steps == FINAL_STEP
    same_weights(weights(d / "boundary-out2"), reference[1])


def test_new_settings_never_resume_old_checkpoints(setup, reference):
    """The checkpoint prefix is per attempt: other settings or data under the same run name start fresh."""
    from thinkforge.stages.train import fingerprint

    base, model, data, d, store = setup
    cfg = named(base, "ref")
    other = cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"learning_rate": 1e-4})})
    assert fingerprint(cfg, "sft", model, data) != fingerprint(other, "sft", model, data)
    changed = d / "other.jsonl"
    changed.write_text(data.read_text() + "\n")
    assert fingerprint(cfg, "sft", model, data) != fingerprint(cfg, "sft", model, changed)
    assert fingerprint(cfg, "sft", model, data) == fingerprint(named(base, "ref"), "sft", model, data)
