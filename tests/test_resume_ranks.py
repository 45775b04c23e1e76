"""Two-process training survives a pod eviction: SFT, DPO and GRPO, each run by the real launcher
(``thinkforge.launch.stage_function`` with ``<stage>.num_processes: 2``: ``accelerate launch``, gloo,
DeepSpeed ZeRO-2 on the CPU), checkpoints to a real S3 server on loopback (tests/plugins/s3.py).

For each stage: an uninterrupted two-process run; a run whose whole process group (the launcher and
both ranks) is SIGKILLed once the first checkpoint is in the bucket and one more step is trained; a
rerun in a fresh output directory, state only from S3. The rerun resumes from that checkpoint and ends
with the same final step and the same final weights as the uninterrupted run, and the checkpoint it
resumed from holds every rank's files (each rank's RNG state, each rank's ZeRO optimizer shard).

The kill point is exact: a ``sitecustomize`` on the children's PYTHONPATH adds a callback to every
rank's trainer that blocks both ranks at the end of step ``save_steps + 1`` (after the step-2 upload
finished; the step-3 update is lost with the kill and must be redone identically).
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

pytestmark = pytest.mark.slow

SAVE = 2  # save_steps
FINAL = 4  # max_steps of every stage here

LAUNCHER = r'''
import json, sys
from thinkforge.config import validate
from thinkforge.launch import stage_function
cfg_path, stage, model, data, out = sys.argv[1:6]
cfg = validate(json.load(open(cfg_path)))
stage_function(stage, cfg)(cfg, model, data, out)
print("FINISHED", flush=True)
'''

# Imported by every Python process of the killed run (the launcher, accelerate, both ranks); active
# only where TF_TEST_HOLD_AT is set.
SITECUSTOMIZE = r'''
import os
if os.environ.get("TF_TEST_HOLD_AT"):
    import thinkforge.stages.train as _train
    _real_fit = _train.fit

    def fit(trainer, *args, **kwargs):
        import time
        from transformers import TrainerCallback

        at, marks = int(os.environ["TF_TEST_HOLD_AT"]), os.environ["TF_TEST_HOLD_DIR"]

        class Hold(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step >= at:
                    open(os.path.join(marks, f"held-{args.process_index}"), "w").close()
                    while True:
                        time.sleep(1)

        trainer.add_callback(Hold())
        if trainer.args.process_index == 1:
            # rank 1 writes its part of each checkpoint late: an upload that does not wait for every rank
            # leaves it out (or takes it half-written)
            real_rng = trainer._save_rng_state

            def late_rng_state(output_dir):
                time.sleep(float(os.environ.get("TF_TEST_RANK1_LATE", "0")))
                return real_rng(output_dir)

            trainer._save_rng_state = late_rng_state
        return _real_fit(trainer, *args, **kwargs)

    _train.fit = fit
'''


@pytest.fixture(scope="module", autouse=True)
def s3_env(s3_server):
    with s3_server.environment(OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error"):
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory, s3_server, request):
    """(base recipe, {stage: input model}, {stage: data file}, work dir, store)."""
    from thinkforge.config import load_recipe
    from thinkforge.records import write_jsonl
    from thinkforge.sources import load_problems
    from thinkforge.templates import system_message
    from tiny_models import tiny_model_dir, word_problem_texts

    d = tmp_path_factory.mktemp("ranks")
    store = s3_server.store()
    problems = load_problems("builtin:word-problems?split=train&n=16&solutions=1")
    common = {"num_processes": 2, "deepspeed": "zero2", "max_steps": FINAL, "save_steps": SAVE,
              "keep_checkpoints": 2, "batch_size": 2, "logging_steps": 1, "lr_scheduler": "linear"}
    overrides = {f"{stage}.{k}": v for stage in ("sft", "dpo", "rl") for k, v in common.items()}
    overrides.update({"sft.learning_rate": 3e-3, "dpo.learning_rate": 1e-3, "rl.learning_rate": 1e-3,
                      "rl.num_generations": 2, "rl.max_completion_tokens": 6, "rl.temperature_start": 1.0,
                      "storage.endpoint": s3_server.endpoint, "storage.secure": False, "storage.bucket": store.bucket})
    base = load_recipe(request.config.rootpath / "recipes" / "smoke.yaml", overrides)
    model = tiny_model_dir(d / "tiny", [*word_problem_texts(problems, system_message(base.template)),
                                        *(str(i) for i in range(10))], vocab_size=400)
    data = {"sft": d / "sft.jsonl", "dpo": d / "dpo.jsonl", "rl": d / "rl.jsonl"}
    write_jsonl(data["sft"], [{"problem_id": p["id"], "problem": p["problem"], "completion": p["completion"]}
                              for p in problems])
    write_jsonl(data["dpo"], [{"problem_id": p["id"], "problem": p["problem"], "chosen": p["completion"],
                               "rejected": f"The answer is {i % 10}."} for i, p in enumerate(problems)])
    # GRPO learns only from groups whose rewards differ: a policy that answers 7 or 3 about half the time
    # each (gold: 7), from a few single-process SFT steps on the tiny model.
    write_jsonl(d / "digits.jsonl", [{"problem_id": p["id"], "problem": p["problem"], "completion": "73"[i % 2]}
                                     for i, p in enumerate(problems)])
    from thinkforge.stages.sft import sft

    digits_cfg = base.model_copy(update={"sft": base.sft.model_copy(update={
        "num_processes": 1, "deepspeed": "none", "save_steps": 0, "max_steps": 12, "batch_size": 16,
        "learning_rate": 1e-2, "lr_scheduler": "constant"})})
    sft(digits_cfg, model, d / "digits.jsonl", d / "digits")
    write_jsonl(data["rl"], [{"id": p["id"], "problem": p["problem"], "answer": "7", "pass_rate": 0.5}
                             for p in problems])
    (d / "launcher.py").write_text(LAUNCHER)
    (d / "site").mkdir()
    (d / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    yield base, {"sft": model, "dpo": model, "rl": d / "digits"}, data, d, store
    s3_server.drop_bucket(store.bucket)


def named(base, name):
    return base.model_copy(update={"run": base.run.model_copy(update={"name": name})})


def stage_prefix(cfg, stage, model, data) -> str:
    from thinkforge.stages.train import checkpoint_prefix
    from thinkforge.storage import ObjectStore

    return checkpoint_prefix(ObjectStore.from_config(cfg.storage), cfg, stage, model, data)


def weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _group_alive(pgid: int) -> list[int]:
    """Processes (not zombies) still in process group ``pgid``."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def evict(cfg, stage: str, model, data, work: Path, store) -> int:
    """Run the stage's launcher in its own process group, SIGKILL the whole group once the first
    checkpoint is complete in the bucket and both ranks trained one step past it; the newest step."""
    from thinkforge.checkpoints import latest_complete

    name = cfg.run.name
    cfg_file = work / f"{name}.json"
    cfg_file.write_text(json.dumps(cfg.model_dump()))
    marks = work / f"{name}-marks"
    marks.mkdir()
    log_path = work / f"{name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_TEST_HOLD_AT": str(SAVE + 1), "TF_TEST_HOLD_DIR": str(marks),
           "TF_TEST_RANK1_LATE": "3",
           "PYTHONPATH": os.pathsep.join([str(work / "site"), os.environ.get("PYTHONPATH", "")])}
    prefix = stage_prefix(cfg, stage, model, data)
    argv = [sys.executable, str(work / "launcher.py"), str(cfg_file), stage, str(model), str(data),
            str(work / f"{name}-out1")]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while latest_complete(store, prefix) is None or len(list(marks.iterdir())) < 2:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"no checkpoint and hold before exit/timeout:\n{log_path.read_text()[-4000:]}")
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks at once, as an eviction does
            proc.wait(timeout=30)
            for _ in range(100):
                if not _group_alive(proc.pid):
                    break
                time.sleep(0.1)
            assert not _group_alive(proc.pid), "a rank survived the group kill"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert "FINISHED" not in log_path.read_text()
    latest = latest_complete(store, prefix)
    assert latest is not None
    return latest[0]


