"""The thinkforge DAG: generate -> filter -> mid-train -> SFT -> DPO -> RL -> evaluate -> report.

Every recipe field is a pipeline parameter named `<section>__<field>`, defaulting to the recipe's value,
so a run submitted from the KFP UI can set any of them; the `configure` task takes each as a typed
input, validates them as one recipe and every stage reads that artifact. Stages switched off (`<stage>__enabled=false`) pass their
input model through by reference.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from kfp import compiler, dsl

from thinkforge.components.configure import parameter_type
from thinkforge.components.stages import build
from thinkforge.config import Recipe, flatten

PIPELINE_NAME = "thinkforge"
DEFAULT_IMAGE = os.environ.get("THINKFORGE_IMAGE", "ghcr.io/thinkforge/thinkforge:0.1.0-cpu")


def build_pipeline(recipe: Recipe, image: str = DEFAULT_IMAGE):
    """The DAG as a KFP pipeline whose parameters default to `recipe`'s values."""
    defaults = flatten(recipe)
    c = build(image, defaults)

    def thinkforge(*args: Any, **kwargs: Any):
        params = {**dict(zip(defaults, args)), **kwargs}  # KFP passes the parameters positionally
        cfg = c.configure(**params).set_display_name("configure").outputs["config"]
        base = c.prepare_model(config=cfg).set_display_name("prepare student").outputs["model"]

        gen = c.generate(config=cfg).set_display_name("1 generate")
        flt = c.filter_rollouts(config=cfg, rollouts=gen.outputs["rollouts"]).set_display_name("2 filter")
        mid = c.midtrain(config=cfg, model=base, data=flt.outputs["midtrain_data"]).set_display_name("3 mid-train")
        sft = c.sft(config=cfg, model=mid.outputs["trained"], data=flt.outputs["sft_data"]).set_display_name("4 SFT")
        dpo = c.dpo(config=cfg, model=sft.outputs["trained"], data=flt.outputs["dpo_pairs"]).set_display_name("5 DPO")
        rl = c.rl(config=cfg, model=dpo.outputs["trained"], data=flt.outputs["rl_prompts"]).set_display_name("6 RL")

        base_eval = c.evaluate(config=cfg, model=base, label="base").set_display_name("7 evaluate base")
        final_eval = c.evaluate(config=cfg, model=rl.outputs["trained"], label="final")
        final_eval.set_display_name("7 evaluate final")
        rep = c.report(config=cfg, base_results=base_eval.outputs["results"],
                       final_results=final_eval.outputs["results"],
                       generate_summary=gen.outputs["summary"], filter_summary=flt.outputs["summary"],
                       midtrain_summary=mid.outputs["summary"], sft_summary=sft.outputs["summary"],
                       dpo_summary=dpo.outputs["summary"], rl_summary=rl.outputs["summary"])
        rep.set_display_name("report")
        return rep.outputs["report_md"]

    thinkforge.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=value, annotation=parameter_type(value))
         for name, value in defaults.items()],
        return_annotation=dsl.Markdown,
    )
    thinkforge.__annotations__ = {**{n: parameter_type(v) for n, v in defaults.items()}, "return": dsl.Markdown}
    return dsl.pipeline(name=PIPELINE_NAME, description=__doc__.split("\n", 1)[0])(thinkforge)


def compile_pipeline(recipe: Recipe, out_path: str | Path, image: str = DEFAULT_IMAGE) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(recipe, image), str(out))
    return out
