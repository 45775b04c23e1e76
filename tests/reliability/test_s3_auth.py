"""Object-store authentication against a server that checks it (tests/plugins/s3.py: moto with IAM
auth on): a wrong secret key, an unknown access key, an expired or invalid session token (STS
AssumeRole credentials), and a policy that denies writes/reads under one key prefix.

Each must give an error naming the operation, the endpoint, the bucket/key and the S3 error code, leak
no secret (the secret key and session token are in no exception text, traceback, log record or object),
and leave nothing half-written that looks complete: an upload_dir or checkpoint refused part-way has no
manifest, a registry publish refused part-way has no version record and moves no champion.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

from thinkforge.checkpoints import CheckpointSync, latest_complete, remote_checkpoints, restore
from thinkforge.config import Recipe, StorageConfig
from thinkforge.registry import ENTRY_MANIFEST, Registry, S3Backend, publish
from thinkforge.storage import (
    MANIFEST,
    CredentialsError,
    IncompleteError,
    ObjectStore,
    PermissionDenied,
    StorageError,
    download_to_cache,
    local_is_complete,
)

from plugins.s3 import Credentials

S3_ENV = ("THINKFORGE_S3_ENDPOINT", "THINKFORGE_S3_SECURE", "THINKFORGE_S3_ACCESS_KEY", "THINKFORGE_S3_SECRET_KEY",
          "THINKFORGE_S3_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def texts_of(exc: BaseException) -> list[str]:
    """Everything an exception can show: its message, repr, and the whole formatted chain."""
    return [str(exc), repr(exc), "".join(traceback.format_exception(exc))]


def assert_leaks_none(creds: Credentials, caplog: pytest.LogCaptureFixture, *texts: str) -> None:
    blobs = [*texts, caplog.text, *(r.getMessage() for r in caplog.records), *(repr(r.args) for r in caplog.records)]
    for secret in creds.secrets():
        assert secret and all(secret not in b for b in blobs), "a secret or session token leaked"


def assert_names(msg: str, store: ObjectStore, key: str, code: str) -> None:
    assert store.endpoint in msg and store.bucket in msg and key in msg and code in msg, msg


def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every in-process client record, down to DEBUG (minio, urllib3, thinkforge). Call it after the
    test's credentials exist: botocore logs the AssumeRole answer at DEBUG while creating them."""
    caplog.set_level(logging.DEBUG)
    return caplog


def no_retries(caplog: pytest.LogCaptureFixture) -> bool:
    return not [r for r in caplog.records if "retry" in r.getMessage()]


