"""Publish to the model registries teams already run, when the recipe names them (issue 16).

After thinkforge's own registry (`thinkforge.registry`) has published a version and its gate has decided,
the publish step calls `register_external`: each configured external registry gets the same version.

MLflow (`registry.mlflow: true`, or `registry.mlflow_name` set; the server is `tracking.uri`, else
MLFLOW_TRACKING_URI; never MLflow's ./mlruns default):
  1. a run `<run.name>[-<run.id>]-publish` in experiment `tracking.experiment` (default run.name), tagged
     `thinkforge.version`, with the published model folder as its artifact `model`, the final metrics as
     metrics (`<benchmark>.pass_at_1`: MLflow names may not hold `@`), the config digest and where the
     version lives in thinkforge's registry as params; set FINISHED only after the upload;
  2. a model version of registered model `registry.mlflow_name` (default the thinkforge registry name)
     from that run's `model` artifact, with the metrics, config digest and `thinkforge.version` as tags;
  3. when thinkforge's `champion.json` points at this version, the registered model's alias `champion`
     moves to it (aliases, not the deprecated stages), LAST.
  Idempotent: a retry finds the model version by its `thinkforge.version` tag (and a FINISHED run by the
  same tag) instead of registering a twin; an unfinished run of an earlier attempt is marked FAILED.

Kubeflow Model Registry (`registry.kubeflow_url`, e.g. http://model-registry-service.kubeflow:8080):
plain HTTP against its REST API (`/api/model_registry/v1` as in model-registry 0.3.18, or the API root the
URL names, e.g. `.../api/model_registry/v1alpha3` for older servers; the OpenAPI types RegisteredModel,
ModelVersion, ModelArtifact of kubeflow/model-registry), not the `model-registry` Python client: its
`register_model` raises "Version ... already exists" on a retry and cannot complete a version an earlier
attempt left without its artifact, and it patches asyncio process-wide (nest_asyncio) and pulls aiohttp
into the image. The steps:
  1. the RegisteredModel by name (`GET /registered_model?name=`), created when missing;
  2. the ModelVersion by name under it (`GET /model_version?name=&parentResourceId=`), created when
     missing with state ARCHIVED (hidden from the UI's version list) and the metrics, config digest and
     thinkforge version as customProperties;
  3. the ModelArtifact (`POST /model_versions/{id}/artifacts`, uri: the S3 prefix of the published model
     folder), unless one with that uri is already there;
  4. the version's state to LIVE (`PATCH /model_versions/{id}`), LAST: a LIVE version is complete;
  5. when promoted, the registered model's customProperty `champion` names the version.
  A token for the server comes from THINKFORGE_MODEL_REGISTRY_TOKEN, else the file named by
  KF_PIPELINES_SA_TOKEN_PATH, else the pod's service-account token; it is sent as a Bearer header and
  never logged.

A failure of an external registry never undoes thinkforge's own publish (done first, it is the source
of truth): it is reported in the decision under `external.<registry>` with `ok: false` and an error that
names the server (credentials removed from the URL) and the recipe field. The step fails only with
`registry.external_required: true`; a retried publish task then finds everything already done and
finishes what is not.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from thinkforge.config import Recipe

log = logging.getLogger("thinkforge.external_registries")

VERSION_TAG = "thinkforge.version"
ALIAS = "champion"
KF_API = "/api/model_registry/v1"
SA_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


class ExternalRegistryError(RuntimeError):
    """An external registry refused or could not be reached (the message names the server and field)."""


def redact(url: str) -> str:
    """`url` without user:password@ and without its query (where tokens sometimes ride)."""
    try:
        p = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    host = p.hostname or ""
    if p.port:
        host = f"{host}:{p.port}"
    return urllib.parse.urlunsplit((p.scheme, host, p.path, "", ""))


def scrub(text: str) -> str:
    """`text` with the user:password@ of every URL in it removed (clients quote the URL they called)."""
    return re.sub(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@", r"\1", text)


def mlflow_enabled(cfg: Recipe) -> bool:
    return bool(cfg.registry.mlflow or cfg.registry.mlflow_name)


def configured(cfg: Recipe) -> list[str]:
    return [n for n, on in (("mlflow", mlflow_enabled(cfg)), ("kubeflow", bool(cfg.registry.kubeflow_url))) if on]


def _facts(cfg: Recipe, out: dict[str, Any], backend: Any = None) -> dict[str, Any]:
    """What both registries record, read back from thinkforge's registry (the complete entry)."""
    from thinkforge.registry import Registry

    reg = Registry.for_recipe(cfg, backend)
    version = out["version"]
    manifest = reg.manifest(version) or {}
    champ, _ = reg.champion()
    metrics: dict[str, float] = {}
    for bench, m in (manifest.get("metrics") or {}).items():
        for key, value in (m or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"{bench}.{key}"] = float(value)
    return {"reg": reg, "name": reg.name, "version": version, "manifest": manifest, "metrics": metrics,
            "config_digest": manifest.get("config_digest") or cfg.digest(),
            "model_uri": reg.uri(f"{reg.entry(version)}/model"), "entry_uri": reg.uri(reg.entry(version)),
            "kfp_run": (manifest.get("run") or {}).get("kfp_run", ""),
            "is_champion": bool(out.get("promoted")) and champ is not None and champ.get("version") == version}


