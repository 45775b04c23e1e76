"""A pod-contract runner for the tests: executes a compiled KFP IR YAML the way KFP's driver and
launcher do, as far as one machine can. It is a test harness, not a runtime.

What it follows (kubeflow/pipelines backend/src/v2/driver and backend/src/v2/component/launcher_v2.go):
- the driver resolves each task's inputs from the run's parameters, constants and upstream outputs,
  and names every output artifact under the pipeline root: ``<root>/<pipeline>/<run id>/<task>/<output>``;
- the launcher downloads each input artifact from the object store behind the pipeline root to
  ``LocalPathForURI(uri)`` (``minio://b/k`` -> ``/minio/b/k``, ``s3://b/k`` -> ``/s3/b/k``), creates the
  output folders, substitutes the ``{{$}}`` and ``{{$.inputs...}}``/``{{$.outputs...}}`` placeholders in the
  compiled command, runs it, reads ``/tmp/kfp_outputs/output_metadata.json``, merges artifact metadata
  and uploads every output path (a file or a folder; a missing one is skipped) to its URI;
- each task runs as its own pod: its own process in its own mount namespace where ``/minio``, ``/s3``
  and ``/tmp`` are an empty sandbox of its own, so no task can read another task's files; the
  environment holds only what the IR's Kubernetes platform config gives the pod (secrets as env,
  looked up in the Secrets given to the runner: a missing Secret or key fails the pod as a kubelet
  does; ``set_env_variable``; field paths) plus what KFP sets (``KFP_POD_NAME``, ``KFP_POD_UID``) and
  what the image sets (``PATH``, ``HOME``, ``LANG``): nothing leaks in from the test process;
- a retried task (the IR's retry policy) runs again in a fresh sandbox, as a rescheduled pod does, and
  its failed attempt uploads nothing;
- KFP's cache: with ``cache=`` the runner keys each cacheable task like backend/src/v2/cacheutils
  (input artifact identities, input parameter values, output specs, image and command) and reuses a
  hit's outputs without starting a pod.

What it does not emulate: the package-install prefix of Python components (``pip install kfp==...``;
the test venv already has the packages the image has), ML Metadata and the KFP API, Argo's ``wait``
container and log archiving, pod scheduling (resources, node selectors, tolerations, shm and
security contexts are read by other tests from the IR, not enforced here), DNS (the chart's object-store
host name is replaced by the loopback server's address), sub-DAGs and loops (the thinkforge DAG has
none; the runner refuses them instead of guessing).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

PREFIXES = {"minio://": "minio", "s3://": "s3"}
OUTPUT_METADATA = "/tmp/kfp_outputs/output_metadata.json"


class PodFailed(RuntimeError):
    """A task whose last attempt failed; the message names the task, the attempt and the log."""


@dataclass
class Artifact:
    name: str
    uri: str
    schema_title: str
    schema_version: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def runtime(self) -> dict[str, Any]:
        return {"name": self.name, "uri": self.uri, "metadata": self.metadata,
                "type": {"schemaTitle": self.schema_title, "schemaVersion": self.schema_version}}


@dataclass
class TaskRun:
    task: str
    attempts: int = 0
    cached: bool = False
    cache_key: str = ""
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    logs: list[Path] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())


@dataclass
class RunResult:
    run_id: str
    tasks: dict[str, TaskRun]

    def ran(self) -> list[str]:
        """Tasks that started at least one pod."""
        return [t for t, r in self.tasks.items() if r.attempts and not r.cached]


def local_path(uri: str) -> tuple[str, str]:
    """(mount, key) of an artifact URI: the launcher's LocalPathForURI is /<mount>/<key>."""
    for prefix, mount in PREFIXES.items():
        if uri.startswith(prefix):
            return mount, uri[len(prefix):]
    raise ValueError(f"unsupported artifact URI {uri!r}: the launcher maps only minio:// and s3://")


