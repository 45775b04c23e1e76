"""Security: nothing leaks, no code runs from models or artifacts.

- the smoke pipeline, run with distinctive dummy secrets in the environment (using the S3 ones for
  real against the loopback S3 server, and the teacher key for real against a llama.cpp server that
  requires it), leaves none of them in its logs, KFP metadata, metrics (KFP and a real Pushgateway),
  artifacts, object storage or the compiled pipeline; a positive control shows the search finds a key
  that is logged;
- ``trust_remote_code`` is off unless the recipe turns it on: custom code in a model directory is not
  executed (and a positive control shows the test would see it run);
- models load from safetensors only; a directory holding only ``pytorch_model.bin`` is refused
  before any byte of the pickle is read;
- no pickle is unpickled from artifacts: the source tree has no pickle loaders, the Trainer's resume
  loads checkpoint state with ``weights_only=True``, and a tampered checkpoint carrying a pickle
  payload is refused without running it.

Covered elsewhere and not repeated (see the README table): containers non-root with read-only root
filesystems and dropped capabilities, RBAC least privilege, egress NetworkPolicy, no secret values
outside Secrets (tests/test_helm.py); object keys sanitized so ``../`` in run names cannot escape
(tests/test_storage.py::test_safe_key_cannot_escape, ::test_evil_run_name_stays_under_its_prefix);
the teacher API key read from env or a mounted file and never logged
(tests/test_openai_engine.py::test_api_key_from_env_and_file_is_sent_and_never_leaks).
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from reliability_helpers import ROOT, recipe_with

from thinkforge.models import ModelError, load_model


# --------------------------------------------------------------------------------- secrets leak-free


def dummy_secrets() -> dict[str, str]:
    tag = uuid.uuid4().hex[:12]
    return {
        "THINKFORGE_S3_ACCESS_KEY": f"tfAK{tag}access",
        "THINKFORGE_S3_SECRET_KEY": f"tfSK{tag}secret/Value+x",
        "THINKFORGE_TEACHER_API_KEY": f"sk-tfTK{tag}teacher",
        "HF_TOKEN": f"hf_tfHF{tag}token",
        "AWS_SECRET_ACCESS_KEY": f"tfAWS{tag}awssecret",
    }


def find_secrets(blobs: dict[str, bytes], secrets: dict[str, str]) -> list[str]:
    """``where: NAME`` for every secret value found in any blob (raw, JSON-escaped, or with ``/`` escaped
    as ``\\/`` the way some JSON writers do), each secret once per blob."""
    found = []
    for where, data in blobs.items():
        for name, value in secrets.items():
            forms = {value, json.dumps(value)[1:-1], json.dumps(value)[1:-1].replace("/", "\\/")}
            if any(form.encode() in data for form in forms):
                found.append(f"{where}: {name}")
    return found


def test_find_secrets_finds_a_logged_teacher_key():
    """Positive control of the search above: a teacher key that is logged (raw, in a JSON record, as an
    Authorization header) is found, under the blob and the secret's name; other values are not."""
    secrets = dummy_secrets()
    key = secrets["THINKFORGE_TEACHER_API_KEY"]
    blobs = {
        "task log": f"INFO generate: POST http://127.0.0.1:8080/v1/chat/completions Authorization: Bearer {key}\n".encode(),
        "executor_output.json": json.dumps({"headers": {"Authorization": f"Bearer {key}"}}).encode(),
        "clean": b"Authorization: Bearer <redacted>",
    }
    assert find_secrets(blobs, secrets) == ["task log: THINKFORGE_TEACHER_API_KEY",
                                            "executor_output.json: THINKFORGE_TEACHER_API_KEY"]
    # a value JSON escapes differently (the S3 secret has a '/') is found in its escaped form too
    escaped = json.dumps({"s": secrets["THINKFORGE_S3_SECRET_KEY"]}, ensure_ascii=True).replace("/", "\\/")
    assert find_secrets({"m": escaped.encode()}, secrets) == ["m: THINKFORGE_S3_SECRET_KEY"]


