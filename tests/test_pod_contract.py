"""The cluster contract, tested without a cluster: the compiled pipeline run task by task as isolated
pods (tests/podrunner.py: what it follows from KFP's driver and launcher and what it does not emulate).

The pipeline is compiled the way the chart's upload Job compiles it (its `--set` arguments, read from
the rendered chart), and the pods get the Secrets the chart renders, so a name or key that does not
line up fails here as it would fail a pod. One substitution: the chart's object-store host name
(`<release>-minio:9000`, cluster DNS) is replaced by the loopback S3 server's address. KFP's own
artifacts go to KFP's default pipeline root (`minio://mlpipeline/v2/artifacts`, KFP's object store)
unless the chart renders a kfp-launcher ConfigMap, whose `defaultPipelineRoot` then applies.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from podrunner import PodFailed, PodRunner
from thinkforge.config import load_recipe, parse_set_flags
from thinkforge.pipelines.training import compile_pipeline
from chart_helpers import upload_sets

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "thinkforge"
KFP_ROOT = "minio://mlpipeline/v2/artifacts"  # standalone KFP's defaultPipelineRoot
KFP_BUCKET = "mlpipeline"
LEAK = "THINKFORGE_TEST_PROCESS_ONLY"  # set in the test process; no pod may see it

pytestmark = pytest.mark.timeout(1800)


def render_chart(values: dict | None = None) -> list[dict]:
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values=values or {}, name="tf", namespace="kubeflow", is_install=True)
    return [d for path, text in sorted(out.items()) if not path.endswith("NOTES.txt")
            for d in yaml.safe_load_all(text) if d]


def chart_secrets(docs: list[dict]) -> dict[str, dict[str, str]]:
    out = {}
    for d in docs:
        if d.get("kind") == "Secret":
            data = {k: base64.b64decode(v).decode() for k, v in (d.get("data") or {}).items()}
            data.update(d.get("stringData") or {})
            out[d["metadata"]["name"]] = data
    return out


def pipeline_root(docs: list[dict]) -> str:
    for d in docs:
        if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == "kfp-launcher":
            return d["data"]["defaultPipelineRoot"]
    return KFP_ROOT


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    """The rendered chart's Secrets and compile arguments, the S3 server as both KFP's object store and
    the chart's, and the KFP bucket; `compile(sets)` compiles the smoke recipe as the upload Job would."""
    docs = render_chart()
    sets = [s for s in upload_sets(docs) if not s.startswith(("storage.endpoint=", "storage.secure="))]
    sets += [f"storage.endpoint={s3_server.endpoint}", "storage.secure=false"]
    bucket = next(s.split("=", 1)[1] for s in sets if s.startswith("storage.bucket="))
    mc = s3_server.minio()
    # The server checks signatures: the chart's generated S3 Secret must be a key it knows, as MinIO's is.
    for data in chart_secrets(docs).values():
        if "accesskey" in data and "secretkey" in data:
            s3_server.add_key(data["accesskey"], data["secretkey"])
    for b in (KFP_BUCKET, bucket):
        if not mc.bucket_exists(b):
            mc.make_bucket(b)
    work = tmp_path_factory.mktemp("pods")

    class Cluster:
        secrets = chart_secrets(docs)
        root = pipeline_root(docs)
        s3 = mc
        server = s3_server
        data_bucket = bucket

        @staticmethod
        def compile(extra: list[str] = (), recipe: str = "recipes/smoke.yaml") -> Path:
            r = load_recipe(ROOT / recipe, parse_set_flags([*sets, *extra]))
            out = work / f"pipeline-{uuid.uuid4().hex[:8]}.yaml"
            compile_pipeline(r, out, image="thinkforge:test")
            return out

        @staticmethod
        def runner(ir: Path, **kw) -> PodRunner:
            return PodRunner(ir, s3=mc, pipeline_root=Cluster.root, secrets=Cluster.secrets,
                             workdir=work / uuid.uuid4().hex[:8], **kw)

    return Cluster


@pytest.fixture(autouse=True)
def leak_marker(monkeypatch):
    monkeypatch.setenv(LEAK, "1")
    monkeypatch.setenv("THINKFORGE_S3_ENDPOINT", "127.0.0.1:1")  # a pod that read the test's env would fail


def run_name() -> str:
    return f"pods-{uuid.uuid4().hex[:8]}"


def read_artifact(cluster, art) -> bytes:
    bucket, _, key = art.uri.split("://", 1)[1].partition("/")
    return cluster.s3.get_object(bucket, key).read()