def rank_files(store, prefix: str, step: int) -> list[str]:
    return sorted(store.manifest(f"{prefix}/checkpoint-{step}")["files"])


def run_and_resume(setup, stage: str, capfd):
    from thinkforge.launch import stage_function

    base, model, data, d, store = setup
    model, data = model[stage], data[stage]
    ref_cfg = named(base, f"{stage}-ref")
    t0 = time.monotonic()
    ref = stage_function(stage, ref_cfg)(ref_cfg, model, data, d / f"{stage}-ref-out")
    ref_s = time.monotonic() - t0
    assert ref.steps == FINAL and ref.extra["resumed_from"] is None

    cfg = named(base, f"{stage}-evicted")
    step = evict(cfg, stage, model, data, d, store)
    assert step == SAVE
    prefix = stage_prefix(cfg, stage, model, data)
    files = rank_files(store, prefix, step)
    # every rank's state is in the remote checkpoint, written before the upload began
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json", "model.safetensors"} <= set(files), files
    shards = [f for f in files if f.startswith(f"global_step{step}/") and f.endswith("_optim_states.pt")]
    assert any("zero_pp_rank_0_" in f for f in shards) and any("zero_pp_rank_1_" in f for f in shards), files

    out2 = d / f"{stage}-evicted-out2"
    capfd.readouterr()
    resumed = stage_function(stage, cfg)(cfg, model, data, out2)  # the retried pod: a fresh directory
    assert resumed.extra["resumed_from"] == SAVE
    assert resumed.steps == FINAL
    # one download (by the local main process) that every rank read; the work folder holding it is gone
    # with the rest of the Trainer's files once the model is saved (the model folder holds only the model)
    log = "".join(capfd.readouterr())
    assert log.count(f"checkpoints: restored step {SAVE} from") == 1, log[-3000:]
    assert not (out2 / "trainer").exists()
    store.download_file(f"{prefix}/checkpoint-{SAVE}/model.safetensors", d / f"{stage}-ckpt.safetensors")
    from safetensors.torch import load_file

    final = weights(out2)
    at_checkpoint = load_file(str(d / f"{stage}-ckpt.safetensors"))
    assert max_difference(final, at_checkpoint) > 0, "nothing trained after the resume"
    diff = max_difference(final, weights(d / f"{stage}-ref-out"))
    print(f"{stage}: reference run {ref_s:.0f}s; max |resumed - uninterrupted| = {diff:.3g}")
    return ref, resumed, diff


