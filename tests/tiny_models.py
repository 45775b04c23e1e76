"""Tiny models with a small tokenizer trained offline, for fast training tests on 2 CPU cores.

The SmolLM2 tokenizer (49,152 tokens) makes the LM head the whole cost of a tiny Llama's step; a
byte-level BPE tokenizer of a few hundred tokens, trained here on the texts the test uses, makes a
training step ~50x cheaper while the stage functions load it exactly like any model directory
(`tokenizer.json` + chat template, `model.safetensors`). ChatML-style template, ``<|im_end|>`` is EOS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]


def small_tokenizer(texts: Iterable[str], vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model_dir(out: str | Path, texts: Iterable[str], *, vocab_size: int = 400, hidden: int = 64,
                   layers: int = 2, seed: int = 0) -> Path:
    """A random tiny Llama with a small BPE tokenizer trained on ``texts``, saved as a model directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from thinkforge.models import save_model

    tok = small_tokenizer(texts, vocab_size)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    save_model(model, tok, out)
    return Path(out)


def word_problem_texts(problems: list[dict], system_prompt: str) -> list[str]:
    return [system_prompt, *(p["problem"] for p in problems), *(p.get("completion", "") for p in problems)]