class PodRunner:
    """Runs one compiled pipeline (``ir_path``) task by task, each task as an isolated pod.

    ``s3`` is a ``minio.Minio`` client of the object store behind ``pipeline_root`` (the launcher's
    credentials, not the task's); ``secrets`` maps Secret name -> {key: value}, as the rendered chart
    creates them; ``python_bin`` is the image's interpreter folder (first on ``PATH``).
    """

    def __init__(self, ir_path: str | Path, *, s3: Any, pipeline_root: str, secrets: dict[str, dict[str, str]],
                 workdir: str | Path, python_bin: str | Path | None = None, task_timeout_s: float = 900,
                 cache: dict[str, dict[str, Any]] | None = None):
        docs = list(yaml.safe_load_all(Path(ir_path).read_text()))
        self.spec = docs[0]
        self.platform = (docs[1] if len(docs) > 1 else {}).get("platforms", {}).get("kubernetes", {}).get(
            "deploymentSpec", {}).get("executors", {})
        self.s3 = s3
        self.root = pipeline_root.rstrip("/")
        self.secrets = secrets
        self.workdir = Path(workdir)
        self.python_bin = str(python_bin or Path(sys.executable).parent)
        self.task_timeout_s = task_timeout_s
        self.cache = cache
        for mount in PREFIXES.values():  # mount points the task namespaces bind their sandboxes onto
            Path(f"/{mount}").mkdir(exist_ok=True)

    # -- the driver ---------------------------------------------------------------------------------

    def run(self, parameters: dict[str, Any] | None = None, *, run_id: str | None = None,
            kill: Callable[[str, int, Path], bool] | None = None, until: set[str] | None = None) -> RunResult:
        """Run every task in dependency order (with ``until``, only those tasks and what they need).
        ``kill(task, attempt, sandbox)`` is polled while a pod runs; when it returns True the pod is
        SIGKILLed (a preemption) and the retry policy applies."""
        run_id = self._run_id = run_id or str(uuid.uuid4())
        root = self.spec["root"]
        if "dag" not in root:
            raise NotImplementedError("the runner runs pipelines with a root DAG only")
        params = {n: d.get("defaultValue") for n, d in root.get("inputDefinitions", {}).get("parameters", {}).items()}
        unknown = set(parameters or {}) - set(params)
        if unknown:
            raise ValueError(f"unknown pipeline parameters {sorted(unknown)}")
        params.update(parameters or {})
        tasks = root["dag"]["tasks"]
        done: dict[str, TaskRun] = {}
        order = self._order(tasks, until)
        for name in order:
            done[name] = self._run_task(name, tasks[name], params, done, run_id, kill)
        return RunResult(run_id, done)

    @staticmethod
    def _order(tasks: dict[str, Any], until: set[str] | None = None) -> list[str]:
        order, seen = [], set()

        def visit(name: str, stack: tuple[str, ...] = ()) -> None:
            if name in seen:
                return
            if name in stack:
                raise ValueError(f"dependency cycle through {name}")
            t = tasks[name]
            deps = set(t.get("dependentTasks", []))
            for spec in t.get("inputs", {}).get("artifacts", {}).values():
                if "taskOutputArtifact" in spec:
                    deps.add(spec["taskOutputArtifact"]["producerTask"])
            for spec in t.get("inputs", {}).get("parameters", {}).values():
                if "taskOutputParameter" in spec:
                    deps.add(spec["taskOutputParameter"]["producerTask"])
            for d in sorted(deps):
                visit(d, stack + (name,))
            seen.add(name)
            order.append(name)

        for name in sorted(until or tasks):
            visit(name)
        return order

    def _component(self, task: dict[str, Any]) -> dict[str, Any]:
        comp = self.spec["components"][task["componentRef"]["name"]]
        if "dag" in comp:
            raise NotImplementedError(f"{task['taskInfo']['name']}: sub-DAGs (dsl.If/ParallelFor groups) are "
                                      "not emulated by this runner")
        return comp

    def _inputs(self, name: str, task: dict[str, Any], params: dict[str, Any], done: dict[str, TaskRun],
                comp: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Artifact]]:
        values: dict[str, Any] = {}
        for pname, spec in task.get("inputs", {}).get("parameters", {}).items():
            if "componentInputParameter" in spec:
                values[pname] = params[spec["componentInputParameter"]]
            elif "runtimeValue" in spec:
                values[pname] = self._resolve(spec["runtimeValue"]["constant"], name)
            elif "taskOutputParameter" in spec:
                src = spec["taskOutputParameter"]
                values[pname] = done[src["producerTask"]].parameters[src["outputParameterKey"]]
            else:
                raise NotImplementedError(f"{name}: input parameter {pname}: {sorted(spec)} is not emulated")
        arts: dict[str, Artifact] = {}
        for aname, spec in task.get("inputs", {}).get("artifacts", {}).items():
            if "taskOutputArtifact" not in spec:
                raise NotImplementedError(f"{name}: input artifact {aname}: {sorted(spec)} is not emulated")
            src = spec["taskOutputArtifact"]
            arts[aname] = done[src["producerTask"]].artifacts[src["outputArtifactKey"]]
        for pname, d in comp.get("inputDefinitions", {}).get("parameters", {}).items():
            if pname not in values and "defaultValue" in d:
                values[pname] = d["defaultValue"]  # the launcher's addDefaultParams
        return values, arts

    def _resolve(self, value: Any, task: str) -> Any:
        """The driver's runtime placeholders in a constant (dsl.PIPELINE_JOB_ID_PLACEHOLDER and kin)."""
        if not isinstance(value, str):
            return value
        for k, v in (("{{$.pipeline_job_uuid}}", self._run_id), ("{{$.pipeline_job_name}}", self._run_id),
                     ("{{$.pipeline_task_name}}", task), ("{{$.pipeline_root}}", self.root)):
            value = value.replace(k, v)
        return value

    def _cache_key(self, values: dict[str, Any], arts: dict[str, Artifact], comp: dict[str, Any],
                   container: dict[str, Any]) -> str:
        key = {"inputArtifactNames": {n: [a.uri] for n, a in sorted(arts.items())},
               "inputParameterValues": values,
               "outputArtifactsSpec": comp.get("outputDefinitions", {}).get("artifacts", {}),
               "outputParametersSpec": comp.get("outputDefinitions", {}).get("parameters", {}),
               "containerSpec": {"image": container["image"],
                                 "cmdArgs": container.get("command", []) + container.get("args", [])}}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def _run_task(self, name: str, task: dict[str, Any], params: dict[str, Any], done: dict[str, TaskRun],
                  run_id: str, kill: Callable[[str, int, Path], bool] | None) -> TaskRun:
        if "triggerPolicy" in task or "iteratorPolicy" in task:
            raise NotImplementedError(f"{name}: conditions and loops are not emulated by this runner")
        comp = self._component(task)
        label = comp["executorLabel"]
        container = self.spec["deploymentSpec"]["executors"][label]["container"]
        values, arts = self._inputs(name, task, params, done, comp)
        result = TaskRun(name)
        cacheable = self.cache is not None and task.get("cachingOptions", {}).get("enableCache", False)
        result.cache_key = self._cache_key(values, arts, comp, container)
        if cacheable and result.cache_key in self.cache:
            hit = self.cache[result.cache_key]
            result.cached, result.artifacts, result.parameters = True, dict(hit["artifacts"]), dict(hit["parameters"])
            return result
        outputs = {n: Artifact(f"{name}-{n}", f"{self.root}/{self.spec['pipelineInfo']['name']}/{run_id}/{name}/{n}",
                               d["artifactType"]["schemaTitle"], d["artifactType"].get("schemaVersion", "0.0.1"))
                   for n, d in comp.get("outputDefinitions", {}).get("artifacts", {}).items()}
        out_params = {n: f"/tmp/kfp_outputs/{n}" for n in comp.get("outputDefinitions", {}).get("parameters", {})}
        executor_input = {
            "inputs": {"parameterValues": values,
                       "artifacts": {n: {"artifacts": [a.runtime()]} for n, a in arts.items()}},
            "outputs": {"artifacts": {n: {"artifacts": [a.runtime()]} for n, a in outputs.items()},
                        "parameters": {n: {"outputFile": p} for n, p in out_params.items()},
                        "outputFile": OUTPUT_METADATA},
        }
        retries = int(task.get("retryPolicy", {}).get("maxRetryCount", 0))
        platform = self.platform.get(label, {})
        for attempt in range(retries + 1):
            result.attempts = attempt + 1
            sandbox = self.workdir / f"{name}.{run_id[:8]}.attempt{attempt}"
            ok, log = self._pod(name, attempt, sandbox, executor_input, arts, container, platform, kill, result)
            result.logs.append(log)
            if ok:
                self._collect(sandbox, executor_input, outputs, out_params, result)
                if cacheable:
                    self.cache[result.cache_key] = {"artifacts": result.artifacts, "parameters": result.parameters}
                return result
        raise PodFailed(f"task {name} ({task['taskInfo']['name']}) failed after {result.attempts} attempt(s); "
                        f"last log {result.logs[-1]}:\n{result.logs[-1].read_text(errors='replace')[-4000:]}")

    # -- the pod ------------------------------------------------------------------------------------

    def _env(self, name: str, container: dict[str, Any], platform: dict[str, Any]) -> dict[str, str]:
        pod = f"{name}-{uuid.uuid4().hex[:5]}"
        env = {"PATH": f"{self.python_bin}:/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp/home", "LANG": "C.UTF-8",
               "KFP_POD_NAME": pod, "KFP_POD_UID": str(uuid.uuid4())}
        for item in container.get("env", []):
            env[item["name"]] = str(item.get("value", ""))
        for ref in platform.get("secretAsEnv", []):
            secret = ref.get("secretName") or ref.get("secretNameParameter", {}).get("runtimeValue", {}).get("constant")
            data = self.secrets.get(secret)
            for kv in ref.get("keyToEnv", []):
                if data is None or kv["secretKey"] not in data:
                    if ref.get("optional"):
                        continue
                    raise PodFailed(f"task {name}: CreateContainerConfigError: secret {secret!r} "
                                    f"{'not found' if data is None else 'has no key ' + repr(kv['secretKey'])}")
                env[kv["envVar"]] = data[kv["secretKey"]]
        fields = {"metadata.name": pod, "metadata.namespace": "kubeflow",
                  "metadata.labels['workflows.argoproj.io/workflow']": self._run_id}  # one workflow per run
        for ref in platform.get("fieldPathAsEnv", []):
            env[ref["name"]] = fields.get(ref["fieldPath"], "")
        return env

    def _download(self, sandbox: Path, art: Artifact) -> None:
        mount, key = local_path(art.uri)
        bucket, _, prefix = key.partition("/")
        dest = sandbox / mount / key
        objects = list(self.s3.list_objects(bucket, prefix=prefix, recursive=True))
        if not objects:
            raise PodFailed(f"failed to download input artifact from remote storage URI {art.uri}: no such object")
        for obj in objects:
            rel = obj.object_name[len(prefix):].lstrip("/")
            target = dest / rel if rel else dest
            target.parent.mkdir(parents=True, exist_ok=True)
            self.s3.fget_object(bucket, obj.object_name, str(target))

    def _upload(self, sandbox: Path, art: Artifact) -> None:
        mount, key = local_path(art.uri)
        bucket, _, prefix = key.partition("/")
        src = sandbox / mount / key
        if src.is_file():
            self.s3.fput_object(bucket, prefix, str(src))
        elif src.is_dir():
            for f in sorted(p for p in src.rglob("*") if p.is_file()):
                self.s3.fput_object(bucket, f"{prefix}/{f.relative_to(src).as_posix()}", str(f))
        # a missing output path is allowed (the launcher logs a warning)

    def _pod(self, name: str, attempt: int, sandbox: Path, executor_input: dict[str, Any], arts: dict[str, Artifact],
             container: dict[str, Any], platform: dict[str, Any], kill: Callable[[str, int, Path], bool] | None,
             result: TaskRun) -> tuple[bool, Path]:
        if sandbox.exists():
            shutil.rmtree(sandbox)
        for d in ("minio", "s3", "tmp/home", "tmp/kfp_outputs", "app"):
            (sandbox / d).mkdir(parents=True)
        log = sandbox.parent / f"{sandbox.name}.log"
        env = self._env(name, container, platform)
        result.env = env
        for art in arts.values():
            self._download(sandbox, art)
        for spec in executor_input["outputs"]["artifacts"].values():
            mount, key = local_path(spec["artifacts"][0]["uri"])
            (sandbox / mount / key).parent.mkdir(parents=True, exist_ok=True)
        command = self._command(executor_input, container)
        # cd first: the working directory lives under the host's /tmp, which the last mount covers
        script = ('cd "$4" && mount --bind "$1" /minio && mount --bind "$2" /s3 && mount --bind "$3" /tmp && '
                  'shift 4 && exec "$@"')
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                str(sandbox / "minio"), str(sandbox / "s3"), str(sandbox / "tmp"), str(sandbox / "app"), *command]
        with open(log, "w") as fh:
            proc = subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            deadline = time.monotonic() + float(platform.get("activeDeadlineSeconds") or self.task_timeout_s)
            while proc.poll() is None:
                why = (f"attempt {attempt} of {name} killed (SIGKILL)" if kill is not None and kill(name, attempt, sandbox)
                       else f"{name} exceeded its deadline" if time.monotonic() > deadline else "")
                if why:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    fh.write(f"\n[podrunner] {why}\n")
                    return False, log
                time.sleep(0.2)
        return proc.returncode == 0, log

    @staticmethod
    def _command(executor_input: dict[str, Any], container: dict[str, Any]) -> list[str]:
        command = list(container.get("command", []))
        # Python components: ["sh", "-c", "<pip install kfp==...> && \"$0\" \"$@\"", "sh", "-ec", ...]: the
        # install prefix is skipped (see the module docstring); the rest runs as compiled.
        if len(command) > 3 and command[:2] == ["sh", "-c"] and "pip install" in command[2]:
            command = command[3:]
        holders = {"{{$}}": json.dumps(executor_input)}
        for n, lst in executor_input["inputs"]["artifacts"].items():
            a = lst["artifacts"][0]
            holders[f"{{{{$.inputs.artifacts['{n}'].uri}}}}"] = a["uri"]
            holders[f"{{{{$.inputs.artifacts['{n}'].path}}}}"] = "/" + "/".join(local_path(a["uri"]))
        for n, lst in executor_input["outputs"]["artifacts"].items():
            a = lst["artifacts"][0]
            holders[f"{{{{$.outputs.artifacts['{n}'].uri}}}}"] = a["uri"]
            holders[f"{{{{$.outputs.artifacts['{n}'].path}}}}"] = "/" + "/".join(local_path(a["uri"]))
        for n, v in executor_input["inputs"]["parameterValues"].items():
            holders[f"{{{{$.inputs.parameters['{n}']}}}}"] = v if isinstance(v, str) else json.dumps(v)
        for n, p in executor_input["outputs"]["parameters"].items():
            holders[f"{{{{$.outputs.parameters['{n}'].output_file}}}}"] = p["outputFile"]
        out = []
        for part in command + list(container.get("args", [])):
            for k, v in holders.items():
                part = part.replace(k, v)
            out.append(part)
        return out

    def _collect(self, sandbox: Path, executor_input: dict[str, Any], outputs: dict[str, Artifact],
                 out_params: dict[str, str], result: TaskRun) -> None:
        meta_file = sandbox / OUTPUT_METADATA.lstrip("/")
        executor_output = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        for n, art in outputs.items():
            produced = executor_output.get("artifacts", {}).get(n, {}).get("artifacts", [])
            if produced:
                art.metadata.update(produced[0].get("metadata", {}))
                art.uri = produced[0].get("uri") or art.uri
            self._upload(sandbox, art)
            result.artifacts[n] = art
        for n, path in out_params.items():
            if n in executor_output.get("parameterValues", {}):
                result.parameters[n] = executor_output["parameterValues"][n]
            else:
                f = sandbox / path.lstrip("/")
                result.parameters[n] = f.read_text() if f.exists() else None
