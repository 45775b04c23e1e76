"""A plain LM head for TRL's trainers on a CPU.

TRL's SFT, DPO and GRPO trainers score tokens through a "fused LM head" (``trl.trainer.utils.
add_fused_lm_head``): it tiles the vocabulary for GPU kernels and, off a GPU, runs that tile loop in
Python over every position. On this machine's CPU it doubled a SmolLM2-sized SFT step (0.93-0.99 s
against 0.48-0.49 s for the model's own loss; ``benchmarks/bench_trainer.py`` measures the stage).
On a CPU, :func:`use_plain_lm_head` puts one matmul over the positions that carry a label in its
place, returning the same fields (log-probs, entropy, top-1 hits, ...), so the trainers run unchanged.
Models whose head TRL transforms (soft-capping, logit scales) or MoE models keep TRL's head.
"""

from __future__ import annotations

import types
from typing import Any

#: Config attributes that make TRL's head transform the logits; a model with any of them keeps TRL's head.
_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def plain_head_applies(model: Any) -> bool:
    cfg = model.config.get_text_config()
    return not any(getattr(cfg, k, None) is not None for k in _TRANSFORMS) and not getattr(
        cfg, "output_router_logits", False)


def use_plain_lm_head(trainer: Any) -> list[Any]:
    """On a CPU, replace the fused head TRL put on the trainer's model (and reference model); returns the
    models changed. A no-op on a GPU, where TRL's kernels are the fast path."""
    import torch

    if torch.cuda.is_available():
        return []
    temperature = float(getattr(trainer, "temperature", 1.0) or 1.0)  # GRPO scores at its sampling temperature
    changed = []
    for model in (trainer.model, getattr(trainer, "ref_model", None)):
        if model is None or not _has_trl_head(model):
            continue  # not patched by TRL (or already ours)
        if plain_head_applies(model):
            model.forward = types.MethodType(_plain_forward(model.forward, temperature), model)
            changed.append(model)
    return changed


def _has_trl_head(model: Any) -> bool:
    fn = getattr(model.forward, "__func__", None)  # functools.wraps renamed it; its code keeps the name
    return fn is not None and fn.__code__.co_name == "_fused_forward"


def _plain_forward(fused_forward: Any, temperature: float) -> Any:
    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head:  # generation and the model's own loss: TRL's wrapper passes these through
            return fused_forward(*args, labels=labels, shift_labels=shift_labels,
                                 num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != -100
        target = labels[mask]
        # Only the positions with a label go through the head (prompt and padding positions do not).
        logits = self.get_output_embeddings()(hidden[mask]).float() / temperature
        logp = logits.log_softmax(-1)
        picked = logp.gather(1, target.unsqueeze(1)).squeeze(1)
        entropy = -(logp.exp() * logp).sum(-1)  # with gradient: GRPO can add an entropy bonus
        with torch.no_grad():
            top1 = logits.argmax(-1) == target
            mean_logits = logits.mean(-1)
            log_sum_sq = torch.logsumexp(2 * logp, -1)

        def full(x: torch.Tensor) -> torch.Tensor:  # back to (batch, positions), zero where there is no label
            return x.new_zeros(mask.shape).masked_scatter(mask, x)

        n = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-picked.sum() / n, log_probs=full(picked), entropy=full(entropy),
                                   log_sum_sq_probs=full(log_sum_sq), mean_logits=full(mean_logits),
                                   is_top1=full(top1), label_mask=mask)

    return forward
