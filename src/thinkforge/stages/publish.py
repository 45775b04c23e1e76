"""Publish: the final model, its eval results and the recipe go to the model registry
(`thinkforge.registry`, MinIO/S3 or a local directory), and the promotion gate decides whether it
becomes the champion. "Not promoted" is an outcome with a reason, not a failure.

The component passes `kfp_run` (the KFP pipeline job id): the registry version is derived from it and
the model's digest, so a retried publish task finishes the version its earlier attempt started."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from thinkforge.config import Recipe
from thinkforge.metrics import StageMetrics
from thinkforge.registry import artifact_digest, publish as publish_model


def read_results(path: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    if path is None or not Path(path).is_file():
        return None
    data = json.loads(Path(path).read_text())
    return None if data.get("skipped") else data


def publish(cfg: Recipe, model_dir: str | os.PathLike[str], results: dict[str, str | os.PathLike[str] | None],
            artifacts: dict[str, tuple[str, str]] | None = None, kfp_run: str = "",
            metrics: StageMetrics | None = None, backend: Any = None) -> dict[str, Any]:
    """`results`: label -> results.json path (base, midtrain, sft, dpo, final); `artifacts`: name ->
    (local path, URI) of the artifacts whose digests go into the lineage."""
    del metrics  # the decision goes to KFP Metrics (the component); no Prometheus series of its own
    if not cfg.registry.enabled:
        return {"published": False, "promoted": False, "reason": "registry off (registry.enabled=false)"}
    loaded = {label: read_results(p) for label, p in results.items()}
    digests = {name: artifact_digest(path, uri) for name, (path, uri) in (artifacts or {}).items()}
    out = publish_model(cfg, model_dir, loaded, digests, kfp_run=kfp_run, backend=backend)
    if out.get("promoted"):
        from thinkforge.serving import notify_champion

        # the chart's serving object (THINKFORGE_SERVING_TARGET) moves to the new champion; never raises
        out["serving"] = notify_champion(cfg, out["version"])
    from thinkforge.external_registries import configured, register_external

    if configured(cfg):
        # MLflow / Kubeflow Model Registry, after thinkforge's own registry: reported under "external";
        # raises only with registry.external_required (the module docstring)
        out["external"] = register_external(cfg, out, backend=backend)
    return out
