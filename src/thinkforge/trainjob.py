"""A training stage on several nodes: a Kubeflow Trainer job, submitted and followed through the
``kubernetes`` client.

- ``TrainJob`` (``trainer.kubeflow.org/v1alpha1``, Kubeflow Trainer v2) referencing a torch
  ClusterTrainingRuntime (``torch-distributed`` by default), built with the typed models of the
  ``kubeflow-trainer-api`` package, or, where only the older training operator is installed, a
  ``PyTorchJob`` (``kubeflow.org/v1``, Master + Workers). Which one is used is found from the API
  groups the cluster serves (``flavor="auto"``).
- Pod settings (node selector, tolerations, a memory-backed ``/dev/shm``, pod annotations) go where
  the installed Trainer release reads them: ``podSpecOverrides`` (v2.0), ``podTemplateOverrides``
  (v2.1) or ``runtimePatches`` (v2.2+). Which field the cluster serves is read from the TrainJob CRD's
  openAPI schema (``apiextensions.k8s.io/v1``; needs ``get`` on customresourcedefinitions), else from
  the OpenAPI v3 discovery document of ``trainer.kubeflow.org/v1alpha1`` (readable by every
  authenticated user), else ``$THINKFORGE_TRAINER_OVERRIDES`` names it; with none of them readable the
  newest (``runtimePatches``) is used and a warning says so. The schema, not a version string, decides:
  an API server silently prunes fields its CRD schema does not declare, so a wrong guess would drop the
  placement without an error. ``activeDeadlineSeconds`` is set where the schema declares it (v2.2+).
- Everything comes from the resolved config, so a KFP task pod that holds only the config artifact
  submits a correct job: the image (``cluster.image``; else ``$THINKFORGE_IMAGE``; else the launching
  pod's own image, read from the API), the Secrets (``cluster.s3_secret`` keys accesskey/secretkey ->
  ``THINKFORGE_S3_ACCESS_KEY``/``THINKFORGE_S3_SECRET_KEY``, ``cluster.hf_secret`` key token ->
  ``HF_TOKEN``, always as ``valueFrom.secretKeyRef``, never by value), and the stage's placement
  (``cluster.placement(stage)``: GPU resource name and count, CPU/memory, node selector, tolerations,
  ``shm_size``, ``timeout_s``).
- Every node runs the same image and the same entry point as a one-pod stage,
  ``accelerate launch ... -m thinkforge.launch <stage> --worker`` (DeepSpeed config from the stage's
  ``deepspeed`` field, with ``--deepspeed_multinode_launcher standard`` so each node starts its own
  processes under the operator's rendezvous instead of DeepSpeed's pdsh/ssh launcher), with the node
  count, node rank and rendezvous address the operator injects
  (``PET_NNODES``/``PET_NODE_RANK``/``PET_MASTER_ADDR``/``PET_MASTER_PORT``; PyTorchJob's
  ``WORLD_SIZE``/``RANK``/``MASTER_ADDR``/``MASTER_PORT`` as a fallback).
- Retries resume: the job name and the checkpoint prefix are deterministic. The prefix is the one a
  one-pod stage uses (:func:`thinkforge.stages.train.checkpoint_prefix`: run name, stage and the
  fingerprint of settings, data and input model), computed here from the local inputs and pinned in
  the job's pods with ``THINKFORGE_CHECKPOINT_PREFIX``; the job name hashes the run identity (the
  KFP run: ``$THINKFORGE_RUN_ID``, else the launching pod's ``pipeline/runid`` or Argo workflow label,
  else ``run.name``), the stage, the config digest and that prefix. A retried KFP task (a fresh pod)
  therefore finds the same job: still running -> it follows it (adopting it as owner), succeeded ->
  it takes its outputs, failed -> it deletes it and submits again, resuming from the checkpoints.
- A killed launcher does not leave GPUs busy: the job carries an ownerReference to the launching pod
  (``KFP_POD_NAME``/``KFP_POD_UID`` from KFP's downward-API env, else the pod named ``$HOSTNAME``
  read from the API), so deleting the pod or the run garbage-collects the job; SIGTERM (a terminated
  run), a failure and the follow deadline delete the job; and the job's own deadline
  (``activeDeadlineSeconds``) stops it if nobody is left to.
- The job's pods hold the S3 credentials and the HF token, so they run with the security context Pod
  Security's "restricted" profile asks for: non-root (the image's uid/gid 10001, docker/Dockerfile.*), no
  privilege escalation, every capability dropped, seccomp ``RuntimeDefault`` (:data:`POD_SECURITY_CONTEXT`,
  :data:`CONTAINER_SECURITY_CONTEXT`). A PyTorchJob carries them in its pod templates; a TrainJob in
  ``runtimePatches`` (v2.2+: the pod's and the ``node`` container's ``securityContext``). Trainer v2.0
  (``podSpecOverrides``) and v2.1 (``podTemplateOverrides``) have no such field: there the pods get the
  runtime's security context only, and a warning says so (the chart README shows the patch to the
  ClusterTrainingRuntime that gives it one).
- Pods do not share the component's local files: the input model, data and config are staged in
  object storage under ``<storage.prefix>/<run>/<stage>/trainjob/<job>/``; the job writes the trained
  model and the result there and the component downloads them.
- :func:`follow` polls the job, streams every pod's new log lines with the pod name in front, and
  returns when the job completes or raises :class:`TrainJobFailed` with the job's reason and message,
  or :class:`TrainJobTimeout` past its deadline.

The job's pods carry no ``app.kubernetes.io/part-of: thinkforge`` label: the chart's egress
NetworkPolicy selects on it and allows no pod-to-pod traffic, which the nodes' rendezvous and NCCL need.

What was not run: no cluster is reachable from the machine this was written on. The manifests are
checked field by field in tests, and the submit/follow/log/failure/retry handling runs with the real
``kubernetes`` client against a fake API server on loopback whose responses are built from the
published types (tests/test_trainjob.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from thinkforge.distributed import image_deepspeed_config, result_from_json
from thinkforge.stages.train import ENV_CHECKPOINT_PREFIX

log = logging.getLogger("thinkforge.trainjob")

TRAINER_GROUP, TRAINER_VERSION, TRAINJOB_PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
OPERATOR_GROUP, OPERATOR_VERSION, PYTORCHJOB_PLURAL = "kubeflow.org", "v1", "pytorchjobs"
TRAINJOB_CRD = f"{TRAINJOB_PLURAL}.{TRAINER_GROUP}"
SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
ENV_IMAGE = "THINKFORGE_IMAGE"
ENV_NAMESPACE = "THINKFORGE_NAMESPACE"
ENV_S3_SECRET = "THINKFORGE_S3_SECRET"  # name of the S3 Secret where cluster.s3_secret is empty
ENV_RUN_ID = "THINKFORGE_RUN_ID"  # the run identity, where the launching pod's labels cannot be read
ENV_OVERRIDES = "THINKFORGE_TRAINER_OVERRIDES"  # force podSpecOverrides | podTemplateOverrides | runtimePatches
ENV_TIMEOUT = "THINKFORGE_TRAINJOB_TIMEOUT_S"  # follow deadline where the placement sets no timeout_s
DEFAULT_TIMEOUT_S = 3 * 24 * 3600  # no placement timeout: give up (and delete the job) after three days
DEADLINE_MARGIN_S = 60  # stop following this long before KFP's own task timeout kills this pod
MIN_FOLLOW_S = 60.0  # the follow deadline is never shorter (uploads may have eaten the task's time)
# Non-secret settings passed on from this pod's environment; credentials only ever as secretKeyRef.
PASS_ENV = ("THINKFORGE_S3_ENDPOINT", "THINKFORGE_S3_SECURE", "THINKFORGE_CACHE")
CREDENTIAL_ENV = ("THINKFORGE_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
S3_SECRET_KEYS = {"THINKFORGE_S3_ACCESS_KEY": "accesskey", "THINKFORGE_S3_SECRET_KEY": "secretkey"}
HF_SECRET_KEYS = {"HF_TOKEN": "token"}
#: The pod-override field of each Trainer release, newest first.
OVERRIDE_FIELDS = ("runtimePatches", "podTemplateOverrides", "podSpecOverrides")  # v2.2+, v2.1, v2.0
PATCH_MANAGER = "thinkforge.io/launcher"  # runtimePatches[].manager: a domain-prefixed path
NODE = "node"  # the torch runtime's replicated job and trainer container
RUN_ID_LABELS = ("pipeline/runid", "workflows.argoproj.io/workflow")  # KFP run, Argo workflow
POD_ANNOTATIONS = {"sidecar.istio.io/inject": "false"}  # an Istio sidecar blocks rendezvous and never exits
RUN_AS = 10001  # the image's user and group (docker/Dockerfile.cpu, docker/Dockerfile.cuda)
#: The job pods' security context (Pod Security "restricted": non-root, seccomp RuntimeDefault).
POD_SECURITY_CONTEXT: dict[str, Any] = {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS,
                                        "seccompProfile": {"type": "RuntimeDefault"}}
#: The trainer container's ("restricted": no privilege escalation, all capabilities dropped). NCCL over TCP
#: needs no capability; RDMA/InfiniBand setups that need IPC_LOCK must relax this deliberately.
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                              "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


class TrainJobError(RuntimeError):
    """The job could not be submitted or followed."""


class TrainJobFailed(TrainJobError):
    """The job ran and failed; the message carries the job's reason and message."""

    def __init__(self, kind: str, name: str, reason: str, message: str):
        self.kind, self.name, self.reason, self.message = kind, name, reason, message
        super().__init__(f"{kind} {name} failed: {reason}: {message}")


