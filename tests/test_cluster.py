"""thinkforge.cluster against a KFP v2beta1 peer on loopback.

No Kubeflow Pipelines server can run here (it needs a Kubernetes cluster, MySQL and Argo), so the peer
is a small HTTP server on 127.0.0.1 that keeps pipelines, versions, experiments and recurring runs in
memory and answers in KFP's v2beta1 REST wire format: snake_case JSON bodies shaped like the responses
of a KFP 2.x API server (the kfp-server-api 2.17.3 models; written from them, not captured from a live
server). The real `kfp.Client` talks to it over a socket; the tests assert the requests it sends
(paths, query strings, multipart uploads, JSON bodies including cron and run parameters).
"""


import argparse
import email.policy
import json
import sys
import threading
import types
import uuid
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

kfp = pytest.importorskip("kfp")
from thinkforge import cluster  # noqa: E402
from thinkforge.config import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
API = "/apis/v2beta1"
PROXY = "/api/v1/namespaces/kubeflow/services/ml-pipeline:http/proxy"
NOW = "2026-11-26T10:00:00Z"


class FakeKFP:
    """In-memory KFP v2beta1 API: records every request, answers like the real server."""

    def __init__(self):
        self.requests: list[dict] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}
        self.experiments: dict[str, dict] = {}
        self.recurring: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                url = urlsplit(self.path)
                path = url.path.removeprefix(PROXY)
                req = {"method": self.command, "path": path, "raw_path": url.path, "query": {k: v[0] for k, v in parse_qs(url.query).items()},
                       "headers": {k.lower(): v for k, v in self.headers.items()}, "raw": raw, "json": None, "files": {}}
                ctype = self.headers.get("Content-Type", "")
                if ctype.startswith("application/json") and raw:
                    req["json"] = json.loads(raw)
                elif ctype.startswith("multipart/form-data"):
                    msg = BytesParser(policy=email.policy.HTTP).parsebytes(f"Content-Type: {ctype}\r\n\r\n".encode() + raw)
                    req["files"] = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                                    for part in msg.iter_parts() if part.get_filename()}
                fake.requests.append(req)
                status, body = fake.route(req)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    # --- the API ---------------------------------------------------------------------------------
    @staticmethod
    def _match(items, query):
        flt = query.get("filter")
        if not flt:
            return list(items)
        preds = json.loads(flt)["predicates"]
        return [i for i in items if all(i.get(p["key"]) == p["stringValue"] for p in preds)]

    def route(self, req):  # noqa: C901 - one branch per endpoint
        m, p, q, body = req["method"], req["path"], req["query"], req["json"]
        if not p.startswith(API):
            return 404, {"error": "not found", "code": 5}
        p = p[len(API):]
        if (m, p) == ("GET", "/healthz"):
            return 200, {"commit_sha": "abc123", "tag_name": "2.5.0", "multi_user": False}
        if (m, p) == ("GET", "/pipelines"):  # v2beta1 lists one namespace: shared ("") unless ?namespace=
            found = [i for i in self._match(self.pipelines.values(), q) if i["namespace"] == q.get("namespace", "")]
            return 200, {"pipelines": found, "total_size": len(found)} if found else {}
        if (m, p) == ("POST", "/pipelines"):
            pid = str(uuid.uuid4())
            self.pipelines[pid] = {"pipeline_id": pid, "display_name": body["display_name"], "name": body["display_name"],
                                   "description": body.get("description", ""), "created_at": NOW,
                                   "namespace": body.get("namespace") or ""}
            return 200, self.pipelines[pid]
        if m == "GET" and p.startswith("/pipelines/") and p.endswith("/versions"):
            pid = p.split("/")[2]
            found = self._match([v for v in self.versions.values() if v["pipeline_id"] == pid], q)
            return 200, {"pipeline_versions": found, "total_size": len(found)} if found else {}
        if (m, p) == ("POST", "/pipelines/upload_version"):
            pid = q["pipelineid"]
            if pid not in self.pipelines:
                return 404, {"error": f"pipeline {pid} not found", "code": 5}
            if any(v["pipeline_id"] == pid and v["display_name"] == q["name"] for v in self.versions.values()):
                return 409, {"error": "already exists", "code": 6}
            vid = str(uuid.uuid4())
            spec = next(yaml.safe_load_all(req["files"]["uploadfile"]))  # pipeline spec, then platform spec
            self.versions[vid] = {"pipeline_id": pid, "pipeline_version_id": vid, "display_name": q["name"], "name": q["name"],
                                  "description": q.get("description", ""), "created_at": NOW, "pipeline_spec": spec}
            return 200, self.versions[vid]
        if (m, p) == ("GET", "/experiments"):
            found = self._match(self.experiments.values(), q)
            return 200, {"experiments": found, "total_size": len(found)} if found else {}
        if (m, p) == ("POST", "/experiments"):
            eid = str(uuid.uuid4())
            self.experiments[eid] = {"experiment_id": eid, "display_name": body["display_name"], "description": body.get("description", ""),
                                     "created_at": NOW, "namespace": "", "storage_state": "AVAILABLE", "last_run_created_at": NOW}
            return 200, self.experiments[eid]
        if (m, p) == ("POST", "/runs"):
            rid = str(uuid.uuid4())
            self.runs[rid] = {**body, "run_id": rid, "state": "PENDING", "created_at": NOW, "storage_state": "AVAILABLE"}
            return 200, self.runs[rid]
        if (m, p) == ("GET", "/recurringruns"):
            found = [r for r in self.recurring.values() if "experiment_id" not in q or r["experiment_id"] == q["experiment_id"]]
            found = self._match(found, q)
            return 200, {"recurringRuns": found, "recurring_runs": found, "total_size": len(found)} if found else {}
        if (m, p) == ("POST", "/recurringruns"):
            rid = str(uuid.uuid4())
            self.recurring[rid] = {**body, "recurring_run_id": rid, "status": "ENABLED", "created_at": NOW, "updated_at": NOW}
            return 200, self.recurring[rid]
        if m == "DELETE" and p.startswith("/recurringruns/"):
            self.recurring.pop(p.rsplit("/", 1)[1], None)
            return 200, {}
        return 404, {"error": f"no route {m} {p}", "code": 5}

    def calls(self, method=None, path=None):
        return [r for r in self.requests if (method is None or r["method"] == method) and (path is None or r["path"] == API + path)]


