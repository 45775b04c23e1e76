"""A full disk, for real: each writer runs in a child process under ``RLIMIT_FSIZE`` (set in
``preexec_fn``), so its writes past the limit fail with a real ``EFBIG`` from the kernel (CPython ignores
``SIGXFSZ``), the way a full volume fails them with ``ENOSPC``. Whatever was being written (a checkpoint
the Trainer saves, a checkpoint downloaded to resume, a generation shard, a model fetched from the
registry) must leave nothing that looks complete, and the error must be a ``DiskWriteError`` (an
``OSError`` with the errno) that names the path. Object storage is the real S3 server on loopback.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_helpers import recipe_with

LIMIT = 128 * 1024  # above the tokenizer and JSON files, below the tiny model's 400 KB of weights

REPORT = r'''
import json, sys, traceback

def report(fn, *args):
    try:
        fn(*args)
    except BaseException as e:
        print("RESULT " + json.dumps({"type": type(e).__name__, "errno": getattr(e, "errno", None),
                                      "filename": str(getattr(e, "filename", "") or ""), "message": str(e)}),
              flush=True)
        traceback.print_exc()
        sys.exit(3)
    print("RESULT " + json.dumps({"type": None}), flush=True)
'''


def run_limited(code: str, *args: str | Path, env: dict[str, str] | None = None, limit: int = LIMIT) -> dict:
    """Run ``REPORT + code`` in a fresh interpreter whose files may not grow past ``limit`` bytes; returns
    what its ``report(...)`` printed (the exception's type, errno, filename and message)."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    full_env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
                "TRANSFORMERS_VERBOSITY": "error", "THINKFORGE_S3_RETRIES": "2", "THINKFORGE_S3_BACKOFF": "0.05",
                **(env or {})}
    full_env.pop("THINKFORGE_CHECKPOINT_PREFIX", None)
    proc = subprocess.run([sys.executable, "-c", REPORT + code, *map(str, args)], preexec_fn=cap, env=full_env,
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    out = json.loads(lines[-1][len("RESULT "):])
    out["log"] = proc.stdout + proc.stderr
    return out


def assert_disk_full(got: dict, *paths: str | Path) -> None:
    """The child failed with a DiskWriteError (EFBIG) whose message names every one of ``paths``."""
    assert got["type"] == "DiskWriteError" and got["errno"] == errno.EFBIG, got
    for p in paths:
        assert str(p) in got["message"], (str(p), got["message"])


def big_tree(root: Path, size: int = 3 * LIMIT) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "trainer_state.json").write_text('{"global_step": 2}')
    (root / "model.safetensors").write_bytes(os.urandom(size))
    return root


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


# ------------------------------------------------------------------------------------------ checkpoints


def test_disk_full_while_saving_a_checkpoint(tiny, s3_credentials, bucket, tmp_path):
    """The real SFT stage, checkpoints to S3, on a disk that fills up while the Trainer writes the step-2
    checkpoint: the stage fails with an error naming that checkpoint directory; the partial directory is
    gone (nothing local looks like a checkpoint), nothing was uploaded, no model was written."""
    cfg = recipe_with(tiny.recipe, {"run.name": "disk-full-save", "storage.endpoint": s3_credentials.endpoint,
                                    "storage.bucket": bucket.bucket})
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg.model_dump()))
    out = tmp_path / "out"
    got = run_limited(r'''
from thinkforge.config import validate
from thinkforge.stages.sft import sft
cfg = validate(json.load(open(sys.argv[1])))
report(sft, cfg, sys.argv[2], sys.argv[3], sys.argv[4])
''', cfg_file, tiny.model, tiny.data, out)
    ckpt = out / "trainer" / "checkpoint-2"
    assert_disk_full(got, ckpt)
    assert "step-2 checkpoint" in got["message"] and got["filename"] == str(ckpt)
    assert not ckpt.exists() and not list((out / "trainer").glob("checkpoint-*"))
    assert not any("checkpoint-" in k for k in bucket.list_keys("")), bucket.list_keys("")
    assert not (out / "model.safetensors").exists()


