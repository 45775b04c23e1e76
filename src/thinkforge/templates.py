"""The one prompt/chat template, used by generation, SFT, DPO, RL and evaluation alike.

A prompt is the tokenizer's chat template over [system, user] with the generation prompt appended;
a training target is the completion followed by the chat template's end-of-turn token (`end_of_turn`:
``<|end|>`` for Phi-4-mini, not its ``eos_token``), so the student learns where to stop the way its
chat format stops. Mismatched templates between stages are the classic cause of failed
distillation, hence one function for every stage.
"""

from __future__ import annotations

from typing import Any

THINK_INSTRUCTION = " First think step by step inside <think> and </think>, then answer."
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def normalize_think(completion: str) -> str:
    """A completion whose thinking is closed but was never opened, given its opening tag.

    DeepSeek-R1 behind a chat API (and any teacher whose chat template ends the generation prompt with
    ``<think>``) returns ``...reasoning</think>answer``: the opening tag sat in the prompt. Trained as is,
    the student would learn targets that start mid-thought. Anything else is returned unchanged.
    """
    close = completion.find(THINK_CLOSE)
    if close < 0 or THINK_OPEN in completion[:close]:
        return completion
    return f"{THINK_OPEN}\n{completion.lstrip()}"


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


_SENTINEL = "\u2063thinkforge-end-of-turn-probe\u2063"


def end_of_turn(tokenizer: Any) -> str:
    """The token that closes an assistant turn in the tokenizer's chat template (``<|end|>`` for
    Phi-4-mini, ``<|im_end|>`` for ChatML models, ``<|eot_id|>`` for Llama 3), which is not always
    ``eos_token`` (Phi-4-mini's is ``<|endoftext|>``, a token its chat never writes after a turn).

    Found by rendering a conversation whose assistant turn is a probe string and taking the first
    special token the template writes after it; ``eos_token`` when the template writes none there, or
    when the tokenizer has no chat template (base models).
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template or not isinstance(template, str):
        return tokenizer.eos_token or ""
    key = (id(tokenizer), template, tokenizer.eos_token)
    hit = _EOT_CACHE.get(key)
    if hit is None:
        hit = _EOT_CACHE[key] = _probe_end_of_turn(tokenizer) or tokenizer.eos_token or ""
    return hit


_EOT_CACHE: dict[tuple[int, str, Any], str] = {}


def _special_tokens(tokenizer: Any) -> list[str]:
    names = set(getattr(tokenizer, "all_special_tokens", None) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    names.update(t.content for t in decoder.values() if getattr(t, "special", False) and getattr(t, "content", ""))
    return sorted((n for n in names if n), key=len, reverse=True)  # longest first: "<|end|>" before "<|e"


def _probe_end_of_turn(tokenizer: Any) -> str:
    answer = {"role": "assistant", "content": _SENTINEL}
    conversations = (
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, answer],
        [{"role": "user", "content": "u"}, answer],  # templates without a system role
    )
    specials = _special_tokens(tokenizer)
    for msgs in conversations:
        try:
            text = tokenizer.apply_chat_template(msgs, tokenize=False)
        except Exception:  # noqa: BLE001 - a template that refuses this conversation: try the next one
            continue
        if not isinstance(text, str):
            continue
        i = text.rfind(_SENTINEL)
        if i < 0:
            continue
        tail = text[i + len(_SENTINEL):]
        best: tuple[int, str] | None = None
        for tok in specials:
            j = tail.find(tok)
            if j >= 0 and (best is None or j < best[0]):
                best = (j, tok)
        # the closing token comes right after the turn (whitespace aside), not somewhere in a later turn
        if best is not None and not tail[:best[0]].strip():
            return best[1]
        return ""
    return ""


def use_end_of_turn_as_eos(tokenizer: Any, model: Any = None) -> str:
    """Make the chat template's end-of-turn token the tokenizer's ``eos_token`` (and one of the model's
    generation stop tokens), so trainers that close targets with ``eos_token`` (TRL's SFT and DPO) and
    samplers that stop on it agree with the targets `render_target` writes. Returns the token."""
    eot = end_of_turn(tokenizer)
    if not eot or eot == tokenizer.eos_token:
        return eot
    tokenizer.eos_token = eot
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    if model is not None and isinstance(eot_id, int):
        cfg = getattr(model, "config", None)
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        if text_cfg is not None:
            text_cfg.eos_token_id = eot_id
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            ids = gen.eos_token_id
            ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
            if eot_id not in ids:
                gen.eos_token_id = [eot_id, *ids]
    return eot


def render_target(tokenizer: Any, completion: str) -> str:
    """A training target: the completion, closed by the chat template's end-of-turn token exactly once."""
    eot = end_of_turn(tokenizer)
    text = completion.rstrip()
    return text if not eot or text.endswith(eot) else text + eot


_SYSTEM_OPEN = "{# thinkforge: default system message #}"
_SYSTEM_CLOSE = "{# /thinkforge #}"


def with_default_system(template: str, cfg: Any) -> str:
    """``template`` (a chat template) made to prepend the recipe's system message (`system_message`:
    system prompt plus answer instruction) to a conversation that has none, so a server that applies the
    saved template to ``[user]`` prompts the model exactly as :func:`render_prompt` did in training; a
    conversation that brings its own system message renders as before. Idempotent (a template this
    already wrapped is re-wrapped with the new message)."""
    import json

    if template.startswith(_SYSTEM_OPEN) and _SYSTEM_CLOSE in template:
        template = template.split(_SYSTEM_CLOSE, 1)[1]
    # a JSON string is a valid Jinja string literal (backslashes, quotes and non-ASCII escaped)
    system = json.dumps(system_message(cfg))
    return (f"{_SYSTEM_OPEN}{{% if not (messages and messages[0]['role'] == 'system') %}}"
            f"{{% set messages = [{{'role': 'system', 'content': {system}}}] + messages %}}{{% endif %}}"
            f"{_SYSTEM_CLOSE}{template}")