@pytest.mark.slow
@pytest.mark.e2e
def test_smoke_pipeline_with_dummy_secrets_leaks_none(s3_server, pushgateway, llama_server_factory, tmp_path):
    """`thinkforge run --recipe recipes/smoke.yaml` with the five secrets set, and not one secret value
    appears in stdout/stderr, any file under the pipeline root (task logs, executor_output.json metadata,
    metrics, every artifact), any object written to the bucket, the Pushgateway's metrics, or the
    compiled pipeline.

    What each secret does in the run:

    - the S3 keys are used for real: checkpoints and the registry go to the loopback S3 server, which
      checks signatures (a run that did not sign with them fails);
    - the teacher key is used for real: generate runs ``generate.engine=openai`` against a llama.cpp
      server started with ``--api_key`` <the dummy key>, on loopback (the compiled allowlist
      THINKFORGE_TEACHER_HOSTS holds the recipe's own endpoint, so the engine sends the key). The server
      answers 401 to a request without it, so the run succeeding, with the server's log showing
      completions answered 200 and no 401, and the rollouts naming the server's model, proves the key
      went out on every request;
    - HF_TOKEN is read the way production reads it, and no further: no thinkforge code reads it (src/
      only names it: ``cluster.hf_secret`` becomes a ``secretKeyRef`` env var on the pods,
      pipelines/placement.py, trainjob.py); huggingface_hub/datasets take it from the environment when
      they call the hub. Here every task gets it in its environment exactly as the teacher key (which
      the 401s prove arrives), and the compile step sets ``cluster.hf_secret`` so the compiled pipeline
      wires HF_TOKEN by reference (asserted). NOT exercised: the token is never sent nor put in a
      request, since the run is offline (HF_HUB_OFFLINE=1, a random local model, builtin data; there is
      no hub to reach), so a leak through a hub request or a hub error message would go unseen here;
    - AWS_SECRET_ACCESS_KEY is only present (thinkforge reads THINKFORGE_S3_*): nothing may copy it out."""
    secrets = dummy_secrets()
    # the S3 server checks signatures: the dummy keys must really sign (the run has to use them)
    s3_server.add_key(secrets["THINKFORGE_S3_ACCESS_KEY"], secrets["THINKFORGE_S3_SECRET_KEY"])
    teacher = llama_server_factory(api_key=secrets["THINKFORGE_TEACHER_API_KEY"])
    for headers in ({}, {"Authorization": "Bearer sk-not-the-key"}):  # the server really demands the key
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(f"{teacher.url}/models", headers=headers), timeout=10)
        assert refused.value.code == 401
    store = s3_server.store()
    run_id = f"secret-smoke-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **secrets, "PYTHONUNBUFFERED": "1",
           "THINKFORGE_S3_ENDPOINT": s3_server.endpoint, "THINKFORGE_S3_SECURE": "false"}
    root = tmp_path / "root"
    sets = [f"run.name={run_id}", f"storage.bucket={store.bucket}", "storage.secure=false",
            "midtrain.save_steps=2", "sft.save_steps=2", f"metrics.push_url={pushgateway.url}",
            "evaluate.per_stage=false", "evaluate.evaluate_base=false",
            "generate.engine=openai", f"generate.endpoint={teacher.url}", f"generate.endpoint_model={teacher.model}",
            "generate.concurrency=2", "generate.request_timeout_s=120"]
    args = [sys.executable, "-m", "thinkforge.cli", "run", "--recipe", str(ROOT / "recipes" / "smoke.yaml"),
            "--pipeline-root", str(root)] + [a for s in sets for a in ("--set", s)]
    try:
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, timeout=900)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out.decode(errors="replace")[-4000:]

        blobs: dict[str, bytes] = {"stdout": proc.stdout, "stderr": proc.stderr}
        files = [p for p in root.rglob("*") if p.is_file()]
        blobs.update({str(p.relative_to(root)): p.read_bytes() for p in files})
        keys = store.list_keys("")
        blobs.update({f"s3://{store.bucket}/{k}": store.get_bytes(k) for k in keys})
        metrics_text = pushgateway.text()
        blobs["pushgateway /metrics"] = metrics_text.encode()
        compiled = tmp_path / "pipeline.yaml"
        # the run's teacher settings, and the secrets as production wires them (Secret references)
        comp_sets = sets[-5:] + ["cluster.teacher_secret=tf-teacher", "cluster.hf_secret=tf-hf"]
        comp = subprocess.run([sys.executable, "-m", "thinkforge.cli", "compile", "--recipe",
                               str(ROOT / "recipes" / "smoke.yaml"), "--out", str(compiled)]
                              + [a for s in comp_sets for a in ("--set", s)],
                              cwd=tmp_path, env=env, capture_output=True, timeout=300)
        assert comp.returncode == 0, comp.stderr.decode(errors="replace")[-2000:]
        blobs.update({"compile stdout": comp.stdout + comp.stderr, "pipeline.yaml": compiled.read_bytes()})
        for ref in (b"HF_TOKEN", b"tf-hf", b"THINKFORGE_TEACHER_API_KEY", b"tf-teacher"):
            assert ref in blobs["pipeline.yaml"], ref  # by reference, never by value (the grep below)

        # The teacher key was really used: every completion request carried it (the server refuses others).
        teacher.check_alive()
        server_log = teacher.log()
        assert server_log.count('"POST /v1/chat/completions HTTP/1.1" 200') >= 16, server_log[-2000:]
        assert not re.search(r'"POST [^"]*" 40[13]', server_log), server_log[-2000:]  # (only the probes above got 401)
        assert any(re.search(rb'"teacher":\s*"smollm2"', data) for data in blobs.values()), "no teacher rollouts"

        # The search covered what it claims to: metadata, task output, checkpoints, registry, metrics.
        assert sum(p.name == "executor_output.json" for p in files) >= 10
        assert any("/checkpoints/" in k and k.endswith("_MANIFEST.json") for k in keys), keys[:20]
        assert any(k.startswith("registry/") for k in keys), keys[:20]
        assert f'run_id="{run_id}' in metrics_text  # the name, then the KFP run id when there is one
        assert find_secrets(blobs, secrets) == []
    finally:
        s3_server.drop_bucket(store.bucket)


