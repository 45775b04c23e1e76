"""Stage 5, DPO: verified-correct vs incorrect rollouts of the same prompt; reference = the SFT model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from thinkforge.config import Recipe
from thinkforge.records import PAIR_FIELDS
from thinkforge.stages.train import TrainResult, callbacks, finish, load_student, read_rows, training_args
from thinkforge.templates import render_prompt, render_target


def dpo(cfg: Recipe, model_path: str | Path, pairs_path: str | Path, out_dir: str | Path,
        metrics: Any = None) -> TrainResult:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    t = cfg.dpo
    start = time.time()
    model, tok = load_student(cfg, model_path)
    ref_model, _ = load_student(cfg, model_path)  # the incoming (SFT) model, frozen
    rows = read_rows(pairs_path, PAIR_FIELDS, "dpo")
    data = Dataset.from_dict({
        "prompt": [render_prompt(tok, r["problem"], cfg.template) for r in rows],
        "chosen": [render_target(tok, r["chosen"]) for r in rows],
        "rejected": [render_target(tok, r["rejected"]) for r in rows],
    })
    args = training_args(DPOConfig, t, Path(out_dir) / "trainer", cfg.run.seed, max_length=t.max_length,
                         beta=t.beta, loss_type=[t.loss_type])
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=tok,
                         callbacks=callbacks(metrics, model))
    trainer.train()
    return finish(trainer, tok, out_dir, len(rows), start)