def test_smoke_dag_runs_as_isolated_pods(cluster):
    ir = cluster.compile()
    result = cluster.runner(ir).run({"run__name": run_name()})
    assert set(result.ran()) == set(result.tasks)  # every task started a pod and succeeded
    report = read_artifact(cluster, result.tasks["report"].artifacts["report_md"]).decode()
    assert "word-problems" in report and "## Registry" in report
    for name, t in result.tasks.items():
        assert LEAK not in t.env and "THINKFORGE_S3_ENDPOINT" not in t.env, name
        # what the platform config gives every pod: the chart's S3 Secret as env
        assert t.env.get("THINKFORGE_S3_ACCESS_KEY"), name
    # the config artifact every pod reads carries the compile-time cluster section (a multi-node stage
    # builds its Trainer job from it) and the snapshot digest of the data
    cfg = json.loads(read_artifact(cluster, result.tasks["configure"].artifacts["config"]))
    s3_secret = next(s.split("=", 1)[1] for s in upload_sets(render_chart()) if s.startswith("cluster.s3_secret="))
    assert cfg["cluster"]["s3_secret"] == s3_secret and s3_secret in cluster.secrets
    assert cfg["cluster"]["image"] == "thinkforge:test" and cfg["data"]["snapshot"]
    # every output artifact lives under KFP's pipeline root, in KFP's object store
    assert all(a.uri.startswith(cluster.root) for t in result.tasks.values() for a in t.artifacts.values())


@pytest.mark.parametrize("stage", ["midtrain", "sft", "dpo", "rl"])
def test_each_stage_disabled_in_turn(cluster, stage):
    ir = cluster.compile([f"{stage}.enabled=false"])
    spec = next(yaml.safe_load_all(ir.read_text()))
    tasks = spec["root"]["dag"]["tasks"]
    assert stage not in tasks  # no pod for a stage that is off
    order = [s for s in ("midtrain", "sft", "dpo", "rl") if s != stage]
    producers = {s: tasks[s]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] for s in order}
    expected_prev = dict(zip(order, ["prepare-model", *order[:-1]]))
    assert producers == expected_prev  # the next stage takes the previous stage's model artifact
    result = cluster.runner(ir).run({"run__name": run_name()})
    assert stage not in result.tasks and set(result.ran()) == set(result.tasks)
    report = read_artifact(cluster, result.tasks["report"].artifacts["report_md"]).decode()
    assert "skipped" in report


def test_evaluations_off_start_no_pods(cluster):
    ir = cluster.compile(["evaluate.per_stage=false", "evaluate.evaluate_base=false", "registry.enabled=false"])
    result = cluster.runner(ir).run({"run__name": run_name()})
    evals = [t for t in result.tasks if t.startswith("evaluate")]
    assert len(evals) == 1 and "publish" not in result.tasks  # only the final evaluation
    assert set(result.ran()) == set(result.tasks)


def test_a_missing_secret_fails_the_pod_like_the_kubelet(cluster):
    ir = cluster.compile(["cluster.hf_secret=no-such-secret"])
    with pytest.raises(PodFailed, match="CreateContainerConfigError: secret 'no-such-secret' not found"):
        cluster.runner(ir).run({"run__name": run_name()}, until={"prepare-model"})


