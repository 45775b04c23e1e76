"""The RL section of the paper recipe (recipes/phi4-mini-reasoning.yaml) and the GRPO knobs of RLConfig.

The recipe runs only on a GPU cluster; these tests check what can be checked from its numbers: the
stabilizers are on, vLLM's window fits its KV-cache share, and one micro-batch of the trainer fits beside
vLLM on an 80 GB GPU (a deliberately simple estimate, written out below).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from thinkforge.config import ConfigError, RLConfig, load_recipe

PHI4 = Path(__file__).resolve().parents[1] / "recipes" / "phi4-mini-reasoning.yaml"

# Phi-4-mini (microsoft/Phi-4-mini-instruct config): 3.84B parameters, 32 layers, hidden 3072, 8 KV heads of 128.
PARAMS, LAYERS, HIDDEN, KV_HEADS, HEAD_DIM = 3.84e9, 32, 3072, 8, 128
GPU_BYTES = 80e9  # H100 80GB, the recipe's node selector
BF16 = 2


@pytest.fixture(scope="module")
def rl():
    return load_recipe(PHI4).rl


def test_paper_stabilizers_on(rl):
    assert rl.prompt_optimization and rl.reward_rebalancing
    assert rl.anneal_temperature and (rl.temperature_start, rl.temperature_end, rl.anneal_fraction) == (1.0, 0.6, 0.5)
    assert rl.max_group_accuracy == 0.5  # the paper's example threshold
    # prompt optimization is bounded: a seeded subset of candidates, not the whole ~1M-prompt pool
    assert 0 < rl.prompt_opt_max_candidates <= 16384


def test_vllm_window_fits_its_kv_cache(rl):
    """TRL passes vllm_max_model_length to vLLM as max_model_len; unset, vLLM takes the model's 131,072
    tokens, whose KV cache for one sequence (17 GB) does not fit the share left after the weights."""
    assert rl.use_vllm
    window = rl.vllm_max_model_length
    assert window >= rl.max_completion_tokens + 512, "room for the prompt"
    kv_per_token = LAYERS * KV_HEADS * HEAD_DIM * 2 * BF16  # K and V, bf16
    kv_share = rl.vllm_gpu_memory_utilization * GPU_BYTES - PARAMS * BF16 - 2e9  # weights, ~2 GB activations
    assert window * kv_per_token <= kv_share / 2, "at least two full-length rollouts in the KV cache"
    assert 131_072 * kv_per_token > kv_share  # why the default does not start


def test_trainer_micro_batch_fits_beside_vllm(rl):
    """Per GPU: vLLM's share + ZeRO-sharded model states (bf16 weights and gradients, fp32 master weights and
    two Adam moments: 16 bytes per parameter over the pod's GPUs) + the activations of one micro-batch with
    gradient checkpointing (one bf16 hidden state per layer boundary, plus ~16 more for the layer being
    recomputed, per token) stays under 80 GB with 10% to spare. batch_size 8 needs ~95 GB."""
    recipe = load_recipe(PHI4)
    gpus = recipe.cluster.stages["rl"].gpus
    assert rl.gradient_checkpointing and gpus == 8
    tokens = rl.batch_size * (rl.vllm_max_model_length or rl.max_completion_tokens + 1024)
    activations = tokens * HIDDEN * BF16 * (LAYERS + 16)
    states = PARAMS * 16 / gpus
    total = rl.vllm_gpu_memory_utilization * GPU_BYTES + states + activations
    assert total <= 0.9 * GPU_BYTES, f"{total / 1e9:.1f} GB per GPU"
    # the global batch stays 256 rollouts per step (32 prompts x 8) across the pod's GPUs
    assert rl.batch_size * rl.grad_accum * gpus == 256 and 256 % rl.num_generations == 0


def test_paper_recipe_grpo_knobs(rl):
    assert (rl.loss_type, rl.scale_rewards, rl.epsilon, rl.epsilon_high) == ("dapo", "group", 0.2, 0.0)
    assert rl.mask_truncated_completions is False  # the paper's -1 for anything unverified, truncation included
    assert rl.importance_sampling_level == "token" and rl.vllm_importance_sampling_correction
    assert rl.vllm_importance_sampling_mode == "token_truncate" and rl.vllm_importance_sampling_clip_max == 3.0


def test_grpo_knob_defaults_are_trls():
    """RLConfig's defaults are TRL 1.16's GRPOConfig defaults (documented as such), with 0 for TRL's None."""
    from trl import GRPOConfig

    trl = GRPOConfig(output_dir="unused", use_cpu=True, bf16=False, report_to=[], per_device_train_batch_size=4,
                     num_generations=2)
    ours = RLConfig()
    for name in ("loss_type", "scale_rewards", "epsilon", "mask_truncated_completions", "importance_sampling_level",
                 "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
                 "vllm_importance_sampling_clip_max", "temperature"):
        mine = ours.temperature_start if name == "temperature" else getattr(ours, name)
        assert mine == getattr(trl, name), name
    assert trl.epsilon_high is None and ours.epsilon_high == 0.0
    assert trl.vllm_importance_sampling_clip_min is None and ours.vllm_importance_sampling_clip_min == 0.0
    assert trl.vllm_max_model_length is None and ours.vllm_max_model_length == 0


def test_grpo_knob_validation(tmp_path):
    bad = {"rl.vllm_max_model_length": 200, "rl.max_completion_tokens": 256}
    with pytest.raises(ConfigError, match=r"vllm_max_model_length \(200\) must exceed max_completion_tokens \(256\)"):
        load_recipe(PHI4, bad)
    with pytest.raises(ConfigError, match="vllm_importance_sampling_clip_min must be below"):
        load_recipe(PHI4, {"rl.vllm_importance_sampling_clip_min": 3.0})
    with pytest.raises(ConfigError, match="loss_type vespo with use_vllm needs a token-level"):
        load_recipe(PHI4, {"rl.loss_type": "vespo", "rl.vllm_importance_sampling_mode": "sequence_mask"})
    with pytest.raises(ConfigError, match="rl.loss_type"):
        load_recipe(PHI4, {"rl.loss_type": "ppo"})
    assert load_recipe(PHI4, {"rl.loss_type": "vespo"}).rl.loss_type == "vespo"  # token_truncate in the recipe
