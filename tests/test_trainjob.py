"""Multi-node stages as Kubeflow Trainer jobs (thinkforge.trainjob).

No Kubernetes cluster can run here. The manifests are checked field by field, the per-node shell line
is executed by bash with the operators' environment variables, and submit/follow/log streaming/failure
and retry handling run with the real `kubernetes` client against a fake API server on loopback
(`FakeKube`). The fake is built from the published types, not from thinkforge's code:

- the TrainJob CRD it serves declares, per Kubeflow Trainer release, the `spec` fields of that release's
  `pkg/apis/trainer/v1alpha1/trainjob_types.go` (json tags at tags v2.0.0, v2.1.0, v2.2.0), and for
  v2.3 the fields of the published Python models (`kubeflow-trainer-api` 2.3.0); it serves the same
  schema as an OpenAPI v3 discovery document;
- it prunes fields the served schema does not declare, as an API server's structural pruning does
  (silently: the object is stored without them), and answers 422 to a v2.2+ TrainJob body that does
  not round-trip through the published `TrainerV1alpha1TrainJob` model;
- everything else is recorded API behaviour: API group discovery, created objects with a uid, status
  conditions over time, pod reads, pod lists and logs, merge patches, foreground deletes, 404/403/409
  Status bodies.

The stage-level tests play a KFP task pod: its environment holds only what KFP and the pipeline's
platform config give it (S3 credentials from the Secret, KFP's downward-API `KFP_POD_NAME`,
`KFP_POD_UID`, `NAMESPACE`), never `THINKFORGE_IMAGE`, secret names or a checkpoint prefix. The
last test also plays the job's pod: it runs the worker command of the submitted manifest in a fresh
process whose environment is exactly the manifest's (secretKeyRefs resolved from a Secret, as the
kubelet does), against a real S3 server on loopback.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from thinkforge import trainjob as tj
from thinkforge.trainjob import (
    JobSpec,
    Owner,
    TrainerAPI,
    TrainJobError,
    TrainJobFailed,
    TrainJobTimeout,
    api_client,
    build_pytorchjob,
    build_trainjob,
    follow,
    job_name,
    job_state,
    node_script,
    submit,
    trainer_api,
)

ROOT = Path(__file__).resolve().parents[1]

GROUPS_TRAINER = {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
    {"name": "apps", "versions": [{"groupVersion": "apps/v1", "version": "v1"}],
     "preferredVersion": {"groupVersion": "apps/v1", "version": "v1"}},
    {"name": "jobset.x-k8s.io", "versions": [{"groupVersion": "jobset.x-k8s.io/v1alpha2", "version": "v1alpha2"}],
     "preferredVersion": {"groupVersion": "jobset.x-k8s.io/v1alpha2", "version": "v1alpha2"}},
    {"name": "trainer.kubeflow.org", "versions": [{"groupVersion": "trainer.kubeflow.org/v1alpha1",
                                                   "version": "v1alpha1"}],
     "preferredVersion": {"groupVersion": "trainer.kubeflow.org/v1alpha1", "version": "v1alpha1"}},
]}
GROUPS_OPERATOR = {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
    {"name": "kubeflow.org", "versions": [{"groupVersion": "kubeflow.org/v1", "version": "v1"}],
     "preferredVersion": {"groupVersion": "kubeflow.org/v1", "version": "v1"}},
]}
GROUPS_NONE = {"kind": "APIGroupList", "apiVersion": "v1", "groups": GROUPS_TRAINER["groups"][:1]}

# TrainJob status conditions as Kubeflow Trainer v2 reports them
COMPLETE = {"conditions": [
    {"type": "Complete", "status": "True", "reason": "JobSetCompleted", "message": "jobset completed successfully",
     "lastTransitionTime": "2026-01-01T00:10:00Z"}]}
FAILED = {"conditions": [
    {"type": "Failed", "status": "True", "reason": "FailedJobs",
     "message": "jobset failed: job tf-run-sft-abc-node-0 failed: BackoffLimitExceeded",
     "lastTransitionTime": "2026-01-01T00:10:00Z"}]}
PT_SUCCEEDED = {"conditions": [{"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded",
                                "message": "PyTorchJob is successfully completed."}]}
PT_FAILED = {"conditions": [
    {"type": "Created", "status": "True", "reason": "PyTorchJobCreated", "message": "created"},
    {"type": "Running", "status": "False", "reason": "PyTorchJobRunning", "message": "running"},
    {"type": "Failed", "status": "True", "reason": "PyTorchJobFailed",
     "message": "PyTorchJob default/tf-run-rl-abc is failed because 1 Master replica(s) failed."}]}


# ----------------------------------------------------------------- the published types, per release


def _published_v23_spec_fields() -> list[str]:
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJobSpec

    return sorted(f.alias or n for n, f in TrainerV1alpha1TrainJobSpec.model_fields.items())


# TrainJobSpec json tags of each release's trainjob_types.go
RELEASE_SPEC_FIELDS = {
    "v2.0": ["runtimeRef", "initializer", "trainer", "labels", "annotations", "podSpecOverrides", "suspend",
             "managedBy"],
    "v2.1": ["runtimeRef", "initializer", "trainer", "labels", "annotations", "podTemplateOverrides", "suspend",
             "managedBy"],
    "v2.2": ["runtimeRef", "initializer", "trainer", "runtimePatches", "suspend", "activeDeadlineSeconds", "managedBy"],
    "v2.3": _published_v23_spec_fields(),
}
# v2.0 PodSpecOverride, v2.1 PodTemplateOverride and its PodTemplateSpecOverride
ENTRY_FIELDS = {
    "podSpecOverrides": {"targetJobs", "serviceAccountName", "nodeSelector", "tolerations", "volumes",
                         "initContainers", "containers", "schedulingGates"},
    "podTemplateOverrides": {"targetJobs", "metadata", "spec"},
}
V21_POD_SPEC_FIELDS = {"serviceAccountName", "nodeSelector", "affinity", "tolerations", "volumes", "initContainers",
                       "containers", "schedulingGates", "imagePullSecrets"}
OVERRIDE_OF = {"v2.0": "podSpecOverrides", "v2.1": "podTemplateOverrides", "v2.2": "runtimePatches",
               "v2.3": "runtimePatches"}


def served_crd(release: str) -> dict:
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "trainjobs.trainer.kubeflow.org"},
            "spec": {"group": "trainer.kubeflow.org", "scope": "Namespaced",
                     "names": {"kind": "TrainJob", "plural": "trainjobs", "singular": "trainjob"},
                     "versions": [{"name": "v1alpha1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                         "type": "object", "properties": {
                             "apiVersion": {"type": "string"}, "kind": {"type": "string"},
                             "metadata": {"type": "object"}, "status": {"type": "object"},
                             "spec": {"type": "object",
                                      "properties": {f: {} for f in RELEASE_SPEC_FIELDS[release]}}}}}}]}}


def served_openapi(release: str) -> dict:
    meta = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes CRD Swagger", "version": "v0.1.0"}, "components": {
        "schemas": {
            "org.kubeflow.trainer.v1alpha1.TrainJob": {
                "type": "object",
                "x-kubernetes-group-version-kind": [{"group": "trainer.kubeflow.org", "kind": "TrainJob",
                                                     "version": "v1alpha1"}],
                "properties": {"metadata": {"allOf": [{"$ref": f"#/components/schemas/{meta}"}]},
                               "spec": {"allOf": [
                                   {"$ref": "#/components/schemas/org.kubeflow.trainer.v1alpha1.Spec"}]}}},
            "org.kubeflow.trainer.v1alpha1.Spec": {
                "type": "object", "properties": {f: {} for f in RELEASE_SPEC_FIELDS[release]}},
            meta: {"type": "object"},
        }}}


def prune(body: dict, release: str) -> dict:
    """What the API server stores of a TrainJob: fields the release's schema does not declare are dropped."""
    spec = {k: v for k, v in body.get("spec", {}).items() if k in RELEASE_SPEC_FIELDS[release]}
    for key, allowed in ENTRY_FIELDS.items():
        if key in spec:
            spec[key] = [{k: v for k, v in entry.items() if k in allowed} for entry in spec[key]]
    for entry in spec.get("podTemplateOverrides", []):
        if "spec" in entry:
            entry["spec"] = {k: v for k, v in entry["spec"].items() if k in V21_POD_SPEC_FIELDS}
    return {**body, "spec": spec}


