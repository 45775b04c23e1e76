"""Stage 5, DPO: verified-correct vs incorrect rollouts of the same prompt; reference = the incoming SFT model.

With ``dpo.precompute_ref_log_probs`` (the default) the reference log-probabilities of every pair are
computed once, by the incoming model itself before it is trained, and no second model is kept in
memory; otherwise the incoming model is loaded a second time, frozen, as ``ref_model``. Either way
the reference is the SFT model, also after a resume (the policy is loaded from the incoming model and
only then overwritten by the checkpoint). ``beta`` and ``loss_type`` come from the config.

Under N processes the precomputed log-probs are written once, by rank 0, as a ``datasets`` cache file
beside the training data, and every rank reads that file: the data therefore lives in a directory all
ranks of the pod share (``<out>/trainer/reference-logps``), not in each process's own temporary
directory, where the other ranks would not find rank 0's file.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from thinkforge.config import Recipe
from thinkforge.records import PAIR_FIELDS
from thinkforge.stages.train import TrainResult, callbacks, finish, fit, load_student, read_rows, \
    training_args, world_size
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
    available = read_rows(pairs_path, PAIR_FIELDS, "dpo")
    rows = pairs_reached(available, t, world_size(), cfg.run.seed)
    data = Dataset.from_dict({
        "prompt": [render_prompt(tok, r["problem"], cfg.template) for r in rows],
        "chosen": [render_target(tok, r["chosen"]) for r in rows],
        "rejected": [render_target(tok, r["rejected"]) for r in rows],
    })
    if precompute and world_size() > 1:
        data = shared_cache_dir(data, Path(out_dir) / "trainer" / "reference-logps")
    args = training_args(DPOConfig, cfg, "dpo", Path(out_dir) / "trainer",
                         max_length=t.max_length, beta=t.beta, loss_type=[t.loss_type],
                         precompute_ref_log_probs=precompute)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=tok,
                         callbacks=callbacks(metrics, model))
    info = fit(trainer, cfg, "dpo", t, model_path, pairs_path, Path(out_dir) / "trainer", metrics)
    return finish(trainer, tok, out_dir, len(rows), start, cfg=cfg, precomputed_reference=precompute,
                  pairs_available=len(available), **info)


def pairs_reached(rows: list[dict[str, Any]], t: Any, processes: int, seed: int) -> list[dict[str, Any]]:
    """The pairs the run trains on: where max_steps ends it inside one epoch, a subset drawn with ``seed``
    (the same on every rank and on resume), so reference log-probs are precomputed for those pairs only (the
    cpu-demo's 12 steps reach 48 of 159 pairs; precomputing all took 48 of its 101 s here)."""
    import random

    if t.max_steps <= 0:
        return rows
    need = t.max_steps * t.batch_size * t.grad_accum * processes
    if need >= len(rows):
        return rows
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), need))]


def shared_cache_dir(data: Any, directory: Path) -> Any:
    """``data`` backed by an Arrow file in ``directory`` (one file per rank), so the cache files ``datasets``
    derives from it (TRL's precomputed reference log-probs: ``cache-<fingerprint>.arrow`` beside the data)
    land in a directory every rank of the pod sees. An in-memory dataset's would go to a per-process
    temporary directory: rank 0 writes the file there and rank 1 fails to open it."""
    import os

    directory.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0") or 0)
    return data.map(None, cache_file_name=str(directory / f"data-rank{rank}.arrow"),
                    new_fingerprint=f"{data._fingerprint}-rank{rank}")  # derived caches stay per rank