@pytest.fixture
def fake_kfp(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KF_PIPELINES_ENDPOINT", raising=False)
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    server = FakeKFP()
    yield server
    server.close()


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """A real compiled KFP IR package with parameters named like thinkforge's (section__field)."""
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11-slim")
    def echo(lr: float, name: str) -> str:
        return f"{name}:{lr}"

    @dsl.pipeline(name="thinkforge")
    def pipe(sft__learning_rate: float = 1e-5, run__name: str = "thinkforge"):
        echo(lr=sft__learning_rate, name=run__name)

    out = tmp_path_factory.mktemp("pkg") / "pipeline.yaml"
    compiler.Compiler().compile(pipe, str(out))
    return out


# --- connecting ------------------------------------------------------------------------------------


def test_client_needs_a_host_outside_a_pod(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(cluster.ClusterError, match="--host"):
        cluster.client(None, "kubeflow", None)
    with pytest.raises(cluster.ClusterError, match="scheme"):
        cluster.client("ml-pipeline:8888")


def test_client_talks_to_host(fake_kfp):
    kc = cluster.client(fake_kfp.url, "kubeflow", None)
    assert isinstance(kc, kfp.Client)
    (h,) = fake_kfp.calls("GET", "/healthz")
    assert "authorization" not in h["headers"]  # outside a pod there is no token to send


def test_in_pod_the_service_account_token_is_sent(fake_kfp, monkeypatch, tmp_path):
    token = tmp_path / "token"
    token.write_text("eyJ-projected-sa-token\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))
    cluster.client(fake_kfp.url, "kubeflow", None)
    (h,) = fake_kfp.calls("GET", "/healthz")
    assert h["headers"]["authorization"] == "Bearer eyJ-projected-sa-token"


def test_in_pod_without_host_uses_the_in_cluster_service(monkeypatch, tmp_path):
    """The in-cluster DNS name does not resolve here, so kfp.Client is replaced by a recorder for this one."""
    token = tmp_path / "token"
    token.write_text("sa-token")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))
    seen = {}
    monkeypatch.setattr(kfp, "Client", lambda **kw: seen.update(kw) or "client")
    assert cluster.client(None, "team-a", None) == "client"
    assert seen == {"host": "http://ml-pipeline.team-a.svc.cluster.local:8888", "namespace": "team-a", "existing_token": "sa-token"}


def test_token_falls_back_to_the_service_account_token(tmp_path):
    sa = tmp_path / "sa"
    sa.write_text("sa")
    assert cluster.read_token([str(tmp_path / "missing"), str(sa)]) == "sa"
    assert cluster.read_token([str(tmp_path / "missing")]) is None
    assert cluster.token_paths()[-1] == "/var/run/secrets/kubernetes.io/serviceaccount/token"


def _kubeconfig(tmp_path, server):
    cfg = {
        "apiVersion": "v1", "kind": "Config", "current-context": "lab",
        "clusters": [{"name": "lab", "cluster": {"server": server}}],
        "users": [{"name": "me", "user": {"token": "kube-user-token"}}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "me"}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_kube_context_goes_through_the_api_server_proxy(fake_kfp, monkeypatch, tmp_path, package):
    from kubernetes.config import kube_config

    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(_kubeconfig(tmp_path, fake_kfp.url)))
    kc = cluster.client(None, "kubeflow", "lab")
    (h,) = fake_kfp.calls("GET", "/healthz")
    assert h["raw_path"] == f"{PROXY}{API}/healthz"
    assert h["headers"]["authorization"] == "Bearer kube-user-token"
    # later calls keep going through the proxy (kfp.Client(kube_context=...) loses the path here)
    cluster.upload(kc, package, "thinkforge", "v1")
    assert len(fake_kfp.requests) > 3 and all(r["raw_path"].startswith(PROXY + API) for r in fake_kfp.requests)
    assert all(r["headers"]["authorization"] == "Bearer kube-user-token" for r in fake_kfp.requests)
    with pytest.raises(cluster.ClusterError, match="not in kubeconfig.*--host"):
        cluster.client(None, "kubeflow", "elsewhere")
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "none"))
    with pytest.raises(cluster.ClusterError, match="no usable kubeconfig.*--host"):
        cluster.client(None, "kubeflow", "lab")