def typed_roundtrip(body: dict) -> dict:
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    return TrainerV1alpha1TrainJob.from_dict(body).to_dict()


def status_body(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason,
            "code": code}


def launcher(name: str, uid: str, *, run_id: str = "", image: str = "ghcr.io/thinkforge/thinkforge:0.1.0-cuda",
             namespace: str = "team-a") -> dict:
    """A KFP v2 task pod as the API returns it (Argo's wait container beside KFP's main)."""
    labels = {"workflows.argoproj.io/workflow": "thinkforge-smoke-x7k2p", "pipelines.kubeflow.org/v2_component": "true"}
    if run_id:
        labels["pipeline/runid"] = run_id
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": uid, "labels": labels},
            "spec": {"containers": [{"name": "wait", "image": "quay.io/argoproj/argoexec:v3.5.14"},
                                    {"name": "main", "image": image}]},
            "status": {"phase": "Running"}}


class FakeKube:
    """A fake API server on loopback (see the module docstring). A created job is served with
    ``statuses`` one per GET (the last repeats); ``jobs`` holds jobs that exist before
    (name -> (object, statuses)); ``launcher_pods`` the pods a ``GET pods/<name>`` finds. With
    ``on_create`` set, a created job reads as running until that callback (the job's pod) returns, and
    as failed if it raised. ``schema_access``: ``crd`` (the CRD is readable), ``openapi`` (the CRD
    read is forbidden, the OpenAPI v3 document is served), ``none`` (neither)."""

    def __init__(self, groups, statuses, pods=None, logs=None, create_error=None, on_create=None, *,
                 release="v2.3", schema_access="crd", jobs=None, launcher_pods=None, on_pod_list=None):
        self.groups, self.statuses, self.pods, self.logs = groups, list(statuses), pods or [], logs or {}
        self.create_error, self.on_create, self.on_pod_list = create_error, on_create, on_pod_list
        self.release, self.schema_access = release, schema_access
        self.jobs = {n: {"obj": o, "statuses": list(s), "gets": 0} for n, (o, s) in (jobs or {}).items()}
        self.launcher_pods = launcher_pods or {}
        self.requests: list[tuple[str, str]] = []
        self.bodies: list[tuple[str, str, object]] = []
        self.created: dict | None = None
        self.pod_error: str | None = None
        self.hold = threading.Event()  # when on_create is set: "running" until the fake pod finishes
        self.log_calls: dict[str, int] = {}
        self.selectors: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body, ctype="application/json"):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self):
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n)) if n else None

            def _not_found(self, path):
                return self._send(404, status_body(404, "NotFound", f"{path} not found"))

            def do_GET(self):
                u = urlparse(self.path)
                fake.requests.append(("GET", self.path))
                parts = u.path.strip("/").split("/")
                if u.path.rstrip("/") == "/apis":
                    return self._send(200, fake.groups)
                if u.path.startswith("/apis/apiextensions.k8s.io/"):
                    if fake.schema_access != "crd":
                        return self._send(403, status_body(403, "Forbidden", 'customresourcedefinitions.apiextensions'
                                                           '.k8s.io "trainjobs.trainer.kubeflow.org" is forbidden'))
                    if parts[-1] == "trainjobs.trainer.kubeflow.org" and fake.release:
                        return self._send(200, served_crd(fake.release))
                    return self._not_found(u.path)
                if u.path.startswith("/openapi/v3/"):
                    if fake.schema_access in ("crd", "openapi") and fake.release:
                        return self._send(200, served_openapi(fake.release))
                    return self._not_found(u.path)
                if u.path.endswith("/log"):
                    name = parts[-2]
                    seq = fake.logs.get(name, [""])
                    i = min(fake.log_calls.get(name, 0), len(seq) - 1)
                    fake.log_calls[name] = fake.log_calls.get(name, 0) + 1
                    return self._send(200, seq[i].encode(), "text/plain")
                if u.path.endswith("/pods"):
                    sel = parse_qs(u.query).get("labelSelector", [""])[0]
                    items = [{"metadata": {"name": n, "namespace": parts[3], "labels": {}},
                              "status": {"phase": ph}} for n, ph in fake.pods]
                    fake.selectors.append(sel)
                    if fake.on_pod_list is not None:
                        fake.on_pod_list()
                    return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
                if len(parts) == 6 and parts[:2] == ["api", "v1"] and parts[4] == "pods":
                    pod = fake.launcher_pods.get(parts[5])
                    return self._send(200, pod) if pod and pod["metadata"]["namespace"] == parts[3] \
                        else self._not_found(u.path)
                job = fake.jobs.get(parts[-1])
                if job is not None:
                    if job["obj"] is fake.created and fake.on_create is not None:
                        if not fake.hold.is_set():
                            return self._send(200, {**job["obj"], "status": {}})
                        if fake.pod_error is not None:
                            return self._send(200, {**job["obj"], "status": {"conditions": [
                                {"type": "Failed", "status": "True", "reason": "PodFailed",
                                 "message": fake.pod_error[-400:]}]}})
                    i = min(job["gets"], len(job["statuses"]) - 1)
                    job["gets"] += 1
                    return self._send(200, {**job["obj"], "status": job["statuses"][i]})
                return self._not_found(u.path)

            def do_POST(self):
                body = self._body()
                fake.requests.append(("POST", self.path))
                fake.bodies.append(("POST", self.path, body))
                if fake.create_error:
                    code, msg = fake.create_error
                    return self._send(code, status_body(code, "Forbidden", msg))
                name = body["metadata"]["name"]
                if name in fake.jobs:
                    return self._send(409, status_body(409, "AlreadyExists", f'"{name}" already exists'))
                if body["kind"] == "TrainJob" and fake.release:
                    body = prune(body, fake.release)
                    if OVERRIDE_OF[fake.release] == "runtimePatches":
                        try:
                            assert typed_roundtrip(body) == body, "fields the published model does not know"
                        except Exception as e:  # noqa: BLE001 - the API server's answer to an invalid object
                            return self._send(422, status_body(422, "Invalid", f"TrainJob is invalid: {e}"))
                fake.created = {**body, "metadata": {**body["metadata"], "uid": "0b6c2c9e-1", "resourceVersion": "1"}}
                fake.jobs[name] = {"obj": fake.created, "statuses": fake.statuses, "gets": 0}
                if fake.on_create is not None:
                    def pod(created=body):
                        try:
                            fake.on_create(created)
                        except BaseException:  # noqa: BLE001 - the pod failed; the job reports it
                            fake.pod_error = traceback.format_exc()
                        finally:
                            fake.hold.set()

                    threading.Thread(target=pod, daemon=True).start()
                return self._send(201, fake.created)

            def do_PATCH(self):
                body = self._body()
                fake.requests.append(("PATCH", self.path))
                fake.bodies.append(("PATCH", self.path, (self.headers.get("Content-Type"), body)))
                job = fake.jobs.get(urlparse(self.path).path.strip("/").split("/")[-1])
                if job is None:
                    return self._not_found(self.path)
                job["obj"] = {**job["obj"], "metadata": {**job["obj"]["metadata"], **body.get("metadata", {})}}
                return self._send(200, job["obj"])

            def do_DELETE(self):
                body = self._body()
                fake.requests.append(("DELETE", self.path))
                fake.bodies.append(("DELETE", self.path, body))
                if fake.jobs.pop(urlparse(self.path).path.strip("/").split("/")[-1], None) is None:
                    return self._not_found(self.path)
                return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.host = f"http://127.0.0.1:{self.server.server_address[1]}"

    def methods(self) -> list[str]:
        return [m for m, p in self.requests if "/trainjobs" in p or "/pytorchjobs" in p]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def kube():
    made = []

    def make(*a, **kw):
        made.append(FakeKube(*a, **kw))
        return made[-1]

    yield make
    for k in made:
        k.close()


