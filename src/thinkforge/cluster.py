"""thinkforge on a Kubeflow Pipelines (2.x) cluster: upload a pipeline version, submit a run, schedule
retraining, and the `thinkforge upload|submit|schedule` sub-commands.

How a client finds KFP (`client`):
- `--host URL`: that API server (e.g. `http://localhost:8888` after
  `kubectl -n kubeflow port-forward svc/ml-pipeline 8888:8888`).
- no host, inside a pod: `http://ml-pipeline.<namespace>.svc.cluster.local:8888`.
- in a pod, the request carries the pod's service-account token: a KFP-audience projected token
  (`$KF_PIPELINES_SA_TOKEN_PATH`, else /var/run/secrets/kubeflow/pipelines/token) when mounted, else
  /var/run/secrets/kubernetes.io/serviceaccount/token. Multi-user KFP authorizes with it.
- no host, outside a pod, `--kube-context NAME`: through the Kubernetes API server's service proxy
  (`/api/v1/namespaces/<ns>/services/ml-pipeline:http/proxy/`), with that kubeconfig context's
  credentials. Without a usable kubeconfig there is no way in: the error says to pass --host.

KFP cron expressions have 6 fields, seconds first: `second minute hour day-of-month month day-of-week`
(robfig/cron). `0 0 3 * * 0` is Sundays at 03:00:00. Descriptors (`@daily`, `@every 6h`) work too.
A 5-field Unix cron is refused with a hint rather than silently shifted by one field.

Images by digest: the component code lives in the image, so a pipeline version whose tasks name an image
by tag runs whatever the tag points at when a run starts. `--image-digest sha256:...` pins the tasks'
image (and the Trainer jobs', through `cluster.image`) as `<repository>@sha256:...`; every image of the
pipeline being uploaded is checked, and one named by tag only is a warning, or an error with
`--require-digest` (or `$THINKFORGE_REQUIRE_IMAGE_DIGEST=1`), before anything is uploaded.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thinkforge.config import (STRUCTURE_FIELDS, TASK_SET_FIELDS, ConfigError, apply_overrides, flatten, load_recipe,
                               parse_set_flags, validate)
from thinkforge.progress import add_secret

if TYPE_CHECKING:  # kfp is heavy; imported where used
    import kfp

log = logging.getLogger(__name__)

KFP_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
ENV_REQUIRE_DIGEST = "THINKFORGE_REQUIRE_IMAGE_DIGEST"
# an OCI digest: algorithm ":" hex (sha256: 64 hex digits)
_DIGEST = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[0-9a-fA-F]{32,}$")
SA_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"
DEFAULT_NAMESPACE = "kubeflow"


class ClusterError(RuntimeError):
    """A problem talking to the cluster, stated so that the user knows what to change."""


# --- connecting --------------------------------------------------------------------------------------


def in_pod() -> bool:
    """True inside a Kubernetes pod (the kubelet sets KUBERNETES_SERVICE_HOST in every container)."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def token_paths() -> list[str]:
    paths = [os.environ.get("KF_PIPELINES_SA_TOKEN_PATH", ""), KFP_TOKEN_PATH, SA_TOKEN_PATH]
    return [p for p in paths if p]


def read_token(paths: list[str] | None = None) -> str | None:
    """The first readable, non-empty service-account token among `paths`."""
    for p in paths if paths is not None else token_paths():
        try:
            token = Path(p).read_text().strip()
        except OSError:
            continue
        if token:
            add_secret(token)  # read from a file, so redact() would not find it in the environment
            return token
    return None


def in_cluster_host(namespace: str) -> str:
    return f"http://ml-pipeline.{namespace}.svc.cluster.local:8888"


def client(host: str | None = None, namespace: str = DEFAULT_NAMESPACE, kube_context: str | None = None,
           user_namespace: str | None = None) -> kfp.Client:
    """A `kfp.Client` for `host`, the in-cluster service, or a kube-context (see the module docstring).

    `namespace` is where KFP itself runs; `user_namespace` is the profile namespace that owns
    experiments and runs in multi-user KFP (leave it empty in single-user KFP).
    """
    kc = _connect(host, namespace, kube_context)
    if user_namespace:
        kc.set_user_namespace(user_namespace)  # also saved to ~/.config/kfp/context.json, as kfp does
    return kc


