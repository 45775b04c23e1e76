"""The Helm chart helm/thinkforge, rendered and linted by the real Helm v4 library (helm-python-sdk).

Every scenario (the defaults and each ci/*-values.yaml) is rendered offline, like `helm template` (no
cluster: `lookup` returns nothing, and the capabilities are Helm's defaults), linted, and every object is
validated with kubernetes-validate in strict mode (unknown fields rejected) against two Kubernetes
minor versions. PodMonitor, ServiceMonitor and PrometheusRule are Prometheus Operator CRDs for which
kubernetes-validate ships no schema: they are skipped there and checked field by field here instead;
the chart renders them only where the cluster serves monitoring.coreos.com/v1, which `render(...,
api_versions=OPERATOR_API)` passes as `helm template --api-versions` does.

Template logic that consumes `lookup` results (an existing kfp-launcher ConfigMap, the API server's
Endpoints) cannot meet a cluster here: `probe` renders the chart's helpers on hand-made objects instead.

The chart embeds files/prometheus-rules.yaml and files/grafana-dashboard.json, written by another part
of the project; when they are absent from the repository the tests copy the chart into a temporary
directory and put small stand-ins there (never into the repository).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from chart_helpers import deep_merge, set_flags

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (the Helm v4 library) is not installed")
kv = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "thinkforge"
CI_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
SCENARIOS = {"default": {}} | {p.name.removesuffix("-values.yaml"): yaml.safe_load(p.read_text()) or {} for p in CI_FILES}
K8S_VERSIONS = ("1.32.0", "1.37.0")  # the oldest and newest minors kubernetes-validate ships schemas for
CRD_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
OPERATOR_API = ("monitoring.coreos.com/v1",)
NAMESPACE = "ml-team"
RELEASE = "tf"

STANDIN_RULES = """groups:
  - name: thinkforge.standin
    rules:
      - alert: ThinkforgeStandIn
        expr: vector(0) > 1
        annotations:
          summary: "stand-in rule {{ $labels.job }}"
"""
STANDIN_DASHBOARD = '{"title": "thinkforge (stand-in)", "panels": []}'

# Distinctive dummy secrets: none of them may appear in a ConfigMap, an env literal or any non-Secret object.
DUMMY = {
    "minio": "MINIOPW-7f3a9c-dummy",
    "s3_access": "S3AK-51d0e2-dummy",
    "s3_secret": "S3SK-b8c4aa-dummy",
    "teacher": "TEACHERKEY-93be11-dummy",
    "hf": "hf_DUMMYTOKEN0c7d55",
}


@pytest.fixture(scope="module")
def chart_dir(tmp_path_factory) -> Path:
    """The chart as it is in the repo, plus stand-ins for embedded files other engineers own, if missing."""
    files = CHART / "files"
    if (files / "prometheus-rules.yaml").exists() and (files / "grafana-dashboard.json").exists():
        return CHART
    tmp = tmp_path_factory.mktemp("chart") / "thinkforge"
    shutil.copytree(CHART, tmp)
    (tmp / "files").mkdir(exist_ok=True)
    if not (tmp / "files" / "prometheus-rules.yaml").exists():
        (tmp / "files" / "prometheus-rules.yaml").write_text(STANDIN_RULES)
    if not (tmp / "files" / "grafana-dashboard.json").exists():
        (tmp / "files" / "grafana-dashboard.json").write_text(STANDIN_DASHBOARD)
    return tmp


@pytest.fixture(scope="module")
def chart(chart_dir):
    with helm.Chart.load(chart_dir) as c:
        yield c


def render_raw(chart, values: dict | None = None, api_versions: tuple[str, ...] = ()) -> dict[str, str]:
    """Render like `helm template [--api-versions ...]`: template path -> text."""
    opts = {"name": RELEASE, "namespace": NAMESPACE, "is_install": True}
    if not api_versions:
        return chart.render(values=values or {}, **opts)
    # helm-python-sdk 0.2.2's Chart.render() exposes no capability options; the Helm library's render it
    # wraps takes `api_versions` (Helm's --api-versions), so call that directly.
    from helm_python import _native

    raw = _native.call_string("helm_render", chart._raw(), json.dumps(values or {}), json.dumps({**opts, "api_versions": list(api_versions)}))
    return json.loads(raw)


def render(chart, values: dict | None = None, api_versions: tuple[str, ...] = ()) -> list[dict]:
    """Render like `helm template`; returns the objects (NOTES.txt and empty documents dropped)."""
    out = render_raw(chart, values, api_versions)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("_template", path)  # dropped again before validation
                docs.append(doc)
    return docs


def notes(chart, values: dict | None = None, api_versions: tuple[str, ...] = ()) -> str:
    out = render_raw(chart, values, api_versions)
    return next(v for k, v in out.items() if k.endswith("NOTES.txt"))


@pytest.fixture(scope="module")
def probe_dir(chart_dir, tmp_path_factory) -> Path:
    """A copy of the chart with one extra template that renders `.Values.global.probe.template`."""
    d = tmp_path_factory.mktemp("probe") / "thinkforge"
    shutil.copytree(chart_dir, d)
    (d / "templates" / "zz-probe.yaml").write_text('{{- with .Values.global }}{{- with .probe }}{{ tpl .template $ }}{{- end }}{{- end }}\n')
    return d


def probe(probe_dir: Path, template: str, **objects) -> str:
    """Render `template` (Go template text) inside the chart; `objects` are at .Values.global.probe."""
    values = {"global": {"probe": {"template": template, **objects}}}
    with helm.Chart.load(probe_dir) as c:
        out = c.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return next(v for k, v in out.items() if k.endswith("zz-probe.yaml")).strip()


def strip(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "_template"}


def of_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def pod_specs(docs):
    """(object, pod spec) for every workload that makes pods."""
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            yield d, d["spec"]["template"]["spec"]


def containers(spec):
    return list(spec.get("initContainers", [])) + list(spec["containers"])


@pytest.fixture(scope="module")
def rendered(chart):
    return {name: render(chart, values) for name, values in SCENARIOS.items()}


# ---------------------------------------------------------------------------------------------------


def test_scenarios_cover_the_switches():
    assert {"external-s3", "teacher-on", "monitoring-off", "schedule-on"} <= set(SCENARIOS)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_lint_clean(chart_dir, scenario):
    report = helm.lint(chart_dir, SCENARIOS[scenario], strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2 and "icon is recommended" not in m["error"]]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_values_pass_schema(chart, scenario):
    chart.validate_schema(SCENARIOS[scenario])


_validated: set[str] = set()


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rendered_objects_validate_strict(rendered, scenario):
    docs = rendered[scenario]
    assert docs
    skipped = []
    for doc in docs:
        obj = strip(doc)
        if obj["kind"] in CRD_KINDS:
            skipped.append(obj["kind"])  # no schema in kubernetes-validate: checked in test_prometheus_operator_objects
            continue
        key = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
        if key in _validated:  # the same object in another scenario: validated already
            continue
        for version in K8S_VERSIONS:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{doc['_template']}: {obj['kind']}/{obj['metadata']['name']} invalid for {version}: "
                            f"{'.'.join(map(str, e.path))}: {e.message}")
        _validated.add(key)
    assert set(skipped) <= CRD_KINDS


def test_strict_validation_catches_unknown_fields(rendered):
    """Guard against a validator that accepts anything: a typo'd field must fail strict validation."""
    job = strip(of_kind(rendered["default"], "Job")[0])
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kv.ValidationError):
        kv.validate(job, K8S_VERSIONS[0], strict=True)


