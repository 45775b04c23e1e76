"""GRPO with the paper's stabilizers, on the real TRL GRPOTrainer (CPU; rollouts through thinkforge's sampler).

A random model earns no reward, so the RL runs here use a task that can be learned in seconds through
the same verifier and the same +1/-1 reward: a tiny Llama (small BPE tokenizer, tests/tiny_models.py)
is first SFT'd by the real SFT stage to answer every word problem with one random digit; RL then
rewards the answer 7 (gold "7" for every prompt). The share of 7s starts near 1 in 10 and GRPO should
raise it within a few steps.
"""

from __future__ import annotations

import random

import pytest
import torch

from thinkforge.config import load_recipe
from thinkforge.records import write_jsonl
from thinkforge.sources import load_problems
from thinkforge.templates import system_message
from tiny_models import tiny_model_dir

pytestmark = pytest.mark.slow

RL_BASE = {"rl.batch_size": 16, "rl.num_generations": 8, "rl.max_completion_tokens": 6, "rl.lr_scheduler": "constant",
           "rl.learning_rate": 2e-3, "rl.logging_steps": 1}


@pytest.fixture(scope="module")
def recipe(request):
    return request.config.rootpath / "recipes" / "smoke.yaml"


@pytest.fixture(scope="module")
def digits(tmp_path_factory, recipe):
    """(model dir SFT'd to answer one random digit, RL prompts file with gold "7", problems)."""
    from thinkforge.stages.sft import sft

    d = tmp_path_factory.mktemp("rl")
    cfg = load_recipe(recipe, {"sft.max_steps": 20, "sft.learning_rate": 1e-2, "sft.batch_size": 16,
                               "sft.lr_scheduler": "constant"})
    problems = load_problems("builtin:word-problems?split=train&n=64")
    texts = [system_message(cfg.template), *(p["problem"] for p in problems), *(str(i) for i in range(10))]
    base = tiny_model_dir(d / "base", texts, vocab_size=600)
    rng = random.Random(0)
    write_jsonl(d / "sft.jsonl", [{"problem_id": p["id"], "problem": p["problem"], "completion": str(rng.randrange(10))}
                                  for p in problems])
    sft(cfg, base, d / "sft.jsonl", d / "digits")
    write_jsonl(d / "prompts.jsonl", [{"id": p["id"], "problem": p["problem"], "answer": "7", "answer_type": "math",
                                       "pass_rate": 0.1} for p in problems])
    return d / "digits", d / "prompts.jsonl", problems


def rewards(result) -> list[float]:
    return [h["reward"] for h in result.history if "reward" in h]


def test_grpo_raises_mean_reward(recipe, digits, tmp_path):
    from thinkforge.stages.rl import rl

    model, prompts, _ = digits
    cfg = load_recipe(recipe, {**RL_BASE, "rl.max_steps": 14, "rl.reward_check_samples": 8})
    r = rl(cfg, model, prompts, tmp_path / "out")
    got = rewards(r)
    assert r.steps == 14 and r.metric == "reward" and len(got) == 14
    assert sum(got[-3:]) / 3 > sum(got[:3]) / 3 + 0.5, f"mean reward per step: {got}"
    assert r.last > r.first
    # the same 32 prompts at temperature_end, before and after: the policy itself answers 7 more often
    check = r.extra["reward_check"]
    assert check["prompts"] == check["n_problems"] == 32 and check["samples"] == 8
    assert check["after"] > check["before"] + 0.3 and check["ci_low"] > 0, check
    for h in (h for h in r.history if "reward" in h):  # the per-step logs Prometheus gets (metrics.LOG_KEYS)
        assert {"reward_std", "frac_reward_zero_std", "completions/mean_length", "temperature"} <= set(h)