def _connect(host: str | None, namespace: str, kube_context: str | None) -> kfp.Client:
    import kfp

    namespace = namespace or DEFAULT_NAMESPACE
    kwargs: dict[str, Any] = {"namespace": namespace}
    token = read_token() if in_pod() else None
    if token:
        kwargs["existing_token"] = token
    if not host and in_pod():
        host = in_cluster_host(namespace)
    if host:
        if not re.match(r"^https?://", host):
            raise ClusterError(f"--host {host}: give a URL with its scheme, e.g. http://{host}")
        kwargs["host"] = host.rstrip("/")
    elif kube_context:
        _check_kube_context(kube_context)
        try:
            return _kube_context_client(kube_context, namespace)
        except TimeoutError as e:
            raise ClusterError(f"Kubeflow Pipelines API via kube-context {kube_context} did not answer /apis/v2beta1/healthz: {e}") from None
    else:
        raise ClusterError(
            "no Kubeflow Pipelines API to talk to: pass --host URL (e.g. after "
            f"`kubectl -n {namespace} port-forward svc/ml-pipeline 8888:8888`, --host http://localhost:8888), "
            "or --kube-context NAME to go through the Kubernetes API server's service proxy"
        )
    where = kwargs.get("host") or f"kube-context {kube_context}"
    try:
        return kfp.Client(**kwargs)
    except TimeoutError as e:  # kfp retries /healthz 5 times, then gives up
        raise ClusterError(f"Kubeflow Pipelines API at {where} did not answer /apis/v2beta1/healthz: {e}") from None


KUBE_PROXY_PATH = "api/v1/namespaces/{namespace}/services/ml-pipeline:http/proxy"


def _kube_context_client(kube_context: str, namespace: str) -> kfp.Client:
    """A kfp.Client that reaches ml-pipeline through the API server's service proxy of `kube_context`.

    kfp.Client(kube_context=...) does this too, but with a token kubeconfig (GKE, EKS, AKS, most
    clusters) the kubernetes loader's refresh hook rewrites `host` before every request, dropping the
    proxy path, so the calls hit the API server's root. Here the configuration is built once, with the
    context's CA, client certificate and (refreshed) token, and the proxy path kept.
    """
    import kfp
    import kfp_server_api
    from kubernetes import client as kclient
    from kubernetes import config as kconfig

    kube = kclient.Configuration()
    kconfig.load_kube_config(context=kube_context, client_configuration=kube)
    cfg = kfp_server_api.Configuration(host=kube.host.rstrip("/") + "/" + KUBE_PROXY_PATH.format(namespace=namespace))
    for attr in ("ssl_ca_cert", "cert_file", "key_file", "verify_ssl"):
        setattr(cfg, attr, getattr(kube, attr))
    cfg.api_key.update(kube.api_key)  # {"authorization": "Bearer ..."} when the context has a token
    cfg.api_key_prefix.update(kube.api_key_prefix)
    kube_hook = kube.refresh_api_key_hook

    if kube_hook is not None:
        def refresh(c: Any) -> None:  # expiring exec/OIDC tokens: refresh the token, never the host
            kube_hook(kube)
            c.api_key.update(kube.api_key)

        cfg.refresh_api_key_hook = refresh

    class _ProxyClient(kfp.Client):
        def _load_config(self, *args: Any, **kwargs: Any) -> Any:
            return cfg

    return _ProxyClient(namespace=namespace)


