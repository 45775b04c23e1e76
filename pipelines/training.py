"""The thinkforge DAG: generate -> filter -> mid-train -> SFT -> DPO -> RL -> evaluate -> publish -> report.

Every recipe field is a pipeline parameter named `<section>__<field>`, defaulting to the recipe's value,
so a run submitted from the KFP UI can set any of them; the `configure` task takes each as a typed
input, validates them as one recipe and every stage reads that artifact. Which stages and evaluations
run is fixed when the pipeline is compiled (`<stage>.enabled`, `evaluate.per_stage`, ...): a stage
that is off is not in the DAG and the next stage takes the previous model.

Evaluation runs on the base and final models, and with `evaluate.per_stage` also after mid-train,
SFT and DPO (the ablation table). `publish` puts the final model, its eval results and the recipe in the
model registry and runs the promotion gate; the report then shows the comparison, the ablation table and
the promotion decision.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from kfp import compiler, dsl

from thinkforge.components.configure import parameter_type, pipeline_docstring
from thinkforge.components.stages import build
from thinkforge.pipelines.placement import key_hosts, place
from thinkforge.config import STRUCTURE_FIELDS, Recipe, flatten

PIPELINE_NAME = "thinkforge"
DEFAULT_IMAGE = os.environ.get("THINKFORGE_IMAGE", "ghcr.io/thinkforge/thinkforge:0.1.0-cpu")
TRAIN_STAGES = {"midtrain": "3 mid-train", "sft": "4 SFT", "dpo": "5 DPO", "rl": "6 RL"}
PER_STAGE_TITLES = {"midtrain": "+mid-train", "sft": "+SFT", "dpo": "+DPO"}  # the ablation's middle rows


def build_pipeline(recipe: Recipe, image: str = ""):
    """The DAG as a KFP pipeline whose parameters default to `recipe`'s values; each task placed on the
    cluster per `recipe.cluster`. The structure fields (config.STRUCTURE_FIELDS: which training stages and
    evaluations run) decide which tasks exist: a stage that is off is not in the DAG, so it starts no pod,
    and the next stage takes the previous stage's model artifact."""
    params = flatten(recipe)  # the run parameters
    # what `configure` takes: the run parameters and the fixed fields (run.id reaches each pod as env instead)
    inputs = {k: v for k, v in flatten(recipe, everything=True).items() if k != "run__id"}
    # Constants of the compiled DAG: the structure fields and the cluster section (a multi-node stage
    # submits its Trainer job from it: image, Secrets, placement), with an image given here recorded.
    fixed = {k: v for k, v in inputs.items() if k in STRUCTURE_FIELDS or k not in params and k.startswith("cluster__")}
    if image:
        fixed["cluster__image"] = image
    c = build(image or recipe.cluster.image or DEFAULT_IMAGE, inputs)
    # the teacher key allowlist, a constant env of the pods that may use the key (a run parameter cannot widen it)
    teacher_hosts = key_hosts(recipe)
    on = {s: getattr(recipe, s).enabled for s in TRAIN_STAGES}
    ev = recipe.evaluate

    def task(component, stage: str, name: str, **kwargs):
        # a multi-node stage's task only launches its Trainer job (nodes is fixed here, like placement)
        launcher = stage in TRAIN_STAGES and getattr(recipe, stage).nodes > 1
        return place(component(**kwargs), stage, recipe.cluster, launcher_only=launcher,
                     teacher_hosts=teacher_hosts).set_display_name(name)

    def thinkforge(*args: Any, **kwargs: Any):
        run = {**dict(zip(params, args)), **kwargs}  # KFP passes the parameters positionally
        # Uncached, so a scheduled run sees new data: its digest is an input of `configure`, whose config
        # artifact every task reads, so KFP's cache keys change exactly when the data does.
        snap = task(c.snapshot_data, "snapshot", "snapshot data", source=run["data__train"],
                    endpoint=run["storage__endpoint"], secure=run["storage__secure"], region=run["storage__region"])
        snap.set_caching_options(False)
        # The run id reaches each pod as THINKFORGE_RUN_ID (placement), not through configure: an input
        # of configure would change every cache key on every run.
        cfg = task(c.configure, "configure", "configure", **run, **fixed, data__snapshot=snap.output).outputs["config"]
        base = task(c.prepare_model, "prepare", "prepare student", config=cfg).outputs["model"]

        gen = task(c.generate, "generate", "1 generate", config=cfg)
        flt = task(c.filter_rollouts, "filter", "2 filter", config=cfg, rollouts=gen.outputs["rollouts"])
        summaries = {"generate_summary": gen.outputs["summary"], "filter_summary": flt.outputs["summary"]}
        data = {"midtrain": "midtrain_data", "sft": "sft_data", "dpo": "dpo_pairs", "rl": "rl_prompts"}
        model, results, extra = base, {}, {}  # extra: what only the report reads (the eval samples)
        if ev.enabled and (ev.evaluate_base or ev.per_stage):
            ev_base = task(c.evaluate, "evaluate", "7 evaluate base", config=cfg, model=base, label="base")
            results["base_results"] = ev_base.outputs["results"]
            extra["base_samples"] = ev_base.outputs["samples"]
        for stage, title in TRAIN_STAGES.items():
            if not on[stage]:
                continue
            t = task(getattr(c, stage), stage, title, config=cfg, model=model, data=flt.outputs[data[stage]])
            model = t.outputs["trained"]
            summaries[f"{stage}_summary"] = t.outputs["summary"]
            if ev.enabled and ev.per_stage and stage in PER_STAGE_TITLES:
                results[f"{stage}_results"] = task(
                    c.evaluate, "evaluate", f"7 evaluate {PER_STAGE_TITLES[stage]}", config=cfg, model=model,
                    label=stage).outputs["results"]
        if ev.enabled:
            ev_final = task(c.evaluate, "evaluate", "7 evaluate final", config=cfg, model=model, label="final")
            results["final_results"] = ev_final.outputs["results"]
            extra["final_samples"] = ev_final.outputs["samples"]
        decision = {}
        if recipe.registry.enabled:
            pub = task(c.publish, "publish", "8 publish", config=cfg, model=model,
                       kfp_run=dsl.PIPELINE_JOB_ID_PLACEHOLDER, **results, **summaries)
            decision = {"decision": pub.outputs["decision"]}
        rep = task(c.report, "report", "report", config=cfg, **decision, **results, **summaries, **extra)
        return rep.outputs["report_md"]

    thinkforge.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=value, annotation=parameter_type(value))
         for name, value in params.items()],
        return_annotation=dsl.Markdown,
    )
    thinkforge.__annotations__ = {**{n: parameter_type(v) for n, v in params.items()}, "return": dsl.Markdown}
    thinkforge.__doc__ = pipeline_docstring(params, __doc__.split("\n", 1)[0])  # KFP UI: each parameter's help
    return dsl.pipeline(name=PIPELINE_NAME, description=__doc__.split("\n", 1)[0])(thinkforge)


def compile_pipeline(recipe: Recipe, out_path: str | Path, image: str = "") -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(recipe, image), str(out))
    return out
