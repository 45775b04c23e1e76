"""One KFP component per recipe stage: typed artifacts in, typed artifacts out.

Each function body is shipped to the cluster as source, so it imports what it needs inside and does
nothing but move artifacts and call the plain stage function (thinkforge.stages.*), which holds the
logic and is unit-tested without KFP. `build(image)` turns them into components on a chosen image.
"""


from types import SimpleNamespace

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output


def snapshot_data(source: str, endpoint: str, secure: bool, region: str) -> str:
    """What the training data source holds now, as a digest (object versions or file digests). Never
    cached: a recurring run after new data lands gets a new digest, and with it new cache keys downstream."""
    import json

    from thinkforge.config import StorageConfig
    from thinkforge.sources import source_digest

    snap = source_digest(source, StorageConfig(endpoint=endpoint, secure=secure, region=region))
    print(json.dumps(snap))
    return snap["digest"]


def prepare_model(config: Input[Artifact], model: Output[Model]):
    """Materialize the student (hub name, URI or built-in) as a safetensors model artifact."""
    from thinkforge.components.common import load_config
    from thinkforge.models import load_model, load_tokenizer, save_model

    cfg = load_config(config)
    spec = cfg.model.tokenizer or cfg.model.student
    save_model(load_model(cfg.model.student, cfg.model.dtype, cfg.model.trust_remote_code, cfg.run.seed),
               load_tokenizer(spec, cfg.model.trust_remote_code), model.path)
    model.metadata["source"] = cfg.model.student


def generate(config: Input[Artifact], rollouts: Output[Dataset], summary: Output[Artifact], metrics: Output[Metrics]):
    """Stage 1: teacher chain-of-thought rollouts of the training problems."""
    from thinkforge.components.common import load_config, run_stage, write_summary
    from thinkforge.stages.generate import generate as run

    cfg = load_config(config)
    result = run_stage(cfg, "generate", lambda m: run(cfg, rollouts.path, metrics=m))
    write_summary(summary, metrics, result)


def filter_rollouts(config: Input[Artifact], rollouts: Input[Dataset], midtrain_data: Output[Dataset],
                    sft_data: Output[Dataset], dpo_pairs: Output[Dataset], rl_prompts: Output[Dataset],
                    verdicts: Output[Dataset], summary: Output[Artifact], metrics: Output[Metrics],
                    filter_report: Output[HTML], hf_datasets: Output[Dataset]):
    """Stage 2: keep rollouts whose answer verifies; derive mid-train, SFT, DPO and RL sets (and the same
    SFT, DPO and RL sets in TRL's formats with dataset cards: `hf_datasets`, a folder sft/ dpo/ rl/)."""
    import shutil
    import tempfile
    from pathlib import Path

    from thinkforge.components.common import load_config, run_stage, write_summary
    from thinkforge.stages.filter import filter_rollouts as run, html_report

    cfg = load_config(config)
    work = Path(tempfile.mkdtemp(prefix="filter-"))
    result = run_stage(cfg, "filter", lambda m: run(cfg, rollouts.path, work, metrics=m))
    for name, art in (("midtrain", midtrain_data), ("sft", sft_data), ("dpo", dpo_pairs),
                      ("rl_prompts", rl_prompts), ("verdicts", verdicts)):
        shutil.move(work / f"{name}.jsonl", art.path)
    shutil.move(work / "hf", hf_datasets.path)
    Path(filter_report.path).write_text(html_report(result))
    write_summary(summary, metrics, result)


def midtrain(config: Input[Artifact], model: Input[Model], data: Input[Dataset], trained: Output[Model],
             summary: Output[Artifact], metrics: Output[Metrics]):
    """Stage 3: distillation mid-training on all accepted CoT, packing on."""
    from thinkforge.components.common import train_component

    train_component("midtrain", config, model, data, trained, summary, metrics)


def sft(config: Input[Artifact], model: Input[Model], data: Input[Dataset], trained: Output[Model],
        summary: Output[Artifact], metrics: Output[Metrics]):
    """Stage 4: SFT on the compact subset, packing off, completion-only loss."""
    from thinkforge.components.common import train_component

    train_component("sft", config, model, data, trained, summary, metrics)


def dpo(config: Input[Artifact], model: Input[Model], data: Input[Dataset], trained: Output[Model],
        summary: Output[Artifact], metrics: Output[Metrics]):
    """Stage 5: rollout DPO, reference = the incoming SFT model."""
    from thinkforge.components.common import train_component

    train_component("dpo", config, model, data, trained, summary, metrics)


