"""Stage 5, DPO: verified-correct vs incorrect rollouts of the same prompt; reference = the incoming SFT model.

With ``dpo.precompute_ref_log_probs`` (the default) the reference log-probabilities of every pair are
computed once, by the incoming model itself before it is trained, and no second model is kept in
memory; otherwise the incoming model is loaded a second time, frozen, as ``ref_model``. Either way
the reference is the SFT model, also after a resume (the policy is loaded from the incoming model and
only then overwritten by the checkpoint). ``beta`` and ``loss_type`` come from the config.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from thinkforge.config import Recipe
from thinkforge.records import PAIR_FIELDS
from thinkforge.stages.train import TrainResult, callbacks, checkpointing, finish, fit, load_student, read_rows, \
    training_args
from thinkforge.templates import render_prompt, render_target, use_end_of_turn_as_eos


def dpo(cfg: Recipe, model_path: str | Path, pairs_path: str | Path, out_dir: str | Path,
        metrics: Any = None) -> TrainResult:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    t = cfg.dpo
    start = time.time()
    model, tok = load_student(cfg, model_path)
    # Targets close with the chat template's end-of-turn token; TRL closes them with eos_token: make them one.
    use_end_of_turn_as_eos(tok, model)
    precompute = t.precompute_ref_log_probs
    ref_model = None if precompute else load_student(cfg, model_path)[0]  # the incoming (SFT) model, frozen
    rows = read_rows(pairs_path, PAIR_FIELDS, "dpo")
    data = Dataset.from_dict({
        "prompt": [render_prompt(tok, r["problem"], cfg.template) for r in rows],
        "chosen": [render_target(tok, r["chosen"]) for r in rows],
        "rejected": [render_target(tok, r["rejected"]) for r in rows],
    })
    args = training_args(DPOConfig, t, Path(out_dir) / "trainer", cfg.run.seed, checkpoints=checkpointing(cfg, t),
                         max_length=t.max_length, beta=t.beta, loss_type=[t.loss_type],
                         precompute_ref_log_probs=precompute)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=tok,
                         callbacks=callbacks(metrics, model))
    info = fit(trainer, cfg, "dpo", t, model_path, pairs_path, Path(out_dir) / "trainer", metrics)
    return finish(trainer, tok, out_dir, len(rows), start, precomputed_reference=precompute, **info)
