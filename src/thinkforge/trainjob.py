"""A training stage on several nodes: a Kubeflow Trainer job, submitted and followed through the
``kubernetes`` client.

- ``TrainJob`` (``trainer.kubeflow.org/v1alpha1``, Kubeflow Trainer v2) referencing a torch
  ClusterTrainingRuntime (``torch-distributed`` by default), or, where only the older training
  operator is installed, a ``PyTorchJob`` (``kubeflow.org/v1``, Master + Workers). Which one is used is
  found from the API groups the cluster serves (``flavor="auto"``).
- Every node runs the same image and the same entry point as a one-pod stage,
  ``accelerate launch ... -m thinkforge.launch <stage> --worker`` (DeepSpeed config from the stage's
  ``deepspeed`` field), with the node count, node rank and rendezvous address the operator injects
  (``PET_NNODES``/``PET_NODE_RANK``/``PET_MASTER_ADDR``/``PET_MASTER_PORT``; PyTorchJob's
  ``WORLD_SIZE``/``RANK``/``MASTER_ADDR``/``MASTER_PORT`` as a fallback).
- Pods do not share the component's local files: the input model, data and config are staged in
  object storage under ``<storage.prefix>/<run>/<stage>/trainjob/<job>/``; the job writes the trained
  model and the result there and the component downloads them.
- :func:`follow` polls the job, streams every pod's new log lines with the pod name in front, and
  returns when the job completes or raises :class:`TrainJobFailed` with the job's reason and message.

What was not run: no cluster is reachable from the machine this was written on. The manifests are
checked field by field in tests, and the submit/follow/log/failure handling runs with the real
``kubernetes`` client against recorded API responses served on loopback (tests/test_trainjob.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("thinkforge.trainjob")

TRAINER_GROUP, TRAINER_VERSION, TRAINJOB_PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
OPERATOR_GROUP, OPERATOR_VERSION, PYTORCHJOB_PLURAL = "kubeflow.org", "v1", "pytorchjobs"
SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
ENV_IMAGE = "THINKFORGE_IMAGE"
ENV_NAMESPACE = "THINKFORGE_NAMESPACE"
ENV_GPUS = "THINKFORGE_TRAINJOB_GPUS"  # GPUs per node to request (default: the stage's num_processes)
ENV_S3_SECRET = "THINKFORGE_S3_SECRET"  # name of the Secret holding the S3 keys, for the job's pods
PASS_ENV = ("THINKFORGE_S3_ENDPOINT", "THINKFORGE_S3_SECURE", "THINKFORGE_S3_ACCESS_KEY", "THINKFORGE_S3_SECRET_KEY",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "THINKFORGE_CACHE")


class TrainJobError(RuntimeError):
    """The job could not be submitted or followed."""


class TrainJobFailed(TrainJobError):
    """The job ran and failed; the message carries the job's reason and message."""

    def __init__(self, kind: str, name: str, reason: str, message: str):
        self.kind, self.name, self.reason, self.message = kind, name, reason, message
        super().__init__(f"{kind} {name} failed: {reason}: {message}")


@dataclass
class JobSpec:
    """What to run where. ``args`` follow ``thinkforge.launch <stage> --worker``."""

    name: str
    namespace: str
    image: str
    stage: str
    nodes: int
    procs_per_node: int
    args: list[str]
    gpus_per_node: int = 0
    deepspeed_config: str = ""  # a path inside the image, e.g. /app/recipes/deepspeed/zero3.json
    runtime: str = "torch-distributed"
    env: dict[str, str] = field(default_factory=dict)
    secret_env: dict[str, tuple[str, str]] = field(default_factory=dict)  # NAME -> (secret, key)
    service_account: str = ""
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    shm_size: str = ""


def job_name(run: str, stage: str) -> str:
    """A DNS-1035 name (<= 40 chars: the operators derive longer pod names from it)."""
    base = re.sub(r"[^a-z0-9-]+", "-", f"tf-{run}-{stage}".lower()).strip("-")[:30].strip("-")
    return f"{base}-{uuid.uuid4().hex[:6]}"


