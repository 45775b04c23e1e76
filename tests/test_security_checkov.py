"""A standard scanner on the chart: checkov's Kubernetes checks (checkov 3.3.30, `--framework kubernetes`).

Two renders are scanned: the chart's defaults, and a hardened install (the images pinned by digest, the
egress NetworkPolicy on). Every finding must be fixed or be in SKIPS below with the reason it is taken
as it is; a skip that no longer fails is an error too, so the list cannot go stale. A positive control
(a privileged container added to the default render) shows the scanner runs its checks.

checkov pins older boto3/botocore/packaging/networkx than the test venv has, so it lives in its own
venv: `make test` installs it at .venv-checkov (the test also takes $THINKFORGE_CHECKOV or a `checkov`
on PATH). It runs offline (`--skip-download`: no guideline or policy download).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (the Helm v4 library) is not installed")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "thinkforge"
NAMESPACE, RELEASE = "ml-team", "tf"
CHECKOV_VERSION = "3.3.30"
DIGEST = "sha256:" + "0123456789abcdef" * 4
MINIO = f"StatefulSet/{RELEASE}-thinkforge-minio"
UPLOAD = f"Job/{RELEASE}-thinkforge-upload"

RENDERS = {
    "default": {},
    "hardened": {"image": {"digest": DIGEST}, "minio": {"image": {"digest": DIGEST}},
                 "networkPolicy": {"enabled": True, "kubeAPIServerCIDRs": ["10.0.0.1/32"]}},
}

# (render, check, object) -> why the finding stays. Everything else checkov reports fails the test.
SKIPS: dict[tuple[str, str, str], str] = {
    # CKV_K8S_43 "Image should use digest" and CKV_K8S_15 "Image Pull Policy should be Always": the chart
    # cannot know the digest of your build (nor will it invent one for MinIO's), so the defaults name tags.
    # image.digest / minio.image.digest render <repo>@<digest>, and then IfNotPresent pulls exactly that
    # image: the hardened render passes both checks; pipeline.requireImageDigest makes the digest mandatory.
    ("default", "CKV_K8S_43", MINIO): "tag by default; minio.image.digest pins it (hardened render passes)",
    ("default", "CKV_K8S_43", UPLOAD): "tag by default; image.digest pins it (hardened render passes)",
    ("default", "CKV_K8S_15", MINIO): "IfNotPresent is right once pinned by digest (hardened render passes)",
    ("default", "CKV_K8S_15", UPLOAD): "IfNotPresent is right once pinned by digest (hardened render passes)",
    # CKV2_K8S_6 "pods without a NetworkPolicy": the egress policy needs the API server's addresses, which
    # `helm template` cannot look up, so it is opt-in (networkPolicy.enabled); the hardened render has it.
    ("default", "CKV2_K8S_6", "Pod/" + MINIO.split("/")[1]): "NetworkPolicy is opt-in (hardened render passes)",
    ("default", "CKV2_K8S_6", "Pod/" + UPLOAD.split("/")[1]): "NetworkPolicy is opt-in (hardened render passes)",
    # CKV_K8S_35 "secrets as files, not env": the Job's ensure-bucket init container gets the S3 keys as
    # env from secretKeyRef (never a literal; no other container of the Job has them), because the storage
    # client reads THINKFORGE_S3_ACCESS_KEY/SECRET_KEY from env, as in every KFP task pod (kfp-kubernetes
    # secret-as-env). MinIO itself now reads its root credentials from the mounted Secret.
    ("default", "CKV_K8S_35", UPLOAD): "the storage client reads the S3 keys from env (secretKeyRef)",
    ("hardened", "CKV_K8S_35", UPLOAD): "the storage client reads the S3 keys from env (secretKeyRef)",
}
# Taken, no longer reported: CKV_K8S_11 "CPU limits" (minio.resources.limits.cpu 2, upload 1), CKV_K8S_35 on
# MinIO (MINIO_ROOT_USER_FILE/MINIO_ROOT_PASSWORD_FILE from a secret volume), and, pinned, CKV_K8S_43/15.


def checkov() -> str:
    for candidate in (os.environ.get("THINKFORGE_CHECKOV"), str(ROOT / ".venv-checkov" / "bin" / "checkov"),
                      shutil.which("checkov")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("checkov is not installed (make test installs checkov==3.3.30 into .venv-checkov)")


def render(values: dict) -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [d for path, text in sorted(out.items()) if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]


def scan(exe: str, docs: list[dict], tmp: Path) -> dict:
    f = tmp / "render.yaml"
    f.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    res = subprocess.run([exe, "--framework", "kubernetes", "-f", str(f), "-o", "json", "--compact", "--skip-download"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_NO_OUTPUT_LOG": "1"})
    assert res.returncode in (0, 1), res.stderr[-3000:]  # 1: some check failed
    report = json.loads(res.stdout)
    report = report[0] if isinstance(report, list) else report
    assert report["check_type"] == "kubernetes", report.get("check_type")
    return report


def findings(report: dict) -> set[tuple[str, str]]:
    """(check id, Kind/name) of every failed check; graph checks name the pod as Pod.<ns>.<name>.<labels>."""
    out = set()
    for r in report["results"]["failed_checks"]:
        kind, _ns, name = r["resource"].split(".")[:3]
        out.add((r["check_id"], f"{kind}/{name}"))
    return out


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, dict]:
    exe = checkov()
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120).stdout.strip()
    assert version == CHECKOV_VERSION, f"checkov {version}: the skip list was made with {CHECKOV_VERSION}"
    out = {name: scan(exe, render(values), tmp_path_factory.mktemp(name)) for name, values in RENDERS.items()}
    control = render({})
    job = next(d for d in control if d["kind"] == "Job")
    job["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] = True
    out["control"] = scan(exe, control, tmp_path_factory.mktemp("control"))
    return out


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_every_finding_is_fixed_or_justified(reports, name):
    report = reports[name]
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["passed"] > 150, report["summary"]  # the checks ran on the objects
    got = findings(report)
    expected = {(check, obj) for (render_, check, obj) in SKIPS if render_ == name}
    unexplained = sorted(got - expected)
    stale = sorted(expected - got)
    assert not unexplained, f"{name}: checkov findings neither fixed nor in SKIPS: {unexplained}"
    assert not stale, f"{name}: SKIPS entries checkov no longer reports (remove them): {stale}"


def test_the_hardened_install_leaves_one_justified_finding(reports):
    assert findings(reports["hardened"]) == {("CKV_K8S_35", UPLOAD)}
    # what the defaults fixed for good: CPU limits everywhere, MinIO's credentials as files
    for name in RENDERS:
        assert not {f for f in findings(reports[name]) if f[0] == "CKV_K8S_11" or f == ("CKV_K8S_35", MINIO)}


def test_the_scanner_catches_a_privileged_container(reports):
    """Positive control: the default render plus one privileged container fails the privileged check."""
    got = findings(reports["control"])
    assert ("CKV_K8S_16", UPLOAD) in got and ("CKV_K8S_16", UPLOAD) not in findings(reports["default"])
