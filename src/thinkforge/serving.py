"""Serving the registry's champion (the chart's `serving.*`).

Two halves:

* **fetch** (`python -m thinkforge.serving fetch-champion --to /models/champion --model NAME`): the init
  container of the chart's vllm-mode Deployment. It reads `<prefix>/<model>/champion.json` (see
  `thinkforge.registry`), downloads that version's `model/` folder with the project's ObjectStore (every
  file checked against the folder's `_MANIFEST.json`; nothing lands at `--to` unless all of it
  verified) and writes the pointer it used next to it (`<to>.champion.json`). S3 comes from the
  environment like every thinkforge pod's (`THINKFORGE_S3_ENDPOINT`, `_SECURE`, `_BUCKET`,
  `_ACCESS_KEY`, `_SECRET_KEY`); without an endpoint `--local-dir` names a local registry.

* **notify** (`notify_champion(cfg, version)`): what the publish step calls after it promoted `version`.
  It patches the one serving object the chart rendered, named by `THINKFORGE_SERVING_TARGET`
  (`deployment/<name>` or `inferenceservice/<name>`; the chart's is `<release>-thinkforge-serving`) in
  `THINKFORGE_SERVING_NAMESPACE` (default: the pod's own namespace):

  - Deployment (mode vllm): a strategic-merge patch of the pod template's `thinkforge.dev/champion`
    annotation. The template changes, so the Deployment rolls out a new pod, whose init container
    fetches the champion that champion.json now names. (kubernetes-client 30's generated
    `patch_namespaced_deployment` would send a dict as `application/json-patch+json`, which the API
    server rejects: the request is sent through `ApiClient.call_api` with the content type set.)
  - InferenceService (mode kserve): a JSON merge patch (the only patch type custom resources take
    besides JSON patch) of `spec.predictor.model.storageUri` to the version's model prefix and the same
    annotation; KServe rolls a new revision that downloads it.

  The chart's Role allows exactly `patch` on that object's name for the runs' service account. A
  promotion has already happened when this runs: a failure is logged and returned, never raised (the
  pointer is right; serving catches up on the next rollout or restart). Without a target it does nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from thinkforge.registry import CHAMPION, LocalBackend, Registry, RegistryError, S3Backend, fetch_version

log = logging.getLogger("thinkforge.serving")

ANNOTATION = "thinkforge.dev/champion"
ENV_TARGET = "THINKFORGE_SERVING_TARGET"
ENV_NAMESPACE = "THINKFORGE_SERVING_NAMESPACE"
ENV_BUCKET = "THINKFORGE_S3_BUCKET"
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
KSERVE = ("serving.kserve.io", "v1beta1", "inferenceservices")
STRATEGIC_MERGE = "application/strategic-merge-patch+json"
MERGE_PATCH = "application/merge-patch+json"


# --- fetch --------------------------------------------------------------------------------------


def open_backend(local_dir: str | os.PathLike[str] | None = None, bucket: str = "") -> LocalBackend | S3Backend:
    """S3 from the environment (THINKFORGE_S3_ENDPOINT ...), else the local registry at `local_dir`."""
    from thinkforge.config import StorageConfig
    from thinkforge.storage import ObjectStore

    cfg = StorageConfig(bucket=bucket or os.environ.get(ENV_BUCKET) or StorageConfig().bucket)
    store = ObjectStore.from_config_or_none(cfg)
    if store is not None:
        return S3Backend(store)
    if local_dir:
        return LocalBackend(local_dir)
    raise RegistryError("no registry: set THINKFORGE_S3_ENDPOINT (and the S3 credentials) or --local-dir")


def fetch_champion(dest: str | os.PathLike[str], *, model: str, prefix: str = "registry",
                   backend: LocalBackend | S3Backend | None = None) -> dict[str, Any]:
    """Download the champion of registry entry `model` into `dest` (replaced), verified against its
    manifest; returns the champion pointer with `path` added. Raises RegistryError without a champion."""
    reg = Registry(backend or open_backend(), prefix, model)
    champ, _ = reg.champion()
    if champ is None or not champ.get("version"):
        raise RegistryError(f"{reg.uri(reg.key(CHAMPION))}: no champion yet (nothing promoted under {model!r})")
    version = str(champ["version"])
    # the same download as `thinkforge registry fetch`: a complete version only, every file checked
    path = fetch_version(reg, version, dest)
    Path(f"{path}.champion.json").write_text(json.dumps(champ, indent=2, sort_keys=True))
    log.info("fetched champion %s of %s into %s", version, model, path)
    return {**champ, "path": str(path)}


# --- notify -------------------------------------------------------------------------------------


def model_uri(cfg: Any, version: str, *, name: str = "", bucket: str = "") -> str:
    """s3://<bucket>/<registry.prefix>/<name>/versions/<version>/model (the KServe storageUri)."""
    reg = Registry(None, cfg.registry.prefix, name or cfg.registry.name or cfg.run.name)  # type: ignore[arg-type]
    return f"s3://{bucket or os.environ.get(ENV_BUCKET) or cfg.storage.bucket}/{reg.entry(version)}/model"