class TrainJobTimeout(TrainJobError):
    """The job was still running at the deadline."""


@dataclass
class Owner:
    """The launching pod, as the job's ownerReference."""

    name: str
    uid: str


@dataclass
class LauncherPod:
    name: str
    uid: str
    namespace: str
    labels: dict[str, str] = field(default_factory=dict)
    image: str = ""


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
    gpu_resource: str = "nvidia.com/gpu"
    requests: dict[str, str] = field(default_factory=dict)  # cpu / memory
    limits: dict[str, str] = field(default_factory=dict)
    deepspeed_config: str = ""  # a path inside the image, e.g. /app/recipes/deepspeed/zero3.json
    runtime: str = "torch-distributed"
    env: dict[str, str] = field(default_factory=dict)
    secret_env: dict[str, tuple[str, str]] = field(default_factory=dict)  # NAME -> (secret, key)
    service_account: str = ""
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)  # the recipe's form (toleration_seconds)
    labels: dict[str, str] = field(default_factory=dict)
    pod_annotations: dict[str, str] = field(default_factory=lambda: dict(POD_ANNOTATIONS))
    shm_size: str = ""
    owner: Owner | None = None
    active_deadline_s: int = 0
    # {} = none set (the runtime's or the operator's defaults)
    pod_security_context: dict[str, Any] = field(default_factory=lambda: json.loads(json.dumps(POD_SECURITY_CONTEXT)))
    container_security_context: dict[str, Any] = field(
        default_factory=lambda: json.loads(json.dumps(CONTAINER_SECURITY_CONTEXT)))


