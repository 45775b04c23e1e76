"""thinkforge.storage against a real S3 server on loopback (moto; see tests/plugins/s3.py)."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from pathlib import Path

import pytest
from plugins.s3 import free_port

from thinkforge.config import StorageConfig
from thinkforge.storage import (
    MANIFEST,
    ChecksumError,
    IncompleteError,
    NotFound,
    ObjectStore,
    StorageError,
    check_key,
    download_to_cache,
    parse_uri,
    safe_key,
)


def make_tree(root: Path, big: int = 0) -> dict[str, bytes]:
    files = {
        "config.json": b'{"a": 1}',
        "nested/deeper/weights.bin": os.urandom(70_000),
        "nested/notes.txt": "ünïcode ✓\n".encode(),
        "empty.txt": b"",
    }
    if big:
        files["big.bin"] = os.urandom(big)
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


class Recorder:
    """Delegates to the real minio client and records which keys were written, in completion order."""

    def __init__(self, client):
        self._client = client
        self.writes: list[str] = []

    def fput_object(self, bucket, key, *a, **kw):
        r = self._client.fput_object(bucket, key, *a, **kw)
        self.writes.append(key)
        return r

    def put_object(self, bucket, key, *a, **kw):
        r = self._client.put_object(bucket, key, *a, **kw)
        self.writes.append(key)
        return r

    def __getattr__(self, name):
        return getattr(self._client, name)


# --------------------------------------------------------------------------------- round trips


def test_file_and_json_round_trip(object_store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(1000))
    object_store.upload_file(src, "x/a.bin")
    assert object_store.exists("x/a.bin") and not object_store.exists("x/b.bin")
    out = object_store.download_file("x/a.bin", tmp_path / "dl" / "a.bin")
    assert out.read_bytes() == src.read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["a.bin"]  # no temp files left

    obj = {"step": 3, "name": "r", "nested": {"x": [1, 2.5, None]}}
    object_store.put_json("x/state.json", obj)
    assert object_store.get_json("x/state.json") == obj
    with pytest.raises(NotFound, match="x/missing.json"):
        object_store.get_json("x/missing.json")
    with pytest.raises(NotFound):
        object_store.download_file("x/missing.bin", tmp_path / "m.bin")
    assert not (tmp_path / "m.bin").exists()


def test_dir_round_trip_nested_and_multipart(object_store: ObjectStore, tmp_path: Path) -> None:
    files = make_tree(tmp_path / "src", big=11 << 20)  # > 5 MiB: the client uploads it in parts
    manifest = object_store.upload_dir(tmp_path / "src", "runs/r/ck")
    assert set(manifest["files"]) == set(files)
    assert manifest["files"]["big.bin"]["size"] == 11 << 20
    assert manifest["total_bytes"] == sum(len(v) for v in files.values())
    assert object_store.is_complete("runs/r/ck")
    assert object_store.list_keys("runs/r/ck") == sorted([f"runs/r/ck/{k}" for k in files] + [f"runs/r/ck/{MANIFEST}"])

    out = object_store.download_dir("runs/r/ck", tmp_path / "dst")
    got = read_tree(out)
    assert json.loads(got.pop(MANIFEST)) == manifest
    assert got == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]  # no partial dirs left


def test_manifest_is_written_last(object_store: ObjectStore, tmp_path: Path) -> None:
    make_tree(tmp_path / "src")
    rec = Recorder(object_store._client)
    object_store._client = rec
    object_store.upload_dir(tmp_path / "src", "p/ck")
    assert rec.writes[-1] == f"p/ck/{MANIFEST}"
    assert sorted(rec.writes[:-1]) == sorted(f"p/ck/{k}" for k in make_tree(tmp_path / "again"))


@pytest.mark.parametrize("kind", ["file", "directory", "dangling"])
def test_symlinks_inside_an_uploaded_directory_are_refused(object_store: ObjectStore, tmp_path: Path,
                                                           kind: str) -> None:
    """A link inside a directory being uploaded (to a mounted Secret, to another directory, to nothing)
    is refused before anything is written, never followed: its target never reaches the bucket."""
    secret_dir = tmp_path / "mounted-secret"
    secret_dir.mkdir()
    (secret_dir / "token").write_text("SECRET-TOKEN-VALUE")
    src = tmp_path / "src"
    make_tree(src)
    link = src / "nested" / "leak"
    target = {"file": secret_dir / "token", "directory": secret_dir, "dangling": tmp_path / "gone"}[kind]
    link.symlink_to(target, target_is_directory=kind == "directory")
    make_tree(tmp_path / "old")
    object_store.upload_dir(tmp_path / "old", "p/ck")  # a complete earlier copy
    with pytest.raises(ValueError, match=rf"{link} is a symbolic link"):
        object_store.upload_dir(src, "p/ck")
    keys = object_store.list_keys("p")
    assert not any("leak" in k for k in keys)
    assert all(b"SECRET-TOKEN-VALUE" not in object_store.get_bytes(k) for k in keys)
    assert object_store.is_complete("p/ck")  # refused up front: the earlier copy is untouched

    # the directory itself may be a link (a mounted artifact path); only links inside it are refused
    link.unlink()
    (tmp_path / "via").symlink_to(src, target_is_directory=True)
    assert set(object_store.upload_dir(tmp_path / "via", "p/ok")["files"]) == set(make_tree(tmp_path / "again"))


def test_rewriting_a_prefix_clears_its_marker_first(object_store: ObjectStore, tmp_path: Path) -> None:
    make_tree(tmp_path / "src")
    object_store.upload_dir(tmp_path / "src", "p/ck")
    seen = []
    rec = Recorder(object_store._client)
    orig = rec.fput_object

    def spy(bucket, key, *a, **kw):  # while files are rewritten, the prefix must not look complete
        seen.append(object_store.is_complete("p/ck"))
        return orig(bucket, key, *a, **kw)

    rec.fput_object = spy
    object_store._client = rec
    object_store.upload_dir(tmp_path / "src", "p/ck")
    assert seen and not any(seen)
    assert object_store.is_complete("p/ck")


def test_checksum_mismatch_is_detected(object_store: ObjectStore, s3_server, tmp_path: Path) -> None:
    files = make_tree(tmp_path / "src")
    object_store.upload_dir(tmp_path / "src", "p/ck")
    # Corrupt one object behind the store's back (same size, different bytes).
    bad = bytearray(files["nested/deeper/weights.bin"])
    bad[100] ^= 0xFF
    s3_server.minio().put_object(object_store.bucket, "p/ck/nested/deeper/weights.bin", io.BytesIO(bytes(bad)), len(bad))

    dest = tmp_path / "dst"
    dest.mkdir()
    (dest / "previous.txt").write_text("an older good copy")
    with pytest.raises(ChecksumError, match="weights.bin"):
        object_store.download_dir("p/ck", dest)
    assert read_tree(dest) == {"previous.txt": b"an older good copy"}  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]  # temp dir removed


def test_incomplete_prefix_is_refused(object_store: ObjectStore, tmp_path: Path) -> None:
    files = make_tree(tmp_path / "src")
    for rel in files:  # what a writer killed before its manifest leaves behind
        object_store.upload_file(tmp_path / "src" / rel, f"p/ck/{rel}")
    assert not object_store.is_complete("p/ck")
    with pytest.raises(IncompleteError, match="_MANIFEST.json"):
        object_store.download_dir("p/ck", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    with pytest.raises(IncompleteError):
        object_store.download_dir("p/nothing-here", tmp_path / "dst")


def test_failed_upload_leaves_nothing_complete(s3_server, flaky_proxy, tmp_path: Path) -> None:
    make_tree(tmp_path / "src", big=6 << 20)
    store = s3_server.store()
    proxy = flaky_proxy()
    via = s3_server.store(store.bucket, endpoint=proxy.endpoint, create=False, retries=2)
    proxy.cut_after(1 << 20, refuse=10_000)  # the server "dies" for good mid-upload
    with pytest.raises(StorageError, match=proxy.endpoint):
        via.upload_dir(tmp_path / "src", "p/ck")
    assert proxy.cuts == 1
    assert not store.is_complete("p/ck")
    with pytest.raises(IncompleteError):
        store.download_dir("p/ck", tmp_path / "dst")
    s3_server.drop_bucket(store.bucket)


def test_listing_and_deleting_prefixes(object_store: ObjectStore, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    for name in ("checkpoint-1", "checkpoint-10", "checkpoint-2"):
        object_store.upload_dir(tmp_path, f"run/ck/{name}")
    object_store.put_json("run/ck/loose.json", {})
    assert object_store.list_prefixes("run/ck") == ["run/ck/checkpoint-1", "run/ck/checkpoint-10", "run/ck/checkpoint-2"]
    assert object_store.list_prefixes("run") == ["run/ck"]
    assert object_store.delete_prefix("run/ck/checkpoint-1") == 2
    # `checkpoint-1` must not match `checkpoint-10`
    assert object_store.list_prefixes("run/ck") == ["run/ck/checkpoint-10", "run/ck/checkpoint-2"]
    assert object_store.is_complete("run/ck/checkpoint-10")
    with pytest.raises(ValueError):
        object_store.delete_prefix("")


# ------------------------------------------------------------------------------------ keys


@pytest.mark.parametrize(
    "name",
    ["../../etc", "..", ".", "/abs/path", "a/../../b", "..\\..\\win", "ctl\x00\x1b\n\r", "a//b", "%2E%2E", " ", "ü/.."],
)
def test_safe_key_cannot_escape(name: str) -> None:
    key = safe_key("runs", name, "checkpoints")
    check_key(key)  # accepted by the store's own validation
    segs = key.split("/")
    assert len(segs) == 3 and segs[0] == "runs" and segs[2] == "checkpoints"
    assert segs[1] not in ("", ".", "..")
    assert not any(c in key for c in "\\\x00\x1b\n\r ")


def test_safe_key_is_one_to_one_and_rejects_empty() -> None:
    names = ["a/b", "a%2Fb", "a_b", "a b", "..", "%2E%2E", "A", "a"]
    keys = [safe_key("runs", n) for n in names]
    assert len(set(keys)) == len(keys)
    assert safe_key("runs", "plain-name_1.0", 7) == "runs/plain-name_1.0/7"
    with pytest.raises(ValueError):
        safe_key("runs", "")


@pytest.mark.parametrize("key", ["../x", "a/../b", "/abs", "a\\b", "a\x00b", "a//b", "./a", ""])
def test_unsafe_raw_keys_are_refused(object_store: ObjectStore, key: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        object_store.put_json(key, {})
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError):
        object_store.upload_dir(tmp_path, key)


def test_evil_run_name_stays_under_its_prefix(object_store: ObjectStore) -> None:
    store = ObjectStore(object_store.endpoint, object_store.bucket, secure=False, prefix="team/runs")
    store._client = object_store._client
    key = store.run_prefix("../../../etc", "passwd")
    assert key.startswith("team/runs/") and key.count("/") == 3
    store.put_json(key, {"x": 1})
    assert object_store.list_keys("team/runs") == [key]
    assert object_store.list_prefixes("") == ["team"]


def test_parse_uri() -> None:
    assert parse_uri("s3://b/k/x.jsonl") == ("b", "k/x.jsonl")
    assert parse_uri("minio://b/pre/") == ("b", "pre")
    for bad in ("s3:///k", "http://b/k", "s3://b/../x"):
        with pytest.raises(ValueError):
            parse_uri(bad)


# ---------------------------------------------------------------------------------- faults


def test_server_down_at_start_retries_then_names_the_endpoint(s3_server, caplog) -> None:
    port = free_port()  # nothing listens here
    store = ObjectStore(f"127.0.0.1:{port}", "ckpt-bucket", access_key=s3_server.access_key,
                        secret_key=s3_server.secret_key, secure=False, retries=4, backoff=0.05, max_backoff=0.1)
    caplog.set_level(logging.WARNING, logger="thinkforge.storage")
    t0 = time.monotonic()
    with pytest.raises(StorageError) as info:
        store.put_json("runs/x/state.json", {"a": 1})
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert f"127.0.0.1:{port}" in msg and "ckpt-bucket" in msg and "after 4 attempts" in msg
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 3
    assert elapsed >= 3 * 0.05 * 0.5  # it backed off between attempts
    assert s3_server.secret_key not in msg and s3_server.secret_key not in caplog.text
    assert s3_server.secret_key not in repr(store) and s3_server.access_key not in repr(store)


def test_server_back_within_the_retry_window(s3_server, flaky_proxy, object_store) -> None:
    proxy = flaky_proxy()
    proxy.refuse(3)  # down at the start of the stage, up again after three tries
    via = s3_server.store(object_store.bucket, endpoint=proxy.endpoint, create=False, retries=5)
    via.put_json("a.json", {"ok": True})
    assert proxy.refused == 3
    assert object_store.get_json("a.json") == {"ok": True}


def test_server_dies_mid_upload_then_upload_retries(s3_server, flaky_proxy, object_store, tmp_path: Path) -> None:
    files = make_tree(tmp_path / "src", big=7 << 20)
    proxy = flaky_proxy()
    via = s3_server.store(object_store.bucket, endpoint=proxy.endpoint, create=False, retries=6, workers=2)
    via.exists("warm-up")  # bucket region lookup before the fault
    proxy.cut_after(2 << 20, refuse=2)  # sever every connection mid-transfer, then refuse two more
    via.upload_dir(tmp_path / "src", "p/ck")
    assert proxy.cuts == 1 and proxy.refused == 2
    out = object_store.download_dir("p/ck", tmp_path / "dst")  # verified against the sha256s
    got = read_tree(out)
    got.pop(MANIFEST)
    assert got == files


def test_slowdown_is_retried_and_missing_bucket_is_not(s3_server, flaky_proxy, object_store, caplog) -> None:
    proxy = flaky_proxy()
    via = s3_server.store(object_store.bucket, endpoint=proxy.endpoint, create=False, retries=5)
    via.exists("warm-up")
    proxy.slowdown(2)
    caplog.set_level(logging.WARNING, logger="thinkforge.storage")
    via.put_json("s.json", {"n": 1})
    assert proxy.slowed == 2
    assert sum("SlowDown" in r.getMessage() for r in caplog.records) == 2
    caplog.clear()
    gone = s3_server.store("no-such-bucket-here", create=False)
    with pytest.raises(NotFound, match="no-such-bucket-here"):
        gone.get_json("x.json")
    assert not [r for r in caplog.records if "retry" in r.getMessage()]


# ------------------------------------------------------------------ config, env and the cache


def test_from_config_and_from_uri_read_env(s3_server, object_store, monkeypatch) -> None:
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    cfg = StorageConfig(endpoint="elsewhere:9000", secure=True, bucket=object_store.bucket, prefix="runs")
    monkeypatch.setenv("THINKFORGE_S3_RETRIES", "3")
    store = ObjectStore.from_config(cfg)  # THINKFORGE_S3_ENDPOINT/SECURE win over the recipe
    assert (store.endpoint, store.secure, store.prefix) == (s3_server.endpoint, False, "runs")
    assert store.retry.attempts == 3
    store.put_json(store.run_prefix("r1", "x.json"), {"v": 1})
    assert object_store.get_json("runs/r1/x.json") == {"v": 1}
    s2, key = ObjectStore.from_uri(f"minio://{object_store.bucket}/runs/r1/x.json")
    assert s2.get_json(key) == {"v": 1}
    monkeypatch.delenv("THINKFORGE_S3_ENDPOINT")
    assert ObjectStore.from_config_or_none(StorageConfig(endpoint="")) is None
    with pytest.raises(StorageError, match="no object-storage endpoint"):
        ObjectStore.from_config(StorageConfig(endpoint=""))
    with pytest.raises(StorageError, match="THINKFORGE_S3_ENDPOINT"):
        ObjectStore.from_uri("s3://bkt/k")
    s3, _ = ObjectStore.from_uri("s3://bkt/k", StorageConfig(endpoint="http://10.0.0.1:9000", secure=True))
    assert (s3.endpoint, s3.secure) == ("10.0.0.1:9000", False)


def test_download_to_cache_file_and_dir(s3_server, object_store, monkeypatch, tmp_path: Path) -> None:
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("THINKFORGE_CACHE", str(tmp_path / "cache"))
    b = object_store.bucket
    object_store.put_bytes("data/p.jsonl", b'{"problem": "1+1?", "answer": "2"}\n')
    path = download_to_cache(f"s3://{b}/data/p.jsonl")
    assert path == tmp_path / "cache" / "s3" / b / "data" / "p.jsonl"
    first = path.stat().st_mtime_ns
    assert download_to_cache(f"s3://{b}/data/p.jsonl").stat().st_mtime_ns == first  # cached
    object_store.put_bytes("data/p.jsonl", b'{"problem": "2+2?", "answer": "4"}\n')
    assert b"2+2" in download_to_cache(f"s3://{b}/data/p.jsonl").read_bytes()  # ETag changed

    from thinkforge.sources import load_problems  # the s3:// prompt source goes through the cache

    assert [p["answer"] for p in load_problems(f"s3://{b}/data/p.jsonl")] == ["4"]

    make_tree(tmp_path / "model")
    object_store.upload_dir(tmp_path / "model", "models/m1")
    d = download_to_cache(f"minio://{b}/models/m1")
    assert (d / "nested" / "deeper" / "weights.bin").is_file()
    with pytest.raises(NotFound):
        download_to_cache(f"s3://{b}/models/none")

    # endpoint gone: complete cached copies are still served; nothing cached -> the error
    monkeypatch.setenv("THINKFORGE_S3_ENDPOINT", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("THINKFORGE_S3_RETRIES", "1")
    assert download_to_cache(f"s3://{b}/data/p.jsonl") == path
    assert download_to_cache(f"minio://{b}/models/m1") == d
    with pytest.raises(StorageError, match="unreachable"):
        download_to_cache(f"s3://{b}/data/other.jsonl")
