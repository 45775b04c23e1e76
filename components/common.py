"""The work behind each component body: config in, stage call, artifacts and metrics out.

Component functions stay a few lines (their source ships to the cluster); this module is installed
with the package in the image, so the shared logic lives once, here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from thinkforge.config import Recipe, validate

log = logging.getLogger("thinkforge")

TRAIN_INPUTS = {"midtrain": "midtrain", "sft": "sft", "dpo": "dpo", "rl": "rl"}
LOG_HISTORY = "log_history.json"  # in each trained model artifact: trainer.state.log_history


def load_config(artifact: Any) -> Recipe:
    """The run's config; `run.id` from the pod's THINKFORGE_RUN_ID (its Argo workflow: one per KFP run,
    the same for a retried task), so run-scoped objects never mix two runs."""
    cfg = validate(json.loads(Path(artifact.path).read_text()), origin=f"config artifact {artifact.path}")
    run_id = os.environ.get("THINKFORGE_RUN_ID", "")
    if run_id and not cfg.run.id:
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"id": run_id})})
    return cfg


def run_stage(cfg: Recipe, stage: str, fn: Callable[[Any], Any]) -> Any:
    """Run one stage function with structured logs and its Prometheus metrics (endpoint and/or pushes,
    per the recipe's `metrics` section); errors propagate so the KFP task fails with the message."""
    from thinkforge.metrics import StageMetrics
    from thinkforge.progress import configure_logging

    configure_logging(cfg.run.name, stage)
    log.info("starting")
    with StageMetrics.for_recipe(stage, cfg) as metrics:
        result = fn(metrics)
    log.info("done")
    return result


def as_dict(result: Any) -> dict[str, Any]:
    return dataclasses.asdict(result) if dataclasses.is_dataclass(result) else dict(result)


def write_summary(summary: Any, metrics: Any, result: Any) -> dict[str, Any]:
    """The stage's summary artifact (a training stage's log history too: the report's curves read it from
    here, a few KB, not from the model artifact) and its numbers as KFP metrics."""
    data = as_dict(result)
    Path(summary.path).write_text(json.dumps(data, indent=2, default=str))
    for key, value in data.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
            metrics.log_metric(key, float(value))
        elif isinstance(value, dict):
            for sub, v in value.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    metrics.log_metric(f"{key}.{sub}", float(v))
    return data


def train_component(stage: str, config: Any, model: Any, data: Any, trained: Any, summary: Any, metrics: Any) -> None:
    from thinkforge.launch import stage_function

    cfg = load_config(config)
    if not getattr(cfg, stage).enabled:  # the compiled DAG has no task for a stage that is off
        raise ValueError(f"{stage}: this task runs only when {stage}.enabled is true; the pipeline was compiled "
                         "from a different recipe than the config artifact")
    fn = stage_function(stage, cfg)  # in process, under accelerate/DeepSpeed, or as a Trainer job
    result = run_stage(cfg, stage, lambda m: fn(cfg, model.path, data.path, trained.path, metrics=m))
    # The Trainer's whole log history (loss/reward curve, learning rate, final train metrics), next to the model.
    history = as_dict(result).get("history") or []
    Path(trained.path, LOG_HISTORY).write_text(json.dumps(history, indent=1, default=str))
    write_summary(summary, metrics, result)


PER_STAGE_LABELS = ("midtrain", "sft", "dpo")


def eval_skip_reason(cfg: Recipe, label: str) -> str | None:
    """Why the evaluate task of `label` (base, midtrain, sft, dpo, final) does nothing, or None."""
    e = cfg.evaluate
    if not e.enabled:
        return "evaluation off (evaluate.enabled=false)"
    if label == "base" and not (e.evaluate_base or e.per_stage):
        return "base evaluation off (evaluate.evaluate_base=false)"
    if label in PER_STAGE_LABELS:
        if not e.per_stage:
            return "per-stage evaluation off (evaluate.per_stage=false)"
        if not getattr(cfg, label).enabled:
            return f"{label} stage off"
    return None


def evaluate_component(config: Any, model: Any, label: str, results: Any, samples: Any, metrics: Any) -> None:
    import shutil
    import tempfile

    from thinkforge.stages.evaluate import evaluate

    cfg = load_config(config)
    why = eval_skip_reason(cfg, label)
    if why:
        Path(results.path).write_text(json.dumps({"label": label, "skipped": True, "reason": why, "benchmarks": {}}))
        Path(samples.path).mkdir(parents=True, exist_ok=True)
        metrics.log_metric("skipped", 1.0)
        return
    work = Path(tempfile.mkdtemp(prefix=f"eval-{label}-"))
    res = run_stage(cfg, f"evaluate-{label}", lambda m: evaluate(cfg, model.path, work, label=label, metrics=m))
    shutil.move(work / "results.json", results.path)
    shutil.move(str(work), samples.path)
    for bench, m in res["benchmarks"].items():
        for key, value in m.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics.log_metric(f"{bench}.{key}", float(value))


def _json(artifact: Any) -> dict[str, Any]:
    return json.loads(Path(artifact.path).read_text())


def publish_component(config: Any, model: Any, results: dict[str, Any], artifacts: dict[str, Any], kfp_run: str,
                      decision: Any, model_card: Any, metrics: Any) -> None:
    from thinkforge.cards import strip_metadata
    from thinkforge.stages.publish import publish

    cfg = load_config(config)
    results = {label: a for label, a in results.items() if a is not None}  # absent: not in the DAG
    artifacts = {name: a for name, a in artifacts.items() if a is not None}
    lineage = {"config": (config.path, config.uri), "model": (model.path, model.uri),
               **{f"results_{label}": (a.path, a.uri) for label, a in results.items()},
               **{name: (a.path, a.uri) for name, a in artifacts.items()}}
    out = run_stage(cfg, "publish", lambda m: publish(cfg, model.path, {label: a.path for label, a in results.items()},
                                                      lineage, kfp_run=kfp_run, metrics=m))
    card = out.pop("card", "")
    Path(decision.path).write_text(json.dumps(out, indent=2, default=str))
    metrics.log_metric("published", 1.0 if out["published"] else 0.0)
    metrics.log_metric("promoted", 1.0 if out["promoted"] else 0.0)
    gate = out.get("gate", {})
    for key in ("candidate_value", "champion_value", "gain"):
        if isinstance(gate.get(key), (int, float)):
            metrics.log_metric(f"gate.{key}", float(gate[key]))
    if out["published"]:
        decision.metadata.update(version=out["version"], where=out["where"])
    verdict = "promoted" if out["promoted"] else "not promoted"
    # KFP shows Markdown only: the card without its YAML metadata (the registry keeps the full card)
    Path(model_card.path).write_text(f"{strip_metadata(card)}\n## Promotion\n\n**{verdict}**: {out['reason']}\n")
    decision.metadata.update(promoted=out["promoted"], reason=out["reason"])
    log.info("registry: %s: %s", verdict, out["reason"])


def report_component(config: Any, results: dict[str, Any], summaries: dict[str, Any], decision: Any,
                     report_md: Any, report_html: Any, ablation_md: Any, ablation_html: Any, metrics: Any,
                     samples: dict[str, Any] | None = None) -> None:
    from thinkforge.stages.report import (ablation, ablation_html as ab_html, ablation_markdown, ablation_plot,
                                          compare, markdown, report_page)

    cfg = load_config(config)
    # An input is None when its task is not in the compiled DAG (stage off, evaluation not asked for).
    res = {label: _json(a) if a is not None else {"label": label, "skipped": True, "reason": eval_skip_reason(cfg, label)
                                                    or "not evaluated"} for label, a in results.items()}
    base, final = res.get("base", {}), res.get("final", {})
    stages = {name: _json(a) if a is not None else {"skipped": True} for name, a in summaries.items()}
    rows = compare(cfg, None if base.get("skipped") else base, final) if not final.get("skipped") else []
    table = ablation(cfg, res)
    dec = _json(decision) if decision is not None else None
    md = markdown(cfg, rows, stages, table, dec)
    Path(report_md.path).write_text(md)
    ab_png = ablation_plot(table) if table["rows"] else b""
    Path(report_html.path).write_text(report_page(
        md, ab_png if len(table["rows"]) > 2 else b"", histories=report_histories(stages),
        base_samples=report_samples((samples or {}).get("base")), final_samples=report_samples((samples or {}).get("final"))))
    ab_md = ablation_markdown(cfg, table)
    Path(ablation_md.path).write_text(ab_md)
    Path(ablation_html.path).write_text(ab_html(ab_md, ab_png))
    for r in rows:
        metrics.log_metric(f"{r['benchmark']}.final_pass@1", r["final"]["pass@1"])
        if "gain" in r:
            metrics.log_metric(f"{r['benchmark']}.gain", r["gain"]["delta"])
            metrics.log_metric(f"{r['benchmark']}.gain_ci_low", r["gain"]["ci_low"])
            metrics.log_metric(f"{r['benchmark']}.gain_ci_high", r["gain"]["ci_high"])
    for row in table["rows"]:  # KFP's run comparison shows these side by side across runs
        for bench, m in row["benchmarks"].items():
            metrics.log_metric(f"stage.{row['label']}.{bench}.pass@1", m["pass@1"])
    if dec is not None:
        metrics.log_metric("registry.promoted", 1.0 if dec.get("promoted") else 0.0)
    print(md)


def report_histories(summaries: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """stage -> the trainer's log history from its summary; stages that are off or that hold no history
    (generate, filter) are left out."""
    return {stage: [h for h in s["history"] if isinstance(h, dict)]
            for stage, s in summaries.items() if isinstance(s.get("history"), list) and s["history"]}


def report_samples(artifact: Any) -> list[dict[str, Any]]:
    """The eval samples of one evaluate task (its samples folder: samples-<benchmark>.jsonl); [] when absent."""
    if artifact is None or not Path(artifact.path).is_dir():
        return []
    rows = []
    for f in sorted(Path(artifact.path).glob("samples-*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows
