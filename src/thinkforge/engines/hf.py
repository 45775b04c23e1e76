"""Hugging Face transformers engine: batched sampling, n samples per prompt, left padding.

Decoding runs through `thinkforge.engines.sampler` (nucleus sampling over candidates, finished rows
dropped from the batch), not `model.generate`: the same distribution at 2.8-3.0x its tokens/s on 2 CPU
cores (benchmarks/bench_sampling.py).

Prompts of similar length batch together (`batch_size` sequences per forward pass, i.e.
`batch_size // n` prompts). Each batch is seeded from `params.seed` and the text of its prompts, not
from its position, so the same prompts with the same seed give the same samples however the call
was split or resumed (on the same hardware, dtype and batch size).
"""

from __future__ import annotations

from typing import Any

from thinkforge.engines.base import Completion, SamplingParams, stable_seed
from thinkforge.engines.sampler import sample
from thinkforge.models import load_model, load_tokenizer
from thinkforge.templates import render_prompt


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class HFEngine:
    """A model given by name or path loads onto the GPU when there is one; a model object samples where it
    already lives (the RL stage passes its policy). Inputs follow the model's device either way."""

    def __init__(self, model: str | Any, template: Any, *, tokenizer: Any = None, dtype: str = "bfloat16",
                 batch_size: int = 32, trust_remote_code: bool = False, seed: int = 0):
        if isinstance(model, str):
            tokenizer = tokenizer or load_tokenizer(model, trust_remote_code)
            model = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code, seed=seed)
            model = model.to(default_device())
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template
        self.batch_size = batch_size  # sequences per forward pass (prompts x n)

    def generate(self, problems: list[str], params: SamplingParams, progress=None) -> list[list[Completion]]:
        import torch

        tok = self.tokenizer
        prompts = [render_prompt(tok, p, self.template) for p in problems]
        # Similar lengths batch together: less padding, same results per prompt (seeded per batch).
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        per_call = max(1, self.batch_size // params.n)
        out: list[list[Completion]] = [[] for _ in prompts]
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else tok.eos_token_id])
        old_side, tok.padding_side = tok.padding_side, "left"
        try:
            for start in range(0, len(order), per_call):
                idx = order[start:start + per_call]
                enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
                enc = enc.to(self.model.device)
                # Seeded by the batch's prompts, not its position: a split or resumed call samples the same.
                generator = torch.Generator(device=self.model.device).manual_seed(
                    stable_seed(params.seed, [prompts[i] for i in idx], bits=47))
                rows = sample(self.model, enc["input_ids"], enc["attention_mask"], n=params.n,
                              temperature=params.temperature, top_p=params.top_p,
                              max_new_tokens=params.max_new_tokens, eos_ids=eos_ids, generator=generator)
                for j, ids in enumerate(rows):
                    finish = "stop" if ids and ids[-1] in eos_ids else "length"
                    text = tok.decode(ids, skip_special_tokens=True)
                    out[idx[j // params.n]].append(Completion(text=text, num_tokens=len(ids), finish_reason=finish))
                if progress is not None:
                    progress(len(idx))
        finally:
            tok.padding_side = old_side
        return out

    def close(self) -> None:
        self.model = None
