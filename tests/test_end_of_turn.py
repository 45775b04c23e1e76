"""Training targets end with the chat template's end-of-turn token, not with ``eos_token``.

Phi-4-mini's chat template closes every turn with ``<|end|>``; its ``eos_token`` is ``<|endoftext|>``,
which a chat never writes after an answer. A student trained on ``answer<|endoftext|>`` learns a stop
that its own chat format does not use. The tokenizers here are small BPE ones trained in the test, with
the real chat templates' shapes (Phi-4-mini, ChatML, Llama 3); the models are tiny random Llamas.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from thinkforge.config import load_recipe
from thinkforge.records import write_jsonl
from thinkforge.templates import end_of_turn, render_prompt, render_target

SMOKE = Path(__file__).resolve().parents[1] / "recipes" / "smoke.yaml"

# microsoft/Phi-4-mini-instruct's chat template (tools branch included), as its tokenizer_config.json has it
PHI4_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] "
    "is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + "
    "'<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI4_SPECIALS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>"]
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
TEXTS = ["Tom has 3 apples and buys 4 more. How many apples does he have?", "3 + 4 = 7, so the answer is 7.",
         "Solve the math problem. Reason step by step, then give the final answer.", "I think it is 9."] * 4


def tokenizer(specials: list[str], eos: str, pad: str, template: str | None, bos: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad, bos_token=bos, unk_token=None)
    if template is not None:
        fast.chat_template = template
    return fast


def phi4_tokenizer():
    return tokenizer(PHI4_SPECIALS, eos="<|endoftext|>", pad="<|endoftext|>", template=PHI4_TEMPLATE)


def test_end_of_turn_is_what_the_chat_template_writes_after_an_answer():
    phi = phi4_tokenizer()
    assert phi.eos_token == "<|endoftext|>" and end_of_turn(phi) == "<|end|>"
    assert render_target(phi, "so \\boxed{7}. \n") == "so \\boxed{7}.<|end|>"
    assert render_target(phi, "so \\boxed{7}.<|end|>") == "so \\boxed{7}.<|end|>", "closed exactly once"
    # the target continues the prompt exactly as the chat template renders the whole conversation
    cfg = load_recipe(SMOKE).template
    prompt = render_prompt(phi, "What is 3+4?", cfg)
    full = phi.apply_chat_template([{"role": "system", "content": prompt.split("<|system|>")[1].split("<|end|>")[0]},
                                    {"role": "user", "content": "What is 3+4?"},
                                    {"role": "assistant", "content": "7"}], tokenize=False)
    assert full.startswith(prompt + render_target(phi, "7"))

    chatml = tokenizer(["<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"], eos="<|endoftext|>",
                       pad="<|pad|>", template=CHATML_TEMPLATE)
    assert end_of_turn(chatml) == "<|im_end|>"
    llama3 = tokenizer(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>"], eos="<|end_of_text|>", pad="<|end_of_text|>", template=LLAMA3_TEMPLATE,
                       bos="<|begin_of_text|>")
    assert end_of_turn(llama3) == "<|eot_id|>"
    base = tokenizer(["<|endoftext|>"], eos="<|endoftext|>", pad="<|endoftext|>", template=None)
    assert end_of_turn(base) == "<|endoftext|>", "no chat template: eos_token"
    # a template that writes nothing after the answer: eos_token
    bare = tokenizer(["<|endoftext|>"], eos="<|endoftext|>", pad="<|endoftext|>",
                     template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    assert end_of_turn(bare) == "<|endoftext|>"


def test_use_end_of_turn_as_eos_makes_trainers_and_samplers_agree():
    from transformers import LlamaConfig, LlamaForCausalLM

    from thinkforge.templates import use_end_of_turn_as_eos

    tok = phi4_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    endoftext = tok.eos_token_id
    model.generation_config.eos_token_id = endoftext
    assert use_end_of_turn_as_eos(tok, model) == "<|end|>"
    end = tok.convert_tokens_to_ids("<|end|>")
    assert tok.eos_token == "<|end|>" and tok.pad_token == "<|endoftext|>", "padding is left alone"
    assert model.config.eos_token_id == end and model.generation_config.eos_token_id == [end, endoftext]
    assert end_of_turn(tok) == "<|end|>" and use_end_of_turn_as_eos(tok, model) == "<|end|>"  # idempotent
    assert model.generation_config.eos_token_id == [end, endoftext]


@pytest.fixture(scope="module")
def phi4_tiny(tmp_path_factory):
    """A tiny random Llama with a Phi-4-mini-style tokenizer, saved as a model directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from thinkforge.models import save_model

    tok = phi4_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out = tmp_path_factory.mktemp("phi4-tiny") / "model"
    save_model(model, tok, out)
    d = out.parent
    rows = [{"problem_id": f"p{i}", "problem": f"Tom has {i} apples and buys 4 more. How many apples does he have?",
             "completion": f"{i} + 4 = {i + 4}, so the answer is \\boxed{{{i + 4}}}."} for i in range(8)]
    write_jsonl(d / "sft.jsonl", rows)
    write_jsonl(d / "dpo.jsonl", [{"problem_id": r["problem_id"], "problem": r["problem"], "chosen": r["completion"],
                                   "rejected": "I think it is 9."} for r in rows])
    return out, d


