"""Serving the champion (issue 16): the chart's `serving.*` and src/thinkforge/serving.py.

The chart is rendered offline like tests/test_helm.py does (the Helm v4 library, `lookup` empty) and the
built-in kinds are validated with kubernetes-validate in strict mode against the same two Kubernetes
minors. kubernetes-validate has no schema for KServe's InferenceService, so it is checked two ways:

* against the InferenceService CRD's own OpenAPI schema (tests/data/kserve-inferenceservice-v1beta1
  .schema.json: the v1beta1 openAPIV3Schema of KServe's config/crd/full/serving.kserve.io_inferenceservices
  .yaml at the commit named in the file, with the predictor fields the chart does not render cut to
  names; see its "about"), made strict here: an object schema without additionalProperties or
  x-kubernetes-preserve-unknown-fields rejects unknown fields, as the API server's pruning would drop them;
* with the `kserve` SDK's types, when the SDK is importable. kserve 0.21 (PyPI) cannot go into the test
  venv: it pins pandas<3 and psutil<6, and `pip install --dry-run kserve` would downgrade pandas 3.1.1
  to 2.3.3 and psutil 7.2.2 to 5.9.8. Its generated model classes need only the kubernetes client, so
  the test loads them without the package's __init__ (which imports the model server: fastapi,
  cloudevents, grpc ...) from .venv-kserve, where `make test` installs them (`pip install --no-deps
  --target .venv-kserve kserve==0.21.0`), or wherever `kserve` is findable.

No cluster here: the promotion patch is sent through the real kubernetes client (so its content-type
choice and URL are what is tested) into a fake REST layer that answers as the API server documents
for PATCH (200 with the patched object; 403 Forbidden as a Status object).

To regenerate the schema file: take `spec.versions[v1beta1].schema.openAPIV3Schema` from the CRD, drop
`status`, replace the predictor properties outside the file's list and canary/explainer/transformer by
{"x-thinkforge-omitted": true}.
"""

from __future__ import annotations

import copy
import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (the Helm v4 library) is not installed")
kv = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

from thinkforge import serving  # noqa: E402
from thinkforge.registry import LocalBackend, RegistryError  # noqa: E402
from chart_helpers import deep_merge, upload_sets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "thinkforge"
CRD_SCHEMA = ROOT / "tests" / "data" / "kserve-inferenceservice-v1beta1.schema.json"
K8S_VERSIONS = ("1.32.0", "1.37.0")
NAMESPACE, RELEASE = "ml-team", "tf"
NAME = f"{RELEASE}-thinkforge-serving"
VERSION = "20260101T000000Z-abcd1234-0123456789ab"
VLLM = {"serving": {"enabled": True, "model": "phi4-math"}}
KSERVE = {"serving": {"enabled": True, "mode": "kserve", "model": "phi4-math", "champion": VERSION},
          "minio": {"auth": {"rootPassword": "MINIOPW-serving-dummy"}}}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as c:
        yield c