def node_script(spec: JobSpec) -> str:
    """The shell line every node runs: accelerate across all nodes, rank and address from the operator."""
    total = f"$(( ${{PET_NNODES:-${{WORLD_SIZE:-{spec.nodes}}}}} * {spec.procs_per_node} ))"
    parts = [
        "exec python -m accelerate.commands.launch",
        f"--num_machines ${{PET_NNODES:-${{WORLD_SIZE:-{spec.nodes}}}}}",
        "--machine_rank ${PET_NODE_RANK:-${RANK:-0}}",
        "--main_process_ip ${PET_MASTER_ADDR:-$MASTER_ADDR}",
        "--main_process_port ${PET_MASTER_PORT:-${MASTER_PORT:-29500}}",
        f"--num_processes {total}",
        "--dynamo_backend no",
    ]
    if spec.deepspeed_config:
        parts += ["--use_deepspeed", f"--deepspeed_config_file {shlex.quote(spec.deepspeed_config)}"]
    else:
        parts += ["--multi_gpu"]
    parts += ["-m thinkforge.launch", shlex.quote(spec.stage), "--worker", *(shlex.quote(a) for a in spec.args)]
    return " ".join(parts)


def _env(spec: JobSpec) -> list[dict[str, Any]]:
    env = {"THINKFORGE_LAUNCHED": "1", "PYTHONUNBUFFERED": "1", **spec.env}
    if spec.deepspeed_config:
        env["THINKFORGE_DEEPSPEED_CONFIG"] = spec.deepspeed_config
    out: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(env.items())]
    out += [{"name": k, "valueFrom": {"secretKeyRef": {"name": s, "key": key}}}
            for k, (s, key) in sorted(spec.secret_env.items())]
    return out


def _resources(spec: JobSpec) -> dict[str, Any]:
    return {"limits": {"nvidia.com/gpu": spec.gpus_per_node}} if spec.gpus_per_node else {}