def register_external(cfg: Recipe, out: dict[str, Any], backend: Any = None) -> dict[str, Any]:
    """Register the version thinkforge published (`out`: its decision) in every configured external
    registry. Returns {registry: {"ok": bool, ...}}; raises ExternalRegistryError only when one failed and
    `registry.external_required` is set."""
    names = configured(cfg)
    if not names or not out.get("published"):
        return {}
    report: dict[str, Any] = {}
    try:
        facts = _facts(cfg, out, backend)
    except Exception as e:  # noqa: BLE001 - thinkforge's registry could not be read back
        facts = None
        report = {n: {"ok": False, "error": scrub(f"{n}: reading version {out.get('version')} back from "
                                                   f"thinkforge's registry: {type(e).__name__}: {e}")}
                  for n in names}
    for name in names if facts is not None else ():
        try:
            report[name] = {"ok": True, **(mlflow_register if name == "mlflow" else kubeflow_register)(cfg, facts)}
            log.info("%s %s registered in %s: %s", facts["name"], facts["version"], name, scrub(str(report[name])))
        except Exception as e:  # noqa: BLE001 - reported, and raised only when the recipe requires it
            msg = scrub(str(e) if isinstance(e, ExternalRegistryError) else f"{name}: {type(e).__name__}: {e}")
            log.error("%s %s: external registry %s failed: %s", facts["name"], facts["version"], name, msg)
            report[name] = {"ok": False, "error": msg}
    failed = [n for n, r in report.items() if not r["ok"]]
    if failed and cfg.registry.external_required:
        raise ExternalRegistryError(
            "; ".join(report[n]["error"] for n in failed)
            + " (registry.external_required: true; thinkforge's own registry has the version, a retry finishes it)")
    return report


# --- MLflow -------------------------------------------------------------------------------------


def _metric_name(key: str) -> str:
    return re.sub(r"[^\w.\- /]", "_", key.replace("@", "_at_"))


def mlflow_register(cfg: Recipe, facts: dict[str, Any]) -> dict[str, Any]:
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    field = "registry.mlflow"
    if not uri:
        raise ExternalRegistryError(f"{field}: no MLflow server: set tracking.uri or MLFLOW_TRACKING_URI")
    where = f"MLflow at {redact(uri)} ({field}, tracking.uri)"
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ExternalRegistryError(f"{field}: the MLflow client is not installed (pip install "
                                    "'thinkforge[tracking]', mlflow-skinny)") from None
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    model_name = cfg.registry.mlflow_name or facts["name"]
    version = facts["version"]
    try:
        mv = _mlflow_find_version(client, model_name, version)
        run_id = mv.run_id if mv is not None else _mlflow_run(client, cfg, facts)
        if mv is None:
            try:
                client.get_registered_model(model_name)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                client.create_registered_model(model_name, tags={"thinkforge.registry": facts["reg"].uri()})
            source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/model"
            tags = {VERSION_TAG: version, "thinkforge.config_digest": facts["config_digest"],
                    "thinkforge.where": facts["entry_uri"],
                    **{_metric_name(k): repr(v) for k, v in facts["metrics"].items()}}
            mv = client.create_model_version(model_name, source, run_id=run_id, tags=tags,
                                             description=f"thinkforge {facts['name']} {version}")
        out = {"server": redact(uri), "name": model_name, "version": str(mv.version), "run_id": run_id}
        if facts["is_champion"]:
            client.set_registered_model_alias(model_name, ALIAS, str(mv.version))  # LAST
            out["alias"] = ALIAS
        return out
    except MlflowException as e:
        raise ExternalRegistryError(f"{where}: registered model {model_name!r} version {version}: "
                                    f"{e.error_code}: {e.message}") from None
    except OSError as e:
        raise ExternalRegistryError(f"{where}: {type(e).__name__}: {e}") from None