def render(chart, values: dict | None = None) -> list[dict]:
    out = chart.render(values=values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [d for p, t in sorted(out.items()) if not p.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]


def key(d: dict) -> tuple[str, str]:
    return d["kind"], d["metadata"]["name"]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.fixture(scope="module")
def default_docs(chart):
    return render(chart)


@pytest.fixture(scope="module")
def vllm_docs(chart):
    return render(chart, VLLM)


@pytest.fixture(scope="module")
def kserve_docs(chart):
    return render(chart, KSERVE)


# --- the chart ------------------------------------------------------------------------------------


def test_default_off_renders_nothing_new(default_docs, vllm_docs, kserve_docs):
    assert not [d for d in default_docs if "serving" in d["metadata"]["name"]
                or d["metadata"]["labels"].get("app.kubernetes.io/component") == "serving"]
    base = {key(d) for d in default_docs}
    assert {key(d) for d in vllm_docs} - base == {("Deployment", NAME), ("Service", NAME), ("Role", NAME), ("RoleBinding", NAME)}
    assert {key(d) for d in kserve_docs} - base == {("InferenceService", NAME), ("ServiceAccount", NAME),
                                                   ("Secret", f"{NAME}-s3"), ("Role", NAME), ("RoleBinding", NAME)}


def test_serving_changes_nothing_else(chart):
    """Serving on adds objects and changes none the chart already rendered (a fixed MinIO password:
    a random one differs per render, and so would the StatefulSet's checksum of it), but for the upload
    Job, which compiles the serving object's name into the pipeline (cluster.serving_target)."""
    pinned = {"minio": KSERVE["minio"]}
    old = {key(d): d for d in render(chart, pinned)}
    for values, target in ((VLLM, f"deployment/{NAME}"), (KSERVE, f"inferenceservice/{NAME}")):
        for d in render(chart, deep_merge(pinned, values)):
            if key(d) not in old:
                continue
            if d["kind"] == "Job" and "upload" in d["metadata"]["name"]:
                assert sorted(upload_sets([d])) == sorted([*upload_sets([old[key(d)]]),
                                                           f"cluster.serving_target={target}"])
            else:
                assert d == old[key(d)], key(d)
    assert not [s for s in upload_sets(list(old.values())) if s.startswith("cluster.serving_target")]


def test_the_pipeline_tells_only_the_publish_step_what_serves(vllm_docs, tmp_path):
    """The upload Job's own --set arguments compile a pipeline whose publish task (and no other) gets
    THINKFORGE_SERVING_TARGET, which notify_champion reads after a promotion."""
    from thinkforge.config import load_recipe, parse_set_flags
    from thinkforge.pipelines.training import compile_pipeline

    sets = [s for s in upload_sets(vllm_docs) if s.startswith("cluster.")]
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "smoke.yaml", parse_set_flags(sets))
    assert recipe.cluster.serving_target == f"deployment/{NAME}"
    _, platform = yaml.safe_load_all(compile_pipeline(recipe, tmp_path / "p.yaml", image="t:1").read_text())
    pipeline = next(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))
    envs = {name: {e["name"]: e.get("value") for e in ex["container"].get("env", [])}
            for name, ex in pipeline["deploymentSpec"]["executors"].items()}
    having = {name for name, env in envs.items() if "THINKFORGE_SERVING_TARGET" in env}
    assert having == {"exec-publish"} and envs["exec-publish"]["THINKFORGE_SERVING_TARGET"] == f"deployment/{NAME}"
    from thinkforge.config import ConfigError

    with pytest.raises(ConfigError, match="serving_target"):
        load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "smoke.yaml",
                    {"cluster.serving_target": "pod/x"})


def test_a_promotion_moves_serving_and_a_non_promotion_does_not(tmp_path, monkeypatch):
    """The publish step calls notify_champion with the new champion when, and only when, it promoted."""
    from registry_helpers import make_cfg, results, write_model

    from thinkforge.stages import publish as publish_mod

    calls = []
    monkeypatch.setattr(serving, "patch_serving", lambda api, kind, name, ns, version, uri: calls.append(
        (kind, name, ns, version)))
    monkeypatch.setattr(serving, "_api_client", lambda: None)
    monkeypatch.setenv("THINKFORGE_SERVING_TARGET", f"deployment/{NAME}")
    monkeypatch.setenv("THINKFORGE_SERVING_NAMESPACE", NAMESPACE)
    cfg = make_cfg("serve-test", name="phi4-math")
    backend = LocalBackend(tmp_path / "registry")

    def publish(value, weights):
        path = tmp_path / f"results-{value}.json"
        path.write_text(json.dumps(results(cfg, value)))
        return publish_mod.publish(cfg, write_model(tmp_path / "model", weights), {"final": path}, backend=backend)

    first = publish(0.5, b"\0" * 4096)
    assert first["promoted"] and first["serving"]["notified"] is True
    assert calls == [("deployment", NAME, NAMESPACE, first["version"])]
    second = publish(0.25, b"\1" * 4096)
    assert not second["promoted"] and "serving" not in second and len(calls) == 1