def test_every_object_is_labelled_and_namespaced(rendered):
    for name, docs in rendered.items():
        for d in docs:
            labels = d["metadata"]["labels"]
            assert labels["app.kubernetes.io/part-of"] == "thinkforge", (name, d["_template"])
            assert labels["app.kubernetes.io/instance"] == RELEASE
            assert d["metadata"]["namespace"] == NAMESPACE, (name, d["_template"])


# --- switches ---------------------------------------------------------------------------------------


def test_teacher_switch(chart):
    off = render(chart)
    assert not [d for d in off if d["metadata"]["labels"]["app.kubernetes.io/component"] == "teacher"]
    on = render(chart, SCENARIOS["teacher-on"])
    (dep,) = of_kind(on, "Deployment")
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["command"] == ["vllm", "serve"] and c["args"][0] == SCENARIOS["teacher-on"]["teacher"]["model"]
    assert "--tensor-parallel-size=2" in c["args"] and "--enable-prefix-caching" in c["args"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2 and c["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == f"{RELEASE}-thinkforge-teacher"
    assert [s["metadata"]["name"] for s in of_kind(on, "Service")] == [f"{RELEASE}-thinkforge-minio", f"{RELEASE}-thinkforge-teacher"]
    # the uploaded pipeline is pointed at the teacher
    job = of_kind(on, "Job")[0]["spec"]["template"]["spec"]["containers"][0]
    assert f"generate.endpoint=http://{RELEASE}-thinkforge-teacher.{NAMESPACE}.svc:8000/v1" in job["args"]
    assert "generate.engine=openai" in job["args"]


def test_teacher_uses_default_gpu_pool(chart):
    docs = render(chart, {"teacher": {"enabled": True}})
    spec = of_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]
    assert "nodeSelector" not in spec
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def _job_containers(docs):
    (job,) = of_kind(docs, "Job")
    spec = job["spec"]["template"]["spec"]
    return job, {c["name"]: c for c in spec.get("initContainers", [])}, {c["name"]: c for c in spec["containers"]}


def test_upload_job_without_schedule(rendered):
    job, init, main = _job_containers(rendered["default"])
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    assert set(init) == {"ensure-bucket"} and set(main) == {"upload"}
    args = main["upload"]["args"]
    assert args[0] == "upload" and "--cron" not in args
    assert args[args.index("--version") + 1] == "0.1.0-r1"
    assert args[args.index("--recipe") + 1] == "/app/recipes/cpu-demo.yaml"
    assert f"storage.endpoint={RELEASE}-thinkforge-minio.{NAMESPACE}.svc:9000" in args
    # the default recipe is the cpu-demo: the default image is the CPU one
    assert args[args.index("--image") + 1] == main["upload"]["image"] == "ghcr.io/thinkforge/thinkforge:0.1.0-cpu"
    assert not any(e["name"] == "SCHEDULE_CRON" for e in main["upload"]["env"])


def test_schedule_switch_creates_the_recurring_run_container(rendered):
    job, init, main = _job_containers(rendered["schedule-on"])
    assert list(init) == ["ensure-bucket", "upload"] and list(main) == ["schedule"]
    args = main["schedule"]["args"]
    assert args[0] == "schedule"
    assert args[args.index("--cron") + 1] == "$(SCHEDULE_CRON)"
    env = {e["name"]: e.get("value") for e in main["schedule"]["env"]}
    assert env["SCHEDULE_CRON"] == "0 30 2 * * 1"
    assert args[args.index("--job-name") + 1] == "weekly-retrain"
    assert args[args.index("--max-concurrency") + 1] == "1"
    assert args[args.index("--service-account") + 1] == "default-editor"
    assert args[args.index("--user-namespace") + 1] == NAMESPACE
    assert args[args.index("--version") + 1] == "weekly-1"
    sets = set_flags(args)
    assert "sft.learning_rate=2e-5" in sets and "run.name=weekly" in sets
    # the inline recipe comes from a ConfigMap mounted where --recipe points
    assert args[args.index("--recipe") + 1] == "/etc/thinkforge/recipe.yaml"
    cm = next(d for d in rendered["schedule-on"] if d["metadata"]["name"] == f"{RELEASE}-thinkforge-recipe")
    assert yaml.safe_load(cm["data"]["recipe.yaml"]) == SCENARIOS["schedule-on"]["pipeline"]["recipe"]
    # upload and schedule agree on pipeline, version and recipe
    up = init["upload"]["args"]
    assert up[1:] == args[1 : len(up)]


def test_multi_user_kfp_passes_the_profile_namespace(chart):
    _, _, main = _job_containers(render(chart, {"kfp": {"multiUser": True}}))
    args = main["upload"]["args"]
    assert args[args.index("--user-namespace") + 1] == NAMESPACE


@pytest.mark.parametrize(
    "values, account",
    [({}, "pipeline-runner"), ({"kfp": {"multiUser": True}}, "default-editor"),
     ({"kfp": {"multiUser": True, "runServiceAccount": "team-runner"}}, "team-runner")],
)
def test_run_service_account_follows_multi_user(chart, values, account):
    """Multi-user Kubeflow runs pipelines as the profile's default-editor; single-user KFP as pipeline-runner."""
    docs = render(chart, deep_merge(values, {"schedule": {"enabled": True}, "rbac": {"multiNodeTraining": True}}))
    _, _, main = _job_containers(docs)
    args = main["schedule"]["args"]
    assert args[args.index("--service-account") + 1] == account
    bindings = {b["metadata"]["name"]: b for b in of_kind(docs, "RoleBinding")}
    # the runs' account gets the Trainer Role, the upload Job's account the KFP one: never both
    assert [s["name"] for s in bindings[f"{RELEASE}-thinkforge-trainer"]["subjects"]] == [account]
    assert [s["name"] for s in bindings[f"{RELEASE}-thinkforge-upload"]["subjects"]] == [f"{RELEASE}-thinkforge"]
    assert ("--user-namespace" in args) == bool(values.get("kfp", {}).get("multiUser"))


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_upload_job_has_no_istio_sidecar(rendered, scenario):
    """Profile namespaces inject Istio sidecars; a Job whose sidecar keeps running never completes."""
    for job in of_kind(rendered[scenario], "Job"):
        assert job["spec"]["template"]["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"


def test_upload_switch(rendered):
    assert not of_kind(rendered["minimal"], "Job")
    assert not [d for d in rendered["minimal"] if d["kind"] in ("Role", "RoleBinding", "ServiceAccount", "NetworkPolicy")]


@pytest.mark.parametrize(
    "values, expected",
    [
        ({}, CRD_KINDS | {"grafana"}),
        ({"monitoring": {"enabled": False}}, set()),
        ({"monitoring": {"podMonitor": {"enabled": False}}}, {"ServiceMonitor", "PrometheusRule", "grafana"}),
        ({"monitoring": {"serviceMonitor": {"enabled": False}}}, {"PodMonitor", "PrometheusRule", "grafana"}),
        ({"monitoring": {"prometheusRule": {"enabled": False}}}, {"PodMonitor", "ServiceMonitor", "grafana"}),
        ({"monitoring": {"grafanaDashboard": {"enabled": False}}}, CRD_KINDS),
    ],
)
def test_monitoring_switches(chart, values, expected):
    docs = render(chart, values, api_versions=OPERATOR_API)
    found = {d["kind"] for d in docs if d["kind"] in CRD_KINDS}
    if any(d["kind"] == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1" for d in docs):
        found.add("grafana")
    assert found == expected


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_no_monitors_without_the_operator_api(rendered, scenario):
    """A cluster with KFP and nothing else: no object of a kind it cannot store (the install would fail)."""
    assert not [d["kind"] for d in rendered[scenario] if d["kind"] in CRD_KINDS]
    assert not [d for d in rendered[scenario] if d["apiVersion"].startswith("monitoring.coreos.com/")]


def test_monitors_where_the_operator_api_is_served(chart):
    assert {d["kind"] for d in render(chart, api_versions=OPERATOR_API)} >= CRD_KINDS
    # `helm template` without --api-versions: skipped, and NOTES say why and how to get them
    assert "monitoring.coreos.com/v1" in notes(chart) and "--api-versions" in notes(chart)
    assert "--api-versions" not in notes(chart, api_versions=OPERATOR_API)
    # the Grafana dashboard is a plain ConfigMap (Grafana's sidecar picks it up): kept either way
    assert [d for d in render(chart) if d["kind"] == "ConfigMap" and "thinkforge.json" in d.get("data", {})]


def test_prometheus_operator_objects(chart, chart_dir):
    """The CRD objects kubernetes-validate cannot check, checked by hand."""
    docs = render(chart, deep_merge(SCENARIOS["teacher-on"], {"monitoring": {"labels": {"release": "kps"}}}), api_versions=OPERATOR_API)
    for d in docs:
        if d["kind"] not in CRD_KINDS:
            continue
        assert d["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(d) == {"apiVersion", "kind", "metadata", "spec", "_template"}
        assert d["metadata"]["labels"]["release"] == "kps"
    (pm,) = of_kind(docs, "PodMonitor")
    assert set(pm["spec"]) <= {"namespaceSelector", "selector", "podTargetLabels", "podMetricsEndpoints"}
    assert pm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/part-of": "thinkforge"}
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert ep["path"] == "/metrics" and ep["interval"] == "30s"
    for r in ep["relabelings"]:
        assert set(r) <= {"sourceLabels", "regex", "action", "targetLabel", "replacement"}
        assert r.get("action", "replace") in {"keep", "replace"}
    assert ep["relabelings"][-1]["replacement"] == "${1}:9400"
    sms = {m["metadata"]["name"]: m for m in of_kind(docs, "ServiceMonitor")}
    assert set(sms) == {f"{RELEASE}-thinkforge-teacher", f"{RELEASE}-thinkforge-minio"}
    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    for name, sm in sms.items():
        (endpoint,) = sm["spec"]["endpoints"]
        svc = services[name]
        assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    (rule,) = of_kind(docs, "PrometheusRule")
    source = yaml.safe_load((chart_dir / "files" / "prometheus-rules.yaml").read_text())
    groups = source["groups"] if "groups" in source else source["spec"]["groups"]
    assert rule["spec"]["groups"] == groups
    for g in rule["spec"]["groups"]:
        assert g["name"] and g["rules"]
        for r in g["rules"]:
            assert ("alert" in r) != ("record" in r) and r["expr"]
    dash = next(d for d in docs if d["kind"] == "ConfigMap" and "thinkforge.json" in d.get("data", {}))
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["thinkforge.json"]) == json.loads((chart_dir / "files" / "grafana-dashboard.json").read_text())


# --- storage and KFP --------------------------------------------------------------------------------


def _launchers(docs):
    return [d for d in docs if d["kind"] == "ConfigMap" and (d["metadata"]["name"].startswith("kfp-launcher") or "defaultPipelineRoot" in d.get("data", {}))]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_kfp_launcher_is_left_to_kfp_by_default(rendered, scenario):
    """KFP ships kfp-launcher (standalone) or its profile controller owns it (multi-user): no takeover."""
    manage = SCENARIOS[scenario].get("kfpLauncher", {}).get("manage", False)
    assert bool(_launchers(rendered[scenario])) == manage
    if not manage:  # the uploaded pipeline still stores data, checkpoints and the registry in the chart's store
        for job in of_kind(rendered[scenario], "Job"):
            args = job["spec"]["template"]["spec"]["containers"][0]["args"]
            assert any(a.startswith("storage.endpoint=") for a in args)


def test_kfp_launcher_has_no_rename_option(chart):
    """The launcher reads only `kfp-launcher`: a renamed copy would configure nothing."""
    for values in ({"kfpLauncher": {"name": "kfp-launcher-thinkforge"}}, {"kfpLauncher": {"enabled": True}}):
        with pytest.raises(helm.HelmError, match="not allowed"):
            chart.validate_schema(values)


def test_kfp_launcher_opt_in_points_at_minio(chart):
    docs = render(chart, {"kfpLauncher": {"manage": True}})
    (cm,) = _launchers(docs)
    assert cm["metadata"]["name"] == "kfp-launcher"
    assert cm["data"]["defaultPipelineRoot"] == "minio://thinkforge/pipelines"
    providers = yaml.safe_load(cm["data"]["providers"])
    default = providers["minio"]["default"]
    assert default["endpoint"] == f"{RELEASE}-thinkforge-minio.{NAMESPACE}.svc:9000" and default["disableSSL"] is True
    ref = default["credentials"]["secretRef"]
    (secret,) = [s for s in of_kind(docs, "Secret") if s["metadata"]["name"] == ref["secretName"]]
    assert {ref["accessKeyKey"], ref["secretKeyKey"]} == set(secret["data"])
    assert default["credentials"]["fromEnv"] is False
    sts = of_kind(docs, "StatefulSet")[0]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in sts["containers"][0]["env"]}
    (creds,) = [v for v in sts["volumes"] if v["name"] == "credentials"]
    assert creds["secret"]["secretName"] == ref["secretName"]
    assert {"key": "secretkey", "path": "secretkey"} in creds["secret"]["items"]
    assert env["MINIO_ROOT_PASSWORD_FILE"]["value"] == "/etc/minio/credentials/secretkey"


CONFLICT = '{{ include "thinkforge.kfpLauncher.conflict" (dict "ctx" $ "existing" .Values.global.probe.cm) }}'
PROFILE_LAUNCHER = {  # what KFP's profile controller writes into a profile namespace (no Helm ownership)
    "apiVersion": "v1", "kind": "ConfigMap",
    "metadata": {"name": "kfp-launcher", "namespace": NAMESPACE, "labels": {"app": "kfp-launcher"},
                 "ownerReferences": [{"apiVersion": "metacontroller.k8s.io/v1alpha1", "kind": "CompositeController", "name": "kubeflow-pipelines-profile-controller", "uid": "0"}]},
    "data": {"defaultPipelineRoot": "minio://mlpipeline/v2/artifacts"},
}


def _owned_by(release: str, namespace: str = NAMESPACE) -> dict:
    cm = copy.deepcopy(PROFILE_LAUNCHER)
    cm["metadata"]["annotations"] = {"meta.helm.sh/release-name": release, "meta.helm.sh/release-namespace": namespace}
    return cm


@pytest.mark.parametrize(
    "existing, conflict",
    [(None, False), (PROFILE_LAUNCHER, True), (_owned_by("someone-else"), True), (_owned_by(RELEASE, "kubeflow"), True), (_owned_by(RELEASE), False)],
    ids=["absent", "profile-controller", "other-release", "other-namespace", "this-release"],
)
def test_kfp_launcher_opt_in_refuses_a_foreign_one(probe_dir, existing, conflict):
    """kfpLauncher.manage looks kfp-launcher up; one this release does not own fails the install, saying what to do.
    (No cluster here: the helper that judges the looked-up object is rendered on hand-made objects.)"""
    text = probe(probe_dir, CONFLICT, cm=existing or {})
    if not conflict:
        assert text == ""
        return
    assert text.startswith("kfpLauncher.manage: ConfigMap kfp-launcher already exists in namespace ml-team and is not owned by release tf")
    assert "Leave kfpLauncher.manage=false" in text and "defaultPipelineRoot" in text and "profile" in text


def test_kfp_launcher_check_is_wired_into_validation(chart_dir):
    """validateValues runs the ownership check on what `lookup` returns (offline: nothing, so it renders)."""
    helpers = (chart_dir / "templates" / "_helpers.tpl").read_text()
    assert 'include "thinkforge.kfpLauncher.conflict" (dict "ctx" . "existing" (lookup "v1" "ConfigMap" .Release.Namespace "kfp-launcher"))' in helpers


def test_external_s3_replaces_minio(rendered):
    docs = rendered["external-s3"]
    assert not of_kind(docs, "StatefulSet") and not of_kind(docs, "Secret")  # existingSecret: the chart writes none
    (cm,) = [d for d in docs if d["metadata"]["name"] == "kfp-launcher"]
    assert cm["data"]["defaultPipelineRoot"] == "s3://my-thinkforge-artifacts/pipelines"
    s3 = yaml.safe_load(cm["data"]["providers"])["s3"]["default"]
    assert s3 == {
        "endpoint": "s3.eu-west-1.amazonaws.com:443", "disableSSL": False, "region": "eu-west-1", "forcePathStyle": False,
        "credentials": {"fromEnv": False, "secretRef": {"secretName": "my-s3-credentials", "accessKeyKey": "accesskey", "secretKeyKey": "secretkey"}},
    }
    (np,) = of_kind(docs, "NetworkPolicy")
    s3_rule = next(r for r in np["spec"]["egress"] if any("ipBlock" in t and t["ipBlock"]["cidr"] == "52.218.0.0/17" for t in r["to"]))
    assert s3_rule["ports"] == [{"protocol": "TCP", "port": 443}]


def test_minio_password_is_generated_when_unset(chart):
    def password(docs):
        s = next(s for s in of_kind(docs, "Secret") if s["metadata"]["name"].endswith("-s3"))
        return base64.b64decode(s["data"]["secretkey"]).decode()

    a, b = password(render(chart)), password(render(chart))
    assert len(a) == 32 and a != b  # offline there is no old Secret to look up: a fresh random one each time


# --- security ---------------------------------------------------------------------------------------


def _secret_values(scenario_values: dict) -> dict:
    return deep_merge(
        scenario_values,
        {"secrets": {"teacherApiKey": {"value": DUMMY["teacher"]}, "hfToken": {"value": DUMMY["hf"]}}, "teacher": {"enabled": True}},
    )


SECRET_CASES = {
    "minio": _secret_values({"minio": {"auth": {"rootPassword": DUMMY["minio"]}}}),
    "external-s3": _secret_values(
        deep_merge(SCENARIOS["external-s3"], {"externalS3": {"existingSecret": "", "accessKey": DUMMY["s3_access"], "secretKey": DUMMY["s3_secret"]}})
    ),
    "schedule": _secret_values(deep_merge(SCENARIOS["schedule-on"], {"minio": {"auth": {"rootPassword": DUMMY["minio"]}}})),
}


@pytest.mark.parametrize("case", sorted(SECRET_CASES))
def test_no_secret_value_outside_secrets(chart, case):
    docs = render(chart, SECRET_CASES[case])
    needles = {v for k, v in DUMMY.items() if k in ("teacher", "hf") or (k == "minio") == (case != "external-s3")}
    # each dummy is in a Secret ...
    in_secrets = "".join(base64.b64decode(v).decode() for s in of_kind(docs, "Secret") for v in s["data"].values())
    for needle in needles:
        assert needle in in_secrets, needle
    # ... and in nothing else, neither plain nor base64-encoded, nor in NOTES.txt
    forbidden = needles | {base64.b64encode(n.encode()).decode() for n in needles}
    for d in docs:
        if d["kind"] == "Secret":
            continue
        text = json.dumps(d)
        for n in forbidden:
            assert n not in text, f"{n} leaked into {d['kind']}/{d['metadata']['name']}"
    assert not any(n in notes(chart, SECRET_CASES[case]) for n in forbidden)
    # env literals never carry secrets; secret env comes from secretKeyRef, or names a file of a mounted
    # Secret (or projected token) volume (*_FILE, *_PATH)
    for _, spec in pod_specs(docs):
        secret_volumes = {v["name"] for v in spec.get("volumes", []) if "secret" in v or "projected" in v}
        for c in containers(spec):
            secret_dirs = [m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in secret_volumes]
            for e in c.get("env", []):
                if not any(w in e["name"] for w in ("KEY", "TOKEN", "PASSWORD", "SECRET")) or e["name"] == "KF_PIPELINES_SA_TOKEN_PATH":
                    continue  # (the KFP client's token path, set on every Job container; not a secret)
                if e["name"].endswith(("_FILE", "_PATH")):
                    assert any(e["value"].startswith(d.rstrip("/") + "/") for d in secret_dirs), (c["name"], e)
                else:
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], (c["name"], e["name"])


@pytest.mark.parametrize("scenario", sorted(SCENARIOS) + ["teacher+schedule"])
def test_pod_security(chart, rendered, scenario):
    docs = rendered.get(scenario) or render(chart, deep_merge(SCENARIOS["teacher-on"], SCENARIOS["schedule-on"]))
    specs = list(pod_specs(docs))
    assert specs
    for obj, spec in specs:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] >= 1000, where
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        mounts_by_volume = {v["name"]: v for v in spec.get("volumes", [])}
        for c in containers(spec):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (where, c["name"])
            assert "privileged" not in sc and "runAsUser" not in sc or sc["runAsUser"] != 0
            # a read-only root needs a writable /tmp
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in mounts_by_volume[tmp[0]["name"]], (where, c["name"])
            assert c["image"].split(":")[-1] not in ("", "latest"), (where, c["image"])
            assert "limits" in c["resources"] and "requests" in c["resources"], (where, c["name"])


