"""Helpers of the reliability suite (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

# 16 examples, batch 4 -> 4 optimizer steps per epoch; 8 steps = 2 epochs, a checkpoint every 2.
MAX_STEPS = 8
SAVE_STEPS = 2


def recipe_with(base: Any, overrides: dict[str, Any]) -> Any:
    """``base`` with dotted overrides (``{"storage.endpoint": ...}``), validated like a recipe file."""
    from thinkforge.config import apply_overrides, validate

    return validate(apply_overrides(base.model_dump(), overrides), origin="test")


def weights(model_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def same_weights(a: dict[str, Any], b: dict[str, Any]) -> None:
    import torch

    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), f"{k} differs by {(a[k] - b[k]).abs().max()}"


def all_finite(tensors: dict[str, Any]) -> bool:
    import torch

    return all(bool(torch.isfinite(t).all()) for t in tensors.values())
