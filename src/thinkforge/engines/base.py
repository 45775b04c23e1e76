"""The engine interface every stage samples through."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 256
    seed: int = 0


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int
    finish_reason: str  # "stop" (ended by itself), "length" (truncated) or "error" (no usable sample)
    reasoning: str = ""  # a trace returned separately by reasoning APIs (OpenAI-compatible engines)
    error: str = ""  # why the sample failed (finish_reason "error"): never holds a credential


FINISH_REASONS = ("stop", "length", "error")


def stable_seed(*parts: Any, bits: int = 31) -> int:
    """A seed that is a function of `parts` (their repr) alone: the same work gets the same seed however
    a call was split, ordered or resumed."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << bits) - 1)


def failed(error: str) -> Completion:
    """A sample the engine could not produce: kept as a record so it is counted, never trained on."""
    return Completion(text="", num_tokens=0, finish_reason="error", error=error)


class Engine(Protocol):
    def generate(self, problems: list[str], params: SamplingParams,
                 progress: Callable[[int], None] | None = None) -> list[list[Completion]]:
        """`params.n` completions for each problem, in order; the engine applies the one template and
        calls `progress(k)` as k more problems finish."""
        ...

    def close(self) -> None: ...