def test_upload_job_uses_a_kfp_audience_token_only(rendered):
    job = of_kind(rendered["default"], "Job")[0]["spec"]["template"]["spec"]
    (token,) = [v for v in job["volumes"] if v["name"] == "kfp-token"]
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
    assert job["automountServiceAccountToken"] is False


@pytest.mark.parametrize("scenario", ["default", "teacher-on", "external-s3", "multi-node"])
def test_rbac_least_privilege(chart, rendered, scenario):
    """Each Role: no wildcards, nothing on Secrets or Roles, no verbs that escalate; the Trainer rights only
    in the Role of the runs' account, and only with rbac.multiNodeTraining (tests/test_security_rbac.py
    checks what each subject ends up with)."""
    docs = rendered.get(scenario) or render(chart, {"rbac": {"multiNodeTraining": True}})
    assert not of_kind(docs, "ClusterRole") and not of_kind(docs, "ClusterRoleBinding")
    roles = {r["metadata"]["name"]: r for r in of_kind(docs, "Role")}
    assert set(roles) == {f"{RELEASE}-thinkforge-upload"} | ({f"{RELEASE}-thinkforge-trainer"} if scenario == "multi-node" else set())
    for role in roles.values():
        granted = {}
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field] and all("*" not in x for x in rule[field]), rule
            assert not set(rule["verbs"]) & {"escalate", "bind", "impersonate", "update", "deletecollection"}, rule
            if "patch" in rule["verbs"]:  # only to adopt a Trainer job a killed launcher left (ownerReference)
                assert set(rule["resources"]) <= {"trainjobs", "pytorchjobs"}, rule
            assert "secrets" not in rule["resources"] and "roles" not in rule["resources"]
            for group in rule["apiGroups"]:
                for res in rule["resources"]:
                    granted.setdefault((group, res), set()).update(rule["verbs"])
        if role["metadata"]["name"].endswith("-upload"):  # KFP's API only (its SubjectAccessReview resources)
            assert {g for g, _ in granted} == {"pipelines.kubeflow.org"}
            assert {"create", "get", "list"} <= granted[("pipelines.kubeflow.org", "pipelines")]
            assert {"create", "get", "list", "delete"} <= granted[("pipelines.kubeflow.org", "jobs")]
        else:
            assert granted[("", "pods")] == granted[("", "pods/log")] == {"get", "list", "watch"}
            assert {"create", "get", "watch", "patch", "delete"} <= granted[("trainer.kubeflow.org", "trainjobs")]
            assert {"create", "get", "watch", "patch", "delete"} <= granted[("kubeflow.org", "pytorchjobs")]
            assert "pipelines.kubeflow.org" not in {g for g, _ in granted}
            assert "Secret" in role["metadata"]["annotations"]["thinkforge.io/grants"]  # says what it amounts to
    for binding in of_kind(docs, "RoleBinding"):
        assert binding["roleRef"]["kind"] == "Role" and binding["roleRef"]["name"] == binding["metadata"]["name"]
        (subject,) = binding["subjects"]
        expected = "pipeline-runner" if binding["metadata"]["name"].endswith("-trainer") else f"{RELEASE}-thinkforge"
        assert subject == {"kind": "ServiceAccount", "name": expected, "namespace": NAMESPACE}