def _check_kube_context(kube_context: str) -> None:
    from kubernetes import config as kconfig

    try:
        contexts, _ = kconfig.list_kube_config_contexts()
    except Exception as e:  # noqa: BLE001 - any kubeconfig problem means the same thing here
        raise ClusterError(f"--kube-context {kube_context}: no usable kubeconfig ({e}); pass --host URL instead") from None
    names = [c["name"] for c in contexts]
    if kube_context not in names:
        raise ClusterError(f"--kube-context {kube_context}: not in kubeconfig (have: {', '.join(names) or 'none'}); pass --host URL instead")


# --- cron ----------------------------------------------------------------------------------------------

_FIELDS = (  # name, low, high, names allowed
    ("second", 0, 59, ()),
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day-of-month", 1, 31, ()),
    ("month", 1, 12, ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")),
    ("day-of-week", 0, 6, ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")),
)
_DESCRIPTOR = re.compile(r"^@(yearly|annually|monthly|weekly|daily|midnight|hourly|every [0-9hms.]+)$")
CRON_HELP = "KFP cron, 6 fields: second minute hour day-of-month month day-of-week (e.g. '0 0 3 * * 0' = Sundays 03:00), or @daily / @every 6h"


def validate_cron(cron: str) -> str:
    """Check a KFP (robfig/cron, 6-field) expression; returns it normalized, raises ValueError saying why not."""
    text = " ".join(str(cron).split())
    if text.startswith("@"):
        if not _DESCRIPTOR.match(text):
            raise ValueError(f"cron {cron!r}: unknown descriptor (use @hourly, @daily, @weekly, @monthly, @yearly or @every <duration>)")
        return text
    fields = text.split(" ") if text else []
    if len(fields) == 5:
        raise ValueError(
            f"cron {cron!r} has 5 fields (Unix cron); KFP's has 6, seconds first: "
            f"second minute hour day-of-month month day-of-week. Did you mean '0 {text}'?"
        )
    if len(fields) != 6:
        raise ValueError(f"cron {cron!r} has {len(fields)} fields; {CRON_HELP}")
    for value, (name, low, high, names) in zip(fields, _FIELDS):
        for part in value.split(","):
            base, _, step = part.partition("/")
            if step and not (step.isdigit() and int(step) > 0):
                raise ValueError(f"cron {cron!r}: {name} step {step!r} must be a positive number")
            if base in ("*", "?"):
                if base == "?" and name not in ("day-of-month", "day-of-week"):
                    raise ValueError(f"cron {cron!r}: '?' is allowed only in day-of-month and day-of-week")
                continue
            for bound in base.split("-", 1):
                if bound.isdigit():
                    if not low <= int(bound) <= high:
                        raise ValueError(f"cron {cron!r}: {name} {bound} is outside {low}-{high}")
                elif bound.upper() not in names:
                    raise ValueError(f"cron {cron!r}: {name} field {value!r} is not a number, range, list or step")
    return text


# --- images by digest ----------------------------------------------------------------------------------


def split_image(ref: str) -> tuple[str, str, str]:
    """(name, tag, digest) of an image reference; tag and digest may be empty. A registry port is not a tag
    (`localhost:5000/x` has none)."""
    ref = ref.strip()
    name, _, digest = ref.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = ""
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    return name, tag, digest


def is_pinned(ref: str) -> bool:
    """True when the reference names its image by digest (`name@sha256:...`, with or without a tag)."""
    return bool(_DIGEST.match(split_image(ref)[2]))


def pin_image(image: str, digest: str) -> str:
    """`image` as `<name>@<digest>`: the tag, if any, is dropped (a digest cannot move; the tag only said
    where the digest was looked up). Raises ValueError for a malformed digest or one that disagrees with a
    digest the reference already has."""
    digest = digest.strip()
    if not _DIGEST.match(digest):
        raise ValueError(f"--image-digest {digest!r}: expected sha256:<64 hex digits> (e.g. from "
                         "`docker buildx imagetools inspect IMAGE` or `crane digest IMAGE`)")
    name, _, have = split_image(image)
    if not name:
        raise ValueError(f"image {image!r}: no repository to pin")
    if have and have != digest:
        raise ValueError(f"image {image!r} already names digest {have}, not --image-digest {digest}")
    return f"{name}@{digest}"


def require_digest_default() -> bool:
    return os.environ.get(ENV_REQUIRE_DIGEST, "").strip().lower() in ("1", "true", "yes")


def check_images(images: list[str], require: bool, where: str) -> None:
    """Warn about (``require``: refuse) images named by tag only; ``where`` says what names them."""
    loose = sorted({i for i in images if i and not is_pinned(i)})
    if not loose:
        return
    msg = (f"{where} names {len(loose)} image(s) by tag, not digest: {', '.join(loose)}. The component code lives "
           "in the image, so this version would run whatever the tag points at when a run starts; pin it with "
           "--image-digest sha256:... (the chart: image.digest)")
    if require:
        raise ClusterError(msg + " (refused: --require-digest)")
    log.warning("%s", msg)


def pipeline_image(image: str, digest: str, recipe: Any = None) -> str:
    """The image to compile the pipeline with: ``image`` pinned to ``digest`` when one is given (without
    ``image``: the recipe's ``cluster.image`` or the default image), else ``image`` as given ("" = the
    recipe's or the default, decided by the compiler)."""
    if not digest:
        return image or ""
    if not image:
        from thinkforge.pipelines.training import DEFAULT_IMAGE  # lazy: pulls in kfp.dsl

        image = (recipe.cluster.image if recipe is not None else "") or DEFAULT_IMAGE
    return pin_image(image, digest)


def package_images(package_path: str | Path) -> list[str]:
    """Every container image a compiled pipeline (KFP IR YAML) names: its executors, and the fixed
    ``cluster__image`` that multi-node stages give their Trainer jobs."""
    import yaml

    with open(package_path, encoding="utf-8") as f:
        spec = next(yaml.safe_load_all(f)) or {}
    images = [e.get("container", {}).get("image", "") for e in
              (spec.get("deploymentSpec", {}).get("executors", {}) or {}).values()]
    images = [i for i in images if i]

    def walk(node: Any) -> None:  # a constant cluster__image input of any task
        if isinstance(node, dict):
            value = node.get("cluster__image")
            if isinstance(value, dict):
                const = value.get("runtimeValue", {}).get("constant")
                if isinstance(const, str) and const:
                    images.append(const)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec.get("root", {}))
    return images


def compile_pinned(recipe: Any, out_path: str | Path, *, image: str = "", digest: str = "", require: bool = False,
                   where: str = "") -> Path:
    """Compile ``recipe`` to ``out_path`` with its image pinned to ``digest`` (see :func:`pipeline_image`),
    then check every image it names (:func:`check_images`): a refused pipeline leaves no file at ``out_path``."""
    from thinkforge.pipelines.training import compile_pipeline  # lazy: pulls in kfp.dsl and the components

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pinned = pipeline_image(image, digest, recipe)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".thinkforge-compile-") as tmp:
        staged = Path(tmp) / out.name
        compile_pipeline(recipe, staged, **({"image": pinned} if pinned else {}))
        check_images(package_images(staged), require, where or f"the pipeline compiled to {out}")
        os.replace(staged, out)
    return out