def test_annealed_temperature_is_the_one_sampling_uses(recipe, digits, tmp_path, monkeypatch):
    """Record the temperature at the point of sampling on the trainer's real rollout path: TRL's generation
    step goes through thinkforge's sampler (its nucleus draw, once per token), not `model.generate`."""
    from transformers import GenerationMixin

    from thinkforge.engines import sampler
    from thinkforge.metrics import LOG_KEYS
    from thinkforge.stages.rl import annealed_temperature, rl

    drawn: list[float] = []
    real = sampler.nucleus_sample

    def nucleus_sample(logits, temperature, top_p, generator):
        drawn.append(float(temperature))
        return real(logits, temperature, top_p, generator)

    monkeypatch.setattr(sampler, "nucleus_sample", nucleus_sample)
    monkeypatch.setattr(GenerationMixin, "generate", lambda *a, **k: pytest.fail("TRL's generate path was taken"))
    model, prompts, _ = digits
    from thinkforge.metrics import StageMetrics

    # anneal over all 4 steps; beta > 0 so that TRL computes (and logs) the KL to the reference model
    cfg = load_recipe(recipe, {**RL_BASE, "rl.max_steps": 4, "rl.temperature_start": 0.9, "rl.temperature_end": 0.5,
                               "rl.anneal_fraction": 1.0, "rl.beta": 0.04})
    metrics = StageMetrics.disabled("rl")
    r = rl(cfg, model, prompts, tmp_path / "out", metrics=metrics)
    want = [annealed_temperature(s, 4, cfg.rl) for s in range(4)]
    assert want == pytest.approx([0.9, 0.8, 0.7, 0.6])
    per_step = [t for i, t in enumerate(drawn) if i == 0 or drawn[i - 1] != t]
    assert per_step == pytest.approx(want), "the sampler's own temperature changes every step"
    steps = [h for h in r.history if "reward" in h]
    assert [h["temperature"] for h in steps] == pytest.approx(want)
    assert all("kl" in h for h in steps)
    # each step's logs reach the Prometheus gauges through MetricsCallback (metrics.LOG_KEYS)
    assert metrics.get(LOG_KEYS["temperature"]) == pytest.approx(0.6)
    for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "kl"):
        assert metrics.get(LOG_KEYS[key]) == pytest.approx(steps[-1][key]), key


def test_temperature_holds_when_annealing_is_off(recipe, digits, tmp_path):
    from thinkforge.stages.rl import rl

    model, prompts, _ = digits
    cfg = load_recipe(recipe, {**RL_BASE, "rl.max_steps": 2, "rl.anneal_temperature": False,
                               "rl.temperature_start": 0.8})
    r = rl(cfg, model, prompts, tmp_path / "out")
    assert [h["temperature"] for h in r.history if "reward" in h] == pytest.approx([0.8, 0.8])


def test_sampling_copy_follows_the_policy_in_bf16(digits):
    """The bf16 copy CPU rollouts sample through holds the policy's weights (cast) after each refresh, and
    is its own model: changing the policy changes nothing on the copy until the next refresh."""
    from transformers import AutoModelForCausalLM

    from thinkforge.stages.rl import SamplingCopy

    model_dir, _, _ = digits
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert SamplingCopy.applies(policy, bf16=True) and not SamplingCopy.applies(policy, bf16=False)
    copy = SamplingCopy(policy)
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        first = copy.refreshed()(ids).logits
        assert copy.model.dtype == torch.bfloat16
        for name, p in copy.model.named_parameters():
            assert torch.equal(p, dict(policy.named_parameters())[name].to(torch.bfloat16)), name
        for p in policy.parameters():
            p.add_(0.5)
        assert torch.equal(copy.model(ids).logits, first), "the copy must not run the policy's weights"
        after = copy.refreshed()(ids).logits
    assert not torch.equal(after, first)


def test_bf16_rollouts_on_a_cpu_sample_through_the_bf16_copy(recipe, digits, tmp_path, monkeypatch):
    """Under bf16 autocast every decoding step re-casts every float32 weight; CPU rollouts use a bf16 copy
    refreshed before each step's sampling (fails without it: the sampler would get the float32 policy)."""
    import thinkforge.stages.rl as rl_mod

    seen: list[torch.dtype] = []
    real = rl_mod.sample

    def sample(model, *args, **kwargs):
        seen.append(next(model.parameters()).dtype)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(rl_mod, "sample", sample)
    model, prompts, _ = digits
    cfg = load_recipe(recipe, {**RL_BASE, "rl.max_steps": 3, "rl.bf16": True})
    r = rl_mod.rl(cfg, model, prompts, tmp_path / "out")
    assert r.steps == 3 and seen == [torch.bfloat16] * 3


# ----------------------------------------------------------------------------------- reward rebalancing