def test_rbac_without_multi_node_training(rendered):
    for scenario, docs in rendered.items():
        for role in of_kind(docs, "Role"):
            assert not [r for r in role["rules"] if {"trainer.kubeflow.org", "kubeflow.org", ""} & set(r["apiGroups"])], scenario


def test_network_policy_limits_training_egress(chart, rendered):
    (np,) = of_kind(rendered["teacher-on"], "NetworkPolicy")
    spec = np["spec"]
    assert spec["policyTypes"] == ["Egress"]
    assert spec["podSelector"]["matchLabels"] == {"app.kubernetes.io/part-of": "thinkforge"}
    assert spec["podSelector"]["matchExpressions"] == [{"key": "app.kubernetes.io/component", "operator": "NotIn", "values": ["minio", "teacher"]}]
    rules = spec["egress"]
    for r in rules:
        assert r.get("to") and r.get("ports"), f"an egress rule without `to` or `ports` allows everything: {r}"
    ports = lambda r: {p["port"] for p in r["ports"]}  # noqa: E731
    dns = [r for r in rules if ports(r) == {53}]
    assert dns and {p["protocol"] for p in dns[0]["ports"]} == {"UDP", "TCP"}
    comp = lambda r: r["to"][0].get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")  # noqa: E731
    assert [ports(r) for r in rules if comp(r) == "minio"] == [{9000}]
    assert [ports(r) for r in rules if comp(r) == "teacher"] == [{8000}]
    kfp = [r for r in rules if r["to"][0].get("namespaceSelector", {}).get("matchLabels")]
    assert kfp[0]["to"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kubeflow"}
    assert ports(kfp[0]) == {8887, 8888, 8080}
    # the training pods' labels are selected; MinIO and the teacher are not
    for obj, _ in pod_specs(rendered["teacher-on"]):
        labels = obj["spec"]["template"]["metadata"]["labels"]
        selected = labels.get("app.kubernetes.io/part-of") == "thinkforge" and labels["app.kubernetes.io/component"] not in ("minio", "teacher")
        assert selected == (labels["app.kubernetes.io/component"] == "upload")
    # the API server: tightened to the given CIDRs
    (np2,) = of_kind(rendered["external-s3"], "NetworkPolicy")
    api = [r for r in np2["spec"]["egress"] if ports(r) == {443, 6443}]
    assert api[0]["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}]
    assert not of_kind(render(chart, {"networkPolicy": {"enabled": False}}), "NetworkPolicy")


def _egress(docs):
    (np,) = of_kind(docs, "NetworkPolicy")
    return np["spec"]["egress"]


def _ports(rule):
    return {p["port"] for p in rule["ports"]}


NP_ON = {"networkPolicy": {"enabled": True, "kubeAPIServerCIDRs": ["10.0.0.1/32"]}}


def test_network_policy_reaches_kfps_object_store(chart, rendered):
    """Argo's wait container archives logs, and KFP's launcher moves artifacts, to KFP's own store in KFP's
    namespace: MinIO pods listen on 9000, SeaweedFS (behind minio-service:9000) on 8333."""
    kfp_ns = {"kubernetes.io/metadata.name": "kubeflow"}
    store = [r for r in _egress(rendered["teacher-on"]) if r["to"][0].get("namespaceSelector", {}).get("matchLabels") == kfp_ns and 9000 in _ports(r)]
    assert len(store) == 1 and _ports(store[0]) == {9000, 8333}
    assert store[0]["to"] == [{"namespaceSelector": {"matchLabels": kfp_ns}}]
    # narrowed to the store's pods, or an S3 outside the cluster
    sel = deep_merge(NP_ON, {"networkPolicy": {"kfpObjectStore": {"podSelector": {"matchLabels": {"app": "seaweedfs"}}, "ports": [8333]}}})
    (r,) = [r for r in _egress(render(chart, sel)) if _ports(r) == {8333}]
    assert r["to"] == [{"namespaceSelector": {"matchLabels": kfp_ns}, "podSelector": {"matchLabels": {"app": "seaweedfs"}}}]
    ext = deep_merge(NP_ON, {"networkPolicy": {"kfpObjectStore": {"cidrs": ["52.92.0.0/17"], "ports": [443]}}})
    assert [r["to"] for r in _egress(render(chart, ext)) if {"ipBlock": {"cidr": "52.92.0.0/17"}} in r["to"]] == [[{"ipBlock": {"cidr": "52.92.0.0/17"}}]]


def test_hugging_face_hub_egress_is_an_explicit_opt_in(chart, rendered):
    hub = [r for r in _egress(rendered["teacher-on"]) if r["to"] and all("ipBlock" in t for t in r["to"]) and _ports(r) == {443}
           and r["to"][0]["ipBlock"]["cidr"] != "172.16.0.2/32"]
    assert hub == [{"to": [{"ipBlock": {"cidr": "192.0.2.0/24"}}, {"ipBlock": {"cidr": "198.51.100.0/24"}}], "ports": [{"protocol": "TCP", "port": 443}]}]
    # off by default: a builtin-model recipe gets no route out beyond the API server
    outside = [r for r in _egress(render(chart, NP_ON)) if any("ipBlock" in t for t in r["to"])]
    assert [[t["ipBlock"]["cidr"] for t in r["to"]] for r in outside] == [["10.0.0.1/32"]]
    # a recipe that names a hub model with the Hub closed would fail at its first download: refused
    with pytest.raises(helm.HelmError, match=r"networkPolicy.huggingFaceHub.enabled: recipes/phi4-mini-reasoning.yaml downloads microsoft/Phi-4-mini-instruct"):
        render(chart, deep_merge(NP_ON, {"pipeline": {"recipeFile": "recipes/phi4-mini-reasoning.yaml"}}))
    # ... unless the student comes from the object store
    render(chart, deep_merge(NP_ON, {"pipeline": {"recipeFile": "recipes/phi4-mini-reasoning.yaml", "overrides": ["model.student=minio://thinkforge/models/phi4-mini"]}}))
    with pytest.raises(helm.HelmError, match=r"networkPolicy.huggingFaceHub.cidrs"):
        render(chart, deep_merge(NP_ON, {"networkPolicy": {"huggingFaceHub": {"enabled": True}}}))


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_no_egress_to_anywhere(rendered, scenario):
    assert "0.0.0.0/0" not in json.dumps([d for d in rendered[scenario] if d["kind"] == "NetworkPolicy"])


def test_api_server_cidrs_are_required_where_lookup_sees_no_cluster(chart):
    """`helm template` and GitOps renders cannot look the API server up: no 0.0.0.0/0 fallback, a clear error."""
    with pytest.raises(helm.HelmError) as err:
        render(chart, {"networkPolicy": {"enabled": True}})
    assert "networkPolicy.kubeAPIServerCIDRs: required" in str(err.value) and "1 invalid value(s)" in str(err.value)


API_CIDRS = '{{ include "thinkforge.networkPolicy.apiServerCIDRs" (dict "ctx" $ "endpoints" .Values.global.probe.ep) }}'
ENDPOINTS = {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "kubernetes", "namespace": "default"},
             "subsets": [{"addresses": [{"ip": "172.18.0.2"}, {"ip": "172.18.0.3"}], "ports": [{"name": "https", "port": 6443}]},
                         {"addresses": [{"ip": "fd00::2"}]}]}


def test_api_server_cidrs_from_the_looked_up_endpoints(probe_dir):
    """What `lookup "v1" "Endpoints" "default" "kubernetes"` returns at install becomes /32 (/128) CIDRs."""
    assert json.loads(probe(probe_dir, API_CIDRS, ep=ENDPOINTS)) == ["172.18.0.2/32", "172.18.0.3/32", "fd00::2/128"]
    assert json.loads(probe(probe_dir, API_CIDRS, ep={})) == []  # offline: nothing, and nothing is made up


# --- recipe-aware defaults ----------------------------------------------------------------------------


def _job_image(docs):
    (job,) = of_kind(docs, "Job")
    return job["spec"]["template"]["spec"]["containers"][0]["image"]


def _minio_size(docs):
    (sts,) = of_kind(docs, "StatefulSet")
    return sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]


