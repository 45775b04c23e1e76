"""Registry test data shared by the registry, registry CLI, external registry and serving tests: a recipe
with one small benchmark, final results at a chosen pass@1, and a small model folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from thinkforge.config import Recipe
from thinkforge.stages.evaluate import protocol


def make_cfg(run_name: str = "reg-test", **registry: Any) -> Recipe:
    return Recipe.model_validate({
        "run": {"name": run_name},
        "evaluate": {"benchmarks": [{"name": "wp", "source": "builtin:word-problems?split=test", "limit": 4}],
                     "k": 2, "bootstrap_samples": 200},
        "registry": registry,
    })


def results(cfg: Recipe, value: float, label: str = "final", **proto: Any) -> dict[str, Any]:
    """An evaluate results document: 4 problems of `wp`, round(4 * value) of them solved."""
    per_problem = {f"p{i}": (1.0 if i < round(4 * value) else 0.0) for i in range(4)}
    return {"label": label, "model": "m", "protocol": {**protocol(cfg), **proto},
            "benchmark_specs": {"wp": {"dataset": "custom", "source": "builtin:word-problems?split=test",
                                       "answer_type": "math", "k": 2, "limit": 4, "n_problems": 4}},
            "benchmarks": {"wp": {"n_problems": 4, "k": 2, "pass@1": value, "pass@1_se": 0.1, "cons@2": value,
                                  "per_problem": per_problem}}}


def write_model(d: Path, weights: bytes | None = None) -> Path:
    """A model folder as the registry sees one: config.json and model.safetensors (random bytes unless given)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model.safetensors").write_bytes(os.urandom(4096) if weights is None else weights)
    return d