def spec(**kw) -> JobSpec:
    base = dict(name="tf-smoke-sft-abc123", namespace="team-a", image="ghcr.io/thinkforge/thinkforge:0.1.0-cuda",
                stage="sft", nodes=3, procs_per_node=8, gpus_per_node=8,
                args=["--config", "s3://b/run/config.json", "--model", "s3://b/run/input-model"],
                deepspeed_config="/app/recipes/deepspeed/zero3.json",
                secret_env={"THINKFORGE_S3_ACCESS_KEY": ("s3-creds", "accesskey")},
                node_selector={"pool": "h100"}, tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                shm_size="16Gi")
    base.update(kw)
    return JobSpec(**base)


# What Pod Security "restricted" asks of the job's pods (they hold the S3 credentials and the HF token),
# written out here rather than imported, so a change in thinkforge.trainjob cannot move the target.
RESTRICTED_POD = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
                        "seccompProfile": {"type": "RuntimeDefault"}}
SHM_MOUNT = [{"name": "dshm", "mountPath": "/dev/shm"}]


def trainjob_pod(body: dict, field: str) -> tuple[dict, dict]:
    """(pod spec settings, pod metadata) of the trainer nodes, from the override field ``field``."""
    s = body["spec"]
    if field == "podSpecOverrides":
        entry = s["podSpecOverrides"][0]
        assert entry["targetJobs"] == [{"name": "node"}]
        return {k: v for k, v in entry.items() if k != "targetJobs"}, {}
    if field == "podTemplateOverrides":
        entry = s["podTemplateOverrides"][0]
        assert entry["targetJobs"] == [{"name": "node"}]
        return entry.get("spec", {}), entry.get("metadata", {})
    (patch,) = s["runtimePatches"]
    assert patch["manager"] == "thinkforge.io/launcher"
    (rj,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rj["name"] == "node"
    pod = rj["template"]["spec"]["template"]
    return pod.get("spec", {}), pod.get("metadata", {})


# ---------------------------------------------------------------------------------------- manifests


def test_trainjob_manifest_from_the_published_models():
    m = build_trainjob(spec(owner=Owner("tf-sft-pod", "4c1b-uid"), active_deadline_s=7200))
    assert typed_roundtrip(m) == m  # every field is one kubeflow-trainer-api's TrainJob knows, typed as it says
    assert m["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and m["kind"] == "TrainJob"
    assert m["metadata"]["labels"] == {"app.kubernetes.io/part-of": "thinkforge", "thinkforge/stage": "sft"}
    assert m["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod", "name": "tf-sft-pod",
                                                 "uid": "4c1b-uid"}]
    assert m["spec"]["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                       "kind": "ClusterTrainingRuntime"}
    assert m["spec"]["activeDeadlineSeconds"] == 7200
    tr = m["spec"]["trainer"]
    assert tr["image"] == "ghcr.io/thinkforge/thinkforge:0.1.0-cuda"
    assert tr["numNodes"] == 3 and tr["numProcPerNode"] == 8
    assert tr["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": "8"}}
    assert tr["command"][:2] == ["bash", "-c"] and tr["command"][2] == node_script(spec())
    env = {e["name"]: e for e in tr["env"]}
    assert env["THINKFORGE_LAUNCHED"]["value"] == "1"
    assert env["THINKFORGE_DEEPSPEED_CONFIG"]["value"] == "/app/recipes/deepspeed/zero3.json"
    assert env["THINKFORGE_S3_ACCESS_KEY"] == {"name": "THINKFORGE_S3_ACCESS_KEY",
                                               "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "accesskey"}}}
    pod, meta = trainjob_pod(m, "runtimePatches")
    assert pod["nodeSelector"] == {"pool": "h100"} and pod["tolerations"][0]["key"] == "gpu"
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}]
    assert pod["containers"] == [{"name": "node", "volumeMounts": SHM_MOUNT, "securityContext": RESTRICTED_CONTAINER}]
    assert pod["securityContext"] == RESTRICTED_POD
    assert meta == {"annotations": {"sidecar.istio.io/inject": "false"}}
    assert "labels" not in meta  # the chart's egress NetworkPolicy must not select the nodes (NCCL between pods)
    # without /dev/shm the trainer container is still patched, for its security context
    pod, _ = trainjob_pod(build_trainjob(spec(shm_size="")), "runtimePatches")
    assert pod["containers"] == [{"name": "node", "securityContext": RESTRICTED_CONTAINER}] and "volumes" not in pod


def test_older_releases_cannot_carry_a_security_context_and_say_so(caplog):
    """Trainer v2.0 PodSpecOverride / v2.1 PodTemplateSpecOverride (and their ContainerOverride) declare no
    securityContext: none is sent (the API server would prune it silently), and a warning names the runtime."""
    for served in (TrainerAPI("podSpecOverrides", False, "CRD v2.0"), TrainerAPI("podTemplateOverrides", False, "CRD v2.1")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="thinkforge.trainjob"):
            body = build_trainjob(spec(), served)
        assert "securityContext" not in json.dumps(body)
        assert any("carries no securityContext" in r.getMessage() and "torch-distributed" in r.getMessage()
                   for r in caplog.records), caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="thinkforge.trainjob"):
        build_trainjob(spec(), TrainerAPI("runtimePatches", True, "CRD v2.2"))
    assert not caplog.records


