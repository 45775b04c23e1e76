"""Stage 3, mid-train: causal-LM distillation on every accepted chain of thought, with packing.

- Packing: TRL's best-fit-decreasing packing (``packing_strategy="bfd"``): whole sequences are placed
  into ``max_length`` bins without being cut across bins (the paper's mid-train setting).
- Streaming: with ``midtrain.streaming`` the corpus is read lazily from the JSONL (a ``datasets``
  IterableDataset), so it may be larger than memory; a stream has no length, so ``max_steps`` sets
  how long to train (the stream restarts for each further epoch).
- Validation: a held-out share of the problems (chosen by a hash of the problem id, so every rollout
  of one problem falls on the same side and the split is the same on every restart) gives a
  validation loss every ``eval_steps`` steps; the result reports every one, and the best with its step
  (``best_eval_loss``, ``best_eval_step``).
- Early stopping only when asked: by default (``early_stopping_patience: 0``) the planned epochs all
  run (the paper distils for 5 epochs; a validation loss that wobbles early must not cut that short).
  With a patience > 0 training stops once the loss saturates: no improvement of at least
  ``early_stopping_min_delta`` for ``early_stopping_patience`` evaluations in a row.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from pathlib import Path
from typing import Any

from thinkforge.config import Recipe
from thinkforge.records import SFT_FIELDS, EmptyDataError, iter_jsonl
from thinkforge.stages.train import TrainResult, callbacks, finish, fit, load_student, read_rows, \
    training_args
from thinkforge.templates import render_prompt, render_target, use_end_of_turn_as_eos


def held_out(problem_id: str, fraction: float, seed: int = 0) -> bool:
    """Whether a problem belongs to the validation split: a stable hash, independent of file order."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{seed}:{problem_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def saturation_callback(patience: int, min_delta: float) -> Any:
    """Stop training once the validation loss has not improved by ``min_delta`` for ``patience``
    evaluations in a row. Its state rides in the Trainer checkpoint, so a resumed run keeps counting."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    class ValidationSaturation(TrainerCallback, ExportableState):
        def __init__(self, patience: int, min_delta: float, best: float | None = None, bad: int = 0,
                     stopped_at: int | None = None):
            self.patience, self.min_delta = patience, min_delta
            self.best, self.bad, self.stopped_at = best, bad, stopped_at

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            loss = (metrics or {}).get("eval_loss")
            if loss is None:
                return
            if self.best is None or loss < self.best - self.min_delta:
                self.best, self.bad = loss, 0
            else:
                self.bad += 1
                if self.bad >= self.patience:
                    self.stopped_at = state.global_step
                    control.should_training_stop = True

        def state(self) -> dict:
            return {"args": {"patience": self.patience, "min_delta": self.min_delta},
                    "attributes": {"best": self.best, "bad": self.bad, "stopped_at": self.stopped_at}}

    return ValidationSaturation(patience, min_delta)


class _TextStream:
    """Rendered training texts, read lazily from the JSONL (a picklable generator for IterableDataset)."""

    def __init__(self, path: str, tokenizer: Any, template: Any, fraction: float, seed: int, validation: bool):
        self.path, self.tok, self.template = path, tokenizer, template
        self.fraction, self.seed, self.validation = fraction, seed, validation

    def __call__(self):
        for r in iter_jsonl(self.path, SFT_FIELDS):
            if held_out(r["problem_id"], self.fraction, self.seed) == self.validation:
                yield {"text": render_prompt(self.tok, r["problem"], self.template) + render_target(self.tok, r["completion"])}


def midtrain(cfg: Recipe, model_path: str | Path, data_path: str | Path, out_dir: str | Path,
             metrics: Any = None) -> TrainResult:
    from datasets import Dataset, IterableDataset
    from trl import SFTConfig, SFTTrainer

    t = cfg.midtrain
    start = time.time()
    model, tok = load_student(cfg, model_path)
    # Targets close with the chat template's end-of-turn token; TRL closes them with eos_token: make them one.
    use_end_of_turn_as_eos(tok, model)
    seed = cfg.run.seed

    def text(r: dict[str, Any]) -> str:
        # Whole sequences (prompt and answer) are the distillation corpus: loss on every token.
        return render_prompt(tok, r["problem"], cfg.template) + render_target(tok, r["completion"])

    if t.streaming:
        first = next(iter_jsonl(data_path, SFT_FIELDS), None)
        if first is None:
            raise EmptyDataError(f"midtrain: no training records in {data_path}")
        train = IterableDataset.from_generator(_TextStream(str(data_path), tok, cfg.template, t.validation_fraction,
                                                           seed, validation=False))
        val_rows = list(itertools.islice(
            (r for r in iter_jsonl(data_path, SFT_FIELDS) if held_out(r["problem_id"], t.validation_fraction, seed)),
            t.validation_max_examples))
        examples = -1  # unknown: the corpus is never counted
    else:
        rows = read_rows(data_path, SFT_FIELDS, "midtrain")
        train_rows = [r for r in rows if not held_out(r["problem_id"], t.validation_fraction, seed)]
        val_rows = [r for r in rows if held_out(r["problem_id"], t.validation_fraction, seed)]
        val_rows = val_rows[:t.validation_max_examples]
        if not train_rows:  # a corpus too small to split: train on everything, validate on nothing
            train_rows, val_rows = rows, []
        train = Dataset.from_dict({"text": [text(r) for r in train_rows]})
        examples = len(train_rows)
    validation = Dataset.from_dict({"text": [text(r) for r in val_rows]}) if val_rows else None

    extra: dict[str, Any] = {}
    if validation is not None:
        extra = dict(eval_strategy="steps", eval_steps=t.eval_steps)
    args = training_args(SFTConfig, cfg, "midtrain", Path(out_dir) / "trainer",
                         max_length=t.max_length, packing=t.packing, packing_strategy="bfd",
                         dataset_text_field="text", **extra)
    cbs = callbacks(metrics, model)
    stopper = None
    if validation is not None and t.early_stopping_patience > 0:
        stopper = saturation_callback(t.early_stopping_patience, t.early_stopping_min_delta)
        cbs.append(stopper)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=validation, processing_class=tok,
                         callbacks=cbs)
    info = fit(trainer, cfg, "midtrain", t, model_path, data_path, Path(out_dir) / "trainer", metrics)
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    best = min((h for h in trainer.state.log_history if "eval_loss" in h), key=lambda h: h["eval_loss"], default=None)
    # The stopper in the trainer's list is the live one (a resumed run restores its state into it).
    live = next((c for c in trainer.callback_handler.callbacks if type(c).__name__ == "ValidationSaturation"), stopper)
    packed = None if t.streaming else len(trainer.train_dataset)
    return finish(trainer, tok, out_dir, examples, start, cfg=cfg, validation_examples=len(val_rows), sequences=packed,
                  eval_losses=evals, stopped_early_at=getattr(live, "stopped_at", None),
                  best_eval_loss=best["eval_loss"] if best else None, best_eval_step=best.get("step") if best else None,
                  **info)