@pytest.mark.parametrize(
    "pipeline, flavor, size",
    [({}, "cpu", "10Gi"), ({"recipeFile": "recipes/smoke.yaml"}, "cpu", "1Gi"),
     ({"recipeFile": "recipes/phi4-mini-reasoning.yaml"}, "cuda", "500Gi"),
     ({"recipe": {"cluster": {"stages": {"sft": {"gpus": 1}}}}}, "cuda", "50Gi"), ({"recipe": {"sft": {"epochs": 1}}}, "cpu", "50Gi")],
)
def test_image_flavor_and_store_size_follow_the_recipe(chart, pipeline, flavor, size):
    docs = render(chart, {"pipeline": pipeline})
    assert _job_image(docs) == f"ghcr.io/thinkforge/thinkforge:0.1.0-{flavor}"
    assert _minio_size(docs) == size


@pytest.mark.parametrize(
    "values, message",
    [({"image": {"flavor": "cuda"}}, "image.flavor: cuda, but recipes/cpu-demo.yaml requests no GPUs"),
     ({"image": {"flavor": "cpu"}, "pipeline": {"recipeFile": "recipes/phi4-mini-reasoning.yaml"}}, "image.flavor: cpu, but recipes/phi4-mini-reasoning.yaml requests GPUs"),
     ({"image": {"flavor": "cpu"}, "pipeline": {"recipe": {"cluster": {"defaults": {"gpus": 2}}}}}, "image.flavor: cpu, but the inline pipeline.recipe requests GPUs"),
     ({"pipeline": {"recipeFile": "recipes/my-own.yaml"}}, "image.flavor: set cpu or cuda; the chart cannot tell whether recipes/my-own.yaml requests GPUs"),
     ({"pipeline": {"recipeFile": "recipes/phi4-mini-reasoning.yaml"}, "minio": {"persistence": {"size": "50Gi"}}},
      "minio.persistence.size: 50Gi is too small for recipes/phi4-mini-reasoning.yaml, which needs at least 500Gi"),
     ({"pipeline": {"recipeFile": "recipes/phi4-mini-reasoning.yaml"}, "minio": {"persistence": {"size": "0.4Ti"}}}, "minio.persistence.size: 0.4Ti is too small"),
     ({"pipeline": {"recipeFile": "recipes/phi4-mini-reasoning.yaml"}, "teacher": {"enabled": True, "maxModelLen": 32768}},
      "teacher.maxModelLen: 32768 cannot hold a prompt (teacher.maxPromptTokens 4096) plus generate.max_new_tokens 32768 of recipes/phi4-mini-reasoning.yaml: set it to at least 36864"),
     ({"pipeline": {"overrides": ["generate.max_new_tokens=40000"]}, "teacher": {"enabled": True}}, "set it to at least 44096")],
    ids=["cuda-cpu-demo", "cpu-phi4", "cpu-inline-gpu", "unknown-recipe", "phi4-50Gi", "phi4-0.4Ti", "phi4-teacher-32k", "override-tokens"],
)
def test_recipe_checks(chart, values, message):
    chart.validate_schema(values)
    with pytest.raises(helm.HelmError) as err:
        render(chart, values)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "values",
    [{"image": {"flavor": "cuda"}, "pipeline": {"recipeFile": "recipes/phi4-mini-reasoning.yaml"}, "minio": {"persistence": {"size": "1Ti"}}},
     {"pipeline": {"recipeFile": "recipes/phi4-mini-reasoning.yaml"}, "minio": {"persistence": {"size": "600G"}}, "teacher": {"enabled": True}},
     {"image": {"flavor": "cuda", "tag": "custom"}, "pipeline": {"recipeFile": "recipes/my-own.yaml"}},
     {"pipeline": {"recipeFile": "recipes/phi4-mini-reasoning.yaml"}, "minio": {"enabled": False}, "externalS3": {"endpoint": "s3.example:443", "existingSecret": "s"}}],
    ids=["phi4-1Ti", "phi4-600G-teacher", "own-recipe-explicit-flavor", "phi4-external-s3"],
)
def test_recipe_checks_accept(chart, values):
    render(chart, values)