# --- upload / submit / schedule ---------------------------------------------------------------------


def _eq_filter(value: str, key: str = "display_name") -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": key, "stringValue": value}]})


def upload(kfp_client: kfp.Client, package_path: str | Path, pipeline_name: str, version: str, description: str | None = None,
           namespace: str | None = None) -> tuple[str, str]:
    """Upload `package_path` as version `version` of pipeline `pipeline_name`; returns (pipeline_id, version_id).

    The pipeline is created when missing, in `namespace` (multi-user KFP: the profile's own pipelines;
    None = shared). A version name that already exists is reused, not uploaded again, so a retried
    install hook (or `schedule` after `upload`) is idempotent.
    """
    package_path = str(package_path)
    # kfp.Client.get_pipeline_id lists shared pipelines only; a namespaced pipeline is found by listing there
    found_p = kfp_client.list_pipelines(filter=_eq_filter(pipeline_name), page_size=2, namespace=namespace)
    pipelines = found_p.pipelines or []
    if len(pipelines) > 1:
        raise ClusterError(f"more than one pipeline named {pipeline_name!r}" + (f" in {namespace}" if namespace else ""))
    pipeline_id = pipelines[0].pipeline_id if pipelines else None
    if pipeline_id is None:
        body = kfp_client.api_models.V2beta1Pipeline(display_name=pipeline_name, description=description,
                                                     namespace=namespace)
        pipeline_id = kfp_client.pipelines.pipeline_service_create_pipeline(pipeline=body).pipeline_id
        log.info("created pipeline %s (%s)", pipeline_name, pipeline_id)
    else:
        found = kfp_client.list_pipeline_versions(pipeline_id, page_size=2, filter=_eq_filter(version))
        if found.pipeline_versions:
            version_id = found.pipeline_versions[0].pipeline_version_id
            log.info("pipeline %s already has version %s (%s): reusing it", pipeline_name, version, version_id)
            return pipeline_id, version_id
    made = kfp_client.upload_pipeline_version(package_path, pipeline_version_name=version, pipeline_id=pipeline_id, description=description)
    return pipeline_id, made.pipeline_version_id


def _experiment_id(kfp_client: kfp.Client, experiment: str) -> str:
    return kfp_client.create_experiment(name=experiment).experiment_id  # gets it when it exists


def submit(
    kfp_client: kfp.Client,
    package_path: str | Path | None = None,
    *,
    pipeline_id: str | None = None,
    version_id: str | None = None,
    params: dict[str, Any] | None = None,
    experiment: str = "thinkforge",
    run_name: str | None = None,
    pipeline_root: str | None = None,
    service_account: str | None = None,
    enable_caching: bool | None = None,
) -> str:
    """Start one run, from a compiled package or an uploaded (pipeline_id, version_id); returns the run id."""
    if (package_path is None) == (pipeline_id is None or version_id is None):
        raise ValueError("submit: give either package_path or both pipeline_id and version_id")
    run = kfp_client.run_pipeline(
        experiment_id=_experiment_id(kfp_client, experiment),
        job_name=run_name or f"thinkforge-{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M%S}",
        pipeline_package_path=str(package_path) if package_path is not None else None,
        pipeline_id=pipeline_id if package_path is None else None,
        version_id=version_id if package_path is None else None,
        params=params or {},
        pipeline_root=pipeline_root or None,
        service_account=service_account or None,
        enable_caching=enable_caching,
    )
    return run.run_id


def schedule(
    kfp_client: kfp.Client,
    pipeline_id: str,
    version_id: str,
    cron: str,
    params: dict[str, Any] | None = None,
    experiment: str = "thinkforge",
    job_name: str = "thinkforge-retrain",
    max_concurrency: int = 1,
    *,
    pipeline_root: str | None = None,
    service_account: str | None = None,
) -> str:
    """Create or update the recurring run `job_name` in `experiment`; returns its id.

    KFP cannot edit a recurring run's pipeline version or trigger, so "update" means: create the new
    recurring run first, then delete every older one with the same name in the experiment (if the
    create fails, the old schedule keeps running). Catch-up is off: a paused schedule does not backfill.
    """
    cron = validate_cron(cron)
    if max_concurrency < 1:
        raise ValueError("max_concurrency must be >= 1")
    experiment_id = _experiment_id(kfp_client, experiment)
    old = kfp_client.list_recurring_runs(experiment_id=experiment_id, page_size=100, filter=_eq_filter(job_name)).recurring_runs or []
    made = kfp_client.create_recurring_run(
        experiment_id=experiment_id,
        job_name=job_name,
        cron_expression=cron,
        max_concurrency=max_concurrency,
        no_catchup=True,
        params=params or {},
        pipeline_id=pipeline_id,
        version_id=version_id,
        pipeline_root=pipeline_root or None,
        service_account=service_account or None,
        enabled=True,
    )
    for rr in old:
        if rr.recurring_run_id != made.recurring_run_id and rr.display_name == job_name:
            kfp_client.delete_recurring_run(rr.recurring_run_id)
            log.info("replaced recurring run %s (%s)", job_name, rr.recurring_run_id)
    return made.recurring_run_id


