"""Per-stage Kubernetes placement from the recipe's `cluster` section, applied to compiled tasks.

GPU count and type, node selector and tolerations for the GPU pool, CPU/memory requests and limits,
a memory-backed /dev/shm, secrets as environment variables, timeout, retries with backoff, caching,
and the pod labels the chart's NetworkPolicy and PodMonitor select on. kfp.local ignores all of it.
"""

from __future__ import annotations

from kfp import kubernetes

from thinkforge.config import ClusterConfig

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


def place(task, stage: str, cluster: ClusterConfig, *, launcher_only: bool = False):
    """`launcher_only`: the task only submits and follows a multi-node Trainer job, whose pods get the
    stage's GPUs and pool; the task itself runs with the defaults' placement and no GPU, so it does
    not hold a GPU node idle while the job trains."""
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
    return task