@dataclass(frozen=True)
class TrainerAPI:
    """What the served TrainJob schema accepts: the pod-override field (None: none known) and
    ``activeDeadlineSeconds``; ``source`` says where that was read."""

    overrides: str | None = "runtimePatches"
    active_deadline: bool = True
    source: str = "default"

    @property
    def security_context(self) -> bool:
        """Whether the override field carries pod and container ``securityContext`` (v2.2+ PodSpecPatch and
        ContainerPatch; v2.0 PodSpecOverride and v2.1 PodTemplateSpecOverride do not)."""
        return self.overrides == "runtimePatches"


NEWEST = TrainerAPI()


def job_name(run: str, stage: str, *identity: str) -> str:
    """A DNS-1035 name (<= 40 chars: the operators derive longer pod names from it), the same for the
    same run, stage and ``identity`` (a retried task must find its job and its checkpoints again)."""
    base = re.sub(r"[^a-z0-9-]+", "-", f"tf-{run}-{stage}".lower()).strip("-")[:30].strip("-")
    digest = hashlib.sha256(json.dumps([run, stage, *identity]).encode()).hexdigest()[:8]
    return f"{base}-{digest}"


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
        # Each node starts its own processes (the operator runs this line on every node); DeepSpeed's
        # default multi-node launcher would instead try to reach the other nodes over pdsh/ssh.
        parts += ["--use_deepspeed", f"--deepspeed_config_file {shlex.quote(spec.deepspeed_config)}",
                  "--deepspeed_multinode_launcher standard"]
    else:
        parts += ["--multi_gpu"]
    parts += ["-m thinkforge.launch", shlex.quote(spec.stage), "--worker", *(shlex.quote(a) for a in spec.args)]
    return " ".join(parts)


# ------------------------------------------------------------------------------ typed manifest parts


def _models() -> Any:
    try:
        from kubeflow_trainer_api import models
    except ImportError as e:  # pragma: no cover - a main dependency
        raise TrainJobError(f"the kubeflow-trainer-api package is needed to build TrainJobs ({e})") from None
    return models


def _env(spec: JobSpec) -> list[Any]:
    m = _models()
    env = {"THINKFORGE_LAUNCHED": "1", "PYTHONUNBUFFERED": "1", **spec.env}
    if spec.deepspeed_config:
        env["THINKFORGE_DEEPSPEED_CONFIG"] = spec.deepspeed_config
    out = [m.IoK8sApiCoreV1EnvVar(name=k, value=v) for k, v in sorted(env.items())]
    out += [m.IoK8sApiCoreV1EnvVar(name=k, value_from=m.IoK8sApiCoreV1EnvVarSource(
        secret_key_ref=m.IoK8sApiCoreV1SecretKeySelector(name=s, key=key)))
        for k, (s, key) in sorted(spec.secret_env.items())]
    return out


def _quantity(value: Any) -> Any:
    return _models().IoK8sApimachineryPkgApiResourceQuantity(str(value))


def _resources(spec: JobSpec) -> Any:
    limits = dict(spec.limits)
    if spec.gpus_per_node:
        limits[spec.gpu_resource] = str(spec.gpus_per_node)
    if not limits and not spec.requests:
        return None
    return _models().IoK8sApiCoreV1ResourceRequirements(
        limits={k: _quantity(v) for k, v in limits.items()} or None,
        requests={k: _quantity(v) for k, v in spec.requests.items()} or None)


def _tolerations(spec: JobSpec) -> list[Any]:
    m = _models()
    return [m.IoK8sApiCoreV1Toleration(**{k: v for k, v in t.items() if v is not None}) for t in spec.tolerations]


def _shm(spec: JobSpec) -> tuple[list[Any], list[Any]]:
    """(volumes, volumeMounts) for a memory-backed /dev/shm; NCCL and dataloader workers need more than 64 MiB."""
    if not spec.shm_size:
        return [], []
    m = _models()
    vol = m.IoK8sApiCoreV1Volume(name="dshm", empty_dir=m.IoK8sApiCoreV1EmptyDirVolumeSource(
        medium="Memory", size_limit=_quantity(spec.shm_size)))
    return [vol], [m.IoK8sApiCoreV1VolumeMount(name="dshm", mount_path="/dev/shm")]


def _metadata(spec: JobSpec) -> Any:
    m = _models()
    owners = None
    if spec.owner is not None:
        # Not a controller reference (the operator is the job's controller), and blockOwnerDeletion
        # stays unset: setting it needs delete permission on pods (422 otherwise).
        owners = [m.IoK8sApimachineryPkgApisMetaV1OwnerReference(api_version="v1", kind="Pod",
                                                                 name=spec.owner.name, uid=spec.owner.uid)]
    return m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
        name=spec.name, namespace=spec.namespace,
        labels={"app.kubernetes.io/part-of": "thinkforge", "thinkforge/stage": spec.stage, **spec.labels},
        owner_references=owners)


