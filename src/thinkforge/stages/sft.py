"""Stage 4, SFT: a compact high-quality subset, no packing, loss on completions only, EOS learned."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from thinkforge.config import Recipe
from thinkforge.records import SFT_FIELDS
from thinkforge.stages.train import TrainResult, callbacks, finish, fit, load_student, read_rows, \
    training_args
from thinkforge.templates import render_prompt, render_target, use_end_of_turn_as_eos


def sft(cfg: Recipe, model_path: str | Path, data_path: str | Path, out_dir: str | Path,
        metrics: Any = None) -> TrainResult:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    t = cfg.sft
    start = time.time()
    model, tok = load_student(cfg, model_path)
    # Targets close with the chat template's end-of-turn token; TRL closes them with eos_token: make them one.
    use_end_of_turn_as_eos(tok, model)
    rows = read_rows(data_path, SFT_FIELDS, "sft")
    data = Dataset.from_dict({
        "prompt": [render_prompt(tok, r["problem"], cfg.template) for r in rows],
        # The end-of-turn token is part of the target, so the model learns to stop by itself.
        "completion": [render_target(tok, r["completion"]) for r in rows],
    })
    # No packing: each example is one sequence, so the loss sees exactly where each answer ends.
    args = training_args(SFTConfig, cfg, "sft", Path(out_dir) / "trainer",
                         max_length=t.max_length, packing=False, completion_only_loss=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                         callbacks=callbacks(metrics, model))
    info = fit(trainer, cfg, "sft", t, model_path, data_path, Path(out_dir) / "trainer", metrics)
    return finish(trainer, tok, out_dir, len(rows), start, cfg=cfg, **info)