def test_disk_full_while_downloading_a_checkpoint(s3_server, bucket, tmp_path):
    """A retried task restores its checkpoint onto a disk without room for it: the error names the local
    file and the destination; no checkpoint directory (and no partial one) is left to pick up."""
    bucket.upload_dir(big_tree(tmp_path / "src" / "checkpoint-2"), "r/ck/checkpoint-2")
    dest = tmp_path / "restore"
    got = run_limited(r'''
from thinkforge.checkpoints import restore_latest
from thinkforge.config import StorageConfig
from thinkforge.storage import ObjectStore
store = ObjectStore.from_config(StorageConfig(bucket=sys.argv[1]))
report(restore_latest, store, "r/ck", sys.argv[2])
''', bucket.bucket, dest, env=s3_server.env())
    assert_disk_full(got, dest / "checkpoint-2")
    assert Path(got["filename"]).name == "model.safetensors" and got["filename"].startswith(str(dest))
    assert leftovers(dest) == []
    assert bucket.is_complete("r/ck/checkpoint-2")  # the remote copy is untouched


# ------------------------------------------------------------------------------------------- generation


def test_disk_full_while_writing_a_generation_shard(tiny, tmp_path):
    """The generate stage's first shard does not fit on the disk: the error names the shard; no shard
    file, temp file or output file is left (a rerun samples those prompts again)."""
    cfg = recipe_with(tiny.recipe, {"run.name": "disk-full-gen",
                                    "generate.shard_prompts": 8, "generate.samples_per_prompt": 4})
    assert not cfg.storage.endpoint
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg.model_dump()))
    out = tmp_path / "rollouts.jsonl"
    got = run_limited(r'''
import thinkforge.stages.generate as gen
from thinkforge.config import validate
from thinkforge.engines.base import Completion

class Verbose:  # a teacher that thinks at length: 8 prompts x 4 samples x 8 KB per shard
    def generate(self, problems, params, progress=None):
        if progress is not None:
            progress(len(problems))
        return [[Completion(text="step " * 1600 + "\\boxed{1}", num_tokens=1600, finish_reason="stop")
                 for _ in range(params.n)] for _ in problems]

    def close(self):
        pass

gen._make_engine = lambda cfg, teacher, metrics: Verbose()
report(gen.generate, validate(json.load(open(sys.argv[1]))), sys.argv[2])
''', cfg_file, out, env={"THINKFORGE_S3_ENDPOINT": ""})
    shards = tmp_path / "rollouts.jsonl.shards"
    assert_disk_full(got, shards / "shard-00000.jsonl")
    assert got["filename"] == str(shards / "shard-00000.jsonl")
    assert [n for n in leftovers(shards) if n not in ("manifest.json", ".lock")] == []
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- registry


@pytest.mark.parametrize("where", ["local", "s3"])
def test_disk_full_while_fetching_from_the_registry(where, s3_server, bucket, tmp_path):
    """A model fetched from the registry onto a disk without room for it: the error names the file;
    nothing is left at the destination (a half copy with its manifest would look complete)."""
    from thinkforge.config import Recipe
    from thinkforge.registry import LocalBackend, S3Backend, publish

    cfg = Recipe.model_validate({"run": {"name": "reg-disk"}, "registry": {}})
    backend = LocalBackend(tmp_path / "registry") if where == "local" else S3Backend(bucket)
    model = big_tree(tmp_path / "model")
    version = publish(cfg, model, {}, backend=backend)["version"]
    dest = tmp_path / "fetched" / "model"
    got = run_limited(r'''
from thinkforge.config import StorageConfig
from thinkforge.registry import LocalBackend, Registry, S3Backend
from thinkforge.storage import ObjectStore
where, root, bucket, version, dest = sys.argv[1:6]
backend = LocalBackend(root) if where == "local" else S3Backend(ObjectStore.from_config(StorageConfig(bucket=bucket)))
report(Registry(backend, "registry", "reg-disk").fetch_model, dest, version)
''', where, tmp_path / "registry", bucket.bucket, version, dest, env=s3_server.env())
    assert_disk_full(got, dest)
    assert Path(got["filename"]).name == "model.safetensors"
    assert leftovers(dest.parent) == []