def after_checkpoint(result, *keys: str) -> list[tuple]:
    """The logged ``keys`` of the steps after the checkpoint the evicted run resumed from."""
    rows = [tuple(h[k] for k in keys) for h in result.history if keys[0] in h and h.get("step", 0) > SAVE]
    assert len(rows) == FINAL - SAVE, result.history
    return rows


def test_sft_two_ranks_evicted_then_resumed(setup, capfd):
    ref, resumed, diff = run_and_resume(setup, "sft", capfd)
    assert diff == 0.0
    assert after_checkpoint(resumed, "loss") == after_checkpoint(ref, "loss")


def test_dpo_two_ranks_evicted_then_resumed(setup, capfd):
    """Also: the resumed run's reference log-probs are the incoming model's (precomputed before the
    checkpoint's weights are loaded), so its DPO losses and rewards match the uninterrupted run's."""
    ref, resumed, diff = run_and_resume(setup, "dpo", capfd)
    assert diff == 0.0
    keys = ("loss", "rewards/chosen", "rewards/rejected")
    assert after_checkpoint(resumed, *keys) == after_checkpoint(ref, *keys)


def test_grpo_two_ranks_evicted_then_resumed(setup, capfd):
    """Also: the rollouts after the resume are the uninterrupted run's (each rank's sampling RNG comes
    back from its own rng_state_<rank>.pth): the same rewards, spreads and losses."""
    ref, resumed, diff = run_and_resume(setup, "rl", capfd)
    keys = ("reward", "reward_std", "loss")
    assert any(std > 0 for _, std, _ in after_checkpoint(ref, *keys)), "no reward spread after the checkpoint"
    assert after_checkpoint(resumed, *keys) == after_checkpoint(ref, *keys)
    assert diff == 0.0
