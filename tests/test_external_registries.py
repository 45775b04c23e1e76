"""Publishing to external model registries (issue 16): MLflow's model registry against the REAL MLflow
tracking server (tests/plugins/mlflow.py, loopback, SQLite store), and the Kubeflow Model Registry
against a FAKE: no Model Registry server can run here, so `FakeKubeflowRegistry` is a loopback HTTP
server that answers the REST calls thinkforge makes as the kubeflow/model-registry OpenAPI spec documents
them (`/api/model_registry/v1`, as the model-registry 0.3.18 client's generated `mr_openapi` calls it:
RegisteredModel, ModelVersion, ModelArtifactList, 404 with an Error body for a find that matches nothing),
and the tests assert the exact requests thinkforge sent.

thinkforge's own registry is a local directory here (tests/test_registry.py covers it on S3 as well)."""

from __future__ import annotations

import json
import logging
import os
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from thinkforge.config import ConfigError, Recipe, validate
from thinkforge.external_registries import ExternalRegistryError, register_external
from thinkforge.registry import LocalBackend, Registry, S3Backend
from thinkforge.stages.publish import publish as publish_stage
from registry_helpers import make_cfg, results, write_model

TOKEN = "tok-s3cr3t-value"






@pytest.fixture
def model_dir(tmp_path):
    return write_model(tmp_path / "model")


