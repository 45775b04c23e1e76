"""Generation engines behind one interface: transformers (CPU/GPU), vLLM (GPU), OpenAI-compatible HTTP."""

from thinkforge.engines.base import Completion, Engine, SamplingParams
from thinkforge.engines.factory import make_engine

__all__ = ["Completion", "Engine", "SamplingParams", "make_engine"]