def test_scheduled_run_sees_new_data(cluster, tmp_path):
    """A recurring run with unchanged data reuses generate from KFP's cache; new data in the bucket
    changes the snapshot digest, and with it generate's cache key, so generate runs on the new data."""
    data = tmp_path / "train.jsonl"
    uri = f"s3://{cluster.data_bucket}/data/{uuid.uuid4().hex[:8]}/train.jsonl"

    def load(n: int) -> None:
        rows = [{"id": f"p{i}", "problem": f"What is {i} + {n}?", "answer": str(i + n)} for i in range(n)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        env = {**os.environ, **cluster.server.env()}
        out = subprocess.run([sys.executable, "-m", "thinkforge.cli", "data", "load", str(data), "--to", uri],
                             env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert f"loaded {n} problems" in out.stdout

    ir = cluster.compile([f"data.train={uri}"])
    cache: dict = {}
    runner = cluster.runner(ir, cache=cache)
    name = run_name()
    load(6)
    first = runner.run({"run__name": name}, until={"generate"})
    second = runner.run({"run__name": name}, until={"generate"})
    assert not first.tasks["generate"].cached and second.tasks["generate"].cached
    assert not second.tasks["snapshot-data"].cached  # the snapshot itself always runs
    assert second.tasks["generate"].cache_key == first.tasks["generate"].cache_key
    load(7)  # new data lands in the bucket
    third = runner.run({"run__name": name}, until={"generate"})
    assert not third.tasks["generate"].cached
    assert third.tasks["generate"].cache_key != first.tasks["generate"].cache_key
    summary = json.loads(read_artifact(cluster, third.tasks["generate"].artifacts["summary"]))
    assert summary["problems"] == 7


def keys_under(cluster, prefix: str) -> list[str]:
    return [o.object_name for o in cluster.s3.list_objects(cluster.data_bucket, prefix=prefix, recursive=True)]


def test_killed_pods_resume_from_object_storage(cluster):
    """Preempt three pods mid-way (SIGKILL) and let KFP's retry start fresh ones with empty disks:
    generation keeps its finished shards, SFT resumes from its last complete checkpoint instead of step 0,
    and the final evaluation does not redo the benchmark it had finished. All of it comes back from the
    chart's bucket, the only thing a retried pod shares with the one it replaces."""
    # small shards, a checkpoint every step and two benchmarks: each pod has work left when it is killed
    ir = cluster.compile(["cluster.defaults.retries=1", "cluster.defaults.backoff_s=0", "sft.save_steps=1",
                          "sft.max_steps=8", "generate.shard_prompts=2", "generate.max_new_tokens=48",
                          "evaluate.per_stage=false"])
    name = run_name()
    benches = [{"name": "wp-a", "source": "builtin:word-problems?split=test", "limit": 8},
               {"name": "wp-b", "source": "builtin:word-problems?split=test&seed=1", "limit": 8}]
    done_marker = {"generate": f"runs/{name}/generate/shards/", "sft": f"runs/{name}/sft/checkpoints/",
                   "final": f"runs/{name}/evaluate/final/wp-a/"}
    title = {t["taskInfo"]["name"]: n for n, t in next(yaml.safe_load_all(ir.read_text()))["root"]["dag"]["tasks"].items()}
    victims = {"generate": "generate", "sft": "sft", title["7 evaluate final"]: "final"}

    def kill(task: str, attempt: int, sandbox: Path) -> bool:
        return task in victims and attempt == 0 and any(
            k.endswith("/_MANIFEST.json") for k in keys_under(cluster, done_marker[victims[task]]))

    run_id = str(uuid.uuid4())  # the KFP run id: it scopes the run's objects, and a retry keeps it
    done_marker = {k: v.replace(f"runs/{name}/", f"runs/{name}/{run_id}/") for k, v in done_marker.items()}
    result = cluster.runner(ir).run({"run__name": name, "evaluate__benchmarks": benches}, kill=kill, run_id=run_id)
    logs = {}
    for task in victims:
        t = result.tasks[task]
        assert t.attempts == 2, task
        first, second = (p.read_text() for p in t.logs)
        assert "killed (SIGKILL)" in first, task
        logs[victims[task]] = (first, second)
    import re

    assert re.search(r"generate: restored [1-9]", logs["generate"][1])
    assert not re.search(r"generate: restored [1-9]", logs["generate"][0])
    assert "sft: resuming from s3://" in logs["sft"][1] and "resuming from" not in logs["sft"][0]
    assert "wp-a already done" in logs["final"][1] and "wp-b already done" not in logs["final"][1]
    gen = json.loads(read_artifact(cluster, result.tasks["generate"].artifacts["summary"]))
    assert gen["restored"] >= 1
    sft = json.loads(read_artifact(cluster, result.tasks["sft"].artifacts["summary"]))
    assert sft["steps"] == 8
    final = json.loads(read_artifact(cluster, result.tasks[title["7 evaluate final"]].artifacts["results"]))
    assert set(final["benchmarks"]) == {"wp-a", "wp-b"}
    assert "## Registry" in read_artifact(cluster, result.tasks["report"].artifacts["report_md"]).decode()


def test_two_runs_of_one_recipe_side_by_side(cluster, pushgateway):
    """Two concurrent runs with the same recipe and run name (a recurring run overlapping a manual one)
    against one S3 server and one Pushgateway: the KFP run id scopes each run's checkpoints and metric
    groups, so neither resumes, prunes or overwrites the other's."""
    import threading

    ir = cluster.compile(["sft.save_steps=1"])
    name, ids = run_name(), [str(uuid.uuid4()), str(uuid.uuid4())]
    results, errors = {}, []

    def one(run_id: str) -> None:
        try:
            results[run_id] = cluster.runner(ir).run({"run__name": name, "metrics__push_url": pushgateway.url},
                                                     run_id=run_id, until={"sft"})
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for run_id in ids:
        keys = keys_under(cluster, f"runs/{name}/{run_id}/sft/checkpoints/")
        assert any(k.endswith("/_MANIFEST.json") for k in keys), run_id
        assert "resuming from" not in results[run_id].tasks["sft"].log()  # never the other run's checkpoint
    groups = [g["labels"] for g in pushgateway.groups()["data"]]
    for run_id in ids:
        assert any(g.get("run_id") == f"{name}-{run_id}" and g.get("stage") == "sft" for g in groups), groups