# --- upload ------------------------------------------------------------------------------------------


def test_upload_creates_the_pipeline_then_adds_versions(fake_kfp, package):
    kc = cluster.client(fake_kfp.url)
    pid, vid = cluster.upload(kc, package, "thinkforge", "0.1.0-r1", description="math reasoner")
    (create,) = fake_kfp.calls("POST", "/pipelines")
    assert create["json"] == {"display_name": "thinkforge", "description": "math reasoner"}
    (up,) = fake_kfp.calls("POST", "/pipelines/upload_version")
    assert up["query"] == {"name": "0.1.0-r1", "pipelineid": pid, "description": "math reasoner"}
    assert up["files"]["uploadfile"] == package.read_bytes()
    assert fake_kfp.versions[vid]["display_name"] == "0.1.0-r1"
    lookup = fake_kfp.calls("GET", "/pipelines")[0]
    (pred,) = json.loads(lookup["query"]["filter"])["predicates"]
    assert pred["key"] == "display_name" and pred["stringValue"] == "thinkforge" and pred["operation"] in (1, "EQUALS")
    vlookup = fake_kfp.calls("GET", f"/pipelines/{pid}/versions")
    assert not vlookup  # a new pipeline has no versions to look through

    pid2, vid2 = cluster.upload(kc, package, "thinkforge", "0.1.0-r2")
    assert pid2 == pid and vid2 != vid
    assert len(fake_kfp.calls("POST", "/pipelines")) == 1  # no second pipeline
    assert len(fake_kfp.calls("POST", "/pipelines/upload_version")) == 2

    # the same version name again (a retried hook): reused, nothing uploaded
    assert cluster.upload(kc, package, "thinkforge", "0.1.0-r1") == (pid, vid)
    assert len(fake_kfp.calls("POST", "/pipelines/upload_version")) == 2


def test_upload_into_a_profile_namespace(fake_kfp, package):
    """Multi-user KFP: the pipeline belongs to the profile (created and found there), not to the shared
    list, where kfp.Client.get_pipeline_id looks."""
    kc = cluster.client(fake_kfp.url, "kubeflow", None, user_namespace="team-a")
    pid, _ = cluster.upload(kc, package, "thinkforge", "v1", namespace="team-a")
    (create,) = fake_kfp.calls("POST", "/pipelines")
    assert create["json"]["namespace"] == "team-a"
    assert fake_kfp.calls("GET", "/pipelines")[0]["query"]["namespace"] == "team-a"
    assert cluster.upload(kc, package, "thinkforge", "v2", namespace="team-a")[0] == pid  # found again there
    assert len(fake_kfp.calls("POST", "/pipelines")) == 1


