"""The work behind each component body: config in, stage call, artifacts and metrics out.

Component functions stay a few lines (their source ships to the cluster); this module is installed
with the package in the image, so the shared logic lives once, here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable

from thinkforge.config import Recipe, validate

log = logging.getLogger("thinkforge")

TRAIN_INPUTS = {"midtrain": "midtrain", "sft": "sft", "dpo": "dpo", "rl": "rl"}


def load_config(artifact: Any) -> Recipe:
    return validate(json.loads(Path(artifact.path).read_text()), origin=f"config artifact {artifact.path}")


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
    data = as_dict(result)
    data.pop("history", None)
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
    from thinkforge.models import write_pointer
    from thinkforge.stages import dpo, midtrain, rl, sft

    cfg = load_config(config)
    if not getattr(cfg, stage).enabled:
        # A skipped stage passes its input model through by reference: no copy, same weights.
        write_pointer(Path(trained.path), Path(model.path))
        Path(summary.path).write_text(json.dumps({"skipped": True}))
        metrics.log_metric("skipped", 1.0)
        return
    fn = {"midtrain": midtrain.midtrain, "sft": sft.sft, "dpo": dpo.dpo, "rl": rl.rl}[stage]
    result = run_stage(cfg, stage, lambda m: fn(cfg, model.path, data.path, trained.path, metrics=m))
    write_summary(summary, metrics, result)


def evaluate_component(config: Any, model: Any, label: str, results: Any, samples: Any, metrics: Any) -> None:
    import shutil
    import tempfile

    from thinkforge.stages.evaluate import evaluate

    cfg = load_config(config)
    if label == "base" and not cfg.evaluate.evaluate_base or not cfg.evaluate.enabled:
        Path(results.path).write_text(json.dumps({"label": label, "skipped": True, "benchmarks": {}}))
        Path(samples.path).mkdir(parents=True, exist_ok=True)
        return
    work = Path(tempfile.mkdtemp(prefix=f"eval-{label}-"))
    res = run_stage(cfg, f"evaluate-{label}", lambda m: evaluate(cfg, model.path, work, label=label, metrics=m))
    shutil.move(work / "results.json", results.path)
    shutil.move(str(work), samples.path)
    for bench, m in res["benchmarks"].items():
        for key, value in m.items():
            if isinstance(value, float):
                metrics.log_metric(f"{bench}.{key}", value)


def report_component(config: Any, base_results: Any, final_results: Any, summaries: dict[str, Any],
                     report_md: Any, report_html: Any, metrics: Any) -> None:
    from thinkforge.stages.report import compare, markdown, to_html

    cfg = load_config(config)
    base = json.loads(Path(base_results.path).read_text())
    final = json.loads(Path(final_results.path).read_text())
    stages = {name: json.loads(Path(a.path).read_text()) for name, a in summaries.items()}
    rows = compare(cfg, None if base.get("skipped") else base, final) if not final.get("skipped") else []
    md = markdown(cfg, rows, stages)
    Path(report_md.path).write_text(md)
    Path(report_html.path).write_text(to_html(md))
    for r in rows:
        metrics.log_metric(f"{r['benchmark']}.final_pass@1", r["final"]["pass@1"])
        if "gain" in r:
            metrics.log_metric(f"{r['benchmark']}.gain", r["gain"]["delta"])
            metrics.log_metric(f"{r['benchmark']}.gain_ci_low", r["gain"]["ci_low"])
            metrics.log_metric(f"{r['benchmark']}.gain_ci_high", r["gain"]["ci_high"])
    print(md)