# --- object storage -----------------------------------------------------------------------------------


def ensure_bucket(endpoint: str, access_key: str, secret_key: str, bucket: str, secure: bool = True,
                  region: str | None = None, attempts: int = 30, delay_s: float = 2.0) -> bool:
    """Create `bucket` unless it exists, retrying while the store starts up; True when it was created."""
    import urllib3
    from minio import Minio
    from minio.error import S3Error

    # this loop does the retrying: one quick try per attempt at the HTTP layer
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=5.0, read=30.0), retries=urllib3.Retry(total=0, connect=0, read=0, redirect=2))
    store = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region or None, http_client=http)
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            if store.bucket_exists(bucket):
                return False
            store.make_bucket(bucket)
            return True
        except S3Error as e:
            if e.code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return False
            if e.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise ClusterError(f"object store {endpoint}: {e.code} for bucket {bucket} (check the credentials Secret)") from None
            last = e
        except Exception as e:  # noqa: BLE001 - connection refused/reset while the store starts
            last = e
        if attempt < attempts:
            time.sleep(min(delay_s * 2 ** (attempt - 1), 30.0))
    raise ClusterError(f"object store {endpoint} unreachable after {attempts} attempts: {type(last).__name__}: {last}")


# --- CLI ----------------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--host", default=os.environ.get("KF_PIPELINES_ENDPOINT"), help="KFP API URL, e.g. http://localhost:8888 (in a pod: the in-cluster service)")
    g.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="namespace of Kubeflow Pipelines (default: kubeflow)")
    g.add_argument("--kube-context", default=None, help="reach KFP through this kubeconfig context's API server proxy")
    g.add_argument("--user-namespace", default=None, help="multi-user KFP: the profile namespace that owns experiments and runs")
    g = p.add_argument_group("pipeline")
    g.add_argument("--recipe", help="recipe YAML; compiled when --package is absent")
    g.add_argument("--package", help="compiled pipeline YAML (thinkforge compile --recipe R --out pipeline.yaml)")
    g.add_argument("--set", dest="set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a recipe field (repeatable)")
    g.add_argument("--pipeline-name", default="thinkforge", help="pipeline name in KFP (default: thinkforge)")
    g.add_argument("--image", default=None, help="container image of the pipeline's tasks when compiling (default: $THINKFORGE_IMAGE or the pipeline's)")
    g.add_argument("--image-digest", default=None, metavar="sha256:HEX",
                   help="pin the tasks' image (--image, else the recipe's cluster.image or the default) as <repository>@<digest>")
    g.add_argument("--require-digest", action="store_true", default=require_digest_default(),
                   help=f"refuse a pipeline that names any image by tag only (default: ${ENV_REQUIRE_DIGEST}; without it, a warning)")