def publish(cfg, model_dir, tmp_path, value, kfp_run="", backend=None):
    """The publish step as the component calls it, with results.json files and a local registry."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"results-{value}.json"
    path.write_text(json.dumps(results(cfg, value)))
    return publish_stage(cfg, model_dir, {"final": path}, kfp_run=kfp_run,
                         backend=backend or LocalBackend(tmp_path / "registry"))


@pytest.fixture
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("MLFLOW_") or key in ("THINKFORGE_MODEL_REGISTRY_TOKEN", "KF_PIPELINES_SA_TOKEN_PATH"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", "/nonexistent/token")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    return monkeypatch


# ------------------------------------------------------------------------------------------------ config


def test_external_registries_are_off_by_default_and_the_url_is_checked_by_field_name():
    r = Recipe().registry
    assert (r.mlflow, r.mlflow_name, r.kubeflow_url, r.external_required) == (False, "", "", False)
    with pytest.raises(ConfigError, match=r"registry\.kubeflow_url"):
        validate({"registry": {"kubeflow_url": "model-registry:8080"}})
    with pytest.raises(ConfigError, match=r"registry\.kubeflow_url.*credentials"):
        validate({"registry": {"kubeflow_url": "http://me:pw@model-registry:8080"}})
    assert register_external(Recipe(), {"published": True, "version": "v"}) == {}


def test_publish_without_external_registries_has_no_external_key(tmp_path, model_dir, clean_env):
    out = publish(make_cfg("ext-test"), model_dir, tmp_path, 0.5)
    assert out["promoted"] and "external" not in out


# ------------------------------------------------------------------------------------- real MLflow server


def versions_of(client, name):
    return sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def test_mlflow_registers_each_version_and_the_champion_alias_follows_promotions(
        mlflow_server, tmp_path, model_dir, clean_env):
    """Against the real MLflow server: the model folder as a run's artifact, a model version per published
    version with the metrics and config digest as tags, the alias `champion` on the promoted one only; a
    retried publish (same KFP run, same model) finds its version by tag instead of registering a twin."""
    cfg = make_cfg("ext-test", mlflow=True, mlflow_name="ext-math")
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": mlflow_server.url})})
    client = mlflow_server.client()

    first = publish(cfg, model_dir, tmp_path, 0.5, kfp_run="kfp-1")
    ext = first["external"]["mlflow"]
    assert first["promoted"] and ext["ok"], first["external"]
    assert ext["name"] == "ext-math" and ext["version"] == "1" and ext["alias"] == "champion"
    (mv,) = versions_of(client, "ext-math")
    assert mv.tags["thinkforge.version"] == first["version"]
    assert mv.tags["thinkforge.config_digest"] == cfg.digest() and float(mv.tags["wp.pass_at_1"]) == 0.5
    assert client.get_registered_model("ext-math").aliases == {"champion": "1"}
    assert client.get_model_version_by_alias("ext-math", "champion").version == "1"
    run = client.get_run(mv.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "ext-test-publish"
    assert run.data.params["config_digest"] == cfg.digest() and run.data.metrics["wp.pass_at_1"] == 0.5
    assert run.data.tags["thinkforge.version"] == first["version"]
    logged = {f.path for f in client.list_artifacts(mv.run_id, "model")}
    assert {"model/config.json", "model/model.safetensors", "model/README.md"} <= logged
    assert mv.source.endswith("/model")

    again = publish(cfg, model_dir, tmp_path, 0.5, kfp_run="kfp-1")  # a retried publish task
    assert again["version"] == first["version"] and again["external"]["mlflow"]["version"] == "1"
    assert len(versions_of(client, "ext-math")) == 1
    exp = client.get_experiment_by_name("ext-test")
    assert len(client.search_runs([exp.experiment_id])) == 1

    same = publish(cfg, model_dir, tmp_path, 0.5)  # published, not promoted: a version, no alias move
    assert not same["promoted"] and same["external"]["mlflow"]["version"] == "2"
    assert "alias" not in same["external"]["mlflow"]
    assert client.get_registered_model("ext-math").aliases == {"champion": "1"}

    better = publish(cfg, model_dir, tmp_path, 0.75)
    assert better["promoted"] and better["external"]["mlflow"]["version"] == "3"
    assert client.get_registered_model("ext-math").aliases == {"champion": "3"}
    assert [v.tags["thinkforge.version"] for v in versions_of(client, "ext-math")] == [
        first["version"], same["version"], better["version"]]


def test_an_unreachable_mlflow_is_reported_by_server_and_field_without_credentials(
        tmp_path, model_dir, clean_env, caplog):
    cfg = make_cfg("ext-test", mlflow=True)
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://someone:pw-s3cr3t@127.0.0.1:9")
    with caplog.at_level(logging.INFO):
        out = publish(cfg, model_dir, tmp_path, 0.5)
    assert out["published"] and out["promoted"]  # thinkforge's registry stands
    err = out["external"]["mlflow"]
    assert not err["ok"] and "registry.mlflow" in err["error"] and "127.0.0.1:9" in err["error"]
    assert "pw-s3cr3t" not in err["error"] and "pw-s3cr3t" not in caplog.text

    clean_env.delenv("MLFLOW_TRACKING_URI")
    none = publish(make_cfg("ext-test", mlflow_name="x"), model_dir, tmp_path / "c", 0.5)
    assert none["external"]["mlflow"] == {
        "ok": False, "error": "registry.mlflow: no MLflow server: set tracking.uri or MLFLOW_TRACKING_URI"}


# --------------------------------------------------------------------------- Kubeflow Model Registry (fake)


class FakeKubeflowRegistry:
    """The Model Registry REST API in memory, answering as its OpenAPI spec documents; every request is
    recorded as (method, path, query, body, authorization). `fail` maps (method, path prefix) to a status
    answered once."""

    API = "/api/model_registry/v1"

    def __init__(self):
        self.requests: list[tuple] = []
        self.models: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}
        self.artifacts: dict[str, list[dict]] = {}
        self.fail: dict[tuple[str, str], int] = {}
        self._next = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _handle(self, method):
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                fake.requests.append((method, url.path, query, body, self.headers.get("Authorization")))
                status, answer = fake.answer(method, url.path, query, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_PATCH(self):
                self._handle("PATCH")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def new_id(self) -> str:
        self._next += 1
        return str(self._next)

    @staticmethod
    def stamp(obj: dict) -> dict:
        return {**obj, "createTimeSinceEpoch": "1700000000000", "lastUpdateTimeSinceEpoch": "1700000000000"}

    def answer(self, method, path, query, body):
        for (m, prefix), status in list(self.fail.items()):
            if m == method and path.startswith(self.API + prefix):
                del self.fail[(m, prefix)]
                return status, {"code": str(status), "message": "injected failure"}
        rel = path.removeprefix(self.API)
        parts = rel.strip("/").split("/")
        not_found = (404, {"code": "404", "message": "no such resource"})
        if method == "GET" and rel == "/registered_model":
            rm = next((r for r in self.models.values() if r["name"] == query.get("name")), None)
            return (200, rm) if rm else not_found
        if method == "POST" and rel == "/registered_models":
            rm = self.stamp({"id": self.new_id(), "state": "LIVE", **body})
            self.models[rm["id"]] = rm
            return 201, rm
        if method == "PATCH" and parts[0] == "registered_models" and len(parts) == 2:
            self.models[parts[1]].update(body)
            return 200, self.models[parts[1]]
        if method == "GET" and rel == "/model_version":
            mv = next((v for v in self.versions.values() if v["name"] == query.get("name")
                       and v["registeredModelId"] == query.get("parentResourceId")), None)
            return (200, mv) if mv else not_found
        if method == "POST" and rel == "/model_versions":
            mv = self.stamp({"id": self.new_id(), "state": "LIVE", **body})
            self.versions[mv["id"]] = mv
            return 201, mv
        if parts[0] == "model_versions" and len(parts) == 2 and method == "PATCH":
            self.versions[parts[1]].update(body)
            return 200, self.versions[parts[1]]
        if parts[0] == "model_versions" and len(parts) == 3 and parts[2] == "artifacts":
            items = self.artifacts.setdefault(parts[1], [])
            if method == "GET":
                return 200, {"items": items, "size": len(items), "pageSize": 100, "nextPageToken": ""}
            art = self.stamp({"id": self.new_id(), **body})
            items.append(art)
            return 200, art
        return 404, {"code": "404", "message": f"no route {method} {rel}"}


@pytest.fixture
def kubeflow():
    fake = FakeKubeflowRegistry()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def requests_of(fake):
    """The requests without the API root and the Authorization header."""
    return [(m, p.removeprefix(fake.API), q, b) for m, p, q, b, _ in fake.requests]


def test_kubeflow_registers_model_version_and_artifact_and_marks_the_version_live_last(
        kubeflow, tmp_path, model_dir, clean_env, caplog, object_store):
    """thinkforge's registry on S3 (moto on loopback): the artifact's uri is the model folder's S3 prefix."""
    clean_env.setenv("THINKFORGE_MODEL_REGISTRY_TOKEN", TOKEN)
    cfg = make_cfg("ext-test", kubeflow_url=kubeflow.url)
    backend = S3Backend(object_store)
    with caplog.at_level(logging.DEBUG):
        out = publish(cfg, model_dir, tmp_path, 0.5, kfp_run="kfp-1", backend=backend)
    version = out["version"]
    reg = Registry.for_recipe(cfg, backend)
    model_uri = reg.uri(f"{reg.entry(version)}/model")
    assert model_uri == f"s3://{object_store.bucket}/registry/ext-test/versions/{version}/model"
    ext = out["external"]["kubeflow"]
    assert ext == {"ok": True, "server": kubeflow.url, "registered_model_id": "1", "model_version_id": "2",
                   "uri": model_uri, "champion": version}

    def s(v):
        return {"metadataType": "MetadataStringValue", "string_value": v}

    def d(v):
        return {"metadataType": "MetadataDoubleValue", "double_value": v}

    props = {"thinkforge_version": s(version), "config_digest": s(cfg.digest()),
             "thinkforge_where": s(reg.uri(reg.entry(version))), "kfp_run": s("kfp-1"),
             "wp.pass@1": d(0.5), "wp.pass@1_se": d(0.1), "wp.cons@2": d(0.5), "wp.n_problems": d(4.0),
             "wp.k": d(2.0)}
    assert requests_of(kubeflow) == [
        ("GET", "/registered_model", {"name": "ext-test"}, None),
        ("POST", "/registered_models", {}, {"name": "ext-test", "description": "thinkforge model line ext-test",
                                        "customProperties": {"thinkforge_registry": s(reg.uri())}}),
        ("GET", "/model_version", {"name": version, "parentResourceId": "1"}, None),
        ("POST", "/model_versions", {}, {"name": version, "registeredModelId": "1", "state": "ARCHIVED",
                                     "author": "thinkforge", "customProperties": props}),
        ("GET", "/model_versions/2/artifacts", {}, None),
        ("POST", "/model_versions/2/artifacts", {}, {"artifactType": "model-artifact", "name": f"ext-test-{version}",
                                                 "uri": model_uri, "modelFormatName": "safetensors",
                                                 "modelFormatVersion": "1", "state": "LIVE"}),
        ("PATCH", "/model_versions/2", {}, {"state": "LIVE"}),
        ("PATCH", "/registered_models/1", {}, {"customProperties": {"thinkforge_registry": s(reg.uri()),
                                                                "champion": s(version)}}),
    ]
    assert {auth for *_, auth in kubeflow.requests} == {f"Bearer {TOKEN}"}
    assert TOKEN not in caplog.text and TOKEN not in json.dumps(out, default=str)

    # a retried publish task: everything is found complete, nothing is registered twice
    kubeflow.requests.clear()
    again = publish(cfg, model_dir, tmp_path, 0.5, kfp_run="kfp-1", backend=backend)
    assert again["version"] == version and again["external"]["kubeflow"]["model_version_id"] == "2"
    assert [(m, p) for m, p, *_ in requests_of(kubeflow)] == [
        ("GET", "/registered_model"), ("GET", "/model_version"), ("PATCH", "/registered_models/1")]
    assert len(kubeflow.versions) == 1 and len(kubeflow.artifacts["2"]) == 1