def local_dir(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


# ------------------------------------------------------------------------ refused credentials


def test_the_fixture_server_checks_signatures(s3_server, object_store):
    """The control: the fixture's keys work, the same access key with another secret does not."""
    object_store.put_bytes("ok.txt", b"fine")
    bad = s3_server.store(object_store.bucket, create=False, retries=1,
                          credentials=Credentials(s3_server.access_key, s3_server.secret_key[::-1]))
    with pytest.raises(CredentialsError, match="SignatureDoesNotMatch"):
        bad.get_bytes("ok.txt")


def test_chosen_keys_sign_requests_in_a_child_process(s3_server, object_store, tmp_path):
    """``add_key``: key strings a test chose (dummy secrets, '/' and '+' in them) become a real access
    key, used from the environment of a child process, as a stage pod uses its Secret."""
    import subprocess
    import sys
    import uuid

    tag = uuid.uuid4().hex[:12]
    creds = s3_server.add_key(f"tfAK{tag}access", f"tfSK{tag}secret/Value+x")
    object_store.put_bytes("runs/r/x.json", b'{"v": 7}')
    env = {k: v for k, v in os.environ.items() if k not in S3_ENV}
    env.update({**s3_server.env(), **creds.env()})
    code = ("from thinkforge.storage import ObjectStore; import sys; "
            "s, k = ObjectStore.from_uri(sys.argv[1]); print(s.get_json(k)['v'])")
    out = subprocess.run([sys.executable, "-c", code, f"s3://{object_store.bucket}/runs/r/x.json"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "7", out.stderr[-2000:]
    env["THINKFORGE_S3_SECRET_KEY"] = f"tfSK{tag}secret/Value+y"
    out = subprocess.run([sys.executable, "-c", code, f"s3://{object_store.bucket}/runs/r/x.json"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "SignatureDoesNotMatch" in out.stderr
    assert f"tfSK{tag}secret" not in out.stderr + out.stdout


def test_wrong_secret_key(s3_server, object_store, caplog, tmp_path):
    creds = Credentials(s3_server.access_key, "tf-wrong-secret-" + s3_server.secret_key[:8])
    # region given: minio skips its GET ?location lookup, so the first request is the operation itself
    bad = s3_server.store(object_store.bucket, create=False, credentials=creds, region="us-east-1")
    log = debug_logs(caplog)
    with pytest.raises(CredentialsError) as put:
        bad.put_bytes("runs/r/x.json", b"{}")
    assert_names(str(put.value), bad, "runs/r/x.json", "SignatureDoesNotMatch")
    assert "THINKFORGE_S3_SECRET_KEY" in str(put.value)
    # a HEAD answer has no body; the code still comes through (before: "AccessDenied: Access denied")
    with pytest.raises(CredentialsError) as head:
        bad.exists("runs/r/x.json")
    assert_names(str(head.value), bad, "runs/r/x.json", "SignatureDoesNotMatch")
    with pytest.raises(CredentialsError, match="SignatureDoesNotMatch"):
        bad.ensure_bucket()  # HEAD bucket
    with pytest.raises(CredentialsError, match="SignatureDoesNotMatch") as up:
        bad.upload_dir(local_dir(tmp_path / "d", {"a.bin": b"a" * 10, "b.bin": b"b" * 10}), "runs/r/dir")
    assert object_store.list_keys("runs") == []  # nothing written
    assert no_retries(log)  # refused credentials are not an outage
    assert_leaks_none(creds, log, *texts_of(put.value), *texts_of(head.value), *texts_of(up.value))
    assert s3_server.secret_key[8:] not in log.text  # nor the real one (the wrong one shares 8 chars)


def test_unknown_access_key(s3_server, object_store, caplog):
    creds = Credentials("AKIATHINKFORGEUNKNOWN", "tf-unknown-secret-0123456789")
    bad = s3_server.store(object_store.bucket, create=False, credentials=creds, region="us-east-1")
    log = debug_logs(caplog)
    with pytest.raises(CredentialsError) as e:
        bad.ensure_bucket()  # HEAD bucket first (before: "AccessDenied: Access denied")
    assert_names(str(e.value), bad, "", "InvalidAccessKeyId")
    assert "THINKFORGE_S3_ACCESS_KEY" in str(e.value)
    with pytest.raises(CredentialsError) as get:
        bad.get_bytes("runs/r/x.json")
    assert_names(str(get.value), bad, "runs/r/x.json", "InvalidAccessKeyId")
    assert no_retries(log)
    assert_leaks_none(creds, log, *texts_of(e.value), *texts_of(get.value))


def test_session_token_from_env_and_refused_tokens(s3_server, object_store, monkeypatch, caplog):
    """STS AssumeRole credentials through the environment (THINKFORGE_S3_SESSION_TOKEN, else
    AWS_SESSION_TOKEN); a token that is not the session's is InvalidToken, none at all InvalidAccessKeyId."""
    sess = s3_server.assume_role()
    object_store.put_bytes("runs/r/x.json", b'{"v": 1}')
    cfg = StorageConfig(endpoint=s3_server.endpoint, secure=False, bucket=object_store.bucket, prefix="runs")
    for k in S3_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("THINKFORGE_S3_SECURE", "false")
    for k, v in sess.env().items():
        monkeypatch.setenv(k, v)
    assert ObjectStore.from_config(cfg).get_json("runs/r/x.json") == {"v": 1}
    for k in sess.env():
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", sess.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", sess.secret_key)
    monkeypatch.setenv("AWS_SESSION_TOKEN", sess.session_token)
    store = ObjectStore.from_config(cfg, retries=1)
    store.put_json("runs/r/y.json", {"v": 2})
    assert object_store.get_json("runs/r/y.json") == {"v": 2}

    log = debug_logs(caplog)
    monkeypatch.setenv("AWS_SESSION_TOKEN", sess.session_token[:-8] + "AAAAAAAA")
    with pytest.raises(CredentialsError) as bad_token:
        ObjectStore.from_config(cfg, retries=1).get_json("runs/r/x.json")
    assert_names(str(bad_token.value), store, "runs/r/x.json", "InvalidToken")
    assert "THINKFORGE_S3_SESSION_TOKEN" in str(bad_token.value)
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    with pytest.raises(CredentialsError, match="InvalidAccessKeyId") as no_token:
        ObjectStore.from_config(cfg, retries=1).get_json("runs/r/x.json")
    assert_leaks_none(sess, log, *texts_of(bad_token.value), *texts_of(no_token.value))


def test_expired_session_token(s3_server, object_store, caplog, tmp_path):
    """Temporary credentials that expire while a writer holds them: every call after the expiry, a
    HEAD too, is ExpiredToken naming the key and the session-token setting; an upload_dir refused then
    leaves no manifest. (moto records STS expirations without enforcing them; the fixture enforces them.)"""
    sess = s3_server.assume_role(duration_s=2)
    store = s3_server.store(object_store.bucket, create=False, credentials=sess, retries=2)
    t0 = time.monotonic()
    store.put_bytes("runs/r/a.txt", b"before")
    assert store.exists("runs/r/a.txt")  # the bucket's region is cached now: later stats are a bare HEAD
    store.upload_dir(local_dir(tmp_path / "v1", {"w.bin": b"1" * 100}), "runs/r/ckpt")
    time.sleep(max(0.0, 2.3 - (time.monotonic() - t0)))
    log = debug_logs(caplog)
    with pytest.raises(CredentialsError) as put:
        store.put_bytes("runs/r/b.txt", b"after")
    assert_names(str(put.value), store, "runs/r/b.txt", "ExpiredToken")
    assert "THINKFORGE_S3_SESSION_TOKEN" in str(put.value) and "expired" in str(put.value)
    with pytest.raises(CredentialsError) as head:
        store.exists("runs/r/a.txt")  # before: "S3 error BadRequest: Bad request"
    assert_names(str(head.value), store, "runs/r/a.txt", "ExpiredToken")
    with pytest.raises(CredentialsError, match="ExpiredToken") as up:
        store.upload_dir(local_dir(tmp_path / "v2", {"w.bin": b"2" * 100}), "runs/r/ckpt")
    assert object_store.get_bytes("runs/r/ckpt/w.bin") == b"1" * 100  # the old copy, never half-replaced
    assert object_store.is_complete("runs/r/ckpt")  # the refused rewrite did not get as far as the manifest
    assert not object_store.exists("runs/r/b.txt")
    assert no_retries(log)
    assert_leaks_none(sess, log, *texts_of(put.value), *texts_of(head.value), *texts_of(up.value))


def test_download_to_cache_does_not_hide_refused_credentials_behind_the_cache(s3_server, object_store,
                                                                             monkeypatch, tmp_path):
    """An outage may fall back to a complete cached copy; refused credentials may not (before: the
    cached copy was used with an "unreachable" warning), or a revoked key would go on reading."""
    for k in S3_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("THINKFORGE_S3_RETRIES", "1")
    monkeypatch.setenv("THINKFORGE_CACHE", str(tmp_path / "cache"))
    object_store.put_bytes("data/p.jsonl", b'{"problem": "1+1?", "answer": "2"}\n')
    uri = f"s3://{object_store.bucket}/data/p.jsonl"
    assert download_to_cache(uri).read_bytes().startswith(b'{"problem"')
    monkeypatch.setenv("THINKFORGE_S3_SECRET_KEY", "tf-revoked-secret-0123456789")
    with pytest.raises(CredentialsError, match="SignatureDoesNotMatch"):
        download_to_cache(uri)


# ----------------------------------------------------------------------- a denied key prefix


def test_denied_prefix_put_and_get(s3_server, object_store, caplog):
    """A policy denying s3:PutObject and s3:GetObject under */denied/*: 403 AccessDenied there, naming the
    key; everything else works."""
    creds = s3_server.add_user(deny={"s3:PutObject": ["arn:aws:s3:::*/denied/*"],
                                     "s3:GetObject": ["arn:aws:s3:::*/denied/*"]})
    object_store.put_bytes("runs/denied/x.json", b"{}")
    store = s3_server.store(object_store.bucket, create=False, credentials=creds)
    log = debug_logs(caplog)
    store.put_bytes("runs/open/x.json", b"{}")
    assert store.get_bytes("runs/open/x.json") == b"{}"
    with pytest.raises(PermissionDenied) as put:
        store.put_bytes("runs/denied/y.json", b"{}")
    assert_names(str(put.value), store, "runs/denied/y.json", "AccessDenied")
    assert str(put.value).startswith("put ") and "policy" in str(put.value)
    with pytest.raises(PermissionDenied) as get:
        store.get_bytes("runs/denied/x.json")
    assert_names(str(get.value), store, "runs/denied/x.json", "AccessDenied")
    with pytest.raises(PermissionDenied) as head:
        store.exists("runs/denied/x.json")
    assert_names(str(head.value), store, "runs/denied/x.json", "AccessDenied")
    assert not object_store.exists("runs/denied/y.json")
    assert no_retries(log)
    assert_leaks_none(creds, log, *texts_of(put.value), *texts_of(get.value), *texts_of(head.value))


def test_upload_dir_denied_midway_leaves_no_manifest(s3_server, object_store, caplog, tmp_path):
    creds = s3_server.add_user(deny={"s3:PutObject": ["arn:aws:s3:::*/denied/*"]})
    store = s3_server.store(object_store.bucket, create=False, credentials=creds)
    src = local_dir(tmp_path / "src", {"a.bin": os.urandom(2048), "b/c.bin": os.urandom(2048),
                                       "denied/d.bin": os.urandom(2048), "z.bin": os.urandom(2048)})
    log = debug_logs(caplog)
    with pytest.raises(PermissionDenied) as e:
        store.upload_dir(src, "runs/r/model")
    assert_names(str(e.value), store, "runs/r/model/denied/d.bin", "AccessDenied")
    assert not object_store.exists(f"runs/r/model/{MANIFEST}")
    assert not object_store.is_complete("runs/r/model")
    with pytest.raises(IncompleteError):
        object_store.download_dir("runs/r/model", tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    assert_leaks_none(creds, log, *texts_of(e.value))


def _checkpoint_dir(root: Path, step: int) -> Path:
    return local_dir(root / f"checkpoint-{step}", {
        "model.safetensors": os.urandom(4096), "optimizer.pt": os.urandom(2048),
        "trainer_state.json": f'{{"global_step": {step}}}'.encode(), "rng_state.pth": os.urandom(512)})


def test_checkpoint_save_denied_midway_never_looks_complete(s3_server, object_store, caplog, tmp_path):
    """Step 2 uploads; step 4's optimizer.pt is denied: step 4 stays incomplete, the newest complete
    checkpoint is still step 2 and that is what a restart restores. "warn" mode, which lets training go on
    past a failed upload, stops at once on this one: a denied write does not recover by retrying
    (tests/test_checkpoints.py::test_refused_credentials_stop_training_at_once_even_in_warn_mode)."""
    prefix = "runs/r/checkpoints"
    CheckpointSync(object_store, prefix, keep=2, on_error="raise").sync(_checkpoint_dir(tmp_path, 2), 2)
    creds = s3_server.add_user(deny={"s3:PutObject": ["arn:aws:s3:::*/checkpoint-4/optimizer.pt"]})
    store = s3_server.store(object_store.bucket, create=False, credentials=creds)
    log = debug_logs(caplog)
    sync = CheckpointSync(store, prefix, keep=2, on_error="raise")
    with pytest.raises(PermissionDenied) as e:
        sync.sync(_checkpoint_dir(tmp_path, 4), 4)
    assert_names(str(e.value), store, f"{prefix}/checkpoint-4/optimizer.pt", "AccessDenied")
    assert [(s, ok) for s, _, ok in remote_checkpoints(object_store, prefix)] == [(2, True), (4, False)]
    assert latest_complete(object_store, prefix) == (2, f"{prefix}/checkpoint-2")
    got = restore(object_store, prefix, tmp_path / "restored")
    assert got.step == 2 and local_is_complete(got.path)

    class Args:
        output_dir = str(tmp_path)

    class State:
        global_step, is_world_process_zero = 4, True

    warn = CheckpointSync(store, prefix, keep=2, on_error="warn")
    with pytest.raises(PermissionDenied) as stopped:
        warn.on_save(Args(), State(), None)
    assert warn.failures == 1 and "Training stops" in str(stopped.value)
    assert_names(str(stopped.value), store, f"{prefix}/checkpoint-4/optimizer.pt", "AccessDenied")
    assert latest_complete(object_store, prefix)[0] == 2
    assert_leaks_none(creds, log, *texts_of(e.value), *texts_of(stopped.value))


def test_checkpoint_restore_denied_midway_raises_and_keeps_nothing(s3_server, object_store, caplog, tmp_path):
    """A read denied on one object of the newest checkpoint is an error naming it, not a silent fallback
    to an older checkpoint or a fresh start; nothing local looks complete."""
    prefix = "runs/r/checkpoints"
    sync = CheckpointSync(object_store, prefix, keep=2, on_error="raise")
    for step in (2, 4):
        sync.sync(_checkpoint_dir(tmp_path / "local", step), step)
    creds = s3_server.add_user(deny={"s3:GetObject": ["arn:aws:s3:::*/checkpoint-4/optimizer.pt"]})
    store = s3_server.store(object_store.bucket, create=False, credentials=creds)
    log = debug_logs(caplog)
    dest = tmp_path / "restored"
    with pytest.raises(PermissionDenied) as e:
        restore(store, prefix, dest)
    assert_names(str(e.value), store, f"{prefix}/checkpoint-4/optimizer.pt", "AccessDenied")
    assert not dest.exists() or not any(local_is_complete(p) for p in dest.iterdir())
    assert not dest.exists() or not [p for p in dest.iterdir() if p.name.startswith("checkpoint-")]
    assert_leaks_none(creds, log, *texts_of(e.value))


# ------------------------------------------------------------------------------------ registry


def _cfg() -> Recipe:
    return Recipe.model_validate({
        "run": {"name": "auth-reg"},
        "evaluate": {"benchmarks": [{"name": "wp", "source": "builtin:word-problems?split=test", "limit": 4}],
                     "k": 2, "bootstrap_samples": 200},
    })


def _results(cfg: Recipe, value: float) -> dict[str, Any]:
    from thinkforge.stages.evaluate import protocol

    per_problem = {f"p{i}": (1.0 if i < round(4 * value) else 0.0) for i in range(4)}
    return {"label": "final", "model": "m", "protocol": protocol(cfg),
            "benchmark_specs": {"wp": {"dataset": "custom", "source": "builtin:word-problems?split=test",
                                       "answer_type": "math", "k": 2, "limit": 4, "n_problems": 4}},
            "benchmarks": {"wp": {"n_problems": 4, "k": 2, "pass@1": value, "pass@1_se": 0.1, "cons@2": value,
                                  "per_problem": per_problem}}}


def test_registry_publish_denied_midway_records_no_version(s3_server, object_store, caplog, tmp_path):
    """The weights upload, then the model card is denied: no version record (manifest.json), no champion;
    the retry of the same KFP run with working credentials finishes that one version."""
    cfg = _cfg()
    model = local_dir(tmp_path / "model", {"config.json": b'{"model_type": "llama"}',
                                           "model.safetensors": os.urandom(4096)})
    creds = s3_server.add_user(deny={"s3:PutObject": ["arn:aws:s3:::*/MODEL_CARD.md"]})
    denied = S3Backend(s3_server.store(object_store.bucket, create=False, credentials=creds))
    log = debug_logs(caplog)
    with pytest.raises(PermissionDenied) as e:
        publish(cfg, model, {"final": _results(cfg, 0.5)}, kfp_run="kfp-auth-1", backend=denied)
    assert "MODEL_CARD.md" in str(e.value) and "AccessDenied" in str(e.value)
    reg = Registry.for_recipe(cfg, S3Backend(object_store))
    keys = object_store.list_keys(reg.root)
    assert any(k.endswith("/model/model.safetensors") for k in keys)  # it did get part-way
    assert not any(k.endswith(f"/{ENTRY_MANIFEST}") for k in keys) and reg.versions() == []
    assert reg.champion() == (None, None)
    assert not any("/decisions/" in k for k in keys)

    done = publish(cfg, model, {"final": _results(cfg, 0.5)}, kfp_run="kfp-auth-1", backend=S3Backend(object_store))
    assert done["promoted"] and reg.versions() == [done["version"]]
    assert reg.champion()[0]["version"] == done["version"]
    objects = "\n".join(object_store.get_bytes(k).decode(errors="replace") for k in object_store.list_keys(reg.root))
    assert_leaks_none(creds, log, *texts_of(e.value), objects)


def test_storage_error_classes_are_storage_errors():
    """Callers that catch StorageError (the checkpoint callback's "warn" mode, the stages) still do."""
    assert issubclass(CredentialsError, StorageError) and issubclass(PermissionDenied, StorageError)