def rl(config: Input[Artifact], model: Input[Model], data: Input[Dataset], trained: Output[Model],
       summary: Output[Artifact], metrics: Output[Metrics]):
    """Stage 6: GRPO with the +1/-1 verifier reward and the paper's stabilizers."""
    from thinkforge.components.common import train_component

    train_component("rl", config, model, data, trained, summary, metrics)


def evaluate(config: Input[Artifact], model: Input[Model], label: str, results: Output[Artifact],
             samples: Output[Dataset], metrics: Output[Metrics]):
    """Stage 7: k samples per problem on every benchmark; pass@1 ± SE, cons@k, pass@k. `label` is base,
    midtrain, sft, dpo (these three only with evaluate.per_stage) or final."""
    from thinkforge.components.common import evaluate_component

    evaluate_component(config, model, label, results, samples, metrics)


def publish(config: Input[Artifact], model: Input[Model], kfp_run: str, decision: Output[Artifact],
            model_card: Output[Markdown], metrics: Output[Metrics], base_results: Input[Artifact] = None,
            midtrain_results: Input[Artifact] = None, sft_results: Input[Artifact] = None,
            dpo_results: Input[Artifact] = None, final_results: Input[Artifact] = None,
            generate_summary: Input[Artifact] = None, filter_summary: Input[Artifact] = None,
            midtrain_summary: Input[Artifact] = None, sft_summary: Input[Artifact] = None,
            dpo_summary: Input[Artifact] = None, rl_summary: Input[Artifact] = None):
    """Publish the final model, its eval results and the recipe to the registry; promote it when it beats
    the champion by the configured margin ("not promoted" is an outcome, not a failure)."""
    from thinkforge.components.common import publish_component

    publish_component(config, model,
                      {"base": base_results, "midtrain": midtrain_results, "sft": sft_results, "dpo": dpo_results,
                       "final": final_results},
                      {"generate_summary": generate_summary, "filter_summary": filter_summary,
                       "midtrain_summary": midtrain_summary, "sft_summary": sft_summary,
                       "dpo_summary": dpo_summary, "rl_summary": rl_summary},
                      kfp_run, decision, model_card, metrics)


def report(config: Input[Artifact], report_md: Output[Markdown], report_html: Output[HTML],
           ablation_md: Output[Markdown], ablation_html: Output[HTML], metrics: Output[Metrics],
           base_results: Input[Artifact] = None, midtrain_results: Input[Artifact] = None,
           sft_results: Input[Artifact] = None, dpo_results: Input[Artifact] = None,
           final_results: Input[Artifact] = None, generate_summary: Input[Artifact] = None,
           filter_summary: Input[Artifact] = None, midtrain_summary: Input[Artifact] = None,
           sft_summary: Input[Artifact] = None, dpo_summary: Input[Artifact] = None,
           rl_summary: Input[Artifact] = None, decision: Input[Artifact] = None,
           base_samples: Input[Dataset] = None, final_samples: Input[Dataset] = None):
    """The run report: base vs final on every benchmark, the per-stage ablation table with its plot, the
    registry's decision, and what each stage did; the HTML page adds the training curves (each training
    stage's log history, in its summary), completion-length histograms and example answers (the eval samples)."""
    from thinkforge.components.common import report_component

    report_component(config,
                     {"base": base_results, "midtrain": midtrain_results, "sft": sft_results, "dpo": dpo_results,
                      "final": final_results},
                     {"generate": generate_summary, "filter": filter_summary, "midtrain": midtrain_summary,
                      "sft": sft_summary, "dpo": dpo_summary, "rl": rl_summary},
                     decision, report_md, report_html, ablation_md, ablation_html, metrics,
                     samples={"base": base_samples, "final": final_samples})


def build(image: str, parameters: dict) -> SimpleNamespace:
    """The components on `image` (the thinkforge CPU or CUDA image); `parameters` are the flattened
    recipe fields the `configure` component takes one by one."""
    from thinkforge.components.configure import configure_function

    fns = (snapshot_data, configure_function(parameters), prepare_model, generate, filter_rollouts, midtrain, sft, dpo, rl,
           evaluate, publish, report)
    return SimpleNamespace(**{f.__name__: dsl.component(base_image=image)(f) for f in fns})
