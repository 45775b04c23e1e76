"""Stage 3, mid-train: causal-LM distillation on every accepted chain of thought, with packing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from thinkforge.config import Recipe
from thinkforge.records import SFT_FIELDS
from thinkforge.stages.train import TrainResult, callbacks, finish, load_student, read_rows, training_args
from thinkforge.templates import render_prompt, render_target


def midtrain(cfg: Recipe, model_path: str | Path, data_path: str | Path, out_dir: str | Path,
        metrics: Any = None) -> TrainResult:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    t = cfg.midtrain
    start = time.time()
    model, tok = load_student(cfg, model_path)
    rows = read_rows(data_path, SFT_FIELDS, "midtrain")
    # Whole sequences (prompt and answer) are the distillation corpus: loss on every token.
    texts = [render_prompt(tok, r["problem"], cfg.template) + render_target(tok, r["completion"]) for r in rows]
    args = training_args(SFTConfig, t, Path(out_dir) / "trainer", cfg.run.seed, max_length=t.max_length,
                         packing=t.packing, packing_strategy="bfd", dataset_text_field="text")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=tok,
                         callbacks=callbacks(metrics, model))
    trainer.train()
    return finish(trainer, tok, out_dir, len(rows), start)