def build_trainjob(spec: JobSpec) -> dict[str, Any]:
    """A ``TrainJob`` (trainer.kubeflow.org/v1alpha1) on the torch runtime."""
    trainer: dict[str, Any] = {
        "image": spec.image,
        "command": ["bash", "-c", node_script(spec)],
        "numNodes": spec.nodes,
        "numProcPerNode": spec.procs_per_node,
        "env": _env(spec),
    }
    if _resources(spec):
        trainer["resourcesPerNode"] = _resources(spec)
    body: dict[str, Any] = {
        "apiVersion": f"{TRAINER_GROUP}/{TRAINER_VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": spec.name, "namespace": spec.namespace,
                     "labels": {"app.kubernetes.io/part-of": "thinkforge", "thinkforge/stage": spec.stage,
                                **spec.labels}},
        "spec": {
            "runtimeRef": {"name": spec.runtime, "apiGroup": TRAINER_GROUP, "kind": "ClusterTrainingRuntime"},
            "trainer": trainer,
        },
    }
    overrides: dict[str, Any] = {}
    if spec.service_account:
        overrides["serviceAccountName"] = spec.service_account
    if spec.node_selector:
        overrides["nodeSelector"] = spec.node_selector
    if spec.tolerations:
        overrides["tolerations"] = spec.tolerations
    if spec.shm_size:
        overrides["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}]
        overrides["containers"] = [{"name": "node", "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}]
    if overrides:
        body["spec"]["podSpecOverrides"] = [{"targetJobs": [{"name": "node"}], **overrides}]
    return body


def build_pytorchjob(spec: JobSpec) -> dict[str, Any]:
    """A ``PyTorchJob`` (kubeflow.org/v1): one Master and nodes - 1 Workers, container named ``pytorch``."""

    def replica(n: int) -> dict[str, Any]:
        container: dict[str, Any] = {"name": "pytorch", "image": spec.image,
                                     "command": ["bash", "-c", node_script(spec)], "env": _env(spec)}
        if _resources(spec):
            container["resources"] = _resources(spec)
        pod: dict[str, Any] = {"containers": [container]}
        if spec.service_account:
            pod["serviceAccountName"] = spec.service_account
        if spec.node_selector:
            pod["nodeSelector"] = spec.node_selector
        if spec.tolerations:
            pod["tolerations"] = spec.tolerations
        if spec.shm_size:
            pod["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}]
            container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
        return {"replicas": n, "restartPolicy": "OnFailure", "template": {"spec": pod}}

    replicas = {"Master": replica(1)}
    if spec.nodes > 1:
        replicas["Worker"] = replica(spec.nodes - 1)
    return {
        "apiVersion": f"{OPERATOR_GROUP}/{OPERATOR_VERSION}",
        "kind": "PyTorchJob",
        "metadata": {"name": spec.name, "namespace": spec.namespace,
                     "labels": {"app.kubernetes.io/part-of": "thinkforge", "thinkforge/stage": spec.stage,
                                **spec.labels}},
        "spec": {"nprocPerNode": str(spec.procs_per_node), "runPolicy": {"backoffLimit": 0},
                 "pytorchReplicaSpecs": replicas},
    }


# ------------------------------------------------------------------------------------------- the API


def api_client(host: str | None = None) -> Any:
    """An ApiClient: ``host`` (tests, a proxy), else in-cluster config, else the kubeconfig."""
    from kubernetes import client, config

    if host:
        conf = client.Configuration()
        conf.host = host
        return client.ApiClient(conf)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except Exception as e:  # noqa: BLE001
            raise TrainJobError(f"no Kubernetes API reachable: not in a pod and no usable kubeconfig ({e})") from None
    return client.ApiClient()


def detect_flavor(api: Any) -> str:
    """``trainjob`` where Kubeflow Trainer is served, ``pytorchjob`` where only the training operator is."""
    from kubernetes import client

    groups = {g.name: [v.version for v in g.versions] for g in client.ApisApi(api).get_api_versions().groups}
    if TRAINER_VERSION in groups.get(TRAINER_GROUP, []):
        return "trainjob"
    if OPERATOR_VERSION in groups.get(OPERATOR_GROUP, []):
        return "pytorchjob"
    raise TrainJobError("neither Kubeflow Trainer (trainer.kubeflow.org/v1alpha1) nor the training operator "
                        "(kubeflow.org/v1 PyTorchJob) is installed in this cluster")


def _coords(flavor: str) -> tuple[str, str, str, str]:
    if flavor == "trainjob":
        return TRAINER_GROUP, TRAINER_VERSION, TRAINJOB_PLURAL, "TrainJob"
    return OPERATOR_GROUP, OPERATOR_VERSION, PYTORCHJOB_PLURAL, "PyTorchJob"


def submit(api: Any, spec: JobSpec, flavor: str = "auto") -> tuple[str, dict[str, Any]]:
    """Create the job; returns (flavor, created object)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    if flavor == "auto":
        flavor = detect_flavor(api)
    body = build_trainjob(spec) if flavor == "trainjob" else build_pytorchjob(spec)
    group, version, plural, kind = _coords(flavor)
    try:
        created = client.CustomObjectsApi(api).create_namespaced_custom_object(group, version, spec.namespace,
                                                                              plural, body)
    except ApiException as e:
        raise TrainJobError(f"creating {kind} {spec.namespace}/{spec.name}: HTTP {e.status} {e.reason}: "
                            f"{_api_message(e)}") from None
    log.info("submitted %s %s/%s (%d nodes x %d processes)", kind, spec.namespace, spec.name, spec.nodes,
             spec.procs_per_node)
    return flavor, created


def _api_message(e: Any) -> str:
    try:
        return json.loads(e.body).get("message", "") or str(e.body)
    except (TypeError, ValueError):
        return str(e.body)


def job_state(obj: dict[str, Any], flavor: str) -> tuple[str, str, str]:
    """("running" | "succeeded" | "failed", reason, message) from a job's status conditions."""
    conds = {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}
    done = "Complete" if flavor == "trainjob" else "Succeeded"
    if "Failed" in conds:
        c = conds["Failed"]
        return "failed", c.get("reason") or "Failed", c.get("message") or ""
    if done in conds:
        c = conds[done]
        return "succeeded", c.get("reason") or done, c.get("message") or ""
    return "running", "", ""


def pod_selector(name: str, flavor: str) -> str:
    # TrainJob -> JobSet of the same name; PyTorchJob pods carry the training operator's job-name label
    return f"jobset.sigs.k8s.io/jobset-name={name}" if flavor == "trainjob" else f"training.kubeflow.org/job-name={name}"


class LogStreamer:
    """New log lines of every pod of a job since the last poll, each line prefixed with its pod."""

    def __init__(self, api: Any, namespace: str, selector: str, sink: Callable[[str], None]):
        from kubernetes import client

        self.core = client.CoreV1Api(api)
        self.namespace, self.selector, self.sink = namespace, selector, sink
        self.seen: dict[str, int] = {}

    def poll(self) -> None:
        from kubernetes.client.rest import ApiException

        try:
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=self.selector).items
        except ApiException as e:
            log.warning("listing pods (%s): HTTP %s", self.selector, e.status)
            return
        for pod in sorted(pods, key=lambda p: p.metadata.name):
            if (pod.status.phase or "Pending") == "Pending":
                continue
            name = pod.metadata.name
            try:
                text = self.core.read_namespaced_pod_log(name, self.namespace)
            except ApiException as e:
                log.debug("log of %s: HTTP %s", name, e.status)
                continue
            new = text[self.seen.get(name, 0):]
            if new:
                cut = new.rfind("\n") + 1  # whole lines only; the rest comes next time
                if pod.status.phase in ("Succeeded", "Failed"):
                    cut = len(new)
                for line in new[:cut].splitlines():
                    self.sink(f"[{name}] {line}")
                self.seen[name] = self.seen.get(name, 0) + cut


def follow(api: Any, name: str, namespace: str, flavor: str, *, poll_s: float = 10.0, timeout_s: float = 0,
           sink: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Wait for the job, streaming its pods' logs; returns the final object or raises TrainJobFailed."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    group, version, plural, kind = _coords(flavor)
    custom = client.CustomObjectsApi(api)
    sink = sink or (lambda line: print(line, flush=True))
    logs = LogStreamer(api, namespace, pod_selector(name, flavor), sink)
    start = time.monotonic()
    misses = 0
    while True:
        try:
            obj = custom.get_namespaced_custom_object(group, version, namespace, plural, name)
            misses = 0
        except ApiException as e:
            if e.status == 404:
                raise TrainJobFailed(kind, f"{namespace}/{name}", "Deleted", "the job disappeared while running")
            misses += 1
            if misses >= 5:
                raise TrainJobError(f"{kind} {namespace}/{name}: API errors {misses} times in a row "
                                    f"(last HTTP {e.status} {e.reason})") from None
            time.sleep(poll_s)
            continue
        logs.poll()
        state, reason, message = job_state(obj, flavor)
        if state == "succeeded":
            log.info("%s %s/%s completed", kind, namespace, name)
            return obj
        if state == "failed":
            raise TrainJobFailed(kind, f"{namespace}/{name}", reason, message)
        if timeout_s and time.monotonic() - start > timeout_s:
            raise TrainJobError(f"{kind} {namespace}/{name} still running after {timeout_s:.0f}s")
        time.sleep(poll_s)


def delete(api: Any, name: str, namespace: str, flavor: str) -> None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    group, version, plural, _ = _coords(flavor)
    try:
        client.CustomObjectsApi(api).delete_namespaced_custom_object(group, version, namespace, plural, name)
    except ApiException as e:
        if e.status != 404:
            log.warning("deleting %s/%s: HTTP %s", namespace, name, e.status)


# ------------------------------------------------------------------------------------ a stage as a job


def current_namespace() -> str:
    if os.environ.get(ENV_NAMESPACE):
        return os.environ[ENV_NAMESPACE]
    try:
        return Path(SA_NAMESPACE).read_text().strip()
    except OSError:
        return "default"


def trainjob_stage(stage: str, *, host: str | None = None, poll_s: float = 10.0,
                   flavor: str = "auto") -> Callable[..., Any]:
    """The stage as a multi-node job, with the signature every stage has."""

    def run(cfg: Any, model_path: str | Path, data_path: str | Path, out_path: str | Path, metrics: Any = None):
        from thinkforge.launch import DEEPSPEED_NAMES, result_from_json
        from thinkforge.models import follow_pointer
        from thinkforge.storage import ObjectStore

        t = getattr(cfg, stage)
        store = ObjectStore.from_config_or_none(cfg.storage)
        if store is None:
            raise TrainJobError(f"{stage}.nodes={t.nodes} needs object storage (storage.endpoint or "
                                "THINKFORGE_S3_ENDPOINT): the job's pods share nothing else with this one")
        image = cfg.cluster.image if hasattr(cfg, "cluster") and cfg.cluster.image else os.environ.get(ENV_IMAGE, "")
        if not image:
            raise TrainJobError(f"{stage}.nodes={t.nodes}: no image for the job's pods (cluster.image or $THINKFORGE_IMAGE)")
        name = job_name(cfg.run.name, stage)
        base = store.run_prefix(cfg.run.name, stage, "trainjob", name)
        store.ensure_bucket()
        store.put_json(f"{base}/config.json", cfg.model_dump())
        store.upload_dir(follow_pointer(Path(model_path)), f"{base}/input-model")
        store.upload_file(data_path, f"{base}/data{Path(data_path).suffix or '.jsonl'}")
        uri = store.uri
        args = ["--config", uri(f"{base}/config.json"), "--model", uri(f"{base}/input-model"),
                "--data", uri(f"{base}/data{Path(data_path).suffix or '.jsonl'}"),
                "--out", uri(f"{base}/model"), "--result", uri(f"{base}/result.json")]
        ds = t.deepspeed if t.deepspeed in ("", "none") else (
            f"/app/recipes/deepspeed/{t.deepspeed}.json" if t.deepspeed in DEEPSPEED_NAMES else t.deepspeed)
        placement = cfg.cluster.placement(stage) if hasattr(cfg, "cluster") else None
        spec = JobSpec(
            name=name, namespace=current_namespace(), image=image, stage=stage, nodes=t.nodes,
            procs_per_node=t.num_processes, args=args,
            gpus_per_node=int(os.environ.get(ENV_GPUS, t.num_processes)),  # one GPU per process unless told
            deepspeed_config="" if ds in ("", "none") else ds,
            env={k: os.environ[k] for k in PASS_ENV if k in os.environ and "KEY" not in k and "TOKEN" not in k},
            secret_env=_secret_env(cfg),
            node_selector=dict(placement.node_selector) if placement else {},
            tolerations=list(placement.tolerations) if placement else [],
            shm_size=placement.shm_size if placement else "",
            labels={"thinkforge/run": re.sub(r"[^A-Za-z0-9_.-]", "-", cfg.run.name)[:63]},
        )
        api = api_client(host)
        used, _ = submit(api, spec, flavor)
        try:
            follow(api, name, spec.namespace, used, poll_s=poll_s)
        except BaseException:
            delete(api, name, spec.namespace, used)  # a failed or abandoned job frees its GPUs
            raise
        store.download_dir(f"{base}/model", out_path)
        return result_from_json(store.get_json(f"{base}/result.json"))

    return run


def _secret_env(cfg: Any) -> dict[str, tuple[str, str]]:
    """S3 credentials from a Secret (keys accesskey/secretkey: ``cluster.s3_secret`` or
    ``$THINKFORGE_S3_SECRET``), referenced by name, never copied into the manifest by value."""
    secret = getattr(getattr(cfg, "cluster", None), "s3_secret", "") or os.environ.get(ENV_S3_SECRET, "")
    if not secret:
        return {}
    return {"THINKFORGE_S3_ACCESS_KEY": (secret, "accesskey"), "THINKFORGE_S3_SECRET_KEY": (secret, "secretkey")}


if __name__ == "__main__":  # pragma: no cover - a manual check: print the manifests for a recipe
    from thinkforge.config import load_recipe

    c = load_recipe(sys.argv[1])
    st = sys.argv[2] if len(sys.argv) > 2 else "sft"
    s = JobSpec(name=job_name(c.run.name, st), namespace="default", image="IMAGE", stage=st, nodes=2,
                procs_per_node=8, args=["--config", "s3://b/config.json"], gpus_per_node=8)
    print(json.dumps({"trainjob": build_trainjob(s), "pytorchjob": build_pytorchjob(s)}, indent=2))