def test_older_releases_overrides_as_they_define_them():
    s = spec(active_deadline_s=3600, tolerations=[{"key": "spot", "operator": "Equal", "value": "yes",
                                                   "effect": "NoExecute", "toleration_seconds": 120}])
    v20 = build_trainjob(s, TrainerAPI("podSpecOverrides", False))
    v21 = build_trainjob(s, TrainerAPI("podTemplateOverrides", False))
    for body, f in ((v20, "podSpecOverrides"), (v21, "podTemplateOverrides")):
        assert set(body["spec"]) == {"runtimeRef", "trainer", f}  # no runtimePatches, no activeDeadlineSeconds
        pod, _ = trainjob_pod(body, f)
        assert pod["tolerations"] == [{"key": "spot", "operator": "Equal", "value": "yes", "effect": "NoExecute",
                                       "tolerationSeconds": 120}]
        assert pod["volumes"][0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
        assert set(v20["spec"]["podSpecOverrides"][0]) <= ENTRY_FIELDS["podSpecOverrides"]
    assert v21["spec"]["podTemplateOverrides"][0]["metadata"] == {"annotations": {"sidecar.istio.io/inject": "false"}}
    assert set(v21["spec"]["podTemplateOverrides"][0]["spec"]) <= V21_POD_SPEC_FIELDS
    with pytest.raises(TrainJobError, match="none of runtimePatches, podTemplateOverrides, podSpecOverrides"):
        build_trainjob(s, TrainerAPI(None, False, "CRD x"))


def test_pytorchjob_manifest():
    m = build_pytorchjob(spec(owner=Owner("tf-sft-pod", "4c1b-uid"), active_deadline_s=7200,
                              limits={"memory": "200Gi"}, requests={"cpu": "16"}))
    assert m["apiVersion"] == "kubeflow.org/v1" and m["kind"] == "PyTorchJob"
    assert m["metadata"]["ownerReferences"][0]["uid"] == "4c1b-uid"
    assert m["spec"]["nprocPerNode"] == "8"
    assert m["spec"]["runPolicy"] == {"backoffLimit": 0, "activeDeadlineSeconds": 7200}
    reps = m["spec"]["pytorchReplicaSpecs"]
    assert reps["Master"]["replicas"] == 1 and reps["Worker"]["replicas"] == 2
    for r in reps.values():
        pod = r["template"]["spec"]
        assert r["template"]["metadata"] == {"annotations": {"sidecar.istio.io/inject": "false"}}
        c = pod["containers"][0]
        assert c["name"] == "pytorch"  # the operator finds its container by this name
        assert c["image"] == spec().image and c["command"] == ["bash", "-c", node_script(spec())]
        assert c["resources"] == {"limits": {"memory": "200Gi", "nvidia.com/gpu": "8"}, "requests": {"cpu": "16"}}
        assert pod["nodeSelector"] == {"pool": "h100"} and c["volumeMounts"][0]["mountPath"] == "/dev/shm"
        assert pod["volumes"][0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
        assert {"name": "THINKFORGE_S3_ACCESS_KEY",
                "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "accesskey"}}} in c["env"]
        assert pod["securityContext"] == RESTRICTED_POD and c["securityContext"] == RESTRICTED_CONTAINER
    assert "Worker" not in build_pytorchjob(spec(nodes=1))["spec"]["pytorchReplicaSpecs"]


@pytest.mark.parametrize("env,rank,addr,total", [
    ({"PET_NNODES": "3", "PET_NODE_RANK": "2", "PET_MASTER_ADDR": "tj-node-0-0.tj", "PET_MASTER_PORT": "29400"},
     "2", "tj-node-0-0.tj", "24"),  # Kubeflow Trainer (torch runtime)
    ({"WORLD_SIZE": "3", "RANK": "1", "MASTER_ADDR": "pt-master-0", "MASTER_PORT": "23456"},
     "1", "pt-master-0", "24"),  # training operator PyTorchJob
])
def test_node_script_under_bash(tmp_path, env, rank, addr, total):
    """Run the node's shell line with a stand-in `python` that prints its arguments."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    clean = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    out = subprocess.run(["bash", "-c", node_script(spec())], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    arg = {out[i]: out[i + 1] for i in range(len(out) - 1) if out[i].startswith("--")}
    assert out[:2] == ["-m", "accelerate.commands.launch"]
    assert arg["--num_machines"] == "3" and arg["--machine_rank"] == rank and arg["--main_process_ip"] == addr
    assert arg["--num_processes"] == total  # all processes of all nodes
    assert arg["--deepspeed_config_file"] == "/app/recipes/deepspeed/zero3.json"
    # every node starts its own processes; DeepSpeed's default launcher would pdsh/ssh into the others
    assert arg["--deepspeed_multinode_launcher"] == "standard"
    tail = out[out.index("thinkforge.launch"):]
    assert tail[:3] == ["thinkforge.launch", "sft", "--worker"] and "s3://b/run/config.json" in tail
    plain = subprocess.run(["bash", "-c", node_script(spec(deepspeed_config=""))], env={**clean, **env},
                           capture_output=True, text=True, check=True).stdout.split("\n")
    assert "--multi_gpu" in plain and "--deepspeed_multinode_launcher" not in plain


def test_job_names_and_states():
    n = job_name("My Run_1", "midtrain", "run-7f3a", "cfgdigest", "runs/my-run-1/midtrain/checkpoints/ab12")
    assert n.startswith("tf-my-run-1-midtrain-") and len(n) <= 40 and n == n.lower()
    assert n == job_name("My Run_1", "midtrain", "run-7f3a", "cfgdigest", "runs/my-run-1/midtrain/checkpoints/ab12")
    assert n != job_name("My Run_1", "midtrain", "run-other", "cfgdigest", "runs/my-run-1/midtrain/checkpoints/ab12")
    assert job_state({"status": COMPLETE}, "trainjob")[0] == "succeeded"
    assert job_state({"status": FAILED}, "trainjob") == ("failed", "FailedJobs", FAILED["conditions"][0]["message"])
    assert job_state({"status": PT_FAILED}, "pytorchjob")[:2] == ("failed", "PyTorchJobFailed")
    assert job_state({"status": {"conditions": [{"type": "Complete", "status": "False"}]}}, "trainjob")[0] == "running"
    assert job_state({}, "trainjob")[0] == "running"


def test_imports_point_one_way():
    """launch imports trainjob (lazily); trainjob and the shared module never import launch."""
    src = ROOT / "src" / "thinkforge"
    for mod in ("trainjob.py", "distributed.py"):
        tree = ast.parse((src / mod).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
            {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "thinkforge.launch" not in imported, f"{mod} imports thinkforge.launch"
    from thinkforge import launch

    assert launch.DEEPSPEED_NAMES == ("zero2", "zero3") and launch.result_from_json is tj.result_from_json


# ------------------------------------------------------------------------- against the API on loopback


def test_submit_and_follow_streams_logs(kube):
    pods = [("tf-smoke-sft-abc123-node-0-0-x1", "Running"), ("tf-smoke-sft-abc123-node-0-1-x2", "Pending")]
    logs = {pods[0][0]: ["step 1\nstep 2\npart", "step 1\nstep 2\npartial line done\nstep 3\n"]}
    k = kube(GROUPS_TRAINER, [{}, {"conditions": [{"type": "Created", "status": "True"}]}, COMPLETE],
             pods=pods, logs=logs)
    api = api_client(k.host)
    flavor, created = submit(api, spec())
    assert flavor == "trainjob" and created["metadata"]["uid"]
    assert ("POST", "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-a/trainjobs") in k.requests
    assert {k_: v for k_, v in k.created.items() if k_ != "metadata"} == \
        {k_: v for k_, v in build_trainjob(spec()).items() if k_ != "metadata"}
    lines = []
    obj = follow(api, "tf-smoke-sft-abc123", "team-a", flavor, poll_s=0.01, sink=lines.append)
    assert job_state(obj, flavor)[0] == "succeeded"
    p = pods[0][0]
    assert lines == [f"[{p}] step 1", f"[{p}] step 2", f"[{p}] partial line done", f"[{p}] step 3"]
    assert set(k.selectors) == {"jobset.sigs.k8s.io/jobset-name=tf-smoke-sft-abc123"}


@pytest.mark.parametrize("access", ["crd", "openapi"])
@pytest.mark.parametrize("release", ["v2.0", "v2.1", "v2.2", "v2.3"])
def test_pod_settings_survive_on_every_trainer_release(kube, release, access):
    """The override field comes from the served schema; the stored object (after pruning) keeps the
    node selector, tolerations, /dev/shm and the deadline wherever the release declares them."""
    k = kube(GROUPS_TRAINER, [COMPLETE], release=release, schema_access=access)
    api = api_client(k.host)
    served = trainer_api(api)
    assert served.overrides == OVERRIDE_OF[release]
    assert served.source.startswith("CRD" if access == "crd" else "OpenAPI v3")
    submit(api, spec(active_deadline_s=3600))
    stored = k.created
    pod, meta = trainjob_pod(stored, OVERRIDE_OF[release])
    assert pod["nodeSelector"] == {"pool": "h100"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}]
    if release >= "v2.2":  # PodSpecPatch / ContainerPatch carry securityContext; older overrides do not
        assert pod["containers"] == [{"name": "node", "volumeMounts": SHM_MOUNT, "securityContext": RESTRICTED_CONTAINER}]
        assert pod["securityContext"] == RESTRICTED_POD
    else:
        assert pod["containers"] == [{"name": "node", "volumeMounts": SHM_MOUNT}] and "securityContext" not in pod
    assert ("activeDeadlineSeconds" in stored["spec"]) == (release >= "v2.2")
    if release != "v2.0":  # v2.0 cannot annotate pods
        assert meta["annotations"] == {"sidecar.istio.io/inject": "false"}


def test_override_field_where_the_schema_cannot_be_read(kube, monkeypatch, caplog):
    k = kube(GROUPS_TRAINER, [COMPLETE], release="v2.3", schema_access="none")
    api = api_client(k.host)
    monkeypatch.delenv(tj.ENV_OVERRIDES, raising=False)
    with caplog.at_level("WARNING", logger="thinkforge.trainjob"):
        assert trainer_api(api).overrides == "runtimePatches"
    assert "THINKFORGE_TRAINER_OVERRIDES" in caplog.text
    monkeypatch.setenv(tj.ENV_OVERRIDES, "podTemplateOverrides")
    assert trainer_api(api) == TrainerAPI("podTemplateOverrides", False, "$THINKFORGE_TRAINER_OVERRIDES")
    monkeypatch.setenv(tj.ENV_OVERRIDES, "podOverrides")
    with pytest.raises(TrainJobError, match="expected one of runtimePatches"):
        trainer_api(api)


def test_follow_fails_with_the_jobs_reason(kube):
    k = kube(GROUPS_TRAINER, [{}, FAILED])
    api = api_client(k.host)
    flavor, _ = submit(api, spec())
    with pytest.raises(TrainJobFailed) as err:
        follow(api, "tf-smoke-sft-abc123", "team-a", flavor, poll_s=0.01, sink=lambda line: None)
    assert err.value.reason == "FailedJobs" and "BackoffLimitExceeded" in str(err.value)
    assert "TrainJob team-a/tf-smoke-sft-abc123 failed: FailedJobs" in str(err.value)


def test_follow_has_a_deadline(kube):
    k = kube(GROUPS_TRAINER, [{}])
    api = api_client(k.host)
    flavor, _ = submit(api, spec())
    with pytest.raises(TrainJobTimeout, match="TrainJob team-a/tf-smoke-sft-abc123 still running after 0s"):
        follow(api, "tf-smoke-sft-abc123", "team-a", flavor, poll_s=0.01, timeout_s=0.05, sink=lambda line: None)


def test_pytorchjob_where_only_the_training_operator_exists(kube):
    k = kube(GROUPS_OPERATOR, [PT_FAILED], pods=[("tf-run-rl-abc-master-0", "Failed")],
             logs={"tf-run-rl-abc-master-0": ["Traceback (most recent call last):\nRuntimeError: CUDA out of memory"]})
    api = api_client(k.host)
    s = spec(name="tf-run-rl-abc", stage="rl")
    flavor, _ = submit(api, s)
    assert flavor == "pytorchjob"
    assert ("POST", "/apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs") in k.requests
    assert k.created["kind"] == "PyTorchJob"
    lines = []
    with pytest.raises(TrainJobFailed, match="PyTorchJobFailed: PyTorchJob default/tf-run-rl-abc is failed"):
        follow(api, "tf-run-rl-abc", "team-a", flavor, poll_s=0.01, sink=lines.append)
    assert lines[-1] == "[tf-run-rl-abc-master-0] RuntimeError: CUDA out of memory"  # a finished pod's last line too
    assert k.selectors == ["training.kubeflow.org/job-name=tf-run-rl-abc"]


def test_no_operator_and_refused_submit(kube):
    api = api_client(kube(GROUPS_NONE, [{}]).host)
    with pytest.raises(TrainJobError, match="neither Kubeflow Trainer"):
        submit(api, spec())
    k = kube(GROUPS_TRAINER, [{}], create_error=(403, 'trainjobs.trainer.kubeflow.org is forbidden: User '
                                                      '"system:serviceaccount:team-a:pipeline-runner" cannot create'))
    with pytest.raises(TrainJobError, match="HTTP 403 .*cannot create"):
        submit(api_client(k.host), spec())


def test_job_that_disappears(kube):
    k = kube(GROUPS_TRAINER, [{}])
    api = api_client(k.host)
    with pytest.raises(TrainJobFailed, match="Deleted"):
        follow(api, "never-created", "team-a", "trainjob", poll_s=0.01, sink=lambda line: None)


# --------------------------------------------------- a stage as a job, from a KFP task pod's point of view

IMAGE = "registry.example.com/ml/thinkforge:1.4.2-cuda"
POD, UID, RUN_ID = "thinkforge-smoke-x7k2p-system-container-impl-1234567890", "9d0f6a1e-uid-1", "5b7e-run-id"
OUR_ENV = ("THINKFORGE_IMAGE", "THINKFORGE_S3_SECRET", "THINKFORGE_NAMESPACE", "THINKFORGE_RUN_ID",
           "THINKFORGE_CHECKPOINT_PREFIX", "THINKFORGE_TRAINER_OVERRIDES", "THINKFORGE_TRAINJOB_TIMEOUT_S",
           "THINKFORGE_S3_ENDPOINT", "THINKFORGE_S3_SECURE", "THINKFORGE_LAUNCHED", "AWS_ACCESS_KEY_ID",
           "AWS_SECRET_ACCESS_KEY", "HOSTNAME", "KFP_POD_NAME", "KFP_POD_UID", "NAMESPACE", "HF_TOKEN")


@pytest.fixture
def task_pod(s3_server, monkeypatch):
    """The environment of a KFP task pod: S3 credentials from the Secret the pipeline maps (use_secret_as_env),
    KFP's downward-API variables, nothing of thinkforge's own."""
    for k in OUR_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("THINKFORGE_S3_ACCESS_KEY", s3_server.access_key)
    monkeypatch.setenv("THINKFORGE_S3_SECRET_KEY", s3_server.secret_key)
    monkeypatch.setenv("KFP_POD_NAME", POD)
    monkeypatch.setenv("KFP_POD_UID", UID)
    monkeypatch.setenv("NAMESPACE", "team-a")
    bucket = s3_server.store().bucket
    yield bucket
    s3_server.drop_bucket(bucket)


def stage_cfg(s3_server, bucket, **over):
    from thinkforge.config import load_recipe

    values = {"sft.nodes": 2, "sft.num_processes": 4, "sft.deepspeed": "zero3",
              "storage.endpoint": s3_server.endpoint, "storage.secure": False, "storage.bucket": bucket,
              "cluster.image": IMAGE, "cluster.s3_secret": "s3-creds", "cluster.hf_secret": "hf-token",
              "cluster.stages.sft.gpus": 4,
              "cluster.stages.sft.node_selector": {"pool": "h100"},
              "cluster.stages.sft.tolerations": [
                  {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                  {"key": "spot", "operator": "Exists", "effect": "NoExecute", "toleration_seconds": 300}],
              "cluster.stages.sft.shm_size": "32Gi", "cluster.stages.sft.timeout_s": 7200,
              "cluster.stages.sft.memory_limit": "200Gi"}
    values.update(over)
    # an override string is parsed as YAML: "" would be null, "''" is the empty string
    return load_recipe(ROOT / "recipes" / "smoke.yaml", {k: "''" if v == "" else v for k, v in values.items()})


def stage_inputs(root: Path) -> tuple[Path, Path]:
    """A model directory and a data file, as KFP's launcher downloads them into a fresh pod."""
    model = root / "minio" / "pipeline-root" / "train-model"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (model / "model.safetensors").write_bytes(b"\0" * 512)
    data = root / "minio" / "pipeline-root" / "sft.jsonl"
    data.write_text("".join(json.dumps({"problem_id": f"p{i}", "problem": f"{i}+1?", "completion": f"{i + 1}"}) + "\n"
                            for i in range(4)))
    return model, data


def node_command(body: dict) -> list[str]:
    if body["kind"] == "TrainJob":
        script = body["spec"]["trainer"]["command"][2]
    else:
        script = body["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"][2]
    return shlex.split(script)


def fake_training(s3_server, bucket):
    """The job's pods, reduced to their contract: write the trained model and the result where the
    command says."""
    from thinkforge.storage import parse_uri

    def run(body):
        words = node_command(body)
        store = s3_server.store(bucket, create=False)
        out = Path(tempfile.mkdtemp(prefix="fake-node-"))
        (out / "model.safetensors").write_bytes(b"trained")
        store.upload_dir(out, parse_uri(words[words.index("--out") + 1])[1])
        store.put_json(parse_uri(words[words.index("--result") + 1])[1],
                       {"steps": 3, "examples": 4, "metric": "loss", "first": 2.0, "last": 1.0, "seconds": 1.0,
                        "history": [], "extra": {}})
        shutil.rmtree(out)

    return run


def expected_prefix(s3_server, bucket, cfg, model, data) -> str:
    """The prefix a one-pod stage checkpoints under, for these inputs."""
    from thinkforge.stages.train import checkpoint_prefix
    from thinkforge.storage import ObjectStore

    return checkpoint_prefix(ObjectStore.from_config(cfg.storage), cfg, "sft", model, data)


def job_parts(body: dict) -> tuple[dict, dict, dict, int | None]:
    """(env by name, pod settings, resources, deadline) of either job kind."""
    if body["kind"] == "TrainJob":
        tr = body["spec"]["trainer"]
        pod, _ = trainjob_pod(body, "runtimePatches")
        return ({e["name"]: e for e in tr["env"]}, pod, tr["resourcesPerNode"],
                body["spec"].get("activeDeadlineSeconds"))
    pod = body["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    c = pod["containers"][0]
    deadline = body["spec"]["runPolicy"].get("activeDeadlineSeconds")
    return {e["name"]: e for e in c["env"]}, pod, c["resources"], deadline


@pytest.mark.parametrize("groups,done", [(GROUPS_TRAINER, COMPLETE), (GROUPS_OPERATOR, PT_SUCCEEDED)],
                         ids=["trainjob", "pytorchjob"])
def test_job_comes_from_the_config_alone(kube, s3_server, task_pod, tmp_path, groups, done):
    """A task pod that holds only the config artifact submits a complete job: image, Secrets by
    reference, placement, the checkpoint prefix, an owner, a deadline."""
    from thinkforge.trainjob import trainjob_stage

    bucket = task_pod
    cfg = stage_cfg(s3_server, bucket)
    model, data = stage_inputs(tmp_path)
    k = kube(groups, [done], on_create=fake_training(s3_server, bucket),
             launcher_pods={POD: launcher(POD, UID, run_id=RUN_ID)})
    result = trainjob_stage("sft", host=k.host, poll_s=0.01)(cfg, model, data, tmp_path / "out")
    assert result.steps == 3 and (tmp_path / "out" / "model.safetensors").read_bytes() == b"trained"

    body = k.created
    text = json.dumps(body)
    assert s3_server.secret_key not in text and s3_server.access_key not in text  # references, never values
    env, pod, resources, deadline = job_parts(body)
    assert env["THINKFORGE_S3_ACCESS_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "s3-creds", "key": "accesskey"}}
    assert env["THINKFORGE_S3_SECRET_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "s3-creds", "key": "secretkey"}}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert env["THINKFORGE_CHECKPOINT_PREFIX"]["value"] == expected_prefix(s3_server, bucket, cfg, model, data)
    assert IMAGE in text
    assert resources["limits"] == {"nvidia.com/gpu": "4", "memory": "200Gi"}
    assert pod["nodeSelector"] == {"pool": "h100"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "spot", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}}]
    assert deadline == 7200
    assert body["metadata"]["namespace"] == "team-a"
    assert body["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod", "name": POD, "uid": UID}]
    assert body["metadata"]["name"] == job_name(cfg.run.name, "sft", RUN_ID, cfg.digest(),
                                                env["THINKFORGE_CHECKPOINT_PREFIX"]["value"])
    words = node_command(body)
    assert words[words.index("--deepspeed_multinode_launcher") + 1] == "standard"
    assert words[words.index("--deepspeed_config_file") + 1] == "/app/recipes/deepspeed/zero3.json"


def test_launching_pod_found_by_hostname(kube, s3_server, task_pod, tmp_path, monkeypatch):
    """Without KFP's downward-API variables the pod named $HOSTNAME is read from the API: its uid for
    the owner, its run label for the job name and, with no cluster.image, its own image."""
    from thinkforge.trainjob import trainjob_stage

    bucket = task_pod
    for k_ in ("KFP_POD_NAME", "KFP_POD_UID"):
        monkeypatch.delenv(k_)
    monkeypatch.setenv("HOSTNAME", POD)
    cfg = stage_cfg(s3_server, bucket, **{"cluster.image": "", "cluster.stages.sft.timeout_s": 0})
    model, data = stage_inputs(tmp_path)
    k = kube(GROUPS_TRAINER, [COMPLETE], on_create=fake_training(s3_server, bucket),
             launcher_pods={POD: launcher(POD, "uid-from-api", run_id=RUN_ID, image="registry.example.com/tf:pod")})
    trainjob_stage("sft", host=k.host, poll_s=0.01)(cfg, model, data, tmp_path / "out")
    body = k.created
    assert ("GET", f"/api/v1/namespaces/team-a/pods/{POD}") in k.requests
    assert body["metadata"]["ownerReferences"][0]["uid"] == "uid-from-api"
    assert body["spec"]["trainer"]["image"] == "registry.example.com/tf:pod"
    assert body["spec"]["activeDeadlineSeconds"] == tj.DEFAULT_TIMEOUT_S  # no placement timeout: the default
    prefix = expected_prefix(s3_server, bucket, cfg, model, data)
    assert body["metadata"]["name"] == job_name(cfg.run.name, "sft", RUN_ID, cfg.digest(), prefix)


def test_retried_task_finds_the_same_job_and_checkpoints(kube, s3_server, task_pod, tmp_path, monkeypatch):
    """Attempt 1's job fails; KFP retries the task in a fresh pod (new name and uid, inputs downloaded
    again to a fresh disk). Attempt 2 names the same job and pins the same checkpoint prefix, the one
    a one-pod stage computes, so the job's pods resume from attempt 1's checkpoints."""
    from thinkforge.trainjob import trainjob_stage

    bucket = task_pod
    cfg = stage_cfg(s3_server, bucket)
    bodies = []
    for attempt, status in ((1, FAILED), (2, COMPLETE)):
        sandbox = tmp_path / f"attempt-{attempt}"
        model, data = stage_inputs(sandbox)
        pod, uid = f"{POD[:-3]}{attempt:03d}", f"uid-attempt-{attempt}"
        monkeypatch.setenv("KFP_POD_NAME", pod)
        monkeypatch.setenv("KFP_POD_UID", uid)
        k = kube(GROUPS_TRAINER, [status], on_create=fake_training(s3_server, bucket),
                 launcher_pods={pod: launcher(pod, uid, run_id=RUN_ID)})
        stage = trainjob_stage("sft", host=k.host, poll_s=0.01)
        if status is FAILED:
            with pytest.raises(TrainJobFailed, match="BackoffLimitExceeded"):
                stage(cfg, model, data, sandbox / "out")
            assert k.methods()[-1] == "DELETE"  # the failed job is removed
        else:
            assert stage(cfg, model, data, sandbox / "out").steps == 3
        bodies.append(k.created)
        prefix = expected_prefix(s3_server, bucket, cfg, model, data)
    one, two = bodies
    assert one["metadata"]["name"] == two["metadata"]["name"]
    env1, env2 = ({e["name"]: e.get("value") for e in b["spec"]["trainer"]["env"]} for b in bodies)
    assert env1["THINKFORGE_CHECKPOINT_PREFIX"] == env2["THINKFORGE_CHECKPOINT_PREFIX"] == prefix
    assert one["spec"]["trainer"]["command"] == two["spec"]["trainer"]["command"]  # same staged inputs
    assert two["metadata"]["ownerReferences"][0]["uid"] == "uid-attempt-2"


def test_retry_follows_the_job_its_killed_attempt_left_running(kube, s3_server, task_pod, tmp_path):
    """The launcher of attempt 1 was killed while its job ran on; attempt 2 takes the job over as its
    owner and follows it instead of starting a second one."""
    from thinkforge.storage import ObjectStore
    from thinkforge.trainjob import trainjob_stage

    bucket = task_pod
    cfg = stage_cfg(s3_server, bucket)
    model, data = stage_inputs(tmp_path)
    name = job_name(cfg.run.name, "sft", RUN_ID, cfg.digest(), expected_prefix(s3_server, bucket, cfg, model, data))
    store = ObjectStore.from_config(cfg.storage)
    base = store.run_prefix(cfg.run.name, "sft", "trainjob", name)
    earlier = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
               "metadata": {"name": name, "namespace": "team-a", "uid": "job-uid-1",
                            "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "old-pod", "uid": "old"}]},
               "spec": {"trainer": {"command": ["bash", "-c", f"x --out {store.uri(base + '/model')} "
                                                               f"--result {store.uri(base + '/result.json')}"]}}}
    fake_training(s3_server, bucket)(earlier)  # what the job writes when it completes
    k = kube(GROUPS_TRAINER, [], jobs={name: (earlier, [{}, {}, COMPLETE])},
             launcher_pods={POD: launcher(POD, UID, run_id=RUN_ID)})
    result = trainjob_stage("sft", host=k.host, poll_s=0.01)(cfg, model, data, tmp_path / "out")
    assert result.steps == 3
    assert "POST" not in k.methods() and "DELETE" not in k.methods()
    (patch,) = [b for m, _, b in k.bodies if m == "PATCH"]
    assert patch == ("application/merge-patch+json",
                     {"metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": POD, "uid": UID}]}})