def test_chart_pods_request_ephemeral_storage(rendered):
    """Disk the chart's own pods write (emptyDirs) is requested, so the scheduler places them where it fits."""
    _, init, main = _job_containers(rendered["default"])
    for c in list(init.values()) + list(main.values()):
        assert c["resources"]["requests"]["ephemeral-storage"] == "2Gi"
    (dep,) = of_kind(rendered["teacher-on"], "Deployment")
    (vllm,) = dep["spec"]["template"]["spec"]["containers"]
    assert vllm["resources"]["requests"]["ephemeral-storage"] == "100Gi"  # teacher.cacheSize


# --- validation ---------------------------------------------------------------------------------------


def test_validate_values_lists_every_error(chart):
    bad = {
        "image": {"flavor": "cuda"},  # the default recipe is the cpu-demo
        "networkPolicy": {"enabled": True},  # offline: no API server to look up, none given
        "minio": {"enabled": False},  # no endpoint, no credentials, no CIDRs for the policy
        "schedule": {"enabled": True, "cron": "0 3 * * 0"},  # 5 fields
        "upload": {"enabled": False},  # the schedule needs the Job
        "teacher": {"enabled": True, "model": "", "gpus": 0},
        "secrets": {"hfToken": {"value": "x", "existingSecret": "y"}},
        "pipeline": {"overrides": ["learning_rate=1"]},
    }
    chart.validate_schema(bad)  # each value has the right type: only the cross-field rules catch these
    with pytest.raises(helm.HelmError) as err:
        render(chart, bad)
    msg = str(err.value)
    expected = [
        "externalS3.endpoint: required",
        "externalS3: set existingSecret, or both accessKey and secretKey",
        "networkPolicy.externalS3CIDRs",
        "schedule.enabled: needs upload.enabled=true",
        "schedule.cron: KFP cron has 6 fields (second minute hour day-of-month month day-of-week), got 5",
        "teacher.model: required",
        "teacher.gpus: must be >= 1",
        "secrets.hfToken: set value or existingSecret, not both",
        '"learning_rate=1" is not section.field=value',
        "image.flavor: cuda, but recipes/cpu-demo.yaml requests no GPUs",
        "networkPolicy.kubeAPIServerCIDRs: required",
    ]
    for e in expected:
        assert e in msg, f"missing {e!r} in:\n{msg}"
    assert f"{len(expected)} invalid value(s)" in msg