def _mlflow_find_version(client: Any, model_name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    token = None
    while True:
        try:
            page = client.search_model_versions(f"name = '{model_name}'", max_results=200, page_token=token)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        for mv in page:
            if (mv.tags or {}).get(VERSION_TAG) == version:
                return mv
        token = page.token
        if not token:
            return None


def _mlflow_run(client: Any, cfg: Recipe, facts: dict[str, Any]) -> str:
    """The FINISHED run holding this version's model folder: an earlier attempt's, or a new one."""
    experiment = cfg.tracking.experiment or cfg.run.name
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    version = facts["version"]
    for run in client.search_runs([exp_id], filter_string=f"tags.`{VERSION_TAG}` = '{version}'"):
        if run.info.status == "FINISHED":
            return run.info.run_id
        client.set_terminated(run.info.run_id, "FAILED")  # an earlier attempt died mid-upload
    run = client.create_run(exp_id, run_name="-".join(cfg.run.scope()) + "-publish",
                            tags={VERSION_TAG: version, "thinkforge.stage": "publish",
                                  "thinkforge.run_id": cfg.run.id, "thinkforge.config_digest": facts["config_digest"]})
    rid = run.info.run_id
    try:
        for key, value in {"config_digest": facts["config_digest"], "thinkforge_version": version,
                           "thinkforge_registry": facts["entry_uri"], "kfp_run": facts["kfp_run"]}.items():
            client.log_param(rid, key, value)
        for key, value in facts["metrics"].items():
            client.log_metric(rid, _metric_name(key), value)
        staging = Path(tempfile.mkdtemp(prefix="thinkforge-mlflow-"))
        try:
            folder = facts["reg"].backend.download_dir(f"{facts['reg'].entry(version)}/model", staging / "model")
            client.log_artifacts(rid, str(folder), "model")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    client.set_terminated(rid, "FINISHED")
    return rid


# --- Kubeflow Model Registry (REST) ------------------------------------------------------------------


def _kf_token() -> str:
    token = os.environ.get("THINKFORGE_MODEL_REGISTRY_TOKEN", "")
    if token:
        return token.strip()
    path = os.environ.get("KF_PIPELINES_SA_TOKEN_PATH", "") or SA_TOKEN
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _prop(value: Any) -> dict[str, Any]:
    if isinstance(value, float):
        return {"metadataType": "MetadataDoubleValue", "double_value": value}
    return {"metadataType": "MetadataStringValue", "string_value": str(value)}


class KubeflowRegistry:
    """The few REST calls of the Model Registry API that registering a version needs."""

    field = "registry.kubeflow_url"

    def __init__(self, url: str, token: str = "", timeout: float = 30.0):
        url = url.rstrip("/")
        # a URL that already names the API root (/api/model_registry/v1alpha3 for servers before 0.3) is kept
        self.base = url if re.search(r"/api/model_registry/[^/]+$", url) else url + KF_API
        self.shown = redact(url)
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             query: dict[str, str] | None = None) -> dict[str, Any] | None:
        """The JSON answer, or None for 404 on a GET (not found)."""
        url = self.base + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers=headers, method=method)
        what = f"Kubeflow Model Registry at {self.shown} ({self.field}): {method} {path}"
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                data = r.read()
        except urllib.error.HTTPError as e:
            if e.code == 404 and method == "GET":
                return None
            detail = e.read()[:500].decode(errors="replace")
            try:
                detail = json.loads(detail).get("message", detail)
            except (ValueError, AttributeError):
                pass
            raise ExternalRegistryError(f"{what}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ExternalRegistryError(f"{what}: {getattr(e, 'reason', e)}") from None
        try:
            return json.loads(data) if data else {}
        except ValueError:
            raise ExternalRegistryError(f"{what}: not JSON: {data[:200]!r}") from None


def kubeflow_register(cfg: Recipe, facts: dict[str, Any]) -> dict[str, Any]:
    api = KubeflowRegistry(cfg.registry.kubeflow_url, _kf_token())
    name, version = facts["name"], facts["version"]
    rm = api.call("GET", "/registered_model", query={"name": name})
    if rm is None:
        rm = api.call("POST", "/registered_models",
                      {"name": name, "description": f"thinkforge model line {name}",
                       "customProperties": {"thinkforge_registry": _prop(facts["reg"].uri())}})
    mv = api.call("GET", "/model_version", query={"name": version, "parentResourceId": rm["id"]})
    if mv is None:
        props = {"thinkforge_version": _prop(version), "config_digest": _prop(facts["config_digest"]),
                 "thinkforge_where": _prop(facts["entry_uri"]),
                 **{k: _prop(v) for k, v in facts["metrics"].items()}}
        if facts["kfp_run"]:
            props["kfp_run"] = _prop(facts["kfp_run"])
        # ARCHIVED until its artifact is registered: a half-registered version never shows as complete
        mv = api.call("POST", "/model_versions",
                      {"name": version, "registeredModelId": rm["id"], "state": "ARCHIVED",
                       "author": "thinkforge", "customProperties": props})
    if mv.get("state") != "LIVE":
        arts = api.call("GET", f"/model_versions/{mv['id']}/artifacts") or {}
        if not any(a.get("uri") == facts["model_uri"] for a in arts.get("items") or []):
            api.call("POST", f"/model_versions/{mv['id']}/artifacts",
                     {"artifactType": "model-artifact", "name": f"{name}-{version}", "uri": facts["model_uri"],
                      "modelFormatName": "safetensors", "modelFormatVersion": "1", "state": "LIVE"})
        mv = api.call("PATCH", f"/model_versions/{mv['id']}", {"state": "LIVE"})  # LAST: complete
    out = {"server": api.shown, "registered_model_id": rm["id"], "model_version_id": mv["id"],
           "uri": facts["model_uri"]}
    if facts["is_champion"]:
        props = {**(rm.get("customProperties") or {}), "champion": _prop(version)}
        api.call("PATCH", f"/registered_models/{rm['id']}", {"customProperties": props})
        out["champion"] = version
    return out