def _spy_finish(monkeypatch, module):
    seen = {}
    real = module.finish

    def spy(trainer, tok, *a, **kw):
        seen["trainer"], seen["tok"] = trainer, tok
        return real(trainer, tok, *a, **kw)

    monkeypatch.setattr(module, "finish", spy)
    return seen


def _ids(tok):
    return tok.convert_tokens_to_ids("<|end|>"), tok.convert_tokens_to_ids("<|endoftext|>")


def test_sft_targets_end_with_the_end_of_turn_token(phi4_tiny, tmp_path, monkeypatch):
    import thinkforge.stages.sft as sft_mod
    from transformers import AutoTokenizer, GenerationConfig

    model_dir, d = phi4_tiny
    seen = _spy_finish(monkeypatch, sft_mod)
    sft_mod.sft(load_recipe(SMOKE, {"sft.max_steps": 1, "sft.batch_size": 2}), model_dir, d / "sft.jsonl",
                tmp_path / "sft")
    end, endoftext = _ids(seen["tok"])
    for ex in seen["trainer"].train_dataset:
        ids = ex["input_ids"]
        completion = [t for t in ex["labels"] if t != -100]  # the tokens the loss sees
        assert completion[-1] == end and endoftext not in ids, "the answer closes with <|end|>, once, and nothing after"
    saved = AutoTokenizer.from_pretrained(tmp_path / "sft")
    assert saved.eos_token == "<|end|>"
    assert end in GenerationConfig.from_pretrained(tmp_path / "sft").eos_token_id, "sampling stops at <|end|>"


def test_dpo_and_midtrain_targets_end_with_the_end_of_turn_token(phi4_tiny, tmp_path, monkeypatch):
    import thinkforge.stages.dpo as dpo_mod
    import thinkforge.stages.midtrain as mid_mod

    model_dir, d = phi4_tiny
    seen = _spy_finish(monkeypatch, dpo_mod)
    dpo_mod.dpo(load_recipe(SMOKE, {"dpo.max_steps": 1, "dpo.batch_size": 2}), model_dir, d / "dpo.jsonl",
                tmp_path / "dpo")
    end, endoftext = _ids(seen["tok"])
    for ex in seen["trainer"].train_dataset:
        for key in ("chosen_ids", "rejected_ids"):
            assert ex[key][-1] == end and endoftext not in ex[key], (key, ex[key][-3:])

    seen = _spy_finish(monkeypatch, mid_mod)
    mid_mod.midtrain(load_recipe(SMOKE, {"midtrain.max_steps": 1, "midtrain.validation_fraction": 0.0,
                                         "midtrain.packing": False}), model_dir, d / "sft.jsonl", tmp_path / "mid")
    for ex in seen["trainer"].train_dataset:
        assert ex["input_ids"][-1] == end and endoftext not in ex["input_ids"]
