"""Build the engine a stage asks for by name: the one place that knows every engine module."""

from __future__ import annotations

from typing import Any

from thinkforge.engines.base import Engine


def make_engine(kind: str, model: str, template: Any, *, dtype: str = "bfloat16", batch_size: int = 32,
                trust_remote_code: bool = False, tensor_parallel_size: int = 1, endpoint: str = "",
                endpoint_model: str = "", seed: int = 0, **http_options: Any) -> Engine:
    """An engine of `kind`. `http_options` go to the OpenAI-compatible engine only (api, concurrency,
    request_timeout_s, max_retries, max_response_bytes, fan_out, tokenizer, metrics, ...)."""
    if kind == "hf":
        from thinkforge.engines.hf import HFEngine

        return HFEngine(model, template, dtype=dtype, batch_size=batch_size, trust_remote_code=trust_remote_code,
                        seed=seed)
    if kind == "vllm":
        from thinkforge.engines.vllm import VLLMEngine

        return VLLMEngine(model, template, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                          trust_remote_code=trust_remote_code, seed=seed)
    if kind == "openai":
        from thinkforge.engines.openai import OpenAIEngine

        return OpenAIEngine(endpoint, endpoint_model, template, seed=seed, **http_options)
    raise ValueError(f"engine {kind!r}: expected one of hf, vllm, openai")
