"""The RL stage's vLLM path on the CPU: TRL's real GRPOTrainer with ``use_vllm=True`` in colocate mode, where
only the engine is a stand-in (no vLLM here). ``FakeVLLM`` replaces ``trl``'s ``VLLMGeneration``: it samples
with transformers' ``generate`` from the live policy at the temperature the trainer sets on it, and returns
what vLLM returns with ``logprobs_mode="processed_logprobs"`` (TRL's setting): the log-prob of each sampled
token under the distribution it was sampled from (log-softmax of the processed scores: temperature applied,
no top-k/top-p filtering at top_p=1). Everything else, the importance weights included, is TRL's own code.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from thinkforge.config import load_recipe
from thinkforge.records import write_jsonl
from thinkforge.sources import load_problems
from thinkforge.templates import system_message
from tiny_models import tiny_model_dir

pytestmark = pytest.mark.slow


class FakeVLLM:
    """TRL's VLLMGeneration (colocate mode) on the CPU; records what the trainer built it with."""

    built: list[dict] = []

    def __init__(self, *, model, accelerator, processing_class, **kw):
        self.model, self.tok, self.kw = model, processing_class, kw
        self.temperature, self.top_p = kw["temperature"], kw["top_p"]
        self.max_completion_length = kw["max_completion_length"]
        self.llm = SimpleNamespace(llm_engine=SimpleNamespace(model_config=SimpleNamespace(
            max_model_len=kw["max_model_length"])))
        self.sampled_at: list[float] = []
        FakeVLLM.built.append({**kw, "instance": self})

    def sync_weights(self):  # samples from the live policy: always in sync
        pass

    def generate(self, prompts, images, num_generations, profiler=None):
        eos = self.tok.eos_token_id
        self.sampled_at.append(self.temperature)
        completions, logprobs = [], []
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            for ids in prompts:  # colocate mode: one completion per (already repeated) prompt
                out = self.model.generate(
                    torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=True,
                    temperature=self.temperature, top_p=1.0, top_k=0, max_new_tokens=self.max_completion_length,
                    output_scores=True, return_dict_in_generate=True, pad_token_id=self.tok.pad_token_id)
                new = out.sequences[0, len(ids):].tolist()
                if eos in new:
                    new = new[:new.index(eos) + 1]
                lps = [torch.log_softmax(out.scores[t][0].float(), dim=-1)[tok].item() for t, tok in enumerate(new)]
                completions.append(new)
                logprobs.append([[lp] for lp in lps])
        self.model.train(was_training)
        return prompts, completions, logprobs, None


@pytest.fixture(scope="module")
def recipe(request):
    return request.config.rootpath / "recipes" / "smoke.yaml"


@pytest.fixture(scope="module")
def peaked(tmp_path_factory, recipe):
    """(model dir, prompts file): a tiny random Llama whose final norm is scaled up, so its next-token
    distributions are peaked like a trained model's (temperature changes its log-probs a lot)."""
    from thinkforge.models import load_model, save_model

    d = tmp_path_factory.mktemp("rl_vllm")
    cfg = load_recipe(recipe)
    problems = load_problems("builtin:word-problems?split=train&n=16")
    base = tiny_model_dir(d / "base", [system_message(cfg.template), *(p["problem"] for p in problems),
                                       *(str(i) for i in range(10))], vocab_size=400)
    from thinkforge.models import load_tokenizer

    model, tok = load_model(base), load_tokenizer(base)
    with torch.no_grad():
        model.model.norm.weight.mul_(12.0)
    save_model(model, tok, d / "peaked")
    write_jsonl(d / "prompts.jsonl", [{"id": p["id"], "problem": p["problem"], "answer": "7", "answer_type": "math",
                                       "pass_rate": 0.1} for p in problems])
    return d / "peaked", d / "prompts.jsonl"


BASE = {"rl.use_vllm": True, "rl.batch_size": 8, "rl.num_generations": 4, "rl.max_completion_tokens": 24,
        "rl.lr_scheduler": "constant", "rl.learning_rate": 1e-3, "rl.logging_steps": 1, "rl.bf16": False,
        "rl.temperature_start": 1.0, "rl.temperature_end": 0.5, "rl.anneal_fraction": 1.0, "rl.max_steps": 3}


def run_with_fake_vllm(monkeypatch, recipe, model, prompts, out, overrides):
    import trl.trainer.grpo_trainer as grpo_trainer

    from thinkforge.stages import rl as rl_mod

    FakeVLLM.built.clear()
    monkeypatch.setattr(grpo_trainer, "VLLMGeneration", FakeVLLM)
    monkeypatch.setattr(rl_mod, "on_gpu", lambda: True)  # the stage's "vLLM needs a GPU" check only
    cfg = load_recipe(recipe, {**BASE, **overrides})
    return cfg, rl_mod.rl(cfg, model, prompts, out)


def test_importance_weights_stay_near_one_while_annealing(recipe, peaked, tmp_path, monkeypatch):
    """Sampling anneals 1.0 -> 0.5; TRL's vLLM importance weights (sequence_mask: exp of the summed per-token
    log-prob differences, dropped outside [0, 3]) stay at 1 up to float error on every step, because the
    training log-probs are computed at the temperature the rollouts were sampled at. With the temperature TRL
    binds at construction (1.0) they fall to ~0.7 here after 24 tokens (and towards 0 over thousands)."""
    from thinkforge.stages.rl import annealed_temperature

    model, prompts = peaked
    cfg, r = run_with_fake_vllm(monkeypatch, recipe, model, prompts, tmp_path / "out", {})
    (built,) = FakeVLLM.built
    want = [annealed_temperature(s, 3, cfg.rl) for s in range(3)]
    assert want == pytest.approx([1.0, 5 / 6, 2 / 3])
    assert built["instance"].sampled_at == pytest.approx(want), "vLLM samples at the annealed temperature"
    steps = [h for h in r.history if "reward" in h]
    assert len(steps) == 3 and [h["temperature"] for h in steps] == pytest.approx(want)
    for h in steps:
        for k in ("min", "mean", "max"):
            assert h[f"sampling/importance_sampling_ratio/{k}"] == pytest.approx(1.0, abs=1e-3), (k, h)
    assert r.extra["logprob_temperature_follows"] is True and "importance_sampling_off" not in r.extra