def _pod_security(spec: JobSpec) -> Any:
    return _models().IoK8sApiCoreV1PodSecurityContext.from_dict(spec.pod_security_context) \
        if spec.pod_security_context else None


def _container_security(spec: JobSpec) -> Any:
    return _models().IoK8sApiCoreV1SecurityContext.from_dict(spec.container_security_context) \
        if spec.container_security_context else None


def pod_spec_patch(spec: JobSpec, security: bool = True) -> Any:
    """The pod settings of the trainer nodes as a typed ``PodSpecPatch`` (None: nothing to set). Without
    ``security`` its fields are a subset of what every release's override accepts (v2.0 PodSpecOverride,
    v2.1 PodTemplateSpecOverride, v2.2+ PodSpecPatch); with it, the pod's and the ``node`` container's
    ``securityContext`` too, which only v2.2+ accepts."""
    m = _models()
    volumes, mounts = _shm(spec)
    kw: dict[str, Any] = {}
    if spec.service_account:
        kw["service_account_name"] = spec.service_account
    if spec.node_selector:
        kw["node_selector"] = dict(spec.node_selector)
    if spec.tolerations:
        kw["tolerations"] = _tolerations(spec)
    if volumes:
        kw["volumes"] = volumes
    container: dict[str, Any] = {}
    if mounts:
        container["volume_mounts"] = mounts
    if security and _pod_security(spec) is not None:
        kw["security_context"] = _pod_security(spec)
    if security and _container_security(spec) is not None:
        container["security_context"] = _container_security(spec)
    if container:
        kw["containers"] = [m.TrainerV1alpha1ContainerPatch(name=NODE, **container)]
    return m.TrainerV1alpha1PodSpecPatch(**kw) if kw else None


def build_trainjob(spec: JobSpec, served: TrainerAPI = NEWEST) -> dict[str, Any]:
    """A ``TrainJob`` (trainer.kubeflow.org/v1alpha1) on the torch runtime, its pod settings in the
    override field ``served`` names."""
    m = _models()
    trainer = m.TrainerV1alpha1Trainer(
        image=spec.image, command=["bash", "-c", node_script(spec)], env=_env(spec),
        num_nodes=spec.nodes, num_proc_per_node=spec.procs_per_node, resources_per_node=_resources(spec))
    patch = pod_spec_patch(spec, security=served.security_context)
    if not served.security_context and (spec.pod_security_context or spec.container_security_context):
        log.warning("%s: the served TrainJob schema (%s) has %s, which carries no securityContext (Trainer "
                    "v2.2+ runtimePatches does): the job's pods, which hold the S3 credentials, get only the "
                    "security context of ClusterTrainingRuntime %s (give it runAsNonRoot, seccomp RuntimeDefault, "
                    "allowPrivilegeEscalation false, capabilities drop ALL; see the chart README)",
                    spec.name, served.source, served.overrides or "no pod override field", spec.runtime)
    pod_meta = m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(annotations=dict(spec.pod_annotations)) \
        if spec.pod_annotations else None
    tj_spec = m.TrainerV1alpha1TrainJobSpec(
        runtime_ref=m.TrainerV1alpha1RuntimeRef(name=spec.runtime, api_group=TRAINER_GROUP,
                                                kind="ClusterTrainingRuntime"),
        trainer=trainer)
    if spec.active_deadline_s and served.active_deadline:
        tj_spec.active_deadline_seconds = int(spec.active_deadline_s)
    if served.overrides == "runtimePatches" and (patch is not None or pod_meta is not None):
        tj_spec.runtime_patches = [m.TrainerV1alpha1RuntimePatch(
            manager=PATCH_MANAGER,
            training_runtime_spec=m.TrainerV1alpha1TrainingRuntimeSpecPatch(
                template=m.TrainerV1alpha1JobSetTemplatePatch(spec=m.TrainerV1alpha1JobSetSpecPatch(
                    replicated_jobs=[m.TrainerV1alpha1ReplicatedJobPatch(
                        name=NODE, template=m.TrainerV1alpha1JobTemplatePatch(spec=m.TrainerV1alpha1JobSpecPatch(
                            template=m.TrainerV1alpha1PodTemplatePatch(metadata=pod_meta, spec=patch))))]))))]
    body = m.TrainerV1alpha1TrainJob(api_version=f"{TRAINER_GROUP}/{TRAINER_VERSION}", kind="TrainJob",
                                     metadata=_metadata(spec), spec=tj_spec).to_dict()
    # kubeflow-trainer-api models the newest release only (runtimePatches); the v2.0/v2.1 override
    # lists are written as those releases' trainjob_types.go define them, from the same typed parts.
    if served.overrides == "podTemplateOverrides" and (patch is not None or pod_meta is not None):
        over: dict[str, Any] = {"targetJobs": [{"name": NODE}]}
        if pod_meta is not None:
            over["metadata"] = pod_meta.to_dict()
        if patch is not None:
            over["spec"] = patch.to_dict()
        body["spec"]["podTemplateOverrides"] = [over]
    elif served.overrides == "podSpecOverrides" and patch is not None:
        # v2.0 has no pod metadata override (its spec.annotations reach the JobSet and Jobs, not pods)
        body["spec"]["podSpecOverrides"] = [{"targetJobs": [{"name": NODE}], **patch.to_dict()}]
    elif served.overrides is None and patch is not None:
        raise TrainJobError(f"the served TrainJob schema ({served.source}) has none of {', '.join(OVERRIDE_FIELDS)}: "
                            "node selector, tolerations and /dev/shm cannot be set on this Trainer release")
    return body


