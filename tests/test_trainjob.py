"""Multi-node stages as Kubeflow Trainer jobs (thinkforge.trainjob).

No Kubernetes cluster can run here. The manifests are checked field by field, the per-node shell line
is executed by bash with the operators' environment variables, and submit/follow/log streaming/failure
handling run with the real `kubernetes` client against a small HTTP server on loopback that answers
with recorded API responses (API group discovery, the created object, status conditions over time,
pod lists and pod logs, error Status bodies). The last test also plays the job's pod: it runs the
worker command from the submitted manifest against a real S3 server on loopback.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from thinkforge.trainjob import (
    JobSpec,
    TrainJobError,
    TrainJobFailed,
    api_client,
    build_pytorchjob,
    build_trainjob,
    follow,
    job_name,
    job_state,
    node_script,
    submit,
)

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
PT_FAILED = {"conditions": [
    {"type": "Created", "status": "True", "reason": "PyTorchJobCreated", "message": "created"},
    {"type": "Running", "status": "False", "reason": "PyTorchJobRunning", "message": "running"},
    {"type": "Failed", "status": "True", "reason": "PyTorchJobFailed",
     "message": "PyTorchJob default/tf-run-rl-abc is failed because 1 Master replica(s) failed."}]}


class FakeKube:
    """Recorded API responses on loopback; `statuses` are served one per GET of the job (the last repeats)."""

    def __init__(self, groups, statuses, pods=None, logs=None, create_error=None, on_create=None):
        self.groups, self.statuses, self.pods, self.logs = groups, list(statuses), pods or [], logs or {}
        self.create_error, self.on_create = create_error, on_create
        self.requests: list[tuple[str, str]] = []
        self.created: dict | None = None
        self.gets = 0
        self.hold = threading.Event()  # when on_create is set: "running" until the fake pod finishes
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

            def do_GET(self):
                u = urlparse(self.path)
                fake.requests.append(("GET", self.path))
                parts = u.path.strip("/").split("/")
                if u.path.rstrip("/") == "/apis":
                    return self._send(200, fake.groups)
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
                    return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
                if fake.created is not None and parts[-1] == fake.created["metadata"]["name"]:
                    if fake.on_create is not None and not fake.hold.is_set():
                        return self._send(200, {**fake.created, "status": {}})
                    i = min(fake.gets, len(fake.statuses) - 1)
                    fake.gets += 1
                    return self._send(200, {**fake.created, "status": fake.statuses[i]})
                return self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                        "message": f"{u.path} not found", "reason": "NotFound", "code": 404})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(("POST", self.path))
                if fake.create_error:
                    code, msg = fake.create_error
                    return self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                             "message": msg, "reason": "Forbidden", "code": code})
                fake.created = {**body, "metadata": {**body["metadata"], "uid": "0b6c2c9e-1", "resourceVersion": "1"}}
                if fake.on_create is not None:
                    threading.Thread(target=lambda: (fake.on_create(body), fake.hold.set()), daemon=True).start()
                return self._send(201, fake.created)

            def do_DELETE(self):
                fake.requests.append(("DELETE", self.path))
                return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

        self.log_calls: dict[str, int] = {}
        self.selectors: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.host = f"http://127.0.0.1:{self.server.server_address[1]}"

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


# ---------------------------------------------------------------------------------------- manifests


def test_trainjob_manifest():
    m = build_trainjob(spec())
    assert m["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and m["kind"] == "TrainJob"
    assert m["metadata"] == {"name": "tf-smoke-sft-abc123", "namespace": "team-a",
                             "labels": {"app.kubernetes.io/part-of": "thinkforge", "thinkforge/stage": "sft"}}
    assert m["spec"]["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                       "kind": "ClusterTrainingRuntime"}
    tr = m["spec"]["trainer"]
    assert tr["image"] == "ghcr.io/thinkforge/thinkforge:0.1.0-cuda"
    assert tr["numNodes"] == 3 and tr["numProcPerNode"] == 8
    assert tr["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": 8}}
    assert tr["command"][:2] == ["bash", "-c"] and tr["command"][2] == node_script(spec())
    env = {e["name"]: e for e in tr["env"]}
    assert env["THINKFORGE_LAUNCHED"]["value"] == "1"
    assert env["THINKFORGE_DEEPSPEED_CONFIG"]["value"] == "/app/recipes/deepspeed/zero3.json"
    assert env["THINKFORGE_S3_ACCESS_KEY"] == {"name": "THINKFORGE_S3_ACCESS_KEY",
                                               "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "accesskey"}}}
    over = m["spec"]["podSpecOverrides"][0]
    assert over["targetJobs"] == [{"name": "node"}] and over["nodeSelector"] == {"pool": "h100"}
    assert over["tolerations"][0]["key"] == "gpu"
    assert over["volumes"][0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}


def test_pytorchjob_manifest():
    m = build_pytorchjob(spec())
    assert m["apiVersion"] == "kubeflow.org/v1" and m["kind"] == "PyTorchJob"
    assert m["spec"]["nprocPerNode"] == "8" and m["spec"]["runPolicy"] == {"backoffLimit": 0}
    reps = m["spec"]["pytorchReplicaSpecs"]
    assert reps["Master"]["replicas"] == 1 and reps["Worker"]["replicas"] == 2
    for r in reps.values():
        pod = r["template"]["spec"]
        c = pod["containers"][0]
        assert c["name"] == "pytorch"  # the operator finds its container by this name
        assert c["image"] == spec().image and c["command"] == ["bash", "-c", node_script(spec())]
        assert c["resources"] == {"limits": {"nvidia.com/gpu": 8}}
        assert pod["nodeSelector"] == {"pool": "h100"} and c["volumeMounts"][0]["mountPath"] == "/dev/shm"
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
    tail = out[out.index("thinkforge.launch"):]
    assert tail[:3] == ["thinkforge.launch", "sft", "--worker"] and "s3://b/run/config.json" in tail


def test_job_names_and_states():
    n = job_name("My Run_1", "midtrain")
    assert n.startswith("tf-my-run-1-midtrain-") and len(n) <= 40 and n == n.lower()
    assert job_state({"status": COMPLETE}, "trainjob")[0] == "succeeded"
    assert job_state({"status": FAILED}, "trainjob") == ("failed", "FailedJobs", FAILED["conditions"][0]["message"])
    assert job_state({"status": PT_FAILED}, "pytorchjob")[:2] == ("failed", "PyTorchJobFailed")
    assert job_state({"status": {"conditions": [{"type": "Complete", "status": "False"}]}}, "trainjob")[0] == "running"
    assert job_state({}, "trainjob")[0] == "running"


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


def test_follow_fails_with_the_jobs_reason(kube):
    k = kube(GROUPS_TRAINER, [{}, FAILED])
    api = api_client(k.host)
    flavor, _ = submit(api, spec())
    with pytest.raises(TrainJobFailed) as err:
        follow(api, "tf-smoke-sft-abc123", "team-a", flavor, poll_s=0.01, sink=lambda line: None)
    assert err.value.reason == "FailedJobs" and "BackoffLimitExceeded" in str(err.value)
    assert "TrainJob team-a/tf-smoke-sft-abc123 failed: FailedJobs" in str(err.value)


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


@pytest.mark.slow
def test_stage_as_a_trainjob_end_to_end(kube, s3_server, tmp_path, monkeypatch, request):
    """trainjob_stage stages inputs in S3, submits, follows; the fake cluster "runs" the pod by executing the
    worker command of the submitted manifest (without accelerate), which reads and writes S3 URIs."""
    from thinkforge.config import load_recipe
    from thinkforge.launch import main as launch_main
    from thinkforge.records import write_jsonl
    from thinkforge.sources import load_problems
    from thinkforge.templates import system_message
    from thinkforge.trainjob import trainjob_stage
    from tiny_models import tiny_model_dir, word_problem_texts

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("THINKFORGE_IMAGE", "ghcr.io/thinkforge/thinkforge:test")
    monkeypatch.setenv("THINKFORGE_NAMESPACE", "team-a")
    monkeypatch.setenv("THINKFORGE_CACHE", str(tmp_path / "cache"))
    bucket = s3_server.store().bucket
    cfg = load_recipe(request.config.rootpath / "recipes" / "smoke.yaml",
                      {"sft.nodes": 2, "sft.num_processes": 1, "sft.max_steps": 2, "storage.bucket": bucket,
                       "storage.secure": False})
    problems = load_problems("builtin:word-problems?split=train&n=8&solutions=1")
    model = tiny_model_dir(tmp_path / "tiny", word_problem_texts(problems, system_message(cfg.template)),
                           vocab_size=400)
    data = tmp_path / "sft.jsonl"
    write_jsonl(data, [{"problem_id": p["id"], "problem": p["problem"], "completion": p["completion"]}
                       for p in problems])

    def pod(body):
        script = body["spec"]["trainer"]["command"][2]
        words = shlex.split(script)
        args = words[words.index("--worker") + 1:]
        env = {e["name"]: e["value"] for e in body["spec"]["trainer"]["env"] if "value" in e}
        assert env["THINKFORGE_LAUNCHED"] == "1"
        launch_main([words[words.index("--worker") - 1], "--worker", *args])

    k = kube(GROUPS_TRAINER, [COMPLETE], on_create=pod)
    result = trainjob_stage("sft", host=k.host, poll_s=0.05)(cfg, model, data, tmp_path / "out")
    assert result.steps == 2 and result.metric == "loss"
    assert (tmp_path / "out" / "model.safetensors").is_file()
    body = k.created
    assert body["spec"]["trainer"]["numNodes"] == 2 and body["spec"]["trainer"]["image"].endswith(":test")
    assert body["metadata"]["namespace"] == "team-a"
    assert not any(v.get("value") == s3_server.secret_key for v in body["spec"]["trainer"]["env"])
    assert os.environ.get("THINKFORGE_LAUNCHED") is None