def test_retry_replaces_the_failed_job_of_an_earlier_attempt(kube, s3_server, task_pod, tmp_path):
    from thinkforge.trainjob import trainjob_stage

    bucket = task_pod
    cfg = stage_cfg(s3_server, bucket)
    model, data = stage_inputs(tmp_path)
    name = job_name(cfg.run.name, "sft", RUN_ID, cfg.digest(), expected_prefix(s3_server, bucket, cfg, model, data))
    earlier = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
               "metadata": {"name": name, "namespace": "team-a", "uid": "job-uid-1"}, "spec": {}}
    k = kube(GROUPS_TRAINER, [COMPLETE], on_create=fake_training(s3_server, bucket), jobs={name: (earlier, [FAILED])},
             launcher_pods={POD: launcher(POD, UID, run_id=RUN_ID)})
    assert trainjob_stage("sft", host=k.host, poll_s=0.01)(cfg, model, data, tmp_path / "out").steps == 3
    methods = k.methods()
    assert methods.index("DELETE") < methods.index("POST")
    (delete_body,) = [b for m, _, b in k.bodies if m == "DELETE"]
    assert delete_body["propagationPolicy"] == "Foreground"  # its JobSet is gone before the new job takes the name
    assert k.created["metadata"]["name"] == name


def test_stage_deadline_deletes_the_job(kube, s3_server, task_pod, tmp_path, monkeypatch):
    from thinkforge.trainjob import trainjob_stage

    bucket = task_pod
    monkeypatch.setattr(tj, "MIN_FOLLOW_S", 0.2)
    monkeypatch.setattr(tj, "DEADLINE_MARGIN_S", 0)
    cfg = stage_cfg(s3_server, bucket, **{"cluster.stages.sft.timeout_s": 1})
    model, data = stage_inputs(tmp_path)
    k = kube(GROUPS_TRAINER, [{}], launcher_pods={POD: launcher(POD, UID, run_id=RUN_ID)})
    with pytest.raises(TrainJobTimeout, match=r"still running after .*timeout_s: 1s\); the job was deleted"):
        trainjob_stage("sft", host=k.host, poll_s=0.02)(cfg, model, data, tmp_path / "out")
    assert k.methods()[-1] == "DELETE" and not k.jobs


