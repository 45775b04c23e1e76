"""The thinkforge DAG: generate -> filter -> mid-train -> SFT -> DPO -> RL -> evaluate -> publish -> report.

Every recipe field is a pipeline parameter named `<section>__<field>`, defaulting to the recipe's value,
so a run submitted from the KFP UI can set any of them; the `configure` task takes each as a typed
input, validates them as one recipe and every stage reads that artifact. Stages switched off (`<stage>__enabled=false`) pass their
input model through by reference.

Evaluation runs on the base and final models, and with `evaluate__per_stage=true` also after mid-train,
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

from thinkforge.components.configure import parameter_type
from thinkforge.components.stages import build
from thinkforge.pipelines.placement import place
from thinkforge.config import Recipe, flatten

PIPELINE_NAME = "thinkforge"
DEFAULT_IMAGE = os.environ.get("THINKFORGE_IMAGE", "ghcr.io/thinkforge/thinkforge:0.1.0-cpu")


def build_pipeline(recipe: Recipe, image: str = ""):
    """The DAG as a KFP pipeline whose parameters default to `recipe`'s values; each task placed on the
    cluster per `recipe.cluster`."""
    defaults = flatten(recipe)
    c = build(image or recipe.cluster.image or DEFAULT_IMAGE, defaults)

    def task(component, stage: str, name: str, **inputs):
        return place(component(**inputs), stage, recipe.cluster).set_display_name(name)

    def thinkforge(*args: Any, **kwargs: Any):
        params = {**dict(zip(defaults, args)), **kwargs}  # KFP passes the parameters positionally
        cfg = task(c.configure, "configure", "configure", **params).outputs["config"]
        base = task(c.prepare_model, "prepare", "prepare student", config=cfg).outputs["model"]

        gen = task(c.generate, "generate", "1 generate", config=cfg)
        flt = task(c.filter_rollouts, "filter", "2 filter", config=cfg, rollouts=gen.outputs["rollouts"])
        mid = task(c.midtrain, "midtrain", "3 mid-train", config=cfg, model=base, data=flt.outputs["midtrain_data"])
        sft = task(c.sft, "sft", "4 SFT", config=cfg, model=mid.outputs["trained"], data=flt.outputs["sft_data"])
        dpo = task(c.dpo, "dpo", "5 DPO", config=cfg, model=sft.outputs["trained"], data=flt.outputs["dpo_pairs"])
        rl = task(c.rl, "rl", "6 RL", config=cfg, model=dpo.outputs["trained"], data=flt.outputs["rl_prompts"])

        base_eval = task(c.evaluate, "evaluate", "7 evaluate base", config=cfg, model=base, label="base")
        final_eval = task(c.evaluate, "evaluate", "7 evaluate final", config=cfg, model=rl.outputs["trained"],
                          label="final")
        # The ablation table's middle rows: each does nothing unless evaluate__per_stage is true (a run
        # parameter, so the tasks are always in the DAG and decide at run time).
        stage_evals = {
            label: task(c.evaluate, "evaluate", f"7 evaluate {title}", config=cfg, model=t.outputs["trained"],
                        label=label).outputs["results"]
            for label, title, t in (("midtrain", "+mid-train", mid), ("sft", "+SFT", sft), ("dpo", "+DPO", dpo))
        }
        results = {"base_results": base_eval.outputs["results"],
                   **{f"{label}_results": r for label, r in stage_evals.items()},
                   "final_results": final_eval.outputs["results"]}
        summaries = {"generate_summary": gen.outputs["summary"], "filter_summary": flt.outputs["summary"],
                     "midtrain_summary": mid.outputs["summary"], "sft_summary": sft.outputs["summary"],
                     "dpo_summary": dpo.outputs["summary"], "rl_summary": rl.outputs["summary"]}
        pub = task(c.publish, "publish", "8 publish", config=cfg, model=rl.outputs["trained"],
                   kfp_run=dsl.PIPELINE_JOB_ID_PLACEHOLDER, **results, **summaries)
        rep = task(c.report, "report", "report", config=cfg, decision=pub.outputs["decision"], **results,
                   **summaries)
        return rep.outputs["report_md"]

    thinkforge.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=value, annotation=parameter_type(value))
         for name, value in defaults.items()],
        return_annotation=dsl.Markdown,
    )
    thinkforge.__annotations__ = {**{n: parameter_type(v) for n, v in defaults.items()}, "return": dsl.Markdown}
    return dsl.pipeline(name=PIPELINE_NAME, description=__doc__.split("\n", 1)[0])(thinkforge)


def compile_pipeline(recipe: Recipe, out_path: str | Path, image: str = "") -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(recipe, image), str(out))
    return out
