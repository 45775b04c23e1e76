"""manifests/: the kustomize base and overlays, rendered with `kubectl kustomize` (offline).

Every rendered object is validated with kubernetes-validate in strict mode for two Kubernetes minors;
PodMonitor/ServiceMonitor (Prometheus Operator CRDs, no schema in kubernetes-validate) are checked by
hand. manifests/ is generated from the chart (manifests/generate.py): a test regenerates it into a
temporary directory and requires the committed files to match.
"""

import base64
import filecmp
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

kv = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
TARGETS = ["base", "overlays/cpu-demo", "overlays/gpu"]
K8S_VERSIONS = ("1.32.0", "1.37.0")
CRD_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}


def kubectl() -> str:
    exe = shutil.which("kubectl")
    if not exe:
        pytest.skip("kubectl not installed (Debian: apt-get install kubectl from the Kubernetes apt repo, or the google-cloud-cli kubectl package)")
    return exe


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict]]:
    out = {}
    for t in TARGETS:
        res = subprocess.run([kubectl(), "kustomize", str(MANIFESTS / t)], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, f"kubectl kustomize {t}: {res.stderr}"
        out[t] = [d for d in yaml.safe_load_all(res.stdout) if d]
    return out


def by(docs, kind, name=None):
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def pod_specs(docs):
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield d, d["spec"]["template"]["spec"]


def test_generated_files_are_up_to_date(tmp_path):
    pytest.importorskip("helm_python")
    res = subprocess.run([sys.executable, str(MANIFESTS / "generate.py"), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr

    def files(d: Path):
        return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != "generate.py" and not p.name.endswith(".md"))

    assert files(tmp_path) == files(MANIFESTS), "run: python manifests/generate.py"
    for f in files(tmp_path):
        assert filecmp.cmp(tmp_path / f, MANIFESTS / f, shallow=False), f"{f} is stale: run python manifests/generate.py"


@pytest.mark.parametrize("target", TARGETS)
def test_kustomize_output_validates_strict(built, target):
    docs = built[target]
    assert docs
    for d in docs:
        assert d["metadata"]["namespace"] == "kubeflow", d["metadata"]["name"]
        if d["kind"] in CRD_KINDS:
            continue  # no schema in kubernetes-validate: test_gpu_overlay checks these by hand
        for v in K8S_VERSIONS:
            try:
                kv.validate(d, v, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{target}: {d['kind']}/{d['metadata']['name']} invalid for {v}: {'.'.join(map(str, e.path))}: {e.message}")


def test_base_matches_the_charts_core_objects(built):
    docs = built["base"]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == sorted([
        ("Job", "thinkforge-upload"), ("Role", "thinkforge-upload"), ("RoleBinding", "thinkforge-upload"), ("Secret", "thinkforge-s3"),
        ("Service", "thinkforge-minio"), ("ServiceAccount", "thinkforge"), ("StatefulSet", "thinkforge-minio"),
    ])
    for d in docs:
        labels = d["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "thinkforge" or d["kind"] == "Secret"
        assert not any(k.startswith("helm.sh/") for k in labels) and not any(k.startswith("helm.sh/") for k in d["metadata"].get("annotations", {}))
    # the upload Job names the generated Secret (env and the pipeline's cluster.s3_secret), whose name carries no hash suffix
    job = by(docs, "Job")[0]["spec"]["template"]["spec"]
    refs = {e["valueFrom"]["secretKeyRef"]["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in job["initContainers"][0]["env"] if "valueFrom" in e}
    secret = by(docs, "Secret", "thinkforge-s3")[0]
    assert set(refs) == {"thinkforge-s3"} and set(secret["data"]) == {"accesskey", "secretkey"}
    assert "cluster.s3_secret=thinkforge-s3" in job["containers"][0]["args"]


@pytest.mark.parametrize("target", TARGETS)
def test_nothing_taken_over_nothing_opened(built, target):
    """KFP owns kfp-launcher (the profile controller in multi-user namespaces); no egress to 0.0.0.0/0."""
    docs = built[target]
    assert not [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "kfp-launcher"]
    # the chart's policy needs the cluster's API server CIDRs (no 0.0.0.0/0 fallback): render it from the chart
    assert not by(docs, "NetworkPolicy")
    for job in by(docs, "Job"):
        assert job["spec"]["template"]["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"


@pytest.mark.parametrize("target", TARGETS)
def test_no_secret_value_outside_secrets(built, target):
    docs = built[target]
    values = {base64.b64decode(v).decode() for s in by(docs, "Secret") for v in s["data"].values()}
    values = {v for v in values if len(v) >= 12}  # "thinkforge" (the access key id) is also a name
    assert values
    for d in docs:
        if d["kind"] != "Secret":
            text = json.dumps(d)
            assert not any(v in text for v in values), f"{d['kind']}/{d['metadata']['name']}"


@pytest.mark.parametrize("target", TARGETS)
def test_security_contexts(built, target):
    for obj, spec in pod_specs(built[target]):
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True and sc["capabilities"] == {"drop": ["ALL"]}
    for role in by(built[target], "Role"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]


@pytest.mark.parametrize("target", TARGETS)
def test_rbac_gives_the_job_kfp_rights_only_and_runs_nothing(built, target):
    """The manifests install no multi-node training: the upload Job's Role is Kubeflow Pipelines API only,
    bound to the Job's account alone, and no Role lets anyone create Trainer jobs (pods with any Secret)."""
    docs = built[target]
    (role,) = by(docs, "Role")
    assert role["metadata"]["name"] == "thinkforge-upload"
    assert {g for rule in role["rules"] for g in rule["apiGroups"]} == {"pipelines.kubeflow.org"}
    (binding,) = by(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == "thinkforge-upload"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "thinkforge", "namespace": "kubeflow"}]


@pytest.mark.parametrize("target", TARGETS)
def test_minio_reads_its_credentials_from_files(built, target):
    (sts,) = by(built[target], "StatefulSet")
    spec = sts["spec"]["template"]["spec"]
    env = {e["name"]: e for e in spec["containers"][0]["env"]}
    assert "MINIO_ROOT_PASSWORD" not in env and not [e for e in env.values() if "valueFrom" in e]
    assert env["MINIO_ROOT_PASSWORD_FILE"]["value"] == "/etc/minio/credentials/secretkey"
    (vol,) = [v for v in spec["volumes"] if v["name"] == "credentials"]
    assert vol["secret"]["secretName"] == "thinkforge-s3"


def test_cpu_demo_overlay(built):
    job = by(built["overlays/cpu-demo"], "Job")[0]["spec"]["template"]["spec"]
    assert {c["image"] for c in job["initContainers"] + job["containers"]} == {"ghcr.io/thinkforge/thinkforge:0.1.0-cpu"}
    args = job["containers"][0]["args"]
    assert args[args.index("--image") + 1] == "ghcr.io/thinkforge/thinkforge:0.1.0-cpu"
    sts = by(built["overlays/cpu-demo"], "StatefulSet")[0]
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "10Gi"
    # the patch changed only what it meant to: the rest of the container is the base's
    base_c = by(built["base"], "StatefulSet")[0]["spec"]["template"]["spec"]["containers"][0]
    demo_c = sts["spec"]["template"]["spec"]["containers"][0]
    assert {k: v for k, v in demo_c.items() if k != "resources"} == {k: v for k, v in base_c.items() if k != "resources"}


def test_gpu_overlay(built):
    docs = built["overlays/gpu"]
    # the GPU recipe, hence the CUDA image and a store sized for it
    job = by(docs, "Job")[0]["spec"]["template"]["spec"]
    assert {c["image"] for c in job["initContainers"] + job["containers"]} == {"ghcr.io/thinkforge/thinkforge:0.1.0-cuda"}
    job_args = job["containers"][0]["args"]
    assert job_args[job_args.index("--recipe") + 1] == "/app/recipes/phi4-mini-reasoning.yaml"
    sts = by(docs, "StatefulSet")[0]
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "500Gi"
    dep = by(docs, "Deployment", "thinkforge-teacher")[0]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["env"][0] == {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "thinkforge-teacher", "key": "api-key"}}}
    assert by(docs, "Secret", "thinkforge-teacher") and by(docs, "Service", "thinkforge-teacher")
    args = by(docs, "Job")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "generate.endpoint=http://thinkforge-teacher.kubeflow.svc:8000/v1" in args
    assert c["resources"]["requests"]["ephemeral-storage"] == "100Gi"
    assert any(a == "--max-model-len=36864" for a in c["args"])  # a 4096-token prompt + the recipe's 32768
    monitors = {d["kind"] for d in docs if d["kind"] in CRD_KINDS}
    assert monitors == {"PodMonitor", "ServiceMonitor"}
    for d in docs:
        if d["kind"] in CRD_KINDS:
            assert d["apiVersion"] == "monitoring.coreos.com/v1" and set(d) == {"apiVersion", "kind", "metadata", "spec"}
            assert d["spec"]["selector"]["matchLabels"] and d["spec"]["namespaceSelector"]["matchNames"] == ["kubeflow"]