def test_a_kubeflow_failure_mid_registration_leaves_an_archived_version_that_a_retry_completes(
        kubeflow, tmp_path, model_dir, clean_env):
    cfg = make_cfg("ext-test", kubeflow_url=kubeflow.url + "/")
    kubeflow.fail[("POST", "/model_versions/")] = 500  # the artifact POST
    out = publish(cfg, model_dir, tmp_path, 0.5, kfp_run="kfp-2")
    assert out["published"] and out["promoted"]
    err = out["external"]["kubeflow"]
    assert not err["ok"]
    assert err["error"] == (f"Kubeflow Model Registry at {kubeflow.url} (registry.kubeflow_url): "
                            "POST /model_versions/2/artifacts: HTTP 500: injected failure")
    (mv,) = kubeflow.versions.values()
    assert mv["state"] == "ARCHIVED" and not kubeflow.artifacts["2"]  # never shown as complete

    kubeflow.requests.clear()
    again = publish(cfg, model_dir, tmp_path, 0.5, kfp_run="kfp-2")
    assert again["external"]["kubeflow"]["ok"]
    assert [(m, p) for m, p, *_ in requests_of(kubeflow)] == [
        ("GET", "/registered_model"), ("GET", "/model_version"), ("GET", "/model_versions/2/artifacts"),
        ("POST", "/model_versions/2/artifacts"), ("PATCH", "/model_versions/2"), ("PATCH", "/registered_models/1")]
    assert kubeflow.versions["2"]["state"] == "LIVE" and len(kubeflow.artifacts["2"]) == 1
    assert all(auth is None for *_, auth in kubeflow.requests)  # no token configured: none sent


def test_external_required_fails_the_step_naming_server_and_field(kubeflow, tmp_path, model_dir, clean_env):
    cfg = make_cfg("ext-test", kubeflow_url=kubeflow.url, external_required=True)
    kubeflow.fail[("GET", "/registered_model")] = 503
    with pytest.raises(ExternalRegistryError) as e:
        publish(cfg, model_dir, tmp_path, 0.5)
    msg = str(e.value)
    assert f"Kubeflow Model Registry at {kubeflow.url} (registry.kubeflow_url)" in msg and "HTTP 503" in msg
    assert "registry.external_required" in msg
    reg = Registry.for_recipe(cfg, LocalBackend(tmp_path / "registry"))
    assert len(reg.versions()) == 1 and reg.champion()[0] is not None  # thinkforge's own publish stands

    older = make_cfg("ext-test", kubeflow_url=kubeflow.url + "/api/model_registry/v1alpha3")
    kubeflow.requests.clear()
    publish(older, model_dir, tmp_path / "older", 0.5)
    assert kubeflow.requests[0][1] == "/api/model_registry/v1alpha3/registered_model"