def test_rebalance_mask_rules():
    from thinkforge.config import RLConfig
    from thinkforge.stages.rl import rebalance_mask, regroup_advantages

    rl_cfg = RLConfig(max_group_accuracy=0.5, min_reward_spread=1e-3)
    r = torch.tensor([
        1, -1, -1, -1,          # 1 positive: kept with exactly 1 negative
        1, 1, -1, -1,           # accuracy 0.5 (not above): all kept
        1, 1, 1, -1,            # accuracy 0.75 > 0.5: dropped
        -1, -1, -1, -1,         # zero spread: dropped
        -1, -1, -1, -1 + 1e-5,  # spread below epsilon (not exactly zero): dropped too
    ], dtype=torch.float32)
    keep, stats = rebalance_mask(r, 4, rl_cfg, torch.Generator().manual_seed(0))
    k = keep.view(-1, 4)
    assert k[0, 0] and k[0].sum() == 2 and k[1].all() and not k[2:].any()
    assert stats["zero_spread_fraction"] == pytest.approx(2 / 5) and stats["easy_group_fraction"] == pytest.approx(1 / 5)
    adv = regroup_advantages(r, keep, 4, "group").view(-1, 4)
    assert (adv[~k] == 0).all()
    assert adv[0][k[0]].tolist() == pytest.approx([1.0, -1.0], abs=1e-3)  # balanced: +1 / -1
    # counting only: nothing dropped, the zero-spread share still reported
    keep_all, stats = rebalance_mask(r, 4, rl_cfg, rebalance=False)
    assert keep_all.all() and stats["zero_spread_fraction"] == pytest.approx(2 / 5)


def test_oversample_hard_prompts():
    from thinkforge.config import RLConfig
    from thinkforge.stages.rl import oversample_hard

    rows = [{"id": "easy", "pass_rate": 0.8}, {"id": "hard", "pass_rate": 0.1}]
    out = oversample_hard(rows, RLConfig(hard_pass_rate=0.25, hard_oversample=3))
    assert [r["id"] for r in out] == ["easy", "hard", "hard", "hard"]


def test_rebalancing_masks_dropped_rollouts_from_the_loss(recipe, digits, tmp_path, monkeypatch):
    """Through the real trainer: the batch keeps its shape; dropped rollouts have an all-zero
    completion mask and zero advantage; kept groups hold every positive and as many negatives."""
    from thinkforge.stages import rl as rl_mod

    cls = rl_mod._trainer_class()
    batches = []
    orig = cls._generate_and_score_completions

    def spy(self, inputs):
        out = orig(self, inputs)
        batches.append((self._last_rewards_per_func.sum(dim=1).clone(), out["completion_mask"].clone(),
                        out["advantages"].clone(), float(out["num_items_in_batch"]), out["completion_ids"].shape))
        return out

    monkeypatch.setattr(cls, "_generate_and_score_completions", spy)
    model, prompts, _ = digits
    cfg = load_recipe(recipe, {**RL_BASE, "rl.max_steps": 6, "rl.reward_rebalancing": True,
                               "rl.max_group_accuracy": 0.5})
    r = rl_mod.rl(cfg, model, prompts, tmp_path / "out")
    assert r.extra["oversampled"] == 64  # every prompt has pass rate 0.1 <= hard_pass_rate: appears twice
    assert len(batches) == 6
    for rew, mask, adv, n_items, shape in batches:
        assert mask.shape[0] == rew.shape[0] == 16 and shape[0] == 16  # shapes intact
        kept = mask.sum(dim=1) > 0
        assert (adv[~kept] == 0).all() and n_items == mask.sum().item()
        for g in range(2):
            sl = slice(8 * g, 8 * g + 8)
            pos, neg = rew[sl] > 0, rew[sl] <= 0
            acc = pos.float().mean().item()
            if acc > 0.5 or pos.all() or neg.all():
                assert not kept[sl].any()
            else:
                assert kept[sl][pos].all() and kept[sl][neg].sum() == pos.sum()
    logs = [h for h in r.history if "reward" in h]
    assert all("rebalance/kept_fraction" in h for h in logs)


# ---------------------------------------------------------------------------------- prompt optimization