def test_schema_rejects_wrong_types_all_at_once(chart):
    with pytest.raises(helm.HelmError) as err:
        chart.validate_schema({"image": {"flavor": "rocm"}, "schedule": {"maxConcurrency": 0}, "minio": {"bucket": "Bad_Bucket"}, "typo": 1})
    msg = str(err.value)
    for part in ("/image/flavor", "/schedule/maxConcurrency", "/minio/bucket", "'typo' not allowed"):
        assert part in msg, msg


@pytest.mark.parametrize(
    "cron, ok",
    [("0 0 3 * * 0", True), ("*/30 * * * * ?", True), ("0 15 10 ? * MON-FRI", True), ("@daily", True),
     ("@every 6h", True), ("0 3 * * 0", False), ("0 0 0 3 * * 0", False), ("@fortnightly", False), ("0 0 3 * * $(rm)", False)],
)
def test_chart_and_cli_agree_on_cron(chart, cron, ok):
    cluster = pytest.importorskip("thinkforge.cluster")
    values = {"schedule": {"enabled": True, "cron": cron}}
    if ok:
        render(chart, values)
        assert cluster.validate_cron(cron) == cron
    else:
        with pytest.raises(helm.HelmError, match="schedule.cron"):
            render(chart, values)
        with pytest.raises(ValueError):
            cluster.validate_cron(cron)


def test_notes_give_next_steps(chart):
    text = notes(chart, SCENARIOS["schedule-on"])
    assert "thinkforge submit" in text and "0 30 2 * * 1" in text and f"job/{RELEASE}-thinkforge-upload" in text