# ------------------------------------------------------------------------------------ remote code

REMOTE_CODE_CHILD = r'''
import json, sys
from pathlib import Path
from thinkforge.models import ModelError, load_model, load_tokenizer

model_dir, marker = Path(sys.argv[1]), Path(sys.argv[2])
out = {}
m = load_model(model_dir)                       # the default: what every stage gets from a default recipe
load_tokenizer(model_dir)
out["default_class"] = type(m).__name__
out["default_ran_code"] = marker.exists()
cfg = json.loads((model_dir / "config.json").read_text())
cfg["model_type"] = "evil"                      # no built-in class: only the custom code could load it
(model_dir / "config.json").write_text(json.dumps(cfg))
try:
    load_model(model_dir)
    out["unknown_refused"] = ""
except ModelError as e:
    out["unknown_refused"] = str(e)
out["unknown_ran_code"] = marker.exists()
m = load_model(model_dir, trust_remote_code=True)   # positive control: the recipe opted in
out["trusted_class"] = type(m).__name__
out["trusted_ran_code"] = marker.exists()
print("RESULT " + json.dumps(out))
'''

EVIL_CODE = '''
from pathlib import Path
Path({marker!r}).write_text("custom code ran")
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "evil"


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
'''


def copy_model(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_remote_code_in_a_model_dir_runs_only_when_the_recipe_says_so(tiny, tmp_path):
    """A model directory whose config maps AutoConfig/AutoModel to custom modules that would write a
    marker file: by default the built-in class loads and the marker never appears; with no built-in
    class the load is refused naming the recipe field; only trust_remote_code=True runs it."""
    model = copy_model(tiny.model, tmp_path / "model")
    marker = tmp_path / "MARKER"
    for name in ("modeling_evil.py", "configuration_evil.py"):
        (model / name).write_text(EVIL_CODE.format(marker=str(marker)))
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                       "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(cfg))
    script = tmp_path / "child.py"
    script.write_text(REMOTE_CODE_CHILD)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, str(script), str(model), str(marker)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert res["default_class"] == "LlamaForCausalLM" and res["default_ran_code"] is False
    assert "model.trust_remote_code: true" in res["unknown_refused"] and res["unknown_ran_code"] is False
    assert res["trusted_class"] == "EvilForCausalLM" and res["trusted_ran_code"] is True


def test_trust_remote_code_is_off_in_every_recipe_and_never_hard_coded():
    from thinkforge.config import Recipe, load_recipe

    assert Recipe().model.trust_remote_code is False
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        assert load_recipe(path).model.trust_remote_code is False, path
    # Every from_pretrained call lives in thinkforge.models, and none passes a literal True.
    calls = []
    for path in source_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                if name == "from_pretrained":
                    calls.append(f"{path.relative_to(ROOT)}:{node.lineno}")
                for kw in node.keywords:
                    if kw.arg == "trust_remote_code":
                        assert not (isinstance(kw.value, ast.Constant) and kw.value.value is True), \
                            f"{path.relative_to(ROOT)}:{node.lineno}: trust_remote_code=True"
    assert calls and all(c.startswith("src/thinkforge/models.py:") for c in calls), calls


# ----------------------------------------------------------------------------- safetensors / pickle


class Payload:
    """Unpickling this runs ``Path(marker).write_text(...)``: a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pickle payload ran"))


def pickle_bomb(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"state": Payload(marker)}))


def test_model_dir_with_only_pytorch_model_bin_is_refused(tiny, tmp_path):
    model = copy_model(tiny.model, tmp_path / "model")
    (model / "model.safetensors").unlink()
    marker = tmp_path / "MARKER"
    pickle_bomb(model / "pytorch_model.bin", marker)
    with pytest.raises(ModelError) as err:
        load_model(model)
    msg = str(err.value)
    assert msg.startswith(f"{model}: only pickle-based weights (pytorch_model.bin); thinkforge loads safetensors "
                          "only"), msg
    assert "save_pretrained(out, safe_serialization=True)" in msg
    assert not marker.exists()
    (model / "pytorch_model.bin").unlink()
    with pytest.raises(ModelError, match="no model weights"):
        load_model(model)


def test_safetensors_win_over_a_pickle_beside_them(tiny, tmp_path):
    model = copy_model(tiny.model, tmp_path / "model")
    marker = tmp_path / "MARKER"
    pickle_bomb(model / "pytorch_model.bin", marker)
    assert type(load_model(model)).__name__ == "LlamaForCausalLM"
    assert not marker.exists()


PICKLE_LOADERS = [
    # torch.load is allowed only with weights_only=True (torch's restricted unpickler, what the Trainer uses)
    r"\btorch\.load\s*\((?![^)]*weights_only=True)", r"\bpickle\.loads?\s*\(", r"\bweights_only\s*=\s*False", r"\ballow_pickle\s*=\s*True",
    r"\b(?:joblib|dill|cloudpickle|cPickle|_pickle)\.loads?\s*\(", r"\bread_pickle\s*\(", r"\bUnpickler\s*\(",
    r"\bshelve\.open\s*\(", r"\bmarshal\.loads?\s*\(", r"\btorch\.jit\.load\s*\(",
]
# Documented exceptions: none. A pickle loader added here needs a reason next to it.
ALLOWED: dict[str, str] = {}


def source_files() -> list[Path]:
    dirs = [ROOT / "src", ROOT / "components", ROOT / "pipelines", ROOT / "scripts", ROOT / "docker"]
    return sorted(p for d in dirs if d.exists() for p in d.rglob("*.py"))


def test_no_pickle_loader_in_the_source_tree():
    hits = []
    for path in source_files():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            for pattern in PICKLE_LOADERS:
                if re.search(pattern, line):
                    where = f"{path.relative_to(ROOT)}:{i}"
                    if where not in ALLOWED:
                        hits.append(f"{where}: {line.strip()}")
    assert len(source_files()) > 20
    assert hits == []


def test_checkpoint_state_is_loaded_weights_only_and_a_pickle_payload_is_refused(
        tiny, s3_credentials, bucket, monkeypatch, tmp_path):
    """The real SFT stage resumes from a checkpoint in object storage: every torch.load the Trainer does
    on it (optimizer, scheduler, RNG state) is weights_only=True. An attacker who can write the bucket
    swaps optimizer.pt for a pickle payload and rewrites the manifest: the resume is refused and the
    payload never runs."""
    import torch

    from thinkforge.stages.sft import sft

    monkeypatch.setenv("THINKFORGE_CHECKPOINT_PREFIX", "runs/pickle-test/sft/checkpoints/pinned")
    base = recipe_with(tiny.recipe, {"storage.endpoint": s3_credentials.endpoint, "storage.bucket": bucket.bucket,
                                     "sft.max_steps": 2})
    sft(base, tiny.model, tiny.data, tmp_path / "run1")

    loads = []
    real_load = torch.load

    def spy(f, *a, **kw):
        loads.append((Path(str(f)).name, kw.get("weights_only")))
        return real_load(f, *a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    result = sft(recipe_with(base, {"sft.max_steps": 4}), tiny.model, tiny.data, tmp_path / "run2")
    assert result.extra["resumed_from"] == 2
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= {name for name, _ in loads}, loads
    assert all(wo is True for _, wo in loads), loads
    monkeypatch.setattr(torch, "load", real_load)

    prefix = "runs/pickle-test/sft/checkpoints/pinned/checkpoint-4"
    local = bucket.download_dir(prefix, tmp_path / "ck4")
    marker = tmp_path / "MARKER"
    pickle_bomb(local / "optimizer.pt", marker)
    bucket.upload_dir(local, prefix)  # a consistent manifest: checksums cannot catch this
    # the restore check loads it weights-only: refused, passed over for the previous complete checkpoint
    result = sft(recipe_with(base, {"sft.max_steps": 6}), tiny.model, tiny.data, tmp_path / "run3")
    (skipped,) = result.extra["unusable_checkpoints"]
    assert skipped["uri"].endswith("checkpoint-4") and "Weights only load failed" in skipped["reason"]
    assert not marker.exists()
