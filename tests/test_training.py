"""Mid-train, SFT and DPO stage behaviour with the real TRL trainers on CPU.

A tiny random Llama with a small BPE tokenizer trained here (tests/tiny_models.py) keeps each step
cheap; the data are the built-in word problems with their worked solutions (``solutions=1``).
"""

from __future__ import annotations

import json

import pytest

from thinkforge.config import load_recipe
from thinkforge.records import write_jsonl
from thinkforge.sources import load_problems
from thinkforge.templates import system_message
from tiny_models import tiny_model_dir, word_problem_texts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def recipe(request):
    return request.config.rootpath / "recipes" / "smoke.yaml"


@pytest.fixture(scope="module")
def problems():
    return load_problems("builtin:word-problems?split=train&n=48&solutions=1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, recipe, problems):
    cfg = load_recipe(recipe)
    held = load_problems("builtin:word-problems?split=test&n=16")
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model",
                          word_problem_texts(problems + held, system_message(cfg.template)), vocab_size=1000)


@pytest.fixture(scope="module")
def data(tmp_path_factory, problems):
    d = tmp_path_factory.mktemp("data")
    write_jsonl(d / "sft.jsonl", [{"problem_id": p["id"], "problem": p["problem"], "completion": p["completion"]}
                                  for p in problems])

    def wrong(p):  # a guess without the work, and a wrong final answer
        return "I am not sure. Maybe it is \\boxed{%d}." % (int(p["answer"]) + 3)

    write_jsonl(d / "dpo.jsonl", [{"problem_id": p["id"], "problem": p["problem"], "chosen": p["completion"],
                                   "rejected": wrong(p)} for p in problems[:16]])
    return d


# ------------------------------------------------------------------------------------------- mid-train


def test_held_out_split_is_stable_and_by_problem():
    from thinkforge.stages.midtrain import held_out

    ids = [f"p{i}" for i in range(2000)]
    picked = [i for i in ids if held_out(i, 0.1)]
    assert 150 < len(picked) < 250
    assert picked == [i for i in ids if held_out(i, 0.1)]  # the same on every restart
    assert not any(held_out(i, 0.0) for i in ids)


def test_midtrain_packs_validates_and_lowers_loss(recipe, tiny, data, tmp_path):
    from thinkforge.stages.midtrain import held_out, midtrain

    cfg = load_recipe(recipe, {"midtrain.max_steps": 6, "midtrain.eval_steps": 2, "midtrain.validation_fraction": 0.2,
                               "midtrain.early_stopping_patience": 0, "midtrain.learning_rate": 3e-3})
    r = midtrain(cfg, tiny, data / "sft.jsonl", tmp_path / "out")
    rows = [json.loads(x) for x in (data / "sft.jsonl").read_text().splitlines()]
    n_val = sum(held_out(x["problem_id"], 0.2, cfg.run.seed) for x in rows)
    assert r.extra["validation_examples"] == n_val > 0 and r.examples == len(rows) - n_val
    # best-fit packing: several examples per max_length sequence
    assert r.extra["sequences"] < r.examples / 1.5
    assert len(r.extra["eval_losses"]) == 3  # every eval interval
    assert r.extra["eval_losses"][-1] < r.extra["eval_losses"][0]
    assert r.steps == 6 and r.last < r.first
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_midtrain_stops_when_validation_saturates(recipe, tiny, data, tmp_path):
    from thinkforge.stages.midtrain import midtrain

    # min_delta larger than any possible gain: the first evaluation sets the best, none improves on it
    cfg = load_recipe(recipe, {"midtrain.max_steps": 40, "midtrain.eval_steps": 1, "midtrain.validation_fraction": 0.2,
                               "midtrain.early_stopping_patience": 2, "midtrain.early_stopping_min_delta": 100.0})
    r = midtrain(cfg, tiny, data / "sft.jsonl", tmp_path / "out")
    assert r.extra["stopped_early_at"] == 3 and r.steps == 3
    assert len(r.extra["eval_losses"]) == 3


