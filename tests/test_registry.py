"""The model registry and its promotion gate, in a local directory and on a real S3 server (moto on
loopback): manifest last, champion by compare-and-swap, "not promoted" with a reason."""

import json
import os
import threading

import pytest

from thinkforge.registry import (CHAMPION, ENTRY_MANIFEST, LocalBackend, Registry, S3Backend, publish,
                                 sha256_file)
from thinkforge.stages.publish import publish as publish_stage
from registry_helpers import make_cfg, results, write_model






@pytest.fixture
def model_dir(tmp_path):
    return write_model(tmp_path / "model")


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path):
    if request.param == "local":
        return LocalBackend(tmp_path / "registry")
    return S3Backend(request.getfixturevalue("object_store"))


def test_gate_promotes_the_first_and_only_winners(backend, model_dir):
    cfg = make_cfg()
    reg = Registry.for_recipe(cfg, backend)
    first = publish(cfg, model_dir, {"base": results(cfg, 0.25, "base"), "final": results(cfg, 0.5)}, backend=backend)
    assert first["promoted"] and first["reason"].startswith("no champion yet")
    champ, _ = reg.champion()
    assert champ["version"] == first["version"] and champ["value"] == 0.5

    m = reg.manifest(first["version"])
    assert m["format"] == "thinkforge-registry/1" and m["config_digest"] == cfg.digest()
    assert m["metrics"]["wp"]["pass@1"] == 0.5 and "per_problem" not in m["metrics"]["wp"]
    assert m["stages"] == {"base": {"wp": 0.25}, "final": {"wp": 0.5}}
    assert m["files"]["model/model.safetensors"]["sha256"] == sha256_file(model_dir / "model.safetensors")
    assert {"eval/results-base.json", "eval/results-final.json", "recipe.yaml", "MODEL_CARD.md"} <= set(m["files"])
    assert m["lineage"]["sources"]["train"] == cfg.data.train and m["lineage"]["config_digest"] == cfg.digest()
    card = backend.get_bytes(f"{reg.entry(first['version'])}/MODEL_CARD.md").decode()
    assert "| wp | 4 | 2 | 50.0% ± 10.0 |" in card and cfg.digest() in card

    same = publish(cfg, model_dir, {"final": results(cfg, 0.5)}, backend=backend)
    assert not same["promoted"] and same["published"]
    assert "does not beat the champion" in same["reason"] and "(+0.0)" in same["reason"]
    assert reg.champion()[0]["version"] == first["version"]

    better = publish(cfg, model_dir, {"final": results(cfg, 0.75)}, backend=backend)
    assert better["promoted"] and "by +25.0 points" in better["reason"]
    champ, _ = reg.champion()
    assert champ["version"] == better["version"] and champ["previous"]["version"] == first["version"]
    assert better["gate"]["bootstrap"]["delta"] == pytest.approx(0.25)
    assert reg.versions() == sorted([first["version"], same["version"], better["version"]])
    for d in (first, same, better):
        assert reg.get_json(reg.key("decisions", f"{d['version']}.json"))["promoted"] == d["promoted"]
    fetched = reg.fetch_model(model_dir.parent / "fetched")
    assert (fetched / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()


def test_margin_protocol_and_force(tmp_path, model_dir):
    backend = LocalBackend(tmp_path / "registry")
    cfg = make_cfg(margin=0.1)
    assert publish(cfg, model_dir, {"final": results(cfg, 0.5)}, backend=backend)["promoted"]
    small = publish(cfg, model_dir, {"final": results(cfg, 0.55)}, backend=backend)
    assert not small["promoted"] and "margin of 10.0 points" in small["reason"]
    other = publish(cfg, model_dir, {"final": results(cfg, 0.9, max_new_tokens=4096)}, backend=backend)
    assert not other["promoted"] and "different protocol (max_new_tokens 256 -> 4096)" in other["reason"]
    none = publish(cfg, model_dir, {"final": {"label": "final", "skipped": True}}, backend=backend)
    assert not none["promoted"] and "no wp pass@1 result" in none["reason"]
    forced = publish(make_cfg(margin=0.1, force=True), model_dir, {"final": results(cfg, 0.4)}, backend=backend)
    assert forced["promoted"] and forced["gate"]["forced"] and "registry.force" in forced["reason"]
    assert Registry.for_recipe(cfg, backend).champion()[0]["version"] == forced["version"]


def test_manifest_is_written_last(backend, model_dir, monkeypatch):
    cfg = make_cfg()
    reg = Registry.for_recipe(cfg, backend)
    real = backend.put_bytes

    def failing(key, data):
        if key.endswith("MODEL_CARD.md"):
            raise OSError("disk full")
        return real(key, data)

    monkeypatch.setattr(backend, "put_bytes", failing)
    with pytest.raises(OSError, match="disk full"):
        publish(cfg, model_dir, {"final": results(cfg, 0.5)}, backend=backend)
    monkeypatch.undo()
    [version] = backend.list_children(reg.key("versions"))
    assert backend.get_bytes(f"{reg.entry(version)}/model/config.json") is not None
    assert backend.get_bytes(f"{reg.entry(version)}/{ENTRY_MANIFEST}") is None
    assert reg.versions() == [] and reg.champion() == (None, None)


def test_champion_compare_and_swap(backend):
    key = "registry/x/" + CHAMPION
    assert backend.read_versioned(key) == (None, None)
    assert backend.put_if(key, b'{"v": 1}', None)
    assert not backend.put_if(key, b'{"v": 9}', None)  # exists already
    data, token = backend.read_versioned(key)
    assert data == b'{"v": 1}'
    assert backend.put_if(key, b'{"v": 2}', token)
    assert not backend.put_if(key, b'{"v": 3}', token)  # stale
    assert backend.read_versioned(key)[0] == b'{"v": 2}'


def test_a_champion_that_moves_mid_gate_is_rechecked(backend, model_dir, monkeypatch):
    """Another run promotes a better model between this run's read and its write: this run's write
    fails the compare-and-swap, the gate runs again against the new champion and says no."""
    cfg = make_cfg()
    reg = Registry.for_recipe(cfg, backend)
    assert publish(cfg, model_dir, {"final": results(cfg, 0.25)}, backend=backend)["promoted"]
    real = backend.put_if
    rival = {}

    def racing_put_if(key, data, token):
        if not rival:
            monkeypatch.setattr(backend, "put_if", real)
            rival.update(publish(cfg, model_dir, {"final": results(cfg, 1.0)}, backend=backend))
            monkeypatch.setattr(backend, "put_if", racing_put_if)
        return real(key, data, token)

    monkeypatch.setattr(backend, "put_if", racing_put_if)
    mine = publish(cfg, model_dir, {"final": results(cfg, 0.5)}, backend=backend)
    assert rival["promoted"] and not mine["promoted"]
    assert rival["version"] in mine["reason"] and reg.champion()[0]["version"] == rival["version"]


def test_concurrent_local_promotions_leave_one_consistent_champion(tmp_path, model_dir):
    backend = LocalBackend(tmp_path / "registry")
    cfg = make_cfg()
    out = []
    threads = [threading.Thread(target=lambda v=v: out.append(publish(cfg, model_dir, {"final": results(cfg, v)},
                                                                      backend=backend)))
               for v in (0.25, 0.5, 0.75, 1.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    champ, _ = Registry.for_recipe(cfg, backend).champion()
    assert champ["value"] == 1.0  # whatever the order, the best one ends up champion
    assert [d["version"] for d in out if d["version"] == champ["version"]] and len(out) == 4


def test_same_layout_in_s3_and_locally(tmp_path, model_dir, object_store):
    cfg = make_cfg()
    local, s3 = LocalBackend(tmp_path / "registry"), S3Backend(object_store)
    a = publish(cfg, model_dir, {"final": results(cfg, 0.5)}, backend=local)
    b = publish(cfg, model_dir, {"final": results(cfg, 0.5)}, backend=s3)
    local_keys = {p.relative_to(local.root).as_posix().replace(a["version"], "V")
                  for p in local.root.rglob("*") if p.is_file() and not p.name.startswith(".")}
    s3_keys = {k.replace(b["version"], "V") for k in object_store.list_keys("registry")}
    assert local_keys == s3_keys
    assert "registry/reg-test/versions/V/manifest.json" in s3_keys and "registry/reg-test/champion.json" in s3_keys
    assert b["where"] == f"s3://{object_store.bucket}/registry/reg-test/versions/{b['version']}"


def test_publish_stage_reads_artifacts_and_can_be_off(tmp_path, model_dir):
    cfg = make_cfg(local_dir=str(tmp_path / "reg"))
    final = tmp_path / "final.json"
    final.write_text(json.dumps(results(cfg, 0.5)))
    skipped = tmp_path / "sft.json"
    skipped.write_text(json.dumps({"label": "sft", "skipped": True}))
    summary = tmp_path / "summary.json"
    summary.write_text('{"kept": 3}')
    out = publish_stage(cfg, model_dir, {"final": final, "sft": skipped},
                        {"filter_summary": (str(summary), "minio://mlpipeline/x/summary")}, kfp_run="run-123")
    assert out["promoted"] and out["where"].startswith(str(tmp_path / "reg"))
    m = Registry.for_recipe(cfg, LocalBackend(tmp_path / "reg")).manifest(out["version"])
    assert m["lineage"]["kfp_run"] == "run-123" and set(m["stages"]) == {"final"}
    assert m["lineage"]["artifacts"]["filter_summary"] == {"uri": "minio://mlpipeline/x/summary",
                                                           "sha256": sha256_file(summary), "size": 11}
    off = publish_stage(make_cfg(enabled=False), model_dir, {"final": final})
    assert off == {"published": False, "promoted": False, "reason": "registry off (registry.enabled=false)"}


# ------------------------------------------------------------------------------------------ retries


class Died(RuntimeError):
    """The publish task's pod went away here."""


def dies_at(monkeypatch, backend, fragment):
    """The next write of a key containing ``fragment`` kills the attempt (after nothing of it was written)."""
    real = backend.put_bytes

    def put(key, data, *a, **kw):
        if fragment in key:
            raise Died(f"killed before writing {key}")
        return real(key, data, *a, **kw)

    monkeypatch.setattr(backend, "put_bytes", put)


def test_a_retried_publish_whose_first_attempt_moved_the_champion_finishes_that_version(backend, model_dir,
                                                                                        monkeypatch):
    """Attempt 1 of run-abc publishes, wins the gate, moves champion.json, and dies before recording its
    decision. The retry (same KFP run, same model) finds that version and reports it promoted, instead
    of publishing a twin that "does not beat the champion"."""
    cfg = make_cfg()
    reg = Registry.for_recipe(cfg, backend)
    old = publish(cfg, model_dir, {"final": results(cfg, 0.25)}, kfp_run="run-000", backend=backend)
    dies_at(monkeypatch, backend, "/decisions/")
    with pytest.raises(Died):
        publish(cfg, model_dir, {"final": results(cfg, 0.75)}, kfp_run="run-abc", backend=backend)
    monkeypatch.undo()
    [first] = [v for v in reg.versions() if v != old["version"]]
    assert reg.champion()[0]["version"] == first  # the pointer moved before the attempt died

    retry = publish(cfg, model_dir, {"final": results(cfg, 0.75)}, kfp_run="run-abc", backend=backend)
    assert retry["version"] == first and retry["promoted"], retry["reason"]
    assert retry["reason"].startswith("wp pass@1 75.0% beats the champion") and "earlier attempt" in retry["reason"]
    assert retry["gate"]["champion_version"] == old["version"]
    assert reg.versions() == sorted([old["version"], first]) and reg.champion()[0]["version"] == first
    assert reg.get_json(reg.key("decisions", f"{first}.json"))["promoted"] is True
    assert "| wp | 4 | 2 | 75.0% ± 10.0 |" in retry["card"]

    again = publish(cfg, model_dir, {"final": results(cfg, 0.75)}, kfp_run="run-abc", backend=backend)
    assert {k: again[k] for k in ("version", "promoted", "reason")} == \
        {k: retry[k] for k in ("version", "promoted", "reason")}  # the recorded decision, as it is
    assert reg.versions() == sorted([old["version"], first])


def test_a_retried_publish_after_a_kill_mid_upload_completes_the_same_entry(backend, model_dir, monkeypatch):
    """Attempt 1 dies between the weights and the manifest: the retry finishes that entry (one version,
    complete, promoted), it does not leave a dead half entry beside a new one."""
    cfg = make_cfg()
    reg = Registry.for_recipe(cfg, backend)
    dies_at(monkeypatch, backend, "MODEL_CARD.md")
    with pytest.raises(Died):
        publish(cfg, model_dir, {"final": results(cfg, 0.5)}, kfp_run="run-xyz", backend=backend)
    monkeypatch.undo()
    [started] = backend.list_children(reg.key("versions"))
    assert reg.versions() == []

    uploads = []
    real_upload = backend.upload_dir
    monkeypatch.setattr(backend, "upload_dir", lambda local, key: uploads.append(key) or real_upload(local, key))
    retry = publish(cfg, model_dir, {"final": results(cfg, 0.5)}, kfp_run="run-xyz", backend=backend)
    assert retry["version"] == started and retry["promoted"]
    assert uploads == []  # the weights the first attempt uploaded (complete, same digest) are kept
    assert backend.list_children(reg.key("versions")) == [started] and reg.versions() == [started]
    assert reg.manifest(started)["run"]["kfp_run"] == "run-xyz"
    assert reg.champion()[0]["version"] == started


def test_the_version_is_derived_from_the_kfp_run_and_the_model(tmp_path, model_dir):
    """Another KFP run, or another model in the same run, is another version; no run id (a local run
    outside KFP) is a new version every time."""
    backend = LocalBackend(tmp_path / "registry")
    cfg = make_cfg()
    a = publish(cfg, model_dir, {"final": results(cfg, 0.5)}, kfp_run="run-1", backend=backend)
    b = publish(cfg, model_dir, {"final": results(cfg, 0.5)}, kfp_run="run-2", backend=backend)
    (model_dir / "model.safetensors").write_bytes(os.urandom(4096))
    c = publish(cfg, model_dir, {"final": results(cfg, 0.5)}, kfp_run="run-1", backend=backend)
    d, e = (publish(cfg, model_dir, {"final": results(cfg, 0.5)}, backend=backend) for _ in range(2))
    assert len({x["version"] for x in (a, b, c, d, e)}) == 5
    assert a["promoted"] and not b["promoted"] and "does not beat the champion" in b["reason"]


def test_symlinks_in_a_published_model_are_refused(backend, model_dir, tmp_path):
    """A link in the model directory (to a mounted Secret, say) is refused, not followed: nothing of
    its target reaches the registry and no version is complete."""
    secret = tmp_path / "token"
    secret.write_text("hf_SECRET_TOKEN_VALUE")
    (model_dir / "tokenizer.json").symlink_to(secret)
    cfg = make_cfg()
    with pytest.raises(ValueError, match=r"tokenizer\.json is a symbolic link"):
        publish(cfg, model_dir, {"final": results(cfg, 0.5)}, kfp_run="run-1", backend=backend)
    reg = Registry.for_recipe(cfg, backend)
    assert reg.versions() == [] and reg.champion() == (None, None)
    for v in backend.list_children(reg.key("versions")):
        assert backend.get_bytes(f"{reg.entry(v)}/model/tokenizer.json") is None