# --- submit ------------------------------------------------------------------------------------------


def test_submit_from_package(fake_kfp, package):
    kc = cluster.client(fake_kfp.url)
    run_id = cluster.submit(kc, package, params={"sft__learning_rate": 2e-5, "run__name": "try-1"}, experiment="math",
                            run_name="try-1", pipeline_root="minio://thinkforge/pipelines", service_account="pipeline-runner")
    (exp,) = fake_kfp.calls("POST", "/experiments")
    assert exp["json"]["display_name"] == "math"
    (run,) = fake_kfp.calls("POST", "/runs")
    body = run["json"]
    assert body["display_name"] == "try-1" and body["experiment_id"] == fake_kfp.runs[run_id]["experiment_id"]
    assert body["runtime_config"] == {"parameters": {"sft__learning_rate": 2e-5, "run__name": "try-1"}, "pipeline_root": "minio://thinkforge/pipelines"}
    assert body["pipeline_spec"]["pipelineInfo"]["name"] == "thinkforge"
    assert body["service_account"] == "pipeline-runner"
    assert "pipeline_version_reference" not in body
    # the experiment is reused, not created twice
    cluster.submit(kc, package, experiment="math")
    assert len(fake_kfp.calls("POST", "/experiments")) == 1


def test_user_namespace_owns_experiments_and_runs(fake_kfp, package):
    kc = cluster.client(fake_kfp.url, "kubeflow", None, user_namespace="team-a")
    cluster.submit(kc, package, experiment="math", run_name="r")
    lookup = fake_kfp.calls("GET", "/experiments")[0]
    assert lookup["query"]["namespace"] == "team-a"
    assert fake_kfp.calls("POST", "/experiments")[0]["json"]["namespace"] == "team-a"


def test_submit_from_uploaded_version(fake_kfp, package):
    kc = cluster.client(fake_kfp.url)
    pid, vid = cluster.upload(kc, package, "thinkforge", "v1")
    cluster.submit(kc, pipeline_id=pid, version_id=vid, params={"run__name": "x"}, experiment="math", run_name="r")
    body = fake_kfp.calls("POST", "/runs")[0]["json"]
    assert body["pipeline_version_reference"] == {"pipeline_id": pid, "pipeline_version_id": vid}
    assert "pipeline_spec" not in body
    with pytest.raises(ValueError):
        cluster.submit(kc, package, pipeline_id=pid, version_id=vid)


# --- schedule ----------------------------------------------------------------------------------------


def test_schedule_creates_then_replaces_the_recurring_run(fake_kfp, package):
    kc = cluster.client(fake_kfp.url)
    pid, vid = cluster.upload(kc, package, "thinkforge", "v1")
    first = cluster.schedule(kc, pid, vid, "0 0 3 * * 0", {"run__name": "nightly"}, "retrain", "thinkforge-retrain")
    (post,) = fake_kfp.calls("POST", "/recurringruns")
    body = post["json"]
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 0"}}
    assert body["display_name"] == "thinkforge-retrain" and body["max_concurrency"] == 1
    assert body["mode"] == "ENABLE" and body["no_catchup"] is True
    assert body["pipeline_version_reference"] == {"pipeline_id": pid, "pipeline_version_id": vid}
    assert body["runtime_config"] == {"parameters": {"run__name": "nightly"}}
    assert body["experiment_id"] == fake_kfp.experiments[body["experiment_id"]]["experiment_id"]
    assert not fake_kfp.calls("DELETE")

    pid2, vid2 = cluster.upload(kc, package, "thinkforge", "v2")
    second = cluster.schedule(kc, pid2, vid2, "0   30 2 * * 1", {}, "retrain", "thinkforge-retrain", max_concurrency=2)
    posts = fake_kfp.calls("POST", "/recurringruns")
    assert len(posts) == 2 and posts[1]["json"]["trigger"]["cron_schedule"]["cron"] == "0 30 2 * * 1"
    assert posts[1]["json"]["max_concurrency"] == 2
    (delete,) = fake_kfp.calls("DELETE")
    assert delete["path"] == f"{API}/recurringruns/{first}"
    # the new one was created before the old one was deleted
    order = [(r["method"], r["path"]) for r in fake_kfp.requests]
    assert order.index(("POST", f"{API}/recurringruns")) < order.index(("DELETE", f"{API}/recurringruns/{first}"))
    assert list(fake_kfp.recurring) == [second]
    lst = fake_kfp.calls("GET", "/recurringruns")[-1]
    assert lst["query"]["experiment_id"] == posts[1]["json"]["experiment_id"]