def parse_target(target: str) -> tuple[str, str]:
    """`deployment/<name>` or `inferenceservice/<name>` -> (kind, name)."""
    kind, _, name = target.strip().partition("/")
    kind = kind.lower()
    if kind not in ("deployment", "inferenceservice") or not name or "/" in name:
        raise ValueError(f"{ENV_TARGET}={target!r}: expected deployment/<name> or inferenceservice/<name>")
    return kind, name


def patch_for(kind: str, version: str, storage_uri: str = "") -> tuple[str, dict[str, Any]]:
    """(content type, body) of the patch that points a serving object at `version`."""
    if kind == "deployment":
        return STRATEGIC_MERGE, {"spec": {"template": {"metadata": {"annotations": {ANNOTATION: version}}}}}
    if kind == "inferenceservice":
        if not storage_uri:
            raise ValueError("an InferenceService patch needs the version's storageUri")
        return MERGE_PATCH, {"metadata": {"annotations": {ANNOTATION: version}},
                             "spec": {"predictor": {"model": {"storageUri": storage_uri}}}}
    raise ValueError(f"unknown serving kind {kind!r}")


def _namespace() -> str:
    ns = os.environ.get(ENV_NAMESPACE, "")
    if not ns and os.path.exists(SA_NAMESPACE_FILE):
        ns = Path(SA_NAMESPACE_FILE).read_text().strip()
    if not ns:
        raise ValueError(f"no namespace: set {ENV_NAMESPACE} (outside a pod there is no service account namespace)")
    return ns


def _api_client() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def patch_serving(api_client: Any, kind: str, name: str, namespace: str, version: str,
                  storage_uri: str = "") -> dict[str, Any]:
    """Send the patch through `api_client` (a kubernetes.client.ApiClient); returns the patched object."""
    content_type, body = patch_for(kind, version, storage_uri)
    if kind == "deployment":
        # the generated patch_namespaced_deployment picks json-patch for any body: set the type here
        resp = api_client.call_api(
            "/apis/apps/v1/namespaces/{namespace}/deployments/{name}", "PATCH",
            path_params={"namespace": namespace, "name": name}, query_params=[],
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body, response_type="object", auth_settings=["BearerToken"],
            _return_http_data_only=True, _preload_content=True)
        return resp
    from kubernetes import client

    group, ver, plural = KSERVE
    # CustomObjectsApi sends application/merge-patch+json (kubernetes-client 30)
    return client.CustomObjectsApi(api_client).patch_namespaced_custom_object(group, ver, namespace, plural, name, body)


def notify_champion(cfg: Any, version: str, *, target: str | None = None, namespace: str | None = None,
                    api_client: Any = None) -> dict[str, Any]:
    """Point the chart's serving object at the newly promoted `version` (see the module docstring).
    Call it from the publish step when its decision promoted. Never raises; returns what it did."""
    target = target if target is not None else os.environ.get(ENV_TARGET, "")
    if not target:
        return {"notified": False, "reason": f"no serving target ({ENV_TARGET} unset)"}
    try:
        kind, name = parse_target(target)
        ns = namespace or _namespace()
        uri = model_uri(cfg, version) if kind == "inferenceservice" else ""
        patch_serving(api_client or _api_client(), kind, name, ns, version, uri)
    except Exception as e:  # the promotion stands; serving catches up on its next rollout
        log.warning("champion %s promoted, but serving %s was not updated: %s", version, target, e)
        return {"notified": False, "target": target, "reason": f"{type(e).__name__}: {e}"}
    log.info("serving %s/%s now points at champion %s", ns, target, version)
    return {"notified": True, "target": target, "namespace": ns, "version": version,
            **({"storageUri": uri} if uri else {})}


# --- command line -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m thinkforge.serving", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch-champion", help="download the registry's champion model folder (verified)")
    f.add_argument("--to", required=True, help="directory to fill (replaced)")
    f.add_argument("--model", required=True, help="registry entry (the runs' registry.name / run.name)")
    f.add_argument("--prefix", default="registry", help="registry.prefix of the runs")
    f.add_argument("--local-dir", default="", help="a local registry directory (when no S3 endpoint is set)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = fetch_champion(args.to, model=args.model, prefix=args.prefix, backend=open_backend(args.local_dir or None))
    except Exception as e:
        print(f"fetch-champion: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"version": out["version"], "path": out["path"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
