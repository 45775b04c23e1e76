"""What every training stage shares: arguments from the config, data rendering, saving, results.

One setup for mid-train, SFT, DPO and RL (open-r1 repeats ~40 lines per script; we don't).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thinkforge.config import Recipe, TrainConfig
from thinkforge.models import load_model, load_tokenizer, save_model


@dataclass
class TrainResult:
    steps: int
    examples: int
    metric: str  # what first/last hold: "loss", or "reward" for RL
    first: float | None
    last: float | None
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def training_args(config_cls: type, t: TrainConfig, out_dir: str | Path, seed: int, **extra: Any) -> Any:
    gpu = on_gpu()
    return config_cls(
        output_dir=str(out_dir),
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        bf16=t.bf16 and gpu,
        use_cpu=not gpu,
        gradient_checkpointing=t.gradient_checkpointing,
        report_to=[],
        save_strategy="no",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=not sys.stderr.isatty(),
        **extra,
    )


def read_rows(path: str | Path, fields: dict[str, type], stage: str) -> list[dict[str, Any]]:
    """Training records; an empty set stops the stage with the file named instead of training on nothing."""
    from thinkforge.records import EmptyDataError, read_jsonl

    rows = read_jsonl(path, fields)
    if not rows:
        raise EmptyDataError(f"{stage}: no training records in {path}")
    return rows


def load_student(cfg: Recipe, model_path: str | Path) -> tuple[Any, Any]:
    tok = load_tokenizer(model_path, cfg.model.trust_remote_code)
    model = load_model(model_path, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                       seed=cfg.run.seed)
    return model, tok


def callbacks(metrics: Any, model: Any) -> list[Any]:
    """Trainer callbacks every stage gets: Prometheus metrics (MFU from 6 x parameters FLOPs per token)."""
    if metrics is None:
        return []
    from thinkforge.metrics import MetricsCallback

    n_params = sum(p.numel() for p in model.parameters())
    return [MetricsCallback(metrics, flops_per_token=6 * n_params)]


def finish(trainer: Any, tokenizer: Any, out_dir: str | Path, examples: int, start: float,
           metric: str = "loss", **extra: Any) -> TrainResult:
    """Save the trained model (safetensors) and summarize the run's log history."""
    history = [h for h in trainer.state.log_history if "loss" in h or metric in h]
    values = [h[metric] for h in history if metric in h]
    bad = next((h for h in history if not math.isfinite(float(h.get("loss", 0.0)))), None)
    if bad is not None:
        raise FloatingPointError(f"loss became {bad['loss']} at step {bad.get('step')}; model not saved")
    save_model(trainer.model, tokenizer, out_dir)
    return TrainResult(
        steps=trainer.state.global_step,
        examples=examples,
        metric=metric,
        first=values[0] if values else None,
        last=values[-1] if values else None,
        seconds=time.time() - start,
        history=trainer.state.log_history,
        extra=extra,
    )