@pytest.mark.parametrize(
    "cron, why",
    [("0 3 * * 0", "Did you mean '0 0 3 \\* \\* 0'"), ("0 0 25 * * *", "hour 25 is outside 0-23"), ("0 0 3 * * 0 2026", "7 fields"),
     ("0 0 3 ? * ?x", "day-of-week"), ("? 0 3 * * 0", "'\\?' is allowed only"), ("0 */0 * * * *", "step"), ("@sometimes", "descriptor")],
)
def test_bad_cron_is_refused_before_any_request(fake_kfp, cron, why):
    kc = cluster.client(fake_kfp.url)
    n = len(fake_kfp.requests)
    with pytest.raises(ValueError, match=why):
        cluster.schedule(kc, "p", "v", cron, {}, "e", "j")
    assert len(fake_kfp.requests) == n


@pytest.mark.parametrize("cron", ["0 0 3 * * 0", "*/15 * * * * *", "0 0 9 ? * MON-FRI", "0 0 0 1 JAN,JUL ?", "@every 12h", "@weekly", "5,35 0-10/2 * * * *"])
def test_good_cron(cron):
    assert cluster.validate_cron(cron) == cron


# --- the CLI -----------------------------------------------------------------------------------------


def _cli(argv):
    parser = argparse.ArgumentParser(prog="thinkforge")
    cluster.add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_upload_submit_schedule(fake_kfp, package, capsys):
    host = ["--host", fake_kfp.url]
    assert _cli(["upload", *host, "--package", str(package), "--pipeline-name", "tf", "--version", "v1"]) == 0
    ids = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fake_kfp.versions[ids["version_id"]]["display_name"] == "v1"

    # default version name = content hash: uploading the same package twice is a no-op
    assert _cli(["upload", *host, "--package", str(package), "--pipeline-name", "tf"]) == 0
    assert _cli(["upload", *host, "--package", str(package), "--pipeline-name", "tf"]) == 0
    names = sorted(v["display_name"] for v in fake_kfp.versions.values())
    assert len(names) == 2 and names[0].startswith("sha-")

    assert _cli(["submit", *host, "--package", str(package), "--set", "sft.learning_rate=2e-5", "--set", "run.name=cli",
                 "--experiment", "exp", "--run-name", "cli-run", "--pipeline-root", "minio://thinkforge/p"]) == 0
    body = fake_kfp.calls("POST", "/runs")[-1]["json"]
    # values are typed by the config model: "2e-5" (a YAML string) arrives as the float the pipeline declares
    assert body["runtime_config"] == {"parameters": {"sft__learning_rate": 2e-5, "run__name": "cli"}, "pipeline_root": "minio://thinkforge/p"}
    assert body["display_name"] == "cli-run"

    assert _cli(["schedule", *host, "--package", str(package), "--pipeline-name", "tf", "--version", "v1", "--cron", "0 0 3 * * 0",
                 "--set", "run.name=weekly", "--experiment", "exp", "--job-name", "weekly", "--service-account", "pipeline-runner"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rr = fake_kfp.recurring[out["recurring_run_id"]]
    assert out["version_id"] == ids["version_id"]  # v1 reused
    assert rr["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 0" and rr["display_name"] == "weekly"
    assert rr["runtime_config"]["parameters"] == {"run__name": "weekly"} and rr["service_account"] == "pipeline-runner"


def test_cli_submit_uploaded_version_with_a_recipe_sends_every_field(fake_kfp, package, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run: {name: from-recipe}\nsft: {epochs: 2}\n")
    kc = cluster.client(fake_kfp.url)
    pid, vid = cluster.upload(kc, package, "tf", "v1")
    assert _cli(["submit", "--host", fake_kfp.url, "--pipeline-id", pid, "--version-id", vid, "--recipe", str(recipe), "--set", "sft.batch_size=8"]) == 0
    params = fake_kfp.calls("POST", "/runs")[-1]["json"]["runtime_config"]["parameters"]
    assert params["run__name"] == "from-recipe" and params["sft__epochs"] == 2.0 and params["sft__batch_size"] == 8
    assert all("__" in k for k in params) and len(params) > 50


def test_cli_compiles_from_recipe(fake_kfp, package, tmp_path, monkeypatch, capsys):
    """--recipe without --package calls thinkforge.pipelines.training.compile_pipeline (stubbed here)."""
    seen = {}

    def compile_pipeline(recipe, out_path, **kw):
        seen["recipe"], seen["kw"] = recipe, kw
        Path(out_path).write_bytes(package.read_bytes())

    stub = types.ModuleType("thinkforge.pipelines.training")
    stub.compile_pipeline = compile_pipeline
    monkeypatch.setitem(sys.modules, "thinkforge.pipelines.training", stub)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run: {name: demo}\n")
    assert _cli(["upload", "--host", fake_kfp.url, "--recipe", str(recipe), "--set", "sft.learning_rate=3e-5", "--version", "v9"]) == 0
    assert seen["recipe"].run.name == "demo" and seen["recipe"].sft.learning_rate == 3e-5 and seen["kw"] == {}
    assert _cli(["upload", "--host", fake_kfp.url, "--recipe", str(recipe), "--image", "reg/tf:1-cuda", "--version", "v10"]) == 0
    assert seen["kw"] == {"image": "reg/tf:1-cuda"}
    assert [v["display_name"] for v in fake_kfp.versions.values()] == ["v9", "v10"]


def test_cli_errors_are_one_line(fake_kfp, capsys, package):
    assert cluster.main(["schedule", "--host", fake_kfp.url, "--package", str(package), "--cron", "0 3 * * 0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cron '0 3 * * 0' has 5 fields") and "Did you mean '0 0 3 * * 0'" in err
    assert not fake_kfp.requests
    assert cluster.main(["upload", "--host", fake_kfp.url]) == 2
    assert "--package" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        cluster.run_params(argparse.Namespace(set=["nosuch.field=1"], recipe=None), full=False)
    # a valid recipe field the compiled pipeline does not declare: refused before any run is created
    assert cluster.main(["submit", "--host", fake_kfp.url, "--package", str(package), "--set", "sft.batch_size=8"]) == 2
    assert "no parameter(s) sft__batch_size" in capsys.readouterr().err
    assert not fake_kfp.calls("POST", "/runs")


def test_cli_with_the_real_pipeline(fake_kfp, capsys):
    """`thinkforge schedule --recipe recipes/cpu-demo.yaml`: compiled by thinkforge.pipelines.training."""
    pytest.importorskip("thinkforge.pipelines.training")
    recipe = ROOT / "recipes" / "cpu-demo.yaml"
    if not recipe.exists():
        pytest.skip("recipes/cpu-demo.yaml not written yet")
    assert _cli(["schedule", "--host", fake_kfp.url, "--recipe", str(recipe), "--image", "reg/thinkforge:9-cuda", "--version", "r1",
                 "--cron", "0 0 3 * * 0", "--set", "sft.learning_rate=2e-5"]) == 0
    (version,) = fake_kfp.versions.values()
    spec = version["pipeline_spec"]
    declared = spec["root"]["inputDefinitions"]["parameters"]
    assert declared["sft__learning_rate"]["defaultValue"] == 2e-5  # the override is baked into the defaults
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {"reg/thinkforge:9-cuda"}
    (rr,) = fake_kfp.recurring.values()
    assert rr["runtime_config"]["parameters"] == {"sft__learning_rate": 2e-5}
    assert set(rr["runtime_config"]["parameters"]) <= set(declared)


# --- the bucket --------------------------------------------------------------------------------------


def test_ensure_bucket(s3_server, monkeypatch, capsys):
    name = f"tf-{uuid.uuid4().hex[:8]}"
    assert cluster.ensure_bucket(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, name, secure=False) is True
    assert cluster.ensure_bucket(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, name, secure=False) is False
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("THINKFORGE_S3_BUCKET", name)
    assert cluster.main(["ensure-bucket"]) == 0
    assert f"bucket {name} exists" in capsys.readouterr().out


def test_ensure_bucket_names_the_endpoint_when_down():
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(cluster.ClusterError, match=f"127.0.0.1:{port} unreachable after 2 attempts"):
        cluster.ensure_bucket(f"127.0.0.1:{port}", "a", "b", "bucket", secure=False, attempts=2, delay_s=0.01)