def test_midtrain_runs_every_planned_step_unless_early_stopping_is_asked_for(recipe, tiny, data, tmp_path):
    """The paper distils for 5 epochs: a validation loss that does not improve early must not end the
    run by default. The same run stops early only with a patience set (see the test above)."""
    from thinkforge.config import MidtrainConfig
    from thinkforge.stages.midtrain import midtrain

    assert MidtrainConfig().early_stopping_patience == 0
    # min_delta larger than any possible gain: no evaluation ever counts as an improvement
    cfg = load_recipe(recipe, {"midtrain.max_steps": 6, "midtrain.eval_steps": 1, "midtrain.validation_fraction": 0.2,
                               "midtrain.early_stopping_min_delta": 100.0})
    r = midtrain(cfg, tiny, data / "sft.jsonl", tmp_path / "out")
    assert r.steps == 6 and r.extra["stopped_early_at"] is None and len(r.extra["eval_losses"]) == 6
    assert r.extra["best_eval_loss"] == min(r.extra["eval_losses"])
    assert r.extra["best_eval_step"] == 1 + r.extra["eval_losses"].index(r.extra["best_eval_loss"])


def test_midtrain_streams_the_corpus_over_several_epochs(recipe, tiny, data, tmp_path):
    from thinkforge.config import ConfigError
    from thinkforge.stages.midtrain import midtrain

    with pytest.raises(ConfigError, match="streaming needs max_steps"):
        load_recipe(recipe, {"midtrain.streaming": True, "midtrain.max_steps": -1})
    cfg = load_recipe(recipe, {"midtrain.streaming": True, "midtrain.max_steps": 8, "midtrain.batch_size": 4,
                               "midtrain.eval_steps": 4, "midtrain.validation_fraction": 0.2,
                               "midtrain.learning_rate": 3e-3})
    r = midtrain(cfg, tiny, data / "sft.jsonl", tmp_path / "out")
    assert r.steps == 8 and r.examples == -1  # a stream is never counted
    epochs = [h["epoch"] for h in r.history if "loss" in h]
    assert epochs[-1] > 1.0, f"expected the stream to restart for a second epoch, got epochs {epochs}"
    assert len(r.extra["eval_losses"]) == 2 and r.extra["validation_examples"] > 0
    assert r.last < r.first


# ------------------------------------------------------------------------------------------------- SFT


def test_sft_learns_to_stop(recipe, tiny, data, tmp_path):
    """Completion-only loss with EOS in the target: the SFT model ends its answers by itself (within the
    token budget) on held-out problems far more often than the base model."""
    from thinkforge.engines.base import SamplingParams
    from thinkforge.engines.hf import HFEngine
    from thinkforge.stages.sft import sft

    cfg = load_recipe(recipe, {"sft.max_steps": 30, "sft.learning_rate": 3e-3, "sft.batch_size": 8,
                               "sft.lr_scheduler": "constant"})
    held = [p["problem"] for p in load_problems("builtin:word-problems?split=test&n=16")]
    params = SamplingParams(n=4, temperature=1.0, top_p=1.0, max_new_tokens=48, seed=0)

    def stop_rate(model_dir):
        outs = HFEngine(str(model_dir), cfg.template, dtype="float32", batch_size=64).generate(held, params)
        return sum(o.finish_reason == "stop" for group in outs for o in group) / (len(held) * params.n)

    base = stop_rate(tiny)
    r = sft(cfg, tiny, data / "sft.jsonl", tmp_path / "sft")
    after = stop_rate(tmp_path / "sft")
    assert r.last < r.first
    assert after >= 0.6 and after > base + 0.4, f"stop rate base {base:.2f} -> SFT {after:.2f}"


def test_sft_trains_on_completions_only_without_packing(recipe, tiny, data, tmp_path, monkeypatch):
    import thinkforge.stages.sft as sft_mod

    seen = {}
    real = sft_mod.training_args

    def spy(*a, **kw):
        seen["args"] = real(*a, **kw)
        return seen["args"]

    monkeypatch.setattr(sft_mod, "training_args", spy)
    cfg = load_recipe(recipe, {"sft.max_steps": 1})
    sft_mod.sft(cfg, tiny, data / "sft.jsonl", tmp_path / "sft")
    assert seen["args"].packing is False and seen["args"].completion_only_loss is True


# ------------------------------------------------------------------------------------------------- DPO


def _spy_args(monkeypatch, module):
    seen = {}
    real = module.training_args

    def spy(*a, **kw):
        seen["args"] = real(*a, **kw)
        return seen["args"]

    monkeypatch.setattr(module, "training_args", spy)
    return seen


