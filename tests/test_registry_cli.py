"""`thinkforge registry list|show|fetch|promote|rollback`, in a local directory and on a real S3 server
(moto on loopback, authentication on): manual moves of the champion by compare-and-swap, a champion
history for rollback, a decision record per move, clean refusals and exit codes."""

import json
import threading

import pytest

from thinkforge.cli import main as cli
from thinkforge.registry import (CHAMPION, ChampionMoved, LocalBackend, Registry, RegistryError, S3Backend,
                                 open_registry, promote_version, publish, rollback)
from registry_helpers import make_cfg, results, write_model






@pytest.fixture
def model_dir(tmp_path):
    return write_model(tmp_path / "model", bytes(range(256)) * 16)


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path, monkeypatch):
    """(backend, --registry value) of the model line `reg-test` under prefix `registry`."""
    if request.param == "local":
        return LocalBackend(tmp_path / "reg"), str(tmp_path / "reg" / "registry" / "reg-test")
    s3 = request.getfixturevalue("s3_server")
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    store = request.getfixturevalue("object_store")
    return S3Backend(store), f"s3://{store.bucket}/registry/reg-test"


def run(capsys, *argv):
    rc = cli(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_list_show_fetch_promote_rollback(where, model_dir, tmp_path, capsys):
    backend, uri = where
    cfg = make_cfg()
    v1 = publish(cfg, model_dir, {"final": results(cfg, 0.5)}, backend=backend)["version"]
    v2 = publish(cfg, model_dir, {"final": results(cfg, 0.75)}, backend=backend)["version"]
    v3 = publish(cfg, model_dir, {"final": results(cfg, 0.25)}, backend=backend)["version"]  # not promoted
    reg = open_registry(uri)
    assert reg.champion()[0]["version"] == v2 and reg.root.endswith("reg-test")

    rc, out, _ = run(capsys, "registry", "list", "--registry", uri, "--json")
    rows = {r["version"]: r for r in json.loads(out)["versions"]}
    assert rc == 0 and sorted(rows) == sorted([v1, v2, v3])  # by name: time, then id
    assert [rows[v]["champion"] for v in (v1, v2, v3)] == [False, True, False]
    assert rows[v1]["metrics"]["wp"] == {"pass@1": 0.5, "pass@1_se": 0.1, "cons@2": 0.5} and rows[v2]["gate"]["value"] == 0.75
    rc, out, _ = run(capsys, "registry", "list", "--registry", uri)
    assert rc == 0 and f"* {v2}  wp pass@1 75.0" in out and "<- champion" in out

    rc, out, _ = run(capsys, "registry", "show", v1, "--registry", uri)
    assert rc == 0 and f"# reg-test {v1}" in out and '"pass@1": 0.5' in out
    rc, out, _ = run(capsys, "registry", "show", "champion", "--registry", uri, "--json")
    assert rc == 0 and json.loads(out)["version"] == v2 and json.loads(out)["champion"]

    dest = tmp_path / "fetched"
    rc, out, _ = run(capsys, "registry", "fetch", v1, "--to", str(dest), "--registry", uri)
    assert rc == 0 and (dest / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()

    rc, out, _ = run(capsys, "registry", "promote", v1, "--registry", uri, "--reason", "v2 regressed", "--by", "alice")
    assert rc == 0 and f"champion {v2} -> {v1}" in out
    champ = reg.champion()[0]
    assert champ["version"] == v1 and champ["manual"] == "promote" and champ["by"] == "alice"
    assert [h["version"] for h in champ["history"]] == [v2, v1]  # v2 replaced v1 at its publish
    assert "alice" in champ["reason"] and "v2 regressed" in champ["reason"]
    records = [reg.get_json(reg.key("decisions", d)) for d in _decision_files(reg)]
    assert [(r["action"], r["version"], r["previous"], r["by"], r["note"]) for r in records] == \
        [("promote", v1, v2, "alice", "v2 regressed")]

    rc, out, _ = run(capsys, "registry", "promote", v1, "--registry", uri, "--reason", "again")
    assert rc == 0 and "already the champion" in out

    rc, out, _ = run(capsys, "registry", "rollback", "--registry", uri, "--reason", "false alarm")
    assert rc == 0 and f"champion {v1} -> {v2}" in out
    assert reg.champion()[0]["version"] == v2
    rc, out, _ = run(capsys, "registry", "rollback", "--registry", uri)
    assert rc == 0 and reg.champion()[0]["version"] == v1  # the champion before v2
    rc, _, err = run(capsys, "registry", "rollback", "--registry", uri)
    assert rc == 2 and "no previous champion" in err and reg.champion()[0]["version"] == v1
    assert len(_decision_files(reg)) == 3


def _decision_files(reg):
    """The manual decision records (publish's own are decisions/<version>.json)."""
    b = reg.backend
    if isinstance(b, LocalBackend):
        names = sorted(p.name for p in (b.root / reg.key("decisions")).iterdir())
    else:
        names = sorted(k.rsplit("/", 1)[-1] for k in b.store.list_keys(reg.key("decisions")))
    return [n for n in names if n.startswith("manual-")]


def test_refusals_and_exit_codes(where, model_dir, tmp_path, capsys):
    backend, uri = where
    cfg = make_cfg()
    rc, _, err = run(capsys, "registry", "rollback", "--registry", uri)
    assert rc == 2 and "no champion, nothing to roll back" in err
    v1 = publish(cfg, model_dir, {"final": results(cfg, 0.5)}, backend=backend)["version"]
    rc, _, err = run(capsys, "registry", "rollback", "--registry", uri)
    assert rc == 2 and f"the champion {v1} has no previous champion" in err

    reg = Registry.for_recipe(cfg, backend)
    half = "20990101T000000Z-deadbeef-abcdef"
    backend.put_bytes(f"{reg.entry(half)}/model/config.json", b"{}")  # a publish that died before its manifest
    rc, _, err = run(capsys, "registry", "promote", half, "--registry", uri, "--reason", "r")
    assert rc == 2 and "incomplete version" in err
    rc, _, err = run(capsys, "registry", "promote", "nope", "--registry", uri, "--reason", "r")
    assert rc == 2 and "no version 'nope'" in err
    rc, _, err = run(capsys, "registry", "fetch", half, "--to", str(tmp_path / "x"), "--registry", uri)
    assert rc == 2 and "incomplete version" in err and not (tmp_path / "x").exists()
    rc, _, err = run(capsys, "registry", "show", "nope", "--registry", uri)
    assert rc == 2 and "no version 'nope'" in err
    assert reg.champion()[0]["version"] == v1 and _decision_files(reg) == []


def test_concurrent_promotes_one_wins_the_other_changes_nothing(where, model_dir):
    backend, uri = where
    cfg = make_cfg()
    v1, v2, v3 = (publish(cfg, model_dir, {"final": results(cfg, x)}, backend=backend)["version"]
                  for x in (0.75, 0.5, 0.25))  # v1 stays champion
    regs = [open_registry(uri), open_registry(uri)]
    barrier = threading.Barrier(2, timeout=30)
    for r in regs:  # both read the pointer before either writes it
        real = r.backend.read_versioned

        def read(key, real=real, first=[True]):
            got = real(key)
            if key.endswith(CHAMPION) and first[0]:  # the promote's own read, not put_if's re-check
                first[0] = False
                barrier.wait()
            return got

        r.backend.read_versioned = read
    outcome = {}

    def go(i, version):
        try:
            outcome[version] = promote_version(regs[i], version, "race", "t%d" % i)
        except ChampionMoved as e:
            outcome[version] = e

    threads = [threading.Thread(target=go, args=(i, v)) for i, v in enumerate((v2, v3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    won = [v for v, o in outcome.items() if isinstance(o, dict)]
    lost = [o for o in outcome.values() if isinstance(o, ChampionMoved)]
    assert len(won) == 1 and len(lost) == 1, outcome
    assert "nothing was changed" in str(lost[0]) and f"it was {v1}" in str(lost[0])
    reg = open_registry(uri)
    assert reg.champion()[0]["version"] == won[0]
    assert [reg.get_json(reg.key("decisions", d))["version"] for d in _decision_files(reg)] == won


def test_cli_exit_code_when_the_pointer_moves_and_recipe_route(tmp_path, model_dir, capsys, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run:\n  name: reg-test\nregistry:\n  local_dir: {tmp_path / 'reg'}\n"
                      "evaluate:\n  benchmarks:\n    - name: wp\n      source: builtin:word-problems?split=test\n"
                      "      limit: 4\n  k: 2\n")
    monkeypatch.delenv("THINKFORGE_S3_ENDPOINT", raising=False)
    backend = LocalBackend(tmp_path / "reg")
    cfg = make_cfg()
    v1 = publish(cfg, model_dir, {"final": results(cfg, 0.75)}, backend=backend)["version"]
    v2 = publish(cfg, model_dir, {"final": results(cfg, 0.5)}, backend=backend)["version"]
    rc, out, _ = run(capsys, "registry", "list", "--recipe", str(recipe))
    assert rc == 0 and f"* {v1}" in out and f"  {v2}" in out
    monkeypatch.setattr(LocalBackend, "put_if", lambda self, key, data, token: False)
    rc, _, err = run(capsys, "registry", "promote", v2, "--recipe", str(recipe), "--reason", "r")
    assert rc == 3 and "the champion moved" in err
    monkeypatch.undo()
    assert Registry.for_recipe(cfg, backend).champion()[0]["version"] == v1
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(open_registry(str(tmp_path / "reg" / "registry" / "reg-test")))
