"""vLLM offline engine (GPU images): `n` samples per prompt in one request, tensor parallel from config."""

from __future__ import annotations

from typing import Any

from thinkforge.engines.base import Completion, SamplingParams
from thinkforge.models import check_safetensors, load_tokenizer, resolve
from thinkforge.templates import render_prompt


class VLLMEngine:
    def __init__(self, model: str, template: Any, *, dtype: str = "bfloat16", tensor_parallel_size: int = 1,
                 trust_remote_code: bool = False, seed: int = 0, max_model_len: int | None = None):
        try:
            from vllm import LLM
        except ImportError as e:  # CPU images and this laptop have no vLLM
            raise RuntimeError("engine 'vllm' needs the vllm package (the CUDA image has it); use engine: hf") from e
        resolved = resolve(model, seed=seed)
        check_safetensors(resolved)  # a local directory with only pickle weights is refused, as in load_model
        path = str(resolved)
        self.tokenizer = load_tokenizer(path, trust_remote_code)
        self.template = template
        self.llm = LLM(model=path, dtype=dtype, tensor_parallel_size=tensor_parallel_size, seed=seed,
                       trust_remote_code=trust_remote_code, max_model_len=max_model_len,
                       load_format="safetensors")  # never a pickle, also for hub names

    def generate(self, problems: list[str], params: SamplingParams, progress=None) -> list[list[Completion]]:
        from vllm import SamplingParams as VSampling

        prompts = [render_prompt(self.tokenizer, p, self.template) for p in problems]
        sp = VSampling(n=params.n, temperature=params.temperature, top_p=params.top_p,
                       max_tokens=params.max_new_tokens, seed=params.seed)
        results = self.llm.generate(prompts, sp, use_tqdm=False)
        out = [[Completion(text=o.text, num_tokens=len(o.token_ids),
                           finish_reason="length" if o.finish_reason == "length" else "stop")
                for o in r.outputs] for r in results]
        if progress is not None:
            progress(len(problems))
        return out

    def close(self) -> None:
        self.llm = None