def test_dpo_reference_is_the_incoming_model_precomputed_or_not(recipe, tiny, data, tmp_path, monkeypatch):
    import thinkforge.stages.dpo as dpo_mod

    over = {"dpo.max_steps": 6, "dpo.learning_rate": 1e-3, "dpo.batch_size": 4, "dpo.beta": 0.2,
            "dpo.loss_type": "sigmoid"}
    seen = _spy_args(monkeypatch, dpo_mod)
    pre = dpo_mod.dpo(load_recipe(recipe, over), tiny, data / "dpo.jsonl", tmp_path / "pre")
    args = seen["args"]
    assert args.precompute_ref_log_probs is True and args.beta == 0.2 and args.loss_type == ["sigmoid"]
    assert pre.extra["precomputed_reference"] is True
    assert pre.last < pre.first, f"DPO loss {pre.first} -> {pre.last}"

    live = dpo_mod.dpo(load_recipe(recipe, {**over, "dpo.precompute_ref_log_probs": False}), tiny,
                       data / "dpo.jsonl", tmp_path / "live")
    assert seen["args"].precompute_ref_log_probs is False
    # Same reference either way (the incoming model): the same losses and implicit rewards, step by step.
    keys = ("loss", "rewards/chosen", "rewards/rejected")
    a = [h[k] for h in pre.history if "loss" in h for k in keys]
    b = [h[k] for h in live.history if "loss" in h for k in keys]
    assert len(a) == len(b) == 6 * len(keys)
    # abs 1e-5: the CPU LM head projects only labelled positions, so a batch's shape (precomputed in its own
    # batches vs live) changes the matmul's summation order: ~1e-6 noise on a zero reward at step 1.
    assert a == pytest.approx(b, rel=1e-4, abs=1e-5)


def test_dpo_precomputes_reference_log_probs_for_the_pairs_it_reaches_only(recipe, tiny, data, tmp_path, monkeypatch):
    """2 steps x 4 pairs reach 8 of the 16 pairs: TRL's precompute (one forward per pair) runs over those 8,
    a seeded subset, the same for the same seed (fails without the subset: all 16 are scored)."""
    import trl.trainer.dpo_trainer as trl_dpo

    import thinkforge.stages.dpo as dpo_mod

    scored: list[int] = []
    real = trl_dpo.DPOTrainer._precompute_ref_logps

    def precompute(self, dataset, *a, **kw):
        scored.append(len(dataset))
        return real(self, dataset, *a, **kw)

    monkeypatch.setattr(trl_dpo.DPOTrainer, "_precompute_ref_logps", precompute)
    cfg = load_recipe(recipe, {"dpo.max_steps": 2, "dpo.batch_size": 4})
    r = dpo_mod.dpo(cfg, tiny, data / "dpo.jsonl", tmp_path / "dpo")
    assert scored == [8] and r.examples == 8 and r.extra["pairs_available"] == 16
    rows = [{"id": i} for i in range(16)]
    assert dpo_mod.pairs_reached(rows, cfg.dpo, 1, 0) == dpo_mod.pairs_reached(rows, cfg.dpo, 1, 0)
    assert dpo_mod.pairs_reached(rows, cfg.dpo, 2, 0) == rows  # 2 processes reach all 16
    assert dpo_mod.pairs_reached(rows, load_recipe(recipe, {"dpo.max_steps": -1}).dpo, 1, 0) == rows


def test_dpo_loss_type_from_config(recipe, tiny, data, tmp_path, monkeypatch):
    import thinkforge.stages.dpo as dpo_mod

    seen = _spy_args(monkeypatch, dpo_mod)
    r = dpo_mod.dpo(load_recipe(recipe, {"dpo.max_steps": 1, "dpo.loss_type": "ipo", "dpo.beta": 0.5}), tiny,
                    data / "dpo.jsonl", tmp_path / "ipo")
    assert seen["args"].loss_type == ["ipo"] and seen["args"].beta == 0.5
    # IPO's loss at the start (policy == reference) is (1 / (2 beta))^2 = 1.0, not sigmoid's log 2
    assert r.first == pytest.approx(1.0, rel=1e-3)