def _version_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", default=None, help="pipeline version name (default: the package's content hash, so re-uploads are no-ops)")
    p.add_argument("--description", default=None)


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", default="thinkforge", help="KFP experiment (created when missing)")
    p.add_argument("--pipeline-root", default=None, help="artifact root, e.g. minio://thinkforge/pipelines (default: the kfp-launcher ConfigMap's)")
    p.add_argument("--service-account", default=None, help="Kubernetes service account the run's pods use")
    p.add_argument("--pipeline-id", default=None, help="run an uploaded pipeline (with --version-id) instead of a package")
    p.add_argument("--version-id", default=None)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register `upload`, `submit` and `schedule` on an argparse subparsers object (each sets `func`)."""
    p = subparsers.add_parser("upload", help="upload the pipeline to Kubeflow Pipelines (a new version)", description=upload.__doc__)
    _common(p)
    _version_arg(p)
    p.set_defaults(func=cmd_upload)

    p = subparsers.add_parser("submit", help="start a run on Kubeflow Pipelines", description=submit.__doc__)
    _common(p)
    _run_args(p)
    p.add_argument("--run-name", default=None)
    p.set_defaults(func=cmd_submit)

    p = subparsers.add_parser(
        "schedule", help="create or update a recurring run (6-field KFP cron)", description=f"{schedule.__doc__}\n{CRON_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(p)
    _version_arg(p)
    _run_args(p)
    p.add_argument("--cron", required=True, help=CRON_HELP)
    p.add_argument("--job-name", default=None, help="recurring run name (default: <pipeline-name>-schedule); an existing one is replaced")
    p.add_argument("--max-concurrency", type=int, default=1)
    p.set_defaults(func=cmd_schedule)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return parse_set_flags(args.set or [])


def _recipe(args: argparse.Namespace):
    overrides = _overrides(args)
    if args.recipe:
        return load_recipe(args.recipe, overrides)
    return validate(apply_overrides({}, overrides), origin="--set")


def run_params(args: argparse.Namespace, full: bool, compiled: bool = False) -> dict[str, Any]:
    """Pipeline parameters (`section__field`) for a run: every recipe field when `full` (a recipe given for
    an already compiled pipeline), else only the --set fields; values typed by the config model."""
    flat = flatten(_recipe(args))
    fixed = [k for k in _overrides(args) if k.replace(".", "__") in STRUCTURE_FIELDS + TASK_SET_FIELDS]
    if fixed and not compiled:
        raise ClusterError(f"--set {', '.join(fixed)}: not a run parameter: which stages and evaluations run is "
                           "fixed when the pipeline is compiled; upload a version with it (thinkforge upload "
                           f"--recipe R --set {fixed[0]}=... --version NAME) and start the run from that version")
    if full:
        return flat
    return {key.replace(".", "__"): flat[key.replace(".", "__")] for key in _overrides(args)
            if key not in fixed}  # structure fields went into the package compiled here


def _preflight(args: argparse.Namespace) -> None:
    """`thinkforge plan`'s checks on --recipe (with its --set): a recipe that cannot work as placed is refused
    before anything reaches the KFP server."""
    from thinkforge.plan import preflight

    if args.recipe:
        preflight(_recipe(args), args.recipe)


def _package(args: argparse.Namespace, workdir: str) -> tuple[str, bool]:
    """(package path, compiled here?)."""
    require = bool(getattr(args, "require_digest", False))
    if args.package:
        if not Path(args.package).is_file():
            raise ClusterError(f"--package {args.package}: no such file")
        if getattr(args, "image_digest", None):
            raise ClusterError("--image-digest pins the image of a pipeline compiled here; --package names its images "
                               "already (compile it with --image-digest)")
        check_images(package_images(args.package), require, f"--package {args.package}")
        return args.package, False
    if not args.recipe:
        raise ClusterError("give --package pipeline.yaml, or --recipe R to compile one")
    out = compile_pinned(_recipe(args), Path(workdir) / "pipeline.yaml", image=args.image or "",
                         digest=getattr(args, "image_digest", None) or "", require=require,
                         where=f"the pipeline compiled from {args.recipe}")
    return str(out), True


def check_params(package_path: str | Path, params: dict[str, Any]) -> None:
    """Refuse parameters the compiled pipeline does not declare (KFP would fail the run later)."""
    import yaml

    with open(package_path, encoding="utf-8") as f:
        spec = next(yaml.safe_load_all(f))
    declared = set(spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {}))
    unknown = sorted(set(params) - declared)
    if unknown:
        raise ClusterError(f"{package_path}: the pipeline has no parameter(s) {', '.join(unknown)}")


def _content_version(path: str) -> str:
    return "sha-" + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def _client(args: argparse.Namespace) -> kfp.Client:
    return client(args.host, args.namespace, args.kube_context, args.user_namespace)


def _emit(**ids: str) -> None:
    print(json.dumps(ids, sort_keys=True))


def _run_source(args: argparse.Namespace, workdir: str) -> tuple[str | None, dict[str, Any]]:
    """(compiled package, or None for --pipeline-id/--version-id; the run's parameters)."""
    if args.pipeline_id or args.version_id:
        if not (args.pipeline_id and args.version_id):
            raise ClusterError("--pipeline-id and --version-id go together")
        return None, run_params(args, full=bool(args.recipe))
    package, compiled = _package(args, workdir)
    params = run_params(args, full=bool(args.recipe) and not compiled, compiled=compiled)
    check_params(package, params)
    return package, params


def _upload_package(args: argparse.Namespace, kc: kfp.Client, package: str) -> tuple[str, str]:
    return upload(kc, package, args.pipeline_name, args.version or _content_version(package), args.description,
                  namespace=args.user_namespace)


def cmd_upload(args: argparse.Namespace) -> int:
    _preflight(args)
    kc = _client(args)
    with tempfile.TemporaryDirectory(prefix="thinkforge-") as tmp:
        package, _ = _package(args, tmp)
        pipeline_id, version_id = _upload_package(args, kc, package)
    _emit(pipeline_id=pipeline_id, version_id=version_id)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    _preflight(args)
    kc = _client(args)
    with tempfile.TemporaryDirectory(prefix="thinkforge-") as tmp:
        package, params = _run_source(args, tmp)
        run_id = submit(
            kc, package, pipeline_id=None if package else args.pipeline_id, version_id=None if package else args.version_id,
            params=params, experiment=args.experiment, run_name=args.run_name, pipeline_root=args.pipeline_root,
            service_account=args.service_account,
        )
    _emit(run_id=run_id)
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    validate_cron(args.cron)  # before any network traffic
    _preflight(args)
    kc = _client(args)
    with tempfile.TemporaryDirectory(prefix="thinkforge-") as tmp:
        package, params = _run_source(args, tmp)
        pipeline_id, version_id = _upload_package(args, kc, package) if package else (args.pipeline_id, args.version_id)
    rr_id = schedule(
        kc, pipeline_id, version_id, args.cron, params=params, experiment=args.experiment,
        job_name=args.job_name or f"{args.pipeline_name}-schedule", max_concurrency=args.max_concurrency,
        pipeline_root=args.pipeline_root, service_account=args.service_account,
    )
    _emit(pipeline_id=pipeline_id, version_id=version_id, recurring_run_id=rr_id)
    return 0


def cmd_ensure_bucket(args: argparse.Namespace) -> int:
    env = os.environ
    missing = [k for k in ("THINKFORGE_S3_ENDPOINT", "THINKFORGE_S3_ACCESS_KEY", "THINKFORGE_S3_SECRET_KEY") if not env.get(k)]
    if missing:
        raise ClusterError(f"ensure-bucket: set {', '.join(missing)}")
    bucket = args.bucket or env.get("THINKFORGE_S3_BUCKET", "thinkforge")
    created = ensure_bucket(
        env["THINKFORGE_S3_ENDPOINT"], env["THINKFORGE_S3_ACCESS_KEY"], env["THINKFORGE_S3_SECRET_KEY"], bucket,
        secure=env.get("THINKFORGE_S3_SECURE", "true").lower() in ("1", "true", "yes"), region=env.get("THINKFORGE_S3_REGION"),
        attempts=args.attempts,
    )
    print(f"bucket {bucket} {'created' if created else 'exists'} at {env['THINKFORGE_S3_ENDPOINT']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m thinkforge.cluster {upload,submit,schedule,ensure-bucket} ...` (the image's hook Job uses it)."""
    parser = argparse.ArgumentParser(prog="python -m thinkforge.cluster", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subs = parser.add_subparsers(dest="command", required=True)
    add_cli(subs)
    p = subs.add_parser("ensure-bucket", help="create the bucket from THINKFORGE_S3_* env unless it exists")
    p.add_argument("--bucket", default=None)
    p.add_argument("--attempts", type=int, default=30)
    p.set_defaults(func=cmd_ensure_bucket)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ClusterError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