@pytest.mark.parametrize("values", [VLLM, KSERVE], ids=["vllm", "kserve"])
def test_lint_clean(values):
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2 and "icon is recommended" not in m["error"]]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("mode", ["vllm", "kserve"])
def test_rendered_objects_validate_strict(vllm_docs, kserve_docs, mode):
    docs = vllm_docs if mode == "vllm" else kserve_docs
    checked = 0
    for d in docs:
        if d["kind"] in ("InferenceService", "PodMonitor", "ServiceMonitor", "PrometheusRule"):
            continue  # InferenceService: test_inferenceservice_matches_the_crd_schema
        for version in K8S_VERSIONS:
            kv.validate(d, version, strict=True)
        checked += 1
        labels = d["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "thinkforge" and d["metadata"]["namespace"] == NAMESPACE
    assert checked > 5


def test_vllm_deployment_fetches_and_serves_the_champion(vllm_docs):
    (dep,) = [d for d in by_kind(vllm_docs, "Deployment") if d["metadata"]["name"] == NAME]
    tmpl = dep["spec"]["template"]
    assert tmpl["metadata"]["annotations"] == {serving.ANNOTATION: ""}  # `helm template`: no live object
    spec = tmpl["spec"]
    (init,) = spec["initContainers"]
    assert init["command"] == ["python", "-m", "thinkforge.serving"]
    assert init["args"] == ["fetch-champion", "--to=/models/champion", "--model=phi4-math", "--prefix=registry"]
    env = {e["name"]: e for e in init["env"]}
    assert env["THINKFORGE_S3_ENDPOINT"]["value"] == f"{RELEASE}-thinkforge-minio.{NAMESPACE}.svc:9000"
    assert env["THINKFORGE_S3_SECRET_KEY"]["valueFrom"]["secretKeyRef"] == {"name": f"{RELEASE}-thinkforge-s3", "key": "secretkey"}
    (c,) = spec["containers"]
    assert c["command"] == ["vllm", "serve"] and c["args"][0] == "/models/champion"
    assert "--served-model-name=champion" in c["args"]
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in c["volumeMounts"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["automountServiceAccountToken"] is False  # the serving pod never talks to the API
    (svc,) = [d for d in by_kind(vllm_docs, "Service") if d["metadata"]["name"] == NAME]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


def test_pinned_champion_goes_into_the_annotation(chart):
    dep = next(d for d in render(chart, deep_merge(VLLM, {"serving": {"champion": VERSION}}))
               if key(d) == ("Deployment", NAME))
    assert dep["spec"]["template"]["metadata"]["annotations"][serving.ANNOTATION] == VERSION


def _isvc(docs):
    (isvc,) = by_kind(docs, "InferenceService")
    return {k: v for k, v in isvc.items()}


def test_kserve_objects(kserve_docs):
    isvc = _isvc(kserve_docs)
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["metadata"]["annotations"][serving.ANNOTATION] == VERSION
    pred = isvc["spec"]["predictor"]
    model = pred["model"]
    assert model["modelFormat"] == {"name": "huggingface"}
    assert model["storageUri"] == f"s3://thinkforge/registry/phi4-math/versions/{VERSION}/model"
    assert "--backend=vllm" in model["args"] and "--model_name=champion" in model["args"]
    # KServe's S3 credentials: the predictor's ServiceAccount lists a Secret with AWS_* keys and
    # serving.kserve.io/s3-* annotations (KServe docs, "Deploy InferenceService with a saved model on S3")
    (sa,) = [d for d in by_kind(kserve_docs, "ServiceAccount") if d["metadata"]["name"] == NAME]
    assert pred["serviceAccountName"] == NAME and sa["secrets"] == [{"name": f"{NAME}-s3"}]
    (secret,) = [d for d in by_kind(kserve_docs, "Secret") if d["metadata"]["name"] == f"{NAME}-s3"]
    assert set(secret["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert secret["metadata"]["annotations"] == {
        "serving.kserve.io/s3-endpoint": f"{RELEASE}-thinkforge-minio.{NAMESPACE}.svc:9000",
        "serving.kserve.io/s3-usehttps": "0", "serving.kserve.io/s3-useanoncredential": "false"}
    # the same credentials as the chart's own S3 Secret
    (s3,) = [d for d in by_kind(kserve_docs, "Secret") if d["metadata"]["name"] == f"{RELEASE}-thinkforge-s3"]
    assert (secret["data"]["AWS_ACCESS_KEY_ID"], secret["data"]["AWS_SECRET_ACCESS_KEY"]) == (s3["data"]["accesskey"], s3["data"]["secretkey"])


def test_kserve_with_external_s3(chart):
    docs = render(chart, deep_merge(KSERVE, {"minio": {"enabled": False}, "externalS3": {
        "endpoint": "s3.eu-west-1.amazonaws.com:443", "region": "eu-west-1", "bucket": "models",
        "accessKey": "AK", "secretKey": "SK"}}))
    secret = next(d for d in docs if key(d) == ("Secret", f"{NAME}-s3"))
    assert secret["metadata"]["annotations"]["serving.kserve.io/s3-usehttps"] == "1"
    assert secret["metadata"]["annotations"]["serving.kserve.io/s3-region"] == "eu-west-1"
    assert _isvc(docs)["spec"]["predictor"]["model"]["storageUri"].startswith("s3://models/registry/phi4-math/")
    # credentials from your own Secret: KServe's Secret must be named, and is then not written
    own = {"serving": {**KSERVE["serving"], "kserve": {"s3Secret": "kserve-s3"}}, "minio": {"auth": {"existingSecret": "mine"}}}
    docs = render(chart, own)
    assert not [d for d in docs if key(d) == ("Secret", f"{NAME}-s3")]
    assert next(d for d in docs if key(d) == ("ServiceAccount", NAME))["secrets"] == [{"name": "kserve-s3"}]


def _strict(schema):
    """A CRD's structural schema, strict: unknown fields rejected, int-or-string understood."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    s = {k: _strict(v) for k, v in schema.items()}
    if s.pop("x-thinkforge-omitted", False):
        return {}
    if s.pop("x-kubernetes-int-or-string", False):
        s.pop("type", None)
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in s and "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
        s["additionalProperties"] = False
    return s


@pytest.fixture(scope="module")
def crd_validator():
    data = json.loads(CRD_SCHEMA.read_text())
    assert (data["group"], data["kind"], data["version"]) == ("serving.kserve.io", "InferenceService", "v1beta1")
    schema = _strict(data["schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked by kubernetes-validate below
    return jsonschema.Draft7Validator(schema)


def test_inferenceservice_matches_the_crd_schema(kserve_docs, crd_validator):
    isvc = _isvc(kserve_docs)
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in crd_validator.iter_errors(isvc)]
    assert not errors, errors
    # its metadata as a ConfigMap's (same ObjectMeta), strictly
    kv.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": isvc["metadata"]}, K8S_VERSIONS[-1], strict=True)
    # guard: the strict schema rejects a typo'd field
    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["model"]["storageURI"] = "s3://x"
    assert list(crd_validator.iter_errors(bad))


def _kserve_models():
    # `make test` puts the SDK's files in .venv-kserve (pip install --no-deps --target); else wherever it is findable
    spec = importlib.machinery.PathFinder.find_spec("kserve", [str(ROOT / ".venv-kserve")]) or \
        importlib.util.find_spec("kserve")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the kserve SDK is not findable (kserve 0.21 would downgrade pandas/psutil in this venv)")
    if "kserve" not in sys.modules:  # the package __init__ imports the model server; the models need none of it
        pkg = types.ModuleType("kserve")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["kserve"] = pkg
    from kserve.models.v1beta1_inference_service import V1beta1InferenceService
    from kserve.models.v1beta1_inference_service_spec import V1beta1InferenceServiceSpec
    from kserve.models.v1beta1_model_format import V1beta1ModelFormat
    from kserve.models.v1beta1_model_spec import V1beta1ModelSpec
    from kserve.models.v1beta1_predictor_spec import V1beta1PredictorSpec

    return V1beta1InferenceService, V1beta1InferenceServiceSpec, V1beta1PredictorSpec, V1beta1ModelSpec, V1beta1ModelFormat


def test_inferenceservice_matches_the_kserve_sdk_types(kserve_docs):
    """The InferenceService built with the kserve SDK's types from the same values equals the chart's."""
    ISVC, Spec, Predictor, Model, Format = _kserve_models()
    from kubernetes import client as k8s

    rendered = _isvc(kserve_docs)
    pred, model = rendered["spec"]["predictor"], rendered["spec"]["predictor"]["model"]
    expected = ISVC(
        api_version="serving.kserve.io/v1beta1", kind="InferenceService",
        metadata=k8s.V1ObjectMeta(name=NAME, namespace=NAMESPACE, labels=rendered["metadata"]["labels"],
                                  annotations={serving.ANNOTATION: VERSION}),
        spec=Spec(predictor=Predictor(
            service_account_name=NAME, min_replicas=1, max_replicas=1,
            security_context=k8s.V1PodSecurityContext(run_as_non_root=True, run_as_user=10001, run_as_group=10001,
                                                      fs_group=10001, seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")),
            tolerations=[k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
            model=Model(
                name=None, model_format=Format(name="huggingface"),
                storage_uri=f"s3://thinkforge/registry/phi4-math/versions/{VERSION}/model",
                args=["--model_name=champion", "--backend=vllm", "--tensor-parallel-size=1", "--max-model-len=8192",
                      "--gpu-memory-utilization=0.9"],
                env=[k8s.V1EnvVar(name="HF_HUB_OFFLINE", value="1"), k8s.V1EnvVar(name="VLLM_NO_USAGE_STATS", value="1")],
                resources=k8s.V1ResourceRequirements(
                    requests={"cpu": "2", "memory": "16Gi", "ephemeral-storage": "50Gi", "nvidia.com/gpu": 1},
                    limits={"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 1}),
                security_context=k8s.V1SecurityContext(allow_privilege_escalation=False, read_only_root_filesystem=True,
                                                       run_as_non_root=True, capabilities=k8s.V1Capabilities(drop=["ALL"]))),
        )),
    )
    assert k8s.ApiClient().sanitize_for_serialization(expected) == rendered
    # every field the chart renders is one the SDK's types know (snake_case attribute_map round trip)
    assert set(pred) <= set(Predictor.attribute_map.values()) and set(model) <= set(Model.attribute_map.values())


def test_values_schema_rejects_bad_modes(chart):
    chart.validate_schema(VLLM)
    chart.validate_schema(KSERVE)
    for bad in ({"serving": {"mode": "triton"}}, {"serving": {"enabled": "yes"}}, {"serving": {"model": "../x"}},
                {"serving": {"colour": "red"}}, {"serving": {"kserve": {"maxReplicas": 0}}}):
        with pytest.raises(Exception):
            chart.validate_schema(bad)


@pytest.mark.parametrize("values, message", [
    ({"serving": {"enabled": True}}, "serving.model"),
    ({"serving": {"enabled": True, "mode": "kserve", "model": "m"}, "minio": {"auth": {"rootPassword": "p"}}}, "serving.champion"),
    ({"serving": {"enabled": True, "mode": "kserve", "model": "m", "champion": VERSION}}, "minio.auth.rootPassword"),
    ({"serving": {"enabled": True, "mode": "kserve", "model": "m", "champion": VERSION},
      "minio": {"auth": {"existingSecret": "mine"}}}, "serving.kserve.s3Secret"),
])
def test_render_fails_with_what_to_set(chart, values, message):
    with pytest.raises(Exception, match=message.replace(".", r"\.")):
        render(chart, values)


@pytest.mark.parametrize("mode", ["vllm", "kserve"])
def test_rbac_is_patch_on_the_one_serving_object(vllm_docs, kserve_docs, mode):
    docs = vllm_docs if mode == "vllm" else kserve_docs
    (role,) = [d for d in by_kind(docs, "Role") if d["metadata"]["name"] == NAME]
    group, resource = ("apps", "deployments") if mode == "vllm" else ("serving.kserve.io", "inferenceservices")
    assert role["rules"] == [{"apiGroups": [group], "resources": [resource], "resourceNames": [NAME], "verbs": ["patch"]}]
    (rb,) = [d for d in by_kind(docs, "RoleBinding") if d["metadata"]["name"] == NAME]
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME}
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": NAMESPACE}]
    # the patched object exists under that name, of that kind
    assert [d for d in docs if key(d) == ({"vllm": "Deployment", "kserve": "InferenceService"}[mode], NAME)]


def test_rbac_follows_the_switches(chart):
    assert not [d for d in render(chart, deep_merge(VLLM, {"rbac": {"create": False}})) if d["kind"] in ("Role", "RoleBinding")]
    rb = next(d for d in render(chart, deep_merge(VLLM, {"kfp": {"multiUser": True}})) if key(d) == ("RoleBinding", NAME))
    assert rb["subjects"][0]["name"] == "default-editor"


# --- fetch-champion -------------------------------------------------------------------------------


def _registry(tmp_path: Path, version: str = VERSION, champion: bool = True) -> Path:
    root = tmp_path / "reg"
    backend = LocalBackend(root)
    model = tmp_path / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    backend.upload_dir(model, f"registry/phi4-math/versions/{version}/model")
    backend.put_bytes(f"registry/phi4-math/versions/{version}/manifest.json", b'{"version": "%s"}' % version.encode())
    if champion:
        backend.put_bytes("registry/phi4-math/champion.json", json.dumps({"name": "phi4-math", "version": version}).encode())
    return root


def test_fetch_champion_downloads_the_verified_model(tmp_path):
    root = _registry(tmp_path)
    out = serving.fetch_champion(tmp_path / "models" / "champion", model="phi4-math", backend=LocalBackend(root))
    dest = Path(out["path"])
    assert out["version"] == VERSION and (dest / "config.json").read_text() == '{"model_type": "llama"}'
    assert json.loads(Path(f"{dest}.champion.json").read_text())["version"] == VERSION
    # the command line, as the init container runs it (a local registry: no S3 endpoint here)
    assert serving.main(["fetch-champion", "--to", str(tmp_path / "cli"), "--model", "phi4-math",
                         "--local-dir", str(root)]) == 0
    assert (tmp_path / "cli" / "model.safetensors").stat().st_size == 64


def test_fetch_champion_refuses_a_corrupt_or_missing_champion(tmp_path, monkeypatch):
    monkeypatch.delenv("THINKFORGE_S3_ENDPOINT", raising=False)
    root = _registry(tmp_path, champion=False)
    with pytest.raises(RegistryError, match="no champion yet"):
        serving.fetch_champion(tmp_path / "x", model="phi4-math", backend=LocalBackend(root))
    root = _registry(tmp_path / "b")
    (root / "registry/phi4-math/versions" / VERSION / "model/model.safetensors").write_bytes(b"\1" * 64)
    with pytest.raises(RegistryError, match="does not match its manifest"):
        serving.fetch_champion(tmp_path / "y", model="phi4-math", backend=LocalBackend(root))
    assert not (tmp_path / "y").exists()  # nothing half-downloaded where vLLM would load it
    assert serving.main(["fetch-champion", "--to", str(tmp_path / "z"), "--model", "phi4-math"]) == 1  # no registry


# --- notify_champion: the promotion patch, against a fake API server --------------------------------


class FakeResponse:
    """What urllib3 hands the kubernetes client (RESTResponse wraps it)."""

    def __init__(self, status: int, body: dict):
        self.status, self.reason = status, {200: "OK", 403: "Forbidden"}[status]
        self.data = json.dumps(body).encode()

    def getheaders(self):
        return {"Content-Type": "application/json"}

    def getheader(self, name, default=None):
        return self.getheaders().get(name, default)


class FakeAPIServer:
    """Answers PATCH like the API server: 200 and the patched object (strategic merge / JSON merge of
    the maps this test patches), or 403 Forbidden with a Status object for any other object."""

    def __init__(self, objects: dict[str, dict], allowed: set[str]):
        self.objects, self.allowed, self.requests = objects, allowed, []

    def request(self, method, url, query_params=None, headers=None, body=None, **kw):
        path = "/" + url.split("://", 1)[1].split("/", 1)[1]
        self.requests.append({"method": method, "path": path, "content_type": headers.get("Content-Type"), "body": body})
        if method != "PATCH" or path not in self.allowed:
            return FakeResponse(403, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden",
                                      "message": f"cannot patch {path}", "code": 403})
        obj = self.objects[path]

        def merge(a, b):
            for k, v in b.items():
                a[k] = merge(a.get(k, {}), v) if isinstance(v, dict) else v
            return a

        merge(obj, body)
        obj["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1
        return FakeResponse(200, obj)


def fake_client(server: FakeAPIServer):
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = "https://kubernetes.default.svc"
    cfg.api_key = {"authorization": "Bearer t"}
    api = client.ApiClient(cfg)
    from kubernetes.client.rest import RESTResponse

    api.rest_client.request = lambda method, url, **kw: _wrap(server.request(method, url, **kw))

    def _wrap(r):
        resp = RESTResponse(r)
        if not 200 <= resp.status <= 299:
            from kubernetes.client.exceptions import ApiException
            raise ApiException(http_resp=resp)
        return resp

    return api


def _recipe(**over):
    from thinkforge.config import Recipe

    cfg = Recipe()
    return cfg.model_copy(update={"registry": cfg.registry.model_copy(update={"name": "phi4-math", **over})})


def test_notify_patches_the_deployment_template_annotation(vllm_docs):
    dep = copy.deepcopy(next(d for d in vllm_docs if key(d) == ("Deployment", NAME)))
    path = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{NAME}"
    server = FakeAPIServer({path: dep}, {path})
    out = serving.notify_champion(_recipe(), VERSION, target=f"deployment/{NAME}", namespace=NAMESPACE,
                                  api_client=fake_client(server))
    assert out["notified"] is True, out
    (req,) = server.requests
    assert req["method"] == "PATCH" and req["path"] == path
    assert req["content_type"] == "application/strategic-merge-patch+json"
    assert req["body"] == {"spec": {"template": {"metadata": {"annotations": {"thinkforge.dev/champion": VERSION}}}}}
    assert dep["spec"]["template"]["metadata"]["annotations"][serving.ANNOTATION] == VERSION  # a new rollout


def test_notify_patches_the_inferenceservice_storage_uri(kserve_docs, monkeypatch):
    monkeypatch.delenv("THINKFORGE_S3_BUCKET", raising=False)
    isvc = copy.deepcopy(_isvc(kserve_docs))
    path = f"/apis/serving.kserve.io/v1beta1/namespaces/{NAMESPACE}/inferenceservices/{NAME}"
    server = FakeAPIServer({path: isvc}, {path})
    new = "20260201T000000Z-ffff0000-aaaaaaaaaaaa"
    monkeypatch.setenv("THINKFORGE_SERVING_TARGET", f"inferenceservice/{NAME}")
    monkeypatch.setenv("THINKFORGE_SERVING_NAMESPACE", NAMESPACE)
    out = serving.notify_champion(_recipe(), new, api_client=fake_client(server))
    assert out["notified"] is True, out
    (req,) = server.requests
    assert req["method"] == "PATCH" and req["path"] == path and req["content_type"] == "application/merge-patch+json"
    uri = f"s3://thinkforge/registry/phi4-math/versions/{new}/model"
    assert req["body"] == {"metadata": {"annotations": {"thinkforge.dev/champion": new}},
                           "spec": {"predictor": {"model": {"storageUri": uri}}}}
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == uri and out["storageUri"] == uri


def test_notify_never_fails_the_promotion(monkeypatch):
    monkeypatch.delenv("THINKFORGE_SERVING_TARGET", raising=False)
    assert serving.notify_champion(_recipe(), VERSION)["notified"] is False  # no target: nothing to do
    server = FakeAPIServer({}, set())  # RBAC denies: 403
    out = serving.notify_champion(_recipe(), VERSION, target="deployment/other", namespace=NAMESPACE,
                                  api_client=fake_client(server))
    assert out["notified"] is False and "Forbidden" in out["reason"]
    assert serving.notify_champion(_recipe(), VERSION, target="pod/x", namespace=NAMESPACE)["notified"] is False