def test_terminated_launcher_deletes_the_job(kube, s3_server, task_pod, tmp_path):
    """SIGTERM (a terminated run) while following: the job is deleted on the way out."""
    from thinkforge.trainjob import trainjob_stage

    bucket = task_pod
    cfg = stage_cfg(s3_server, bucket)
    model, data = stage_inputs(tmp_path)
    sent = []

    def terminate():  # on the first pod listing, i.e. while follow() runs
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)

    class Unhandled(Exception):
        pass

    def fallback(signum, frame):  # so a stage without its own handler fails the test instead of killing pytest
        raise Unhandled("SIGTERM reached the test's handler: the stage installed none")

    k = kube(GROUPS_TRAINER, [{}], launcher_pods={POD: launcher(POD, UID, run_id=RUN_ID)}, on_pod_list=terminate)
    before = signal.signal(signal.SIGTERM, fallback)
    try:
        with pytest.raises(SystemExit):
            trainjob_stage("sft", host=k.host, poll_s=0.05)(cfg, model, data, tmp_path / "out")
        assert signal.getsignal(signal.SIGTERM) is fallback  # restored after following
    finally:
        signal.signal(signal.SIGTERM, before)
    assert k.methods()[-1] == "DELETE" and not k.jobs


def test_credentials_the_jobs_pods_would_lack(s3_server, task_pod, tmp_path):
    from thinkforge.trainjob import trainjob_stage

    cfg = stage_cfg(s3_server, task_pod, **{"cluster.s3_secret": ""})
    model, data = stage_inputs(tmp_path)
    with pytest.raises(TrainJobError, match="set cluster.s3_secret"):
        trainjob_stage("sft", host="http://127.0.0.1:9")(cfg, model, data, tmp_path / "out")