def test_correction_turned_off_where_the_temperature_cannot_follow(recipe, peaked, tmp_path, monkeypatch):
    """A TRL whose log-prob head hides its temperature: annealing keeps sampling, the correction is turned off
    (no weights computed, none applied) and the result says so."""
    from thinkforge.stages import rl as rl_mod

    monkeypatch.setattr(rl_mod, "fused_head_temperature_cells", lambda model: [])
    model, prompts = peaked
    _, r = run_with_fake_vllm(monkeypatch, recipe, model, prompts, tmp_path / "out", {"rl.max_steps": 1})
    assert not any(k.startswith("sampling/importance_sampling_ratio") for h in r.history for k in h)
    assert r.extra["logprob_temperature_follows"] is False
    assert "turned off while annealing" in r.extra["importance_sampling_off"]


def test_colocate_window_and_grpo_knobs_reach_trl(recipe, peaked, tmp_path, monkeypatch):
    """vllm_max_model_length (derived: the longest tokenized prompt + max_completion_tokens; or the recipe's)
    and the GRPO knobs arrive in TRL's GRPOConfig and trainer under their TRL names."""
    from thinkforge.models import load_tokenizer
    from thinkforge.records import read_jsonl
    from thinkforge.stages import rl as rl_mod
    from thinkforge.templates import render_prompt

    seen = {}
    cls = rl_mod._trainer_class()
    orig = cls.__init__

    def init(self, *a, **kw):
        orig(self, *a, **kw)
        seen["args"], seen["trainer"] = self.args, self

    monkeypatch.setattr(cls, "__init__", init)
    model, prompts = peaked
    knobs = {"rl.loss_type": "grpo", "rl.scale_rewards": "batch", "rl.epsilon": 0.1, "rl.epsilon_high": 0.28,
             "rl.mask_truncated_completions": True, "rl.importance_sampling_level": "sequence",
             "rl.vllm_importance_sampling_mode": "token_truncate", "rl.vllm_importance_sampling_clip_max": 2.0,
             "rl.vllm_importance_sampling_clip_min": 0.5, "rl.max_steps": 1}
    cfg, r = run_with_fake_vllm(monkeypatch, recipe, model, prompts, tmp_path / "a", knobs)
    tok = load_tokenizer(model)
    longest = max(len(tok(text=render_prompt(tok, x["problem"], cfg.template))["input_ids"])
                  for x in read_jsonl(prompts))
    assert FakeVLLM.built[0]["max_model_length"] == longest + 24 == r.extra["vllm_max_model_length"]
    a, t = seen["args"], seen["trainer"]
    assert (a.loss_type, a.scale_rewards, a.epsilon, a.epsilon_high, a.mask_truncated_completions) == \
        ("grpo", "batch", 0.1, 0.28, True)
    assert (a.importance_sampling_level, a.vllm_importance_sampling_mode, a.vllm_importance_sampling_clip_max,
            a.vllm_importance_sampling_clip_min, a.vllm_importance_sampling_correction) == \
        ("sequence", "token_truncate", 2.0, 0.5, True)
    assert (t.loss_type, t.epsilon_low, t.epsilon_high, t.scale_rewards) == ("grpo", 0.1, 0.28, "batch")
    # a window from the recipe is passed as it is
    _, r = run_with_fake_vllm(monkeypatch, recipe, model, prompts, tmp_path / "b",
                              {"rl.max_steps": 1, "rl.vllm_max_model_length": longest + 100})
    assert FakeVLLM.built[0]["max_model_length"] == longest + 100


def test_vllm_window_rules():
    from thinkforge.config import RLConfig
    from thinkforge.stages.rl import vllm_window

    assert vllm_window(RLConfig(max_completion_tokens=256), [10, 40, 25]) == 296
    assert vllm_window(RLConfig(max_completion_tokens=256, vllm_max_model_length=1024), [10, 40]) == 1024
    with pytest.raises(ValueError, match=r"rl.vllm_max_model_length \(300\) leaves no room.*300 tokens"):
        vllm_window(RLConfig(max_completion_tokens=256, vllm_max_model_length=300), [300])


@pytest.mark.parametrize("wrapped", [False, True])
def test_trl_fused_head_temperature_can_be_moved(wrapped):
    """The head GRPOTrainer puts on a GPU model (TRL's add_fused_lm_head, here on its CPU code path): the
    temperature found in it, once moved, gives log-probs of softmax(logits / T), also through a decorator
    around the forward such as the autocast wrapper accelerate adds."""
    import types

    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from thinkforge.stages.rl import fused_head_temperature_cells

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2))
    add_fused_lm_head(m, temperature=1.0, outputs=("log_probs", "entropy"))
    if wrapped:
        m.forward = types.MethodType(torch.autocast("cpu", enabled=False)(m.forward.__func__), m)
    (cell,) = fused_head_temperature_cells(m)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        logits = m(input_ids=ids).logits[:, :-1].float()  # the model's own forward (no fused_lm_head)
        for temp in (1.0, 0.6):
            cell.cell_contents = temp
            got = m(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
            want = torch.log_softmax(logits / temp, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            assert torch.allclose(got, want, atol=1e-5), temp