def build_pytorchjob(spec: JobSpec) -> dict[str, Any]:
    """A ``PyTorchJob`` (kubeflow.org/v1): one Master and nodes - 1 Workers, container named ``pytorch``.
    kubeflow-trainer-api has no PyTorchJob model (it covers Trainer v2 only), so the job wrapper is a
    dict as the training operator documents it; the pod and container are the typed core models."""
    m = _models()
    volumes, mounts = _shm(spec)
    container = m.IoK8sApiCoreV1Container(name="pytorch", image=spec.image, command=["bash", "-c", node_script(spec)],
                                          env=_env(spec), resources=_resources(spec), volume_mounts=mounts or None,
                                          security_context=_container_security(spec))
    pod = m.IoK8sApiCoreV1PodSpec(containers=[container], service_account_name=spec.service_account or None,
                                  node_selector=dict(spec.node_selector) or None,
                                  tolerations=_tolerations(spec) or None, volumes=volumes or None,
                                  security_context=_pod_security(spec)).to_dict()

    def replica(n: int) -> dict[str, Any]:
        template: dict[str, Any] = {"spec": pod}
        if spec.pod_annotations:
            template["metadata"] = {"annotations": dict(spec.pod_annotations)}
        return {"replicas": n, "restartPolicy": "OnFailure", "template": template}

    replicas = {"Master": replica(1)}
    if spec.nodes > 1:
        replicas["Worker"] = replica(spec.nodes - 1)
    run_policy: dict[str, Any] = {"backoffLimit": 0}
    if spec.active_deadline_s:
        run_policy["activeDeadlineSeconds"] = int(spec.active_deadline_s)
    return {
        "apiVersion": f"{OPERATOR_GROUP}/{OPERATOR_VERSION}",
        "kind": "PyTorchJob",
        "metadata": _metadata(spec).to_dict(),
        "spec": {"nprocPerNode": str(spec.procs_per_node), "runPolicy": run_policy, "pytorchReplicaSpecs": replicas},
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


def _get_raw(api: Any, path: str) -> Any:
    """GET ``path`` as JSON (the client's auth and TLS settings, no model deserialization)."""
    resp = api.call_api(path, "GET", header_params={"Accept": "application/json"}, auth_settings=["BearerToken"],
                        _preload_content=False, _return_http_data_only=True)
    return json.loads(resp.data)


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Follow ``$ref`` / single ``allOf`` wrappers of an OpenAPI v3 document to the schema itself."""
    for _ in range(8):
        if "$ref" in schema:
            schema = doc.get("components", {}).get("schemas", {}).get(schema["$ref"].rsplit("/", 1)[-1], {})
        elif not schema.get("properties") and len(schema.get("allOf") or []) == 1:
            schema = schema["allOf"][0]
        else:
            break
    return schema


def served_trainjob_fields(api: Any) -> tuple[set[str] | None, str]:
    """The ``spec`` fields of TrainJob that the cluster's schema declares, and where they were read
    (``None`` when neither the CRD nor the OpenAPI document could be read)."""
    from kubernetes.client.rest import ApiException

    try:
        crd = _get_raw(api, f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{TRAINJOB_CRD}")
        for v in crd.get("spec", {}).get("versions", []):
            if v.get("name") == TRAINER_VERSION and v.get("served", True):
                props = v.get("schema", {}).get("openAPIV3Schema", {}).get("properties", {})
                return set(props.get("spec", {}).get("properties", {})), f"CRD {TRAINJOB_CRD}"
    except (ApiException, ValueError) as e:
        log.debug("reading CRD %s: %s", TRAINJOB_CRD, getattr(e, "status", e))
    try:
        doc = _get_raw(api, f"/openapi/v3/apis/{TRAINER_GROUP}/{TRAINER_VERSION}")
        for schema in doc.get("components", {}).get("schemas", {}).values():
            gvks = schema.get("x-kubernetes-group-version-kind") or []
            if any(g.get("group") == TRAINER_GROUP and g.get("kind") == "TrainJob" for g in gvks):
                spec = _resolve(doc, schema.get("properties", {}).get("spec", {}))
                return set(spec.get("properties", {})), f"OpenAPI v3 /openapi/v3/apis/{TRAINER_GROUP}/{TRAINER_VERSION}"
    except (ApiException, ValueError) as e:
        log.debug("reading OpenAPI v3 of %s/%s: %s", TRAINER_GROUP, TRAINER_VERSION, getattr(e, "status", e))
    return None, "unreadable"


def trainer_api(api: Any) -> TrainerAPI:
    """Which pod-override field (and whether ``activeDeadlineSeconds``) the served TrainJob takes."""
    forced = os.environ.get(ENV_OVERRIDES, "").strip()
    if forced:
        if forced not in OVERRIDE_FIELDS:
            raise TrainJobError(f"${ENV_OVERRIDES}={forced!r}: expected one of {', '.join(OVERRIDE_FIELDS)}")
        return TrainerAPI(forced, forced == "runtimePatches", f"${ENV_OVERRIDES}")
    fields, source = served_trainjob_fields(api)
    if fields is None:
        log.warning("the TrainJob schema could not be read (no access to the CRD or to /openapi/v3): assuming "
                    "Kubeflow Trainer v2.2+ (runtimePatches); set $%s for an older release", ENV_OVERRIDES)
        return TrainerAPI("runtimePatches", True, "default: schema unreadable")
    chosen = next((f for f in OVERRIDE_FIELDS if f in fields), None)
    log.info("TrainJob pod settings go in %s (from the %s)", chosen, source)
    return TrainerAPI(chosen, "activeDeadlineSeconds" in fields, source)


def _coords(flavor: str) -> tuple[str, str, str, str]:
    if flavor == "trainjob":
        return TRAINER_GROUP, TRAINER_VERSION, TRAINJOB_PLURAL, "TrainJob"
    return OPERATOR_GROUP, OPERATOR_VERSION, PYTORCHJOB_PLURAL, "PyTorchJob"


def submit(api: Any, spec: JobSpec, flavor: str = "auto",
           served: TrainerAPI | None = None) -> tuple[str, dict[str, Any]]:
    """Create the job; returns (flavor, created object)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    if flavor == "auto":
        flavor = detect_flavor(api)
    if flavor == "trainjob":
        body = build_trainjob(spec, served if served is not None else trainer_api(api))
    else:
        body = build_pytorchjob(spec)
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


def get_job(api: Any, name: str, namespace: str, flavor: str) -> dict[str, Any] | None:
    """The job, or None where there is none."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    group, version, plural, kind = _coords(flavor)
    try:
        return client.CustomObjectsApi(api).get_namespaced_custom_object(group, version, namespace, plural, name)
    except ApiException as e:
        if e.status == 404:
            return None
        raise TrainJobError(f"reading {kind} {namespace}/{name}: HTTP {e.status} {e.reason}: "
                            f"{_api_message(e)}") from None


def set_owner(api: Any, name: str, namespace: str, flavor: str, owner: Owner) -> None:
    """Make ``owner`` (the launching pod) the job's only owner (a merge patch replaces the list)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    group, version, plural, kind = _coords(flavor)
    ref = {"apiVersion": "v1", "kind": "Pod", "name": owner.name, "uid": owner.uid}
    try:
        client.CustomObjectsApi(api).patch_namespaced_custom_object(
            group, version, namespace, plural, name, {"metadata": {"ownerReferences": [ref]}})
    except ApiException as e:
        log.warning("%s %s/%s: could not take it over as owner (HTTP %s); it keeps its earlier owner",
                    kind, namespace, name, e.status)


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
    """Wait for the job, streaming its pods' logs; returns the final object, raises TrainJobFailed when
    it fails and TrainJobTimeout when it still runs after ``timeout_s`` (0: no deadline)."""
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
            raise TrainJobTimeout(f"{kind} {namespace}/{name} still running after {timeout_s:.0f}s")
        time.sleep(poll_s)


def delete(api: Any, name: str, namespace: str, flavor: str) -> None:
    """Delete the job and, in the foreground, what it made (JobSet / pods), so a job of the same name
    can be created once it is gone."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    group, version, plural, _ = _coords(flavor)
    try:
        client.CustomObjectsApi(api).delete_namespaced_custom_object(
            group, version, namespace, plural, name, body=client.V1DeleteOptions(propagation_policy="Foreground"))
    except ApiException as e:
        if e.status != 404:
            log.warning("deleting %s/%s: HTTP %s", namespace, name, e.status)


def wait_gone(api: Any, name: str, namespace: str, flavor: str, *, timeout_s: float = 300, poll_s: float = 2.0) -> None:
    start = time.monotonic()
    while get_job(api, name, namespace, flavor) is not None:
        if time.monotonic() - start > timeout_s:
            raise TrainJobError(f"{_coords(flavor)[3]} {namespace}/{name} still exists {timeout_s:.0f}s after "
                                "its deletion; delete it by hand and retry")
        time.sleep(poll_s)


# ------------------------------------------------------------------------------------ a stage as a job


def current_namespace() -> str:
    if os.environ.get(ENV_NAMESPACE):
        return os.environ[ENV_NAMESPACE]
    try:
        return Path(SA_NAMESPACE).read_text().strip()
    except OSError:
        return os.environ.get("NAMESPACE") or "default"  # KFP's downward-API env in task pods


def launcher_pod(api: Any, namespace: str) -> LauncherPod | None:
    """This pod (the KFP task running the stage): its name and uid from KFP's downward-API env
    (``KFP_POD_NAME``/``KFP_POD_UID``) or ``$HOSTNAME``, its labels and image read from the API."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    name = os.environ.get("KFP_POD_NAME") or os.environ.get("HOSTNAME") or ""
    uid = os.environ.get("KFP_POD_UID", "")
    if not name:
        return None
    pod_ns = os.environ.get("NAMESPACE") or namespace
    try:
        pod = client.CoreV1Api(api).read_namespaced_pod(name, pod_ns)
    except ApiException as e:
        if not uid:
            log.info("no launching pod %s/%s readable (HTTP %s): the job gets no owner", pod_ns, name, e.status)
            return None
        return LauncherPod(name, uid, pod_ns)
    if uid and pod.metadata.uid != uid:
        log.warning("pod %s/%s has uid %s, not $KFP_POD_UID %s", pod_ns, name, pod.metadata.uid, uid)
    containers = pod.spec.containers or []
    main = next((c for c in containers if c.name == "main"), containers[0] if containers else None)
    return LauncherPod(name, uid or pod.metadata.uid, pod_ns, dict(pod.metadata.labels or {}),
                       main.image if main is not None else "")


def run_identity(cfg: Any, pod: LauncherPod | None) -> tuple[str, str]:
    """(identity, where from): the same for every attempt of one run's task, different between runs."""
    if os.environ.get(ENV_RUN_ID):
        return os.environ[ENV_RUN_ID], f"${ENV_RUN_ID}"
    if cfg.run.id:  # the KFP run id the pipeline put in the config
        return cfg.run.id, "run.id"
    for label in RUN_ID_LABELS:
        if pod is not None and pod.labels.get(label):
            return pod.labels[label], f"pod label {label}"
    return cfg.run.name, "run.name"


def job_image(cfg: Any, pod: LauncherPod | None) -> str:
    image = cfg.cluster.image or os.environ.get(ENV_IMAGE, "") or (pod.image if pod is not None else "")
    if not image:
        raise TrainJobError("no image for the job's pods: set cluster.image in the recipe (or $THINKFORGE_IMAGE); "
                            "the launching pod's own image could not be read either")
    return image


def secret_env(cfg: Any) -> dict[str, tuple[str, str]]:
    """Credentials for the job's pods, each a reference to a key of a Secret, never a value:
    ``cluster.s3_secret`` (keys accesskey/secretkey; ``$THINKFORGE_S3_SECRET`` where the config has
    none) and ``cluster.hf_secret`` (key token)."""
    out: dict[str, tuple[str, str]] = {}
    s3 = cfg.cluster.s3_secret or os.environ.get(ENV_S3_SECRET, "")
    if s3:
        out.update({env: (s3, key) for env, key in S3_SECRET_KEYS.items()})
    if cfg.cluster.hf_secret:
        out.update({env: (cfg.cluster.hf_secret, key) for env, key in HF_SECRET_KEYS.items()})
    return out


def gpu_resource(accelerator: str) -> str:
    """The extended resource to request: ``placement.accelerator`` where it names one (``amd.com/gpu``),
    else ``nvidia.com/gpu`` (a KFP accelerator type such as ``NVIDIA_TESLA_A100`` is a node label, not a
    resource)."""
    return accelerator if "/" in accelerator else "nvidia.com/gpu"


def stage_timeout(placement: Any) -> tuple[int, str]:
    if placement.timeout_s:
        return int(placement.timeout_s), "the stage's placement timeout_s"
    if os.environ.get(ENV_TIMEOUT):
        return int(os.environ[ENV_TIMEOUT]), f"${ENV_TIMEOUT}"
    return DEFAULT_TIMEOUT_S, "the default (no placement timeout_s)"


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM (a terminated KFP run, a deleted pod) raises SystemExit, so the job is deleted on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def job_spec(cfg: Any, stage: str, *, name: str, namespace: str, image: str, args: list[str], checkpoint_prefix: str,
             owner: Owner | None, timeout_s: int, store: Any = None) -> JobSpec:
    """The job of ``stage`` under ``cfg``: everything from the config, nothing secret by value. ``store``
    (the object store the inputs are staged in) gives the pods its endpoint: they need it to fetch the
    config that names it."""
    t = getattr(cfg, stage)
    p = cfg.cluster.placement(stage)
    env = {k: os.environ[k] for k in PASS_ENV if os.environ.get(k)}
    if store is not None:
        env.update({"THINKFORGE_S3_ENDPOINT": store.endpoint, "THINKFORGE_S3_SECURE": str(bool(store.secure)).lower()})
    env[ENV_CHECKPOINT_PREFIX] = checkpoint_prefix
    return JobSpec(
        name=name, namespace=namespace, image=image, stage=stage, nodes=t.nodes, procs_per_node=t.num_processes,
        args=args,
        gpus_per_node=p.gpus or t.num_processes,  # one GPU per process unless the placement says otherwise
        gpu_resource=gpu_resource(p.accelerator),
        requests={k: v for k, v in (("cpu", p.cpu_request), ("memory", p.memory_request)) if v},
        limits={k: v for k, v in (("cpu", p.cpu_limit), ("memory", p.memory_limit)) if v},
        deepspeed_config=image_deepspeed_config(t.deepspeed),
        env=env, secret_env=secret_env(cfg),
        node_selector=dict(p.node_selector), tolerations=[dict(x) for x in p.tolerations], shm_size=p.shm_size,
        labels={"thinkforge/run": re.sub(r"[^A-Za-z0-9_.-]", "-", cfg.run.name)[:63].strip("-_.") or "run"},
        owner=owner, active_deadline_s=timeout_s,
    )


def trainjob_stage(stage: str, *, host: str | None = None, poll_s: float = 10.0,
                   flavor: str = "auto") -> Callable[..., Any]:
    """The stage as a multi-node job, with the signature every stage has."""

    def run(cfg: Any, model_path: str | Path, data_path: str | Path, out_path: str | Path, metrics: Any = None):
        from thinkforge.models import follow_pointer
        from thinkforge.stages.train import checkpoint_prefix
        from thinkforge.storage import ObjectStore

        start = time.monotonic()
        t = getattr(cfg, stage)
        store = ObjectStore.from_config_or_none(cfg.storage)
        if store is None:
            raise TrainJobError(f"{stage}.nodes={t.nodes} needs object storage (storage.endpoint or "
                                "THINKFORGE_S3_ENDPOINT): the job's pods share nothing else with this one")
        secrets = secret_env(cfg)
        if "THINKFORGE_S3_ACCESS_KEY" not in secrets and any(os.environ.get(k) for k in CREDENTIAL_ENV):
            raise TrainJobError(f"{stage}.nodes={t.nodes}: this pod has S3 credentials but the job's pods would not: "
                                "set cluster.s3_secret to the Secret holding them (keys accesskey, secretkey); "
                                "credentials are never copied into the job's manifest")
        api = api_client(host)
        used = detect_flavor(api) if flavor == "auto" else flavor
        kind = _coords(used)[3]
        namespace = current_namespace()
        pod = launcher_pod(api, namespace)
        owner = Owner(pod.name, pod.uid) if pod is not None and pod.uid and pod.namespace == namespace else None
        image = job_image(cfg, pod)
        model_dir = follow_pointer(Path(model_path))
        data_name = f"data{Path(data_path).suffix or '.jsonl'}"
        ckpt = checkpoint_prefix(store, cfg, stage, model_dir, data_path)  # as a one-pod stage computes it
        run_id, run_source = run_identity(cfg, pod)
        name = job_name(cfg.run.name, stage, run_id, cfg.digest(), ckpt)
        base = store.run_prefix(*cfg.run.scope(), stage, "trainjob", name)
        uri = store.uri
        args = ["--config", uri(f"{base}/config.json"), "--model", uri(f"{base}/input-model"),
                "--data", uri(f"{base}/{data_name}"), "--out", uri(f"{base}/model"),
                "--result", uri(f"{base}/result.json")]
        timeout_s, timeout_source = stage_timeout(cfg.cluster.placement(stage))
        spec = job_spec(cfg, stage, name=name, namespace=namespace, image=image, args=args, checkpoint_prefix=ckpt,
                        owner=owner, timeout_s=timeout_s, store=store)
        log.info("%s: %s %s/%s (run identity from %s), checkpoints under %s", stage, kind, namespace, name,
                 run_source, uri(ckpt))

        existing = get_job(api, name, namespace, used)
        if existing is not None:
            state, reason, _ = job_state(existing, used)
            if state == "failed":
                log.info("%s: %s %s/%s of an earlier attempt failed (%s): deleting it and submitting again; "
                         "training resumes from %s", stage, kind, namespace, name, reason, uri(ckpt))
                delete(api, name, namespace, used)
                wait_gone(api, name, namespace, used, poll_s=min(2.0, max(poll_s, 0.01)))
                existing = None
            else:
                log.info("%s: %s %s/%s of an earlier attempt is %s: following it instead of starting another",
                         stage, kind, namespace, name, state)
                if owner is not None:
                    set_owner(api, name, namespace, used, owner)
        if existing is None:
            store.ensure_bucket()
            if store.exists(f"{base}/result.json"):  # a stale result must not pass for this attempt's
                store.delete_key(f"{base}/result.json")
            store.put_json(f"{base}/config.json", cfg.model_dump())
            store.upload_dir(model_dir, f"{base}/input-model")
            store.upload_file(data_path, f"{base}/{data_name}")
            submit(api, spec, used)
        deadline = max(MIN_FOLLOW_S, timeout_s - (time.monotonic() - start) - DEADLINE_MARGIN_S)
        try:
            with _terminate_as_exit():
                follow(api, name, namespace, used, poll_s=poll_s, timeout_s=deadline)
        except TrainJobTimeout as e:
            delete(api, name, namespace, used)
            raise TrainJobTimeout(f"{stage}: {e} (deadline from {timeout_source}: {timeout_s}s); the job was deleted, "
                                  f"its checkpoints stay under {uri(ckpt)}") from None
        except BaseException:
            delete(api, name, namespace, used)  # a failed or abandoned job frees its GPUs
            raise
        store.download_dir(f"{base}/model", out_path)
        return result_from_json(store.get_json(f"{base}/result.json"))

    return run


if __name__ == "__main__":  # pragma: no cover - a manual check: print the manifests for a recipe
    from thinkforge.config import load_recipe

    c = load_recipe(sys.argv[1])
    st = sys.argv[2] if len(sys.argv) > 2 else "sft"
    s = job_spec(c, st, name=job_name(c.run.name, st), namespace="default", image=c.cluster.image or "IMAGE",
                 args=["--config", "s3://b/config.json"], checkpoint_prefix="runs/x/ckpt", owner=None,
                 timeout_s=stage_timeout(c.cluster.placement(st))[0])
    manifests = {f: build_trainjob(s, TrainerAPI(f)) for f in OVERRIDE_FIELDS}
    print(json.dumps({**manifests, "pytorchjob": build_pytorchjob(s)}, indent=2))