def test_prompt_optimization_keeps_band_and_uniform_lengths(recipe, digits, monkeypatch):
    """Rounds and rules on a scripted engine (pass rate and lengths chosen per prompt)."""
    from thinkforge.engines.base import Completion
    from thinkforge.stages import rl as rl_mod

    script = {  # problem -> per-round list of (correct?, n_tokens)
        "ok": [(True, 10), (False, 11)],
        "too-easy": [(True, 10), (True, 10)],
        "too-hard": [(False, 10), (False, 10)],
        "ragged": [(True, 2), (False, 40)],
    }
    calls = []

    class Engine:
        def __init__(self, model, template, tokenizer=None, **kw):
            pass

        def generate(self, problems, params, progress=None):
            calls.append(list(problems))
            return [[Completion("7" if ok else "3", n, "stop") for ok, n in script[p]] for p in problems]

    monkeypatch.setattr("thinkforge.engines.hf.HFEngine", Engine)
    cfg = load_recipe(recipe, {"rl.prompt_optimization": True, "rl.prompt_min_pass_rate": 0.2,
                               "rl.prompt_max_pass_rate": 0.8, "rl.prompt_opt_samples": 2, "rl.prompt_opt_rounds": 2,
                               "rl.prompt_opt_max_length_cv": 0.5})
    rows = [{"id": k, "problem": k, "answer": "7"} for k in script]
    kept, stats = rl_mod.optimize_prompts(cfg, torch.nn.Linear(1, 1), None, rows)
    assert [r["id"] for r in kept] == ["ok"]
    assert kept[0]["pass_rate"] == 0.5 and kept[0]["length_cv"] < 0.1 and kept[0]["mean_length"] == 10.5
    assert stats["dropped"] == {"pass_rate_low": 1, "pass_rate_high": 1, "length_spread": 1}
    # round 2 re-samples only the survivors of round 1 (a length spread may still settle)
    assert calls == [["ok", "too-easy", "too-hard", "ragged"], ["ok", "ragged"]]
    assert [x["kept"] for x in stats["rounds"]] == [2, 1]


def test_prompt_optimization_with_the_current_model_then_rl(recipe, digits, tmp_path):
    """The real HF engine samples the SFT'd model: prompts it can never solve (gold 12345) fall below the
    band; the kept ones carry their measured pass rate and length spread into RL."""
    from thinkforge.records import read_jsonl
    from thinkforge.stages.rl import rl

    model, prompts, _ = digits
    rows = read_jsonl(prompts)[:16]
    for row in rows[8:]:
        row["answer"] = "12345"
    mixed = tmp_path / "mixed.jsonl"
    write_jsonl(mixed, rows)
    cfg = load_recipe(recipe, {**RL_BASE, "rl.max_steps": 2, "rl.prompt_optimization": True,
                               "rl.prompt_opt_samples": 8, "rl.prompt_min_pass_rate": 0.01,
                               "rl.prompt_max_pass_rate": 0.9, "rl.prompt_opt_max_length_cv": 1.0})
    r = rl(cfg, model, mixed, tmp_path / "out")
    po = r.extra["prompt_optimization"]
    assert po["candidates"] == 16 and 0 < po["kept"] <= 8 and r.examples == po["kept"]
    assert po["dropped"]["pass_rate_low"] >= 8
    assert r.steps == 2


def test_reward_check_draws_the_same_random_numbers_before_and_after(recipe, digits):
    """pass_rates seeds by run.seed alone: the same model reads the same pass rates twice, so a change
    between before and after is the policy's, not the sampler's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from thinkforge.records import read_jsonl
    from thinkforge.stages.rl import pass_rates, reward_check_rows
    from thinkforge.verify import Verifier

    model_dir, prompts, _ = digits
    cfg = load_recipe(recipe, {**RL_BASE, "rl.reward_check_samples": 4, "rl.reward_check_prompts": 12})
    rows = reward_check_rows(read_jsonl(prompts) * 2, cfg.rl)  # repeated rows count once
    assert len(rows) == 12 and len({r["id"] for r in rows}) == 12
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    with Verifier(mode="fallback") as v:  # the model answers a bare digit
        a = pass_rates(cfg, model, tok, rows, v)
        b = pass_rates(cfg, model, tok, rows, v)
    assert a == b and set(a) == {r["id"] for r in rows} and 0 < sum(a.values()) < 12


def test_vllm_rollouts_need_a_gpu(recipe, digits, tmp_path):
    from thinkforge.stages.rl import rl

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    model, prompts, _ = digits
    with pytest.raises(RuntimeError, match="rl.use_vllm needs a CUDA GPU"):
        rl(load_recipe(recipe, {"rl.use_vllm": True}), model, prompts, tmp_path / "out")
