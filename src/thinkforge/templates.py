"""The one prompt/chat template, used by generation, SFT, DPO, RL and evaluation alike.

A prompt is the tokenizer's chat template over [system, user] with the generation prompt appended;
a training target is the completion followed by the tokenizer's end-of-turn token, so the student
learns where to stop. Mismatched templates between stages are the classic cause of failed
distillation, hence one function for every stage.
"""

from __future__ import annotations

from typing import Any

THINK_INSTRUCTION = " First think step by step inside <think> and </think>, then answer."


def system_message(cfg: Any) -> str:
    """`cfg` is a TemplateConfig."""
    return cfg.system_prompt + (THINK_INSTRUCTION if cfg.think else "")


def messages(problem: str, cfg: Any) -> list[dict[str, str]]:
    return [{"role": "system", "content": system_message(cfg)}, {"role": "user", "content": problem}]


def render_prompt(tokenizer: Any, problem: str, cfg: Any) -> str:
    """The exact text the model sees before its answer."""
    msgs = messages(problem, cfg)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    # Base models without a chat template: a plain, still unambiguous layout.
    return f"{msgs[0]['content']}\n\nProblem: {problem}\n\nSolution:"


def end_of_turn(tokenizer: Any) -> str:
    return tokenizer.eos_token or ""


def render_target(tokenizer: Any, completion: str) -> str:
    """A training target: the completion, closed by the end-of-turn token exactly once."""
    eot = end_of_turn(tokenizer)
    text = completion.rstrip()
    return text if not eot or text.endswith(eot) else text + eot
