"""The DAG: the real KFP compiler's IR, and whole runs through the real kfp.local runner."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from thinkforge.config import flatten, load_recipe
from thinkforge.pipelines.training import compile_pipeline

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["generate", "filter-rollouts", "midtrain", "sft", "dpo", "rl", "evaluate", "publish", "report"]


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ir") / "pipeline.yaml"
    compile_pipeline(load_recipe(ROOT / "recipes" / "cpu-demo.yaml"), out)
    return next(yaml.safe_load_all(out.read_text()))


def _artifact_types(component, direction):
    defs = component.get(f"{direction}Definitions", {}).get("artifacts", {})
    return {name: d["artifactType"]["schemaTitle"] for name, d in defs.items()}


def test_seven_stage_components_with_typed_artifacts(ir):
    comps = ir["components"]
    for stage in STAGES:
        assert f"comp-{stage}" in comps, stage
    assert _artifact_types(comps["comp-generate"], "output")["rollouts"] == "system.Dataset"
    assert _artifact_types(comps["comp-filter-rollouts"], "input")["rollouts"] == "system.Dataset"
    flt_out = _artifact_types(comps["comp-filter-rollouts"], "output")
    assert {flt_out[k] for k in ("midtrain_data", "sft_data", "dpo_pairs", "rl_prompts")} == {"system.Dataset"}
    assert flt_out["filter_report"] == "system.HTML" and flt_out["hf_datasets"] == "system.Dataset"
    for stage in ("midtrain", "sft", "dpo", "rl"):
        ins, outs = _artifact_types(comps[f"comp-{stage}"], "input"), _artifact_types(comps[f"comp-{stage}"], "output")
        assert ins["model"] == "system.Model" and ins["data"] == "system.Dataset"
        assert outs["trained"] == "system.Model" and outs["metrics"] == "system.Metrics"
    assert _artifact_types(comps["comp-evaluate"], "output")["metrics"] == "system.Metrics"
    rep = _artifact_types(comps["comp-report"], "output")
    assert rep["report_md"] == "system.Markdown" and rep["report_html"] == "system.HTML"
    assert rep["ablation_md"] == "system.Markdown" and rep["ablation_html"] == "system.HTML"
    assert rep["metrics"] == "system.Metrics"
    pub = _artifact_types(comps["comp-publish"], "output")
    assert pub == {"decision": "system.Artifact", "model_card": "system.Markdown", "metrics": "system.Metrics"}
    assert _artifact_types(comps["comp-publish"], "input")["model"] == "system.Model"


def _by_title(tasks):
    return {t["taskInfo"]["name"]: name for name, t in tasks.items()}


def test_stages_are_wired_in_recipe_order(tmp_path):
    out = compile_pipeline(load_recipe(ROOT / "recipes" / "smoke.yaml"), tmp_path / "p.yaml")  # per_stage on
    tasks = next(yaml.safe_load_all(out.read_text()))["root"]["dag"]["tasks"]
    title = _by_title(tasks)

    def producer(task, artifact):
        return tasks[task]["inputs"]["artifacts"][artifact]["taskOutputArtifact"]["producerTask"]

    assert producer("filter-rollouts", "rollouts") == "generate"
    assert producer("midtrain", "data") == "filter-rollouts" and producer("midtrain", "model") == "prepare-model"
    assert producer("sft", "model") == "midtrain"
    assert producer("dpo", "model") == "sft"
    assert producer("rl", "model") == "dpo"
    evals = {label: title[f"7 evaluate {label}"] for label in ("base", "+mid-train", "+SFT", "+DPO", "final")}
    assert {label: producer(t, "model") for label, t in evals.items()} == {
        "base": "prepare-model", "+mid-train": "midtrain", "+SFT": "sft", "+DPO": "dpo", "final": "rl"}
    labels = {label: tasks[t]["inputs"]["parameters"]["label"]["runtimeValue"]["constant"] for label, t in evals.items()}
    assert labels == {"base": "base", "+mid-train": "midtrain", "+SFT": "sft", "+DPO": "dpo", "final": "final"}
    assert producer("publish", "model") == "rl"
    assert {a: producer("publish", f"{a}_results") for a in ("base", "midtrain", "sft", "dpo", "final")} == {
        "base": evals["base"], "midtrain": evals["+mid-train"], "sft": evals["+SFT"], "dpo": evals["+DPO"],
        "final": evals["final"]}
    assert tasks["publish"]["inputs"]["parameters"]["kfp_run"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    assert producer("report", "decision") == "publish"
    assert producer("report", "dpo_results") == evals["+DPO"]
    # the data snapshot is never cached and feeds configure, so every cache key follows the data
    assert tasks["snapshot-data"].get("cachingOptions", {}).get("enableCache") in (None, False)
    assert tasks["configure"]["inputs"]["parameters"]["data__snapshot"] == {
        "taskOutputParameter": {"outputParameterKey": "Output", "producerTask": "snapshot-data"}}


def test_structure_fields_decide_the_tasks_not_run_parameters(tmp_path, ir):
    """A stage or evaluation that is off has no task (no pod); the switches are not run parameters."""
    from thinkforge.config import STRUCTURE_FIELDS

    assert not set(STRUCTURE_FIELDS) & set(ir["root"]["inputDefinitions"]["parameters"])
    r = load_recipe(ROOT / "recipes" / "smoke.yaml", {"sft.enabled": False, "evaluate.per_stage": False,
                                                      "registry.enabled": False})
    tasks = next(yaml.safe_load_all(compile_pipeline(r, tmp_path / "p.yaml").read_text()))["root"]["dag"]["tasks"]
    assert "sft" not in tasks and "publish" not in tasks
    assert tasks["dpo"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == "midtrain"
    assert sorted(_by_title(tasks)[t] for t in ("7 evaluate base", "7 evaluate final")) == ["evaluate", "evaluate-2"]
    assert tasks["configure"]["inputs"]["parameters"]["sft__enabled"] == {"runtimeValue": {"constant": False}}


def test_every_recipe_field_is_a_pipeline_parameter(ir):
    recipe = load_recipe(ROOT / "recipes" / "cpu-demo.yaml")
    params = ir["root"]["inputDefinitions"]["parameters"]
    flat = flatten(recipe)
    assert set(params) == set(flat)  # every field but the compile-time `cluster` section and structure fields
    assert params["rl__max_steps"]["defaultValue"] == recipe.rl.max_steps
    assert params["template__think"]["defaultValue"] is False
    assert params["evaluate__benchmarks"]["parameterType"] == "LIST"
    # the KFP UI shows each parameter's help: the config field's description, from the pipeline docstring
    assert all(p.get("description") for p in params.values())
    assert params["sft__learning_rate"]["description"].startswith("Peak learning rate")


def _run(*args, timeout=900, env=None):
    return subprocess.run([sys.executable, "-m", "thinkforge.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def smoke_run(s3_server, tmp_path_factory):
    """One smoke-recipe DAG run (per-stage evaluation on) publishing to a fresh bucket on the S3 server."""
    from plugins.s3 import new_bucket_name

    root = tmp_path_factory.mktemp("smoke")
    bucket = new_bucket_name()
    env = {**os.environ, **s3_server.env()}
    proc = _run("run", "--recipe", "recipes/smoke.yaml", "--pipeline-root", str(root),
                "--set", f"storage.bucket={bucket}", env=env)
    try:
        yield proc, root, s3_server.store(bucket, create=False), env
    finally:
        s3_server.drop_bucket(bucket)


def _artifact(root, task, name):
    [path] = root.glob(f"*/{task}/{name}")
    return path


@pytest.mark.e2e
def test_smoke_dag_runs_locally_end_to_end(smoke_run):
    proc, root, _, _ = smoke_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "# thinkforge report: smoke" in out and "| word-problems | 8 |" in out
    report = Path(out.split("report (Markdown): ")[1].split()[0])
    text = report.read_text()
    assert "## Stages" in text and "## By stage (ablation)" in text and "## Registry" in text
    assert "**promoted** to champion: no champion yet" in text
    for stage in ("snapshot-data", "generate", "filter-rollouts", "midtrain", "sft", "dpo", "rl", "evaluate",
                  "evaluate-2", "evaluate-3", "evaluate-4", "evaluate-5", "publish", "report"):
        assert any(root.glob(f"*/{stage}")), stage
    # A quiet terminal: each task's start and end under its display name, the executor dumps in the log
    for name in ("1 generate", "2 filter", "3 mid-train", "4 SFT", "5 DPO", "6 RL", "7 evaluate final", "8 publish"):
        assert re.search(rf"^\d\d:\d\d:\d\d {re.escape(name)} done in ", out, re.M), name
    assert "Got executor_input" not in out and "Loading weights" not in out
    assert len(out.splitlines()) < 150, len(out.splitlines())
    log = Path(out.split("every task's output: ")[1].split()[0])
    assert "Got executor_input" in log.read_text() and log.parent == root / "logs"
    # the filter's data sets in TRL's formats, each with its dataset card, are a KFP artifact of their own
    [hf] = root.glob("*/filter-rollouts/hf_datasets")
    assert {p.parent.name for p in hf.glob("*/data.jsonl")} == {"sft", "dpo", "rl"}
    assert all((p.parent / "README.md").is_file() for p in hf.glob("*/data.jsonl"))


@pytest.mark.e2e
def test_smoke_run_writes_the_per_stage_ablation_table(smoke_run):
    proc, root, _, _ = smoke_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = _artifact(root, "report", "ablation_md").read_text()
    assert "| model | word-problems pass@1 |" in md
    for row in ("| base |", "| +mid-train |", "| +SFT |", "| +DPO |", "| +RL |"):
        assert row in md, row
    page = _artifact(root, "report", "ablation_html").read_text()
    assert "data:image/png;base64,iVBOR" in page and "<td>+DPO</td>" in page
    # every stage's model was really evaluated (none skipped)
    evaluated = {json.loads(p.read_text())["label"] for p in root.glob("*/evaluate*/results")
                 if not json.loads(p.read_text()).get("skipped")}
    assert evaluated == {"base", "midtrain", "sft", "dpo", "final"}


@pytest.mark.e2e
def test_smoke_run_publishes_a_complete_registry_entry(smoke_run):
    proc, root, store, _ = smoke_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    decision = json.loads(_artifact(root, "publish", "decision").read_text())
    assert decision["promoted"] and decision["where"].startswith(f"s3://{store.bucket}/registry/smoke/versions/")
    champion = store.get_json("registry/smoke/champion.json")
    assert champion["version"] == decision["version"]
    entry = f"registry/smoke/versions/{decision['version']}"
    manifest = store.get_json(f"{entry}/manifest.json")
    from thinkforge.config import validate

    # the config the run used: the recipe plus the data snapshot digest and the KFP run id
    used = validate(json.loads(_artifact(root, "configure", "config").read_text()))
    assert manifest["config_digest"] == used.digest()
    assert used.model_copy(update={"data": used.data.model_copy(update={"snapshot": ""}),
                                   "run": used.run.model_copy(update={"id": ""})}).digest() == load_recipe(
        ROOT / "recipes" / "smoke.yaml", {"storage.bucket": store.bucket}).digest()
    assert set(manifest["stages"]) == {"base", "midtrain", "sft", "dpo", "final"}
    assert manifest["metrics"]["word-problems"]["n_problems"] == 8
    assert manifest["lineage"]["kfp_run"] and manifest["lineage"]["sources"]["student"] == "random:llama-tiny"
    assert {"config", "model", "results_final", "filter_summary"} <= set(manifest["lineage"]["artifacts"])
    keys = set(store.list_keys(entry))
    assert set(manifest["files"]) == {k[len(entry) + 1:] for k in keys} - {"manifest.json", "model/_MANIFEST.json"}
    assert any(k.endswith("model/model.safetensors") for k in keys)
    assert "## Promotion" in _artifact(root, "publish", "model_card").read_text()


@pytest.mark.e2e
def test_a_second_run_that_is_not_better_is_not_promoted(smoke_run, tmp_path):
    """Run 2 starts from run 1's final model and trains nothing: not better, so not promoted; the run
    still succeeds and says why."""
    proc, root, store, env = smoke_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads(_artifact(root, "publish", "decision").read_text())
    final_model = _artifact(root, "rl", "trained")
    sets = [f"storage.bucket={store.bucket}", f"model.student={final_model}", "evaluate.per_stage=false",
            "evaluate.evaluate_base=false", "generate.sample_imported=false",  # nothing to sample or compare
            *(f"{s}.enabled=false" for s in ("midtrain", "sft", "dpo", "rl"))]
    proc2 = _run("run", "--recipe", "recipes/smoke.yaml", "--pipeline-root", str(tmp_path),
                 *(a for s in sets for a in ("--set", s)), env=env)
    assert proc2.returncode == 0, proc2.stdout[-3000:] + proc2.stderr[-3000:]
    second = json.loads(_artifact(tmp_path, "publish", "decision").read_text())
    assert second["published"] and not second["promoted"]
    assert f"does not beat the champion {first['version']}" in second["reason"]
    assert "**not promoted**: word-problems pass@1" in proc2.stdout
    assert store.get_json("registry/smoke/champion.json")["version"] == first["version"]
    assert len(store.list_prefixes("registry/smoke/versions")) == 2
    assert store.get_json(f"registry/smoke/decisions/{second['version']}.json")["promoted"] is False


@pytest.mark.e2e
def test_filter_keeping_nothing_stops_the_run_before_training(tmp_path):
    proc = _run("run", "--recipe", "recipes/smoke.yaml", "--pipeline-root", str(tmp_path),
                "--set", "data.train=builtin:word-problems?split=train&n=4",
                "--set", "generate.sample_imported=false")
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "filter kept 0 of 8 rollouts" in log and "counts per reason:" in log
    assert any(tmp_path.glob("*/generate")) and not any(tmp_path.glob("*/midtrain"))


def test_malformed_training_source_names_file_and_line(tmp_path):
    bad = tmp_path / "problems.jsonl"
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?", "answer": \n')
    proc = _run("run", "--recipe", "recipes/smoke.yaml", "--pipeline-root", str(tmp_path / "root"),
                "--set", f"data.train={bad}")
    assert proc.returncode != 0
    assert f"{bad}:2: malformed JSON" in proc.stdout + proc.stderr
    assert not any((tmp_path / "root").glob("*/filter-rollouts"))


def test_ir_carries_each_stages_cluster_placement(tmp_path):
    out = compile_pipeline(load_recipe(ROOT / "recipes" / "phi4-mini-reasoning.yaml"), tmp_path / "p.yaml")
    pipeline, platform = yaml.safe_load_all(out.read_text())
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    executors = pipeline["deploymentSpec"]["executors"]
    tasks = pipeline["root"]["dag"]["tasks"]
    assert executors["exec-rl"]["container"]["image"] == "ghcr.io/thinkforge/thinkforge:0.1.0-cuda"
    for task, stage in (("midtrain", "midtrain"), ("sft", "sft"), ("dpo", "dpo"), ("rl", "rl")):
        res = executors[f"exec-{task}"]["container"]["resources"]
        assert res["accelerator"]["resourceType"] == "nvidia.com/gpu" and res["accelerator"]["resourceCount"] == "8"
        assert res["resourceMemoryRequest"] == "900Gi"
        spec = k8s[f"exec-{task}"]
        assert spec["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert spec["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "64Gi",
                                            "volumeName": "dshm"}]
        assert spec["activeDeadlineSeconds"] == "604800"
        assert spec["podMetadata"]["labels"] == {"app.kubernetes.io/component": stage,
                                                 "app.kubernetes.io/part-of": "thinkforge"}
        assert spec["securityContext"] == {"runAsUser": "10001", "runAsGroup": "10001", "runAsNonRoot": True}
        assert tasks[task]["retryPolicy"]["maxRetryCount"] == 5
        assert tasks[task]["retryPolicy"]["backoffDuration"] == "120s"
        assert not tasks[task]["cachingOptions"].get("enableCache", False)
    eval_res = executors[f"exec-{_by_title(tasks)['7 evaluate final']}"]["container"]["resources"]
    assert eval_res["accelerator"]["resourceCount"] == "1"
    assert "accelerator" not in executors["exec-filter-rollouts"]["container"]["resources"]
    assert executors["exec-filter-rollouts"]["container"]["resources"]["resourceMemoryRequest"] == "64Gi"
    assert tasks["filter-rollouts"]["retryPolicy"]["maxRetryCount"] == 2  # the defaults apply

    def secrets(task):
        return {s["secretName"]: sorted(e["envVar"] for e in s["keyToEnv"]) for s in k8s[task].get("secretAsEnv", [])}

    assert secrets("exec-generate") == {"thinkforge-s3": ["THINKFORGE_S3_ACCESS_KEY", "THINKFORGE_S3_SECRET_KEY"],
                                        "thinkforge-teacher": ["THINKFORGE_TEACHER_API_KEY"],
                                        "thinkforge-hf": ["HF_TOKEN"]}
    assert "thinkforge-teacher" not in secrets("exec-rl") and "thinkforge-hf" not in secrets("exec-report")


def test_cluster_section_is_compile_time_only():
    recipe = load_recipe(ROOT / "recipes" / "phi4-mini-reasoning.yaml")
    assert not any(k.startswith("cluster__") for k in flatten(recipe))
    assert recipe.cluster.placement("sft").gpus == 8 and recipe.cluster.placement("report").gpus == 0
    assert recipe.cluster.placement("generate").retries == 2  # defaults under the stage's own fields


def test_a_multi_node_stage_task_holds_no_gpu(tmp_path):
    """With nodes > 1 the task only launches the Trainer job, whose pods get the stage's GPUs."""
    r = load_recipe(ROOT / "recipes" / "phi4-mini-reasoning.yaml", {"sft.nodes": 2})
    pipeline, platform = yaml.safe_load_all(compile_pipeline(r, tmp_path / "p.yaml").read_text())
    res = pipeline["deploymentSpec"]["executors"]["exec-sft"]["container"].get("resources", {})
    assert "accelerator" not in res
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-sft"]
    assert "nvidia.com/gpu.product" not in k8s.get("nodeSelector", {}).get("labels", {})
    assert pipeline["root"]["dag"]["tasks"]["sft"]["retryPolicy"]["maxRetryCount"] == 5  # the stage's own retries
    dpo = pipeline["deploymentSpec"]["executors"]["exec-dpo"]["container"]["resources"]
    assert dpo["accelerator"]["resourceCount"] == "8"  # one-node stages keep their GPUs


def test_scratch_volume_for_big_local_files(tmp_path):
    """Checkpoints and model caches of a big stage go to a generic ephemeral volume, not the node's disk."""
    r = load_recipe(ROOT / "recipes" / "smoke.yaml", {"cluster.stages": {"sft": {"scratch_size": "200Gi",
                                                                                  "scratch_storage_class": "fast"}}})
    pipeline, platform = yaml.safe_load_all(compile_pipeline(r, tmp_path / "p.yaml").read_text())
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    (vol,) = k8s["exec-sft"]["genericEphemeralVolume"]
    assert vol["mountPath"] == "/scratch" and vol["size"] == "200Gi" and vol["storageClassName"] == "fast"
    env = {e["name"]: e["value"] for e in pipeline["deploymentSpec"]["executors"]["exec-sft"]["container"]["env"]}
    assert env == {"TMPDIR": "/scratch", "THINKFORGE_CACHE": "/scratch/cache"}
    assert "genericEphemeralVolume" not in k8s.get("exec-dpo", {})
