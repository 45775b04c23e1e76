"""The HF engine's decoding loop: nucleus sampling that sorts a few candidates, and a batch that shrinks.

`transformers`' `generate` spends most of a CPU decoding step outside the model when it samples a
small model: its top-p warper sorts the whole vocabulary for every row and its multinomial draws an
exponential variate per vocabulary entry (measured on SmolLM2-135M, 96 rows, 49K vocabulary, 2 cores:
~190 of ~630 ms a step), and it keeps computing rows that already ended. This loop:

- draws from the same nucleus distribution (temperature, then the smallest set of most likely tokens
  whose mass reaches top_p) from the `CANDIDATES` most likely tokens; a row whose nucleus does not fit
  in them falls back to a full sort, so the distribution is exact either way;
- drops rows that emitted an end token from the batch and its KV cache (once enough of them ended), so
  a batch costs what its live rows cost.

`benchmarks/bench_sampling.py` measures it against `generate` on the same prompts and token budget.
"""

from __future__ import annotations

import inspect
from typing import Any

CANDIDATES = 64  # most likely tokens looked at first; the nucleus at top_p 0.95 fits here for nearly all rows
COMPACT_FRACTION = 0.125  # shrink the batch once this share of its rows has ended since the last shrink


def nucleus_sample(logits: Any, temperature: float, top_p: float, generator: Any) -> Any:
    """One token per row of `logits` (rows x vocab): greedy at temperature 0, else top-p sampling."""
    import torch

    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:  # no nucleus: every token stays
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    values, indices = probs.topk(min(CANDIDATES, probs.shape[-1]), dim=-1)
    fits = values.sum(dim=-1) >= top_p
    if not bool(fits.all()):  # rare: a flat distribution whose nucleus needs more than the candidates
        return _sample_sorted(probs, top_p, generator, values, indices, fits)
    pick = torch.multinomial(_nucleus(values, top_p), 1, generator=generator)
    return indices.gather(-1, pick).squeeze(-1)


def _nucleus(values: Any, top_p: float) -> Any:
    """Probabilities sorted falling, with the tokens outside the nucleus zeroed: token i stays when the mass
    before it is below top_p, as transformers' TopPLogitsWarper keeps it (so at least one token stays)."""
    return values.masked_fill(values.cumsum(dim=-1) - values >= top_p, 0.0)


def _sample_sorted(probs: Any, top_p: float, generator: Any, values: Any, indices: Any, fits: Any) -> Any:
    import torch

    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    for row in range(probs.shape[0]):  # row by row: the rows that need a full sort are few
        v, i = (values[row], indices[row]) if bool(fits[row]) else probs[row].sort(descending=True)
        out[row] = i[torch.multinomial(_nucleus(v, top_p), 1, generator=generator)]
    return out


def sample(model: Any, input_ids: Any, attention_mask: Any, *, n: int, temperature: float, top_p: float,
           max_new_tokens: int, eos_ids: set[int], generator: Any) -> list[list[int]]:
    """`n` continuations of each (left-padded) prompt row: token ids up to and including the first end token,
    or `max_new_tokens` ids. Rows are prompt-major: prompt 0's n samples first."""
    import torch
    from transformers import DynamicCache

    device = input_ids.device
    eos = torch.tensor(sorted(eos_ids), device=device)
    cache = DynamicCache()
    # transformers 5.2x renamed forward's `past_key_values` to `cache` (the old name warns, then goes)
    kv = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                    **{kv: cache}, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :]
        if n > 1:  # one prefill per prompt, then n copies of its cache
            cache.batch_repeat_interleave(n)
            logits = logits.repeat_interleave(n, dim=0)
            attention_mask = attention_mask.repeat_interleave(n, dim=0)
            positions = positions.repeat_interleave(n, dim=0)
        rows = logits.shape[0]
        result: list[list[int]] = [[] for _ in range(rows)]
        live = torch.arange(rows, device=device)  # original row of each row in the batch
        ended = torch.zeros(rows, dtype=torch.bool, device=device)
        position = positions[:, -1]
        for step in range(max_new_tokens):
            token = nucleus_sample(logits, temperature, top_p, generator).to(device)
            done = ended.tolist()
            for row, t in zip(live.tolist(), token.tolist()):
                if not done[row]:
                    result[row].append(t)
            ended[live] |= torch.isin(token, eos)
            if step + 1 == max_new_tokens or bool(ended.all()):
                break
            keep = ~ended[live]
            if int((~keep).sum()) >= max(1, int(COMPACT_FRACTION * len(live))):
                idx = keep.nonzero().squeeze(-1)
                cache.batch_select_indices(idx)
                live, token, position, attention_mask = live[idx], token[idx], position[idx], attention_mask[idx]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(live), 1)], dim=-1)
            position = position + 1
            out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position[:, None],
                        **{kv: cache}, use_cache=True)
            logits = out.logits[:, -1, :]
    return result