# ----------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_stage_as_a_trainjob_end_to_end(kube, s3_server, task_pod, tmp_path, monkeypatch):
    """trainjob_stage stages inputs in S3, submits, follows; the fake cluster "runs" the pod: the worker
    command of the submitted manifest (without accelerate) in a fresh process whose environment is
    exactly the manifest's, secretKeyRefs resolved from a Secret as the kubelet does."""
    from thinkforge.records import write_jsonl
    from thinkforge.sources import load_problems
    from thinkforge.storage import ObjectStore
    from thinkforge.templates import system_message
    from thinkforge.trainjob import trainjob_stage
    from tiny_models import tiny_model_dir, word_problem_texts

    bucket = task_pod
    monkeypatch.setenv("THINKFORGE_CACHE", str(tmp_path / "cache"))
    cfg = stage_cfg(s3_server, bucket, **{"sft.num_processes": 1, "sft.deepspeed": "none", "sft.max_steps": 2,
                                          "sft.save_steps": 1, "cluster.hf_secret": ""})
    problems = load_problems("builtin:word-problems?split=train&n=8&solutions=1")
    model = tiny_model_dir(tmp_path / "tiny", word_problem_texts(problems, system_message(cfg.template)),
                           vocab_size=400)
    data = tmp_path / "sft.jsonl"
    write_jsonl(data, [{"problem_id": p["id"], "problem": p["problem"], "completion": p["completion"]}
                       for p in problems])
    secrets = {"s3-creds": {"accesskey": s3_server.access_key, "secretkey": s3_server.secret_key}}

    def pod(body):
        words = node_command(body)
        args = words[words.index("--worker") + 1:]
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "RANK": "0"}
        for e in body["spec"]["trainer"]["env"]:
            if "value" in e:
                env[e["name"]] = e["value"]
            else:
                ref = e["valueFrom"]["secretKeyRef"]
                env[e["name"]] = secrets[ref["name"]][ref["key"]]
        # the endpoint too: the pod needs it to fetch the config that names it
        assert env["THINKFORGE_LAUNCHED"] == "1" and env["THINKFORGE_S3_ENDPOINT"] == s3_server.endpoint
        proc = subprocess.run([sys.executable, "-m", "thinkforge.launch", words[words.index("--worker") - 1],
                               "--worker", *args], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    k = kube(GROUPS_TRAINER, [COMPLETE], on_create=pod, launcher_pods={POD: launcher(POD, UID, run_id=RUN_ID)})
    result = trainjob_stage("sft", host=k.host, poll_s=0.05)(cfg, model, data, tmp_path / "out")
    assert k.pod_error is None
    assert result.steps == 2 and result.metric == "loss"
    assert (tmp_path / "out" / "model.safetensors").is_file()
    body = k.created
    assert body["spec"]["trainer"]["numNodes"] == 2 and body["spec"]["trainer"]["image"] == IMAGE
    assert s3_server.secret_key not in json.dumps(body)
    # the job's pods checkpointed under the prefix the launcher pinned (the one a retry computes again)
    store = ObjectStore.from_config(cfg.storage)
    prefix = expected_prefix(s3_server, bucket, cfg, model, data)
    assert result.extra.get("checkpoint_prefix", store.uri(prefix)) == store.uri(prefix)
    assert store.list_prefixes(prefix), f"no checkpoints under {prefix}"
    assert os.environ.get("THINKFORGE_LAUNCHED") is None


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_node_line_trains_across_two_nodes_with_deepspeed(tmp_path):
    """The per-node shell line of a 2-node job, run twice under bash as the operator runs it on each
    node (PET_* from Kubeflow Trainer, rendezvous on loopback), with ZeRO-2 and the standard multi-node
    launcher on CPU: the two "nodes" form one world of two processes, each trains on half of every
    global batch, and rank 0 writes the model and the result (~3 min on 2 cores)."""
    from thinkforge.config import load_recipe
    from thinkforge.records import write_jsonl
    from thinkforge.sources import load_problems
    from thinkforge.templates import system_message
    from tiny_models import tiny_model_dir, word_problem_texts

    cfg = load_recipe(ROOT / "recipes" / "smoke.yaml", {"sft.nodes": 2, "sft.max_steps": 1, "sft.batch_size": 2,
                                                        "sft.deepspeed": "zero2", "sft.save_steps": 0})
    problems = load_problems("builtin:word-problems?split=train&n=8&solutions=1")
    model = tiny_model_dir(tmp_path / "tiny", word_problem_texts(problems, system_message(cfg.template)),
                           vocab_size=400)
    data = tmp_path / "sft.jsonl"
    write_jsonl(data, [{"problem_id": p["id"], "problem": p["problem"], "completion": p["completion"]}
                       for p in problems])
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.model_dump()))
    ds = str(ROOT / "recipes" / "deepspeed" / "zero2.json")
    s = spec(nodes=2, procs_per_node=1, gpus_per_node=0, deepspeed_config=ds,
             args=["--config", str(tmp_path / "cfg.json"), "--model", str(model), "--data", str(data),
                   "--out", str(tmp_path / "out"), "--result", str(tmp_path / "result.json")])
    env = {e["name"]: e["value"] for e in build_trainjob(s)["spec"]["trainer"]["env"] if "value" in e}
    base = {**env, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
            "HF_HUB_OFFLINE": "1", "PET_NNODES": "2", "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(_free_port())}
    logs = [tmp_path / f"node-{r}.log" for r in range(2)]
    procs = [subprocess.Popen(["bash", "-c", node_script(s)], env={**base, "PET_NODE_RANK": str(r)},
                              stdout=open(logs[r], "w"), stderr=subprocess.STDOUT) for r in range(2)]
    try:
        rcs = [p.wait(timeout=800) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert rcs == [0, 0], "\n".join(f.read_text()[-2000:] for f in logs)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["steps"] == 1
    # 8 examples, 2 processes x batch 2 = 4 per step -> 2 steps per epoch; one step is half an epoch
    # (two nodes that each trained alone, on every example, would show a quarter)
    epochs = [h["epoch"] for h in result["history"] if "loss" in h]
    assert epochs[-1] == pytest.approx(0.5)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
