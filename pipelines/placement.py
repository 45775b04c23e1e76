"""Per-stage Kubernetes placement from the recipe's `cluster` section, applied to compiled tasks.

GPU count and type, node selector and tolerations for the GPU pool, CPU/memory requests and limits,
a memory-backed /dev/shm, secrets as environment variables, timeout, retries with backoff, caching,
and the pod labels the chart's NetworkPolicy and PodMonitor select on. kfp.local ignores most of it
(not the environment variables).

The teacher key allowlist (`key_hosts`) is set here too, as THINKFORGE_TEACHER_HOSTS on the pods that
get the teacher key: a constant of the compiled pipeline, which no run parameter reaches.
"""

from __future__ import annotations

from kfp import kubernetes

from urllib.parse import urlsplit

from thinkforge.config import ClusterConfig, ConfigError, Recipe, key_allowed, teacher_host

PART_OF = "thinkforge"
SCRATCH = "/scratch"
RUN_AS = 10001
RUN_LABEL = "metadata.labels['workflows.argoproj.io/workflow']"
# (cluster field, secret key -> env var, stages that get it): each secret only where it is used.
SECRET_ENV = (
    ("s3_secret", {"accesskey": "THINKFORGE_S3_ACCESS_KEY", "secretkey": "THINKFORGE_S3_SECRET_KEY"}, None),
    ("teacher_secret", {"api-key": "THINKFORGE_TEACHER_API_KEY"}, {"generate", "evaluate"}),
    ("hf_secret", {"token": "HF_TOKEN"}, {"prepare", "generate", "midtrain", "sft", "dpo", "rl", "evaluate"}),
)
KEY_STAGES = {"generate", "evaluate"}  # where the teacher key may be used: they get the allowlist
ENV_KEY_HOSTS = "THINKFORGE_TEACHER_HOSTS"  # read by thinkforge.engines.openai
ENV_SERVING_TARGET = "THINKFORGE_SERVING_TARGET"  # read by thinkforge.serving (the publish step)


def _endpoints(recipe: Recipe) -> list[tuple[str, str]]:
    return [(f"{s}.endpoint", getattr(recipe, s).endpoint) for s in ("generate", "evaluate")
            if getattr(recipe, s).engine == "openai" and getattr(recipe, s).endpoint]


def key_hosts(recipe: Recipe) -> list[str]:
    """The teacher key allowlist the compiled pipeline enforces: cluster.teacher_hosts, or when that is
    empty the hosts of the recipe's own endpoints (an endpoint changed by a run parameter gets no key).
    With a list and a teacher Secret, an endpoint of the recipe that the list leaves out is an error now
    rather than a refused key at run time."""
    listed = recipe.cluster.teacher_hosts
    hosts = []
    for field, url in _endpoints(recipe):
        try:
            u = urlsplit(url)
            port = u.port or (443 if u.scheme == "https" else 80)
            entry = teacher_host(f"{u.scheme}://{u.hostname}:{port}")
        except ValueError:
            continue  # not a usable URL: configure and the engine say so
        if listed and recipe.cluster.teacher_secret and not key_allowed(u.scheme, u.hostname or "", port, listed):
            raise ConfigError(f"{field} {url}: {u.scheme}://{u.hostname}:{port} is not on cluster.teacher_hosts "
                              f"{listed} (the teacher key allowlist; chart: teacher.allowedHosts): add it there, or "
                              "the run's teacher key is refused")
        hosts.append(entry)
    return list(listed) if listed else list(dict.fromkeys(hosts))


def place(task, stage: str, cluster: ClusterConfig, *, launcher_only: bool = False,
          teacher_hosts: list[str] | None = None):
    """`launcher_only`: the task only submits and follows a multi-node Trainer job, whose pods get the
    stage's GPUs and pool; the task itself runs with the defaults' placement and no GPU, so it does
    not hold a GPU node idle while the job trains. `teacher_hosts` (`key_hosts`): the key allowlist of the
    stages in KEY_STAGES (None = none set: only tests that place one task)."""
    p = cluster.placement(stage)
    if launcher_only:
        keep = {k: getattr(p, k) for k in ("timeout_s", "retries", "backoff_s", "backoff_factor", "backoff_max_s",
                                           "cache")}
        p = cluster.defaults.model_copy(update={"gpus": 0, "accelerator": "", **keep})
    kubernetes.add_pod_label(task, "app.kubernetes.io/part-of", PART_OF)
    kubernetes.add_pod_label(task, "app.kubernetes.io/component", stage)
    # the image's user (docker/Dockerfile.*): with KFP >= 2.16's own defaults (seccomp, no escalation,
    # dropped capabilities) a task pod then meets Pod Security "restricted"
    kubernetes.set_security_context(task, run_as_user=RUN_AS, run_as_group=RUN_AS, run_as_non_root=True)
    # one KFP run = one Argo workflow, whose name labels each of its pods (a retried task's too)
    kubernetes.use_field_path_as_env(task, env_name="THINKFORGE_RUN_ID", field_path=RUN_LABEL)
    if p.gpus:
        task.set_accelerator_type(p.accelerator or "nvidia.com/gpu")
        task.set_accelerator_limit(p.gpus)
    for setter, value in ((task.set_cpu_request, p.cpu_request), (task.set_cpu_limit, p.cpu_limit),
                          (task.set_memory_request, p.memory_request), (task.set_memory_limit, p.memory_limit)):
        if value:
            setter(value)
    for key, value in sorted(p.node_selector.items()):
        kubernetes.add_node_selector(task, key, value)
    for t in p.tolerations:
        kubernetes.add_toleration(task, **t)
    if p.shm_size:
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=p.shm_size)
    if p.scratch_size:
        # KFP has no ephemeral-storage request; a generic ephemeral volume is the supported way to give a
        # task disk of its own (checkpoints, model caches), released with the pod
        kubernetes.add_ephemeral_volume(task, volume_name="scratch", mount_path=SCRATCH, access_modes=["ReadWriteOnce"],
                                        size=p.scratch_size, storage_class_name=p.scratch_storage_class or None)
        task.set_env_variable("TMPDIR", SCRATCH)
        task.set_env_variable("THINKFORGE_CACHE", f"{SCRATCH}/cache")
    if p.timeout_s:
        kubernetes.set_timeout(task, p.timeout_s)
    if p.retries:
        task.set_retry(p.retries, backoff_duration=f"{p.backoff_s}s", backoff_factor=p.backoff_factor,
                       backoff_max_duration=f"{p.backoff_max_s}s")
    task.set_caching_options(p.cache)
    for field, keys, stages in SECRET_ENV:
        name = getattr(cluster, field)
        if name and (stages is None or stage in stages):
            kubernetes.use_secret_as_env(task, secret_name=name, secret_key_to_env=keys)
    if teacher_hosts is not None and stage in KEY_STAGES:
        task.set_env_variable(ENV_KEY_HOSTS, ",".join(teacher_hosts))
    if stage == "publish" and cluster.serving_target:
        task.set_env_variable(ENV_SERVING_TARGET, cluster.serving_target)
    return task
