"""Stage 6, RL: GRPO with a +1/-1 verifiable reward and the paper's small-model stabilizers.

- reward: +1 when the final answer verifies against the reference (the shared verifier), else -1
- prompt selection: keep RL prompts whose pass rate (from the filter stage) lies in
  [prompt_min_pass_rate, prompt_max_pass_rate]
- prompt optimization (``rl.prompt_optimization``): before RL, sample every candidate prompt
  ``prompt_opt_samples`` times with the current model (the HF engine), over ``prompt_opt_rounds``
  rounds (each round re-samples the survivors and pools the samples), and keep the prompts whose
  measured pass rate lies in the band and whose response lengths are uniform (coefficient of
  variation <= ``prompt_opt_max_length_cv``); the kept prompts carry the measured statistics. The
  candidates (all, or a subset seeded by ``run.seed``) are the same on every rank; under N processes
  each rank samples every N-th candidate and the verdicts are all-gathered, so every rank trains on
  the same prompt set, in the same order, whatever its own sampler did
- reward rebalancing (``rl.reward_rebalancing``), inspired by DAPO: hard prompts (pass rate <=
  ``hard_pass_rate``) appear ``hard_oversample`` times per epoch; in each generation batch a group
  (the rollouts of one prompt) is dropped when its accuracy is above ``max_group_accuracy`` or its
  reward spread (population std) is below ``min_reward_spread`` (never an exact ``std == 0``
  test); in the groups that stay, every positive rollout is kept and an equal number of negatives
  is sampled. Dropped rollouts stay in the batch (shapes unchanged) with their completion masked
  out of the loss and a zero advantage; advantages are re-normalized over the kept rollouts
- temperature annealing: the rollout temperature decays linearly from temperature_start to
  temperature_end over the first ``anneal_fraction`` of the steps, then holds; it is set on the
  trainer before each step where TRL samples with it (the HF generation config, or vLLM) **and**
  where TRL computes the training log-probabilities: TRL binds the temperature of its fused LM head
  (``trl.trainer.utils.add_fused_lm_head``) when the trainer is built, so the policy, old-policy and
  reference log-probs would stay at ``temperature_start`` while vLLM samples at the annealed one.
  vLLM's importance-sampling correction then weights a rollout by exp(sum over its tokens of
  log p(T_start) - log p(T)), which drifts from 1 over thousands of tokens (towards 0: a silenced
  rollout). The trainer moves that bound temperature every step (TRL's fused head on a GPU, the plain
  head of ``thinkforge.stages.lm_head`` on a CPU); where it finds none (a TRL whose head works
  otherwise), it turns the correction off while annealing and logs a warning
- reward check (``rl.reward_check_samples`` > 0): the RL prompts' pass rate at ``temperature_end``
  before and after training, the same random numbers for both, with a paired bootstrap interval: the
  reward curve alone rises with the annealed temperature even where the policy learned nothing
- rollouts on a CPU with bf16 autocast sample through a bf16 copy of the policy, refreshed each step
  (``SamplingCopy``): autocast would re-cast every weight at every decoding step
- logged each step (and exported through thinkforge.metrics.LOG_KEYS): reward mean/std
  (``reward``, ``reward_std``), the share of zero-spread groups (``frac_reward_zero_std``, with the
  epsilon above), completion length, KL (when ``beta`` > 0: TRL computes it against a reference
  model only then), and the temperature used (``temperature``)
- rollouts: HF ``generate`` on CPU; vLLM in TRL's colocate mode on a GPU with ``rl.use_vllm``, with a
  context window of ``vllm_max_model_length`` (0: the longest RL prompt + ``max_completion_tokens``;
  vLLM's default, the model's full context, leaves no KV cache beside the trainer)
- GRPO knobs, passed to TRL's GRPOConfig under the same names: ``loss_type`` (dapo), ``scale_rewards``
  (group), ``epsilon`` (0.2) / ``epsilon_high`` (0 = epsilon), ``mask_truncated_completions`` (off),
  ``importance_sampling_level`` (token) and, with vLLM, ``vllm_importance_sampling_correction`` (on),
  ``_mode`` (sequence_mask), ``_clip_max`` (3.0), ``_clip_min`` (0 = none): TRL 1.16's defaults
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

from thinkforge.config import RLConfig, Recipe
from thinkforge.engines.sampler import sample
from thinkforge.records import RL_PROMPT_FIELDS, EmptyDataError
from thinkforge.scoring import paired_bootstrap
from thinkforge.stages.train import TrainResult, callbacks, finish, fit, load_student, on_gpu, \
    read_rows, training_args
from thinkforge.templates import render_prompt
from thinkforge.verify import Verifier

log = logging.getLogger("thinkforge.rl")


class VerifierReward:
    """+1 / -1 from the shared verifier. A class, not a closure, so it stays picklable."""

    __name__ = "verifier"

    def __init__(self, mode: str = "fallback"):
        self.mode = mode
        self._verifier: Verifier | None = None

    def __call__(self, completions: list[str], answer: list[str], answer_type: list[str] | None = None,
                 **_: Any) -> list[float]:
        if self._verifier is None:
            self._verifier = Verifier(mode=self.mode)
        types = answer_type or ["math"] * len(completions)
        verdicts = self._verifier.verify_many(list(zip(answer, completions, types)))
        return [1.0 if v.correct else -1.0 for v in verdicts]

    def close(self) -> None:
        if self._verifier is not None:
            self._verifier.close()
            self._verifier = None


# ------------------------------------------------------------------------------ temperature annealing


def annealed_temperature(step: int, total_steps: int, rl: RLConfig) -> float:
    """Linear decay start -> end over the first anneal_fraction of the steps, then constant."""
    if not rl.anneal_temperature:
        return rl.temperature_start
    horizon = max(1.0, rl.anneal_fraction * total_steps)
    frac = min(1.0, step / horizon)
    return rl.temperature_start + frac * (rl.temperature_end - rl.temperature_start)


def _temperature_callback(rl: RLConfig):
    from transformers import TrainerCallback

    class TemperatureAnnealing(TrainerCallback):
        """Sets the temperature the trainer actually samples with, before each step."""

        def __init__(self):
            self.trainer = None
            self.used: list[tuple[int, float]] = []

        def on_step_begin(self, args, state, control, **kwargs):
            temp = annealed_temperature(state.global_step, state.max_steps, rl)
            set_sampling_temperature(self.trainer, temp)
            self.used.append((state.global_step, temp))

    return TemperatureAnnealing()


def set_sampling_temperature(trainer: Any, temp: float) -> None:
    """The one temperature of a GRPO step: the sampler's (HF generation config, or vLLM) and the one the
    trainer divides the logits by when it computes the policy, old-policy and reference log-probs."""
    trainer.temperature = temp
    if getattr(trainer, "generation_config", None) is not None:
        trainer.generation_config.temperature = temp
    if isinstance(getattr(trainer, "generation_kwargs", None), dict):
        trainer.generation_kwargs["temperature"] = temp
    if getattr(trainer, "vllm_generation", None) is not None:
        trainer.vllm_generation.temperature = temp
    follow = getattr(trainer, "follow_temperature", None)
    if follow is not None:
        follow(temp)


#: The log-prob heads that bind a temperature: TRL's fused head (``trl.trainer.utils.add_fused_lm_head``,
#: on a GPU) and the plain head thinkforge puts in its place on a CPU (``thinkforge.stages.lm_head``).
_LOGPROB_HEADS = ("add_fused_lm_head.<locals>._fused_forward", "_plain_forward.<locals>.forward")


def fused_head_temperature_cells(model: Any) -> list[Any]:
    """The closure cells holding the temperature of the log-prob head on ``model``.

    ``add_fused_lm_head(model, temperature=...)`` replaces ``model.forward`` with a closure that reads
    ``temperature`` from its enclosing scope on every call (``model(..., fused_lm_head=True)`` is how
    GRPOTrainer computes every per-token log-prob); so does the CPU head of ``thinkforge.stages.lm_head``.
    Setting the cell moves the temperature of every later call, through any wrapper accelerate adds around
    the forward. Returns [] when no such head is found (a TRL whose head works otherwise)."""
    cells: list[Any] = []
    targets = [model, getattr(model, "module", None)]  # DeepSpeed's engine keeps the model as .module
    for m in list(targets):
        base = getattr(m, "get_base_model", None)  # PEFT: TRL patches the base model
        if callable(base):
            targets.append(base())
    for m in targets:
        fn = getattr(m, "forward", None)
        fn = getattr(fn, "__func__", fn)
        for _ in range(16):  # down the __wrapped__ chain of decorators (autocast, fp32 outputs)
            code = getattr(fn, "__code__", None)
            if code is not None and getattr(code, "co_qualname", code.co_name) in _LOGPROB_HEADS \
                    and "temperature" in code.co_freevars:
                cell = fn.__closure__[code.co_freevars.index("temperature")]
                if all(cell is not c for c in cells):
                    cells.append(cell)
                break
            fn = getattr(fn, "__wrapped__", None)
            if fn is None:
                break
    return cells


# ---------------------------------------------------------------------------------- sampling copy


class SamplingCopy:
    """A bfloat16 copy of a float32 policy that samples on a CPU, its weights refreshed from the policy
    before each use. Under bf16 autocast every decoding step re-casts every weight (measured on
    SmolLM2-135M, 16 rollouts of <= 64 tokens, 2 cores: 9.0 s under autocast, 3.8-4.4 s through this copy;
    the refresh costs 0.05 s). Built from the config, not deep-copied: the policy's forward is a closure
    over the policy (the log-prob head), which a deep copy would keep calling."""

    def __init__(self, model: Any):
        import torch
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_config(model.config, dtype=torch.bfloat16).eval()
        self.model.generation_config = model.generation_config
        self.pairs: list[tuple[Any, Any]] = []
        own = dict(self.model.named_parameters())
        for name, param in model.named_parameters():
            if name not in own:
                raise RuntimeError(f"rl: sampling copy of {type(model).__name__} has no parameter {name!r}")
            self.pairs.append((own[name], param))
        own_bufs = dict(self.model.named_buffers())
        with torch.no_grad():
            for name, buf in model.named_buffers():  # rotary frequencies and the like: copied once
                mine = own_bufs.get(name)
                if mine is not None and mine.shape == buf.shape:
                    mine.copy_(buf)

    @staticmethod
    def applies(model: Any, bf16: bool) -> bool:
        """On a CPU, when training runs bf16 autocast over float32 weights."""
        import torch

        return bf16 and not on_gpu() and next(model.parameters()).dtype == torch.float32

    def refreshed(self) -> Any:
        import torch

        with torch.no_grad():
            for mine, theirs in self.pairs:
                mine.copy_(theirs)
        return self.model


def sampling_model(model: Any, bf16: bool, copy: SamplingCopy | None = None) -> Any:
    """What samples for ``model``: its bf16 copy, refreshed (the stage's one copy, or a new one where
    SamplingCopy applies), else the model itself."""
    if copy is None and SamplingCopy.applies(model, bf16):
        copy = SamplingCopy(model)
    return copy.refreshed() if copy is not None else model


# ---------------------------------------------------------------------------------- prompt selection


def select_prompts(rows: list[dict[str, Any]], rl: RLConfig) -> list[dict[str, Any]]:
    keep = [r for r in rows if rl.prompt_min_pass_rate <= r.get("pass_rate", 0.0) <= rl.prompt_max_pass_rate]
    if not keep:
        raise EmptyDataError(
            f"RL prompt selection kept 0 of {len(rows)} prompts: no pass rate in "
            f"[{rl.prompt_min_pass_rate}, {rl.prompt_max_pass_rate}]"
        )
    return keep


def length_cv(lengths: list[int]) -> float:
    """Coefficient of variation (population std / mean) of response lengths; 0 for fewer than 2."""
    if len(lengths) < 2:
        return 0.0
    mean = statistics.fmean(lengths)
    return statistics.pstdev(lengths) / mean if mean > 0 else 0.0


def prompt_candidates(rows: list[dict[str, Any]], rl: RLConfig, seed: int) -> list[dict[str, Any]]:
    """The prompts prompt optimization samples: all, or ``prompt_opt_max_candidates`` of them drawn with
    ``seed`` alone (never the rank), in their original order, so every rank computes the same list."""
    import random

    n = rl.prompt_opt_max_candidates
    if not n or len(rows) <= n:
        return list(rows)
    picked = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in picked]


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) of this training process. Under a launcher (WORLD_SIZE > 1) the process group is
    brought up the way the Trainer would (accelerate's PartialState), or with torch.distributed itself."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        from accelerate import PartialState

        PartialState()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _all_gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def optimize_prompts(cfg: Recipe, model: Any, tokenizer: Any, rows: list[dict[str, Any]],
                     verifier: Verifier | None = None,
                     copy: SamplingCopy | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sample candidates with the current model and keep those inside the pass-rate band whose response
    lengths are uniform. Returns (kept rows with measured pass_rate/mean_length/length_cv, stats).

    Every rank returns the same kept rows in the same order: under N processes rank k samples and judges
    candidates k, k+N, ... (an N-th of the work each), and the verdicts are all-gathered. Samplers are not
    bitwise reproducible across GPUs, so ranks that each judged every candidate would keep different sets
    (and the Trainer's sampler, which assumes one dataset on every rank, would mix them)."""
    from thinkforge.engines.base import SamplingParams
    from thinkforge.engines.hf import HFEngine

    r = cfg.rl
    candidates = prompt_candidates(rows, r, cfg.run.seed)
    rank, world = distributed_rank_world()
    mine = list(range(rank, len(candidates), world))  # indices into candidates
    if on_gpu():  # sample on this process's GPU, where the Trainer would put the policy anyway
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    engine = HFEngine(sampling_model(model, r.bf16, copy), cfg.template, tokenizer=tokenizer,
                      batch_size=max(r.prompt_opt_samples, 32))
    own = verifier is None
    verifier = verifier or Verifier(mode=cfg.extraction(cfg.rl.reward_extraction))
    samples: dict[int, list[tuple[bool, int]]] = {i: [] for i in mine}
    alive = list(mine)
    rounds: list[dict[str, int]] = []
    reasons = {"pass_rate_low": 0, "pass_rate_high": 0, "length_spread": 0}

    def verdict(i: int) -> str | None:
        s = samples[i]
        rate = sum(ok for ok, _ in s) / len(s)
        if rate < r.prompt_min_pass_rate:
            return "pass_rate_low"
        if rate > r.prompt_max_pass_rate:
            return "pass_rate_high"
        if length_cv([n for _, n in s]) > r.prompt_opt_max_length_cv:
            return "length_spread"
        return None

    try:
        for rnd in range(r.prompt_opt_rounds):
            before = len(alive)
            if alive:
                params = SamplingParams(n=r.prompt_opt_samples, temperature=r.temperature_start, top_p=r.top_p,
                                        max_new_tokens=r.max_completion_tokens, seed=cfg.run.seed * 1000 + rnd)
                outs = engine.generate([candidates[i]["problem"] for i in alive], params)
                items = [(candidates[i]["answer"], o.text, candidates[i].get("answer_type", "math"))
                         for i, os_ in zip(alive, outs) for o in os_]
                verdicts = iter(verifier.verify_many(items))
                for i, os_ in zip(alive, outs):
                    samples[i].extend((next(verdicts).correct, o.num_tokens) for o in os_)
            survivors = []
            for i in alive:
                why = verdict(i)
                if why is None:
                    survivors.append(i)
                elif rnd == r.prompt_opt_rounds - 1 or why != "length_spread":
                    reasons[why] += 1  # a spread may still settle with more samples; a band miss rarely does
                else:
                    survivors.append(i)
            alive = survivors if rnd < r.prompt_opt_rounds - 1 else [i for i in survivors if verdict(i) is None]
            rounds.append({"round": rnd, "sampled": before, "kept": len(alive)})
    finally:
        model.train()
        if own:
            verifier.close()
    local = []
    for i in alive:
        s = samples[i]
        lengths = [n for _, n in s]
        local.append((i, {"pass_rate": sum(ok for ok, _ in s) / len(s), "mean_length": statistics.fmean(lengths),
                          "length_cv": length_cv(lengths)}))
    parts = _all_gather({"kept": local, "rounds": rounds, "dropped": reasons}, world)
    kept = [{**candidates[i], **measured} for i, measured in sorted(k for part in parts for k in part["kept"])]
    rounds = [{"round": rnd, "sampled": sum(p["rounds"][rnd]["sampled"] for p in parts),
               "kept": sum(p["rounds"][rnd]["kept"] for p in parts)} for rnd in range(r.prompt_opt_rounds)]
    reasons = {k: sum(p["dropped"][k] for p in parts) for k in reasons}
    stats = {"candidates": len(candidates), "kept": len(kept), "rounds": rounds, "dropped": reasons, "ranks": world}
    if not kept:
        raise EmptyDataError(
            f"RL prompt optimization kept 0 of {len(candidates)} prompts (pass rate band "
            f"[{r.prompt_min_pass_rate}, {r.prompt_max_pass_rate}], length CV <= {r.prompt_opt_max_length_cv}): "
            + ", ".join(f"{k}={v}" for k, v in reasons.items())
        )
    return kept, stats


def pass_rates(cfg: Recipe, model: Any, tokenizer: Any, rows: list[dict[str, Any]], verifier: Verifier,
               copy: SamplingCopy | None = None) -> dict[str, float]:
    """Each prompt's pass rate (by id) over ``reward_check_samples`` rollouts at ``temperature_end``, seeded
    by ``run.seed`` alone: before and after training the same prompts draw the same random numbers, so
    their difference is the policy's."""
    from thinkforge.engines.base import SamplingParams
    from thinkforge.engines.hf import HFEngine

    r = cfg.rl
    was_training = model.training
    try:
        engine = HFEngine(sampling_model(model, r.bf16, copy), cfg.template, tokenizer=tokenizer, batch_size=max(r.reward_check_samples, 32))
        params = SamplingParams(n=r.reward_check_samples, temperature=r.temperature_end, top_p=r.top_p,
                                max_new_tokens=r.max_completion_tokens, seed=cfg.run.seed)
        outs = engine.generate([x["problem"] for x in rows], params)
    finally:
        model.train(was_training)
    verdicts = iter(verifier.verify_many([(x["answer"], o.text, x.get("answer_type", "math"))
                                          for x, os_ in zip(rows, outs) for o in os_]))
    return {x["id"]: sum(next(verdicts).correct for _ in os_) / len(os_) for x, os_ in zip(rows, outs)}


def reward_check_rows(rows: list[dict[str, Any]], rl: RLConfig) -> list[dict[str, Any]]:
    """The first ``reward_check_prompts`` distinct RL prompts (oversampling repeats some)."""
    seen: dict[str, dict[str, Any]] = {}
    for row in rows:
        seen.setdefault(row["id"], row)
    return list(seen.values())[:rl.reward_check_prompts]


def oversample_hard(rows: list[dict[str, Any]], rl: RLConfig) -> list[dict[str, Any]]:
    """Hard prompts (pass rate <= hard_pass_rate) repeated hard_oversample times."""
    out = []
    for row in rows:
        times = rl.hard_oversample if row.get("pass_rate", 0.0) <= rl.hard_pass_rate else 1
        out.extend([row] * times)
    return out


# --------------------------------------------------------------------------------- reward rebalancing


def rebalance_mask(rewards: Any, group_size: int, rl: RLConfig, generator: Any = None,
                   rebalance: bool = True) -> tuple[Any, dict[str, float]]:
    """Which rollouts train, for rewards (global, grouped by prompt in runs of ``group_size``).

    Returns (keep: bool tensor like ``rewards``, stats). Zero-spread groups (population std below
    ``min_reward_spread``) are counted always and dropped when ``rebalance``; so are groups whose
    accuracy (share of positive rewards) is above ``max_group_accuracy``. In a kept group every positive
    rollout stays and an equal number of negatives is drawn at random (``generator``)."""
    import torch

    groups = rewards.view(-1, group_size)
    spread = groups.std(dim=1, unbiased=False)
    zero = spread < rl.min_reward_spread  # an epsilon, never an exact std == 0 test
    acc = (groups > 0).float().mean(dim=1)
    easy = acc > rl.max_group_accuracy
    keep = torch.ones_like(groups, dtype=torch.bool)
    if rebalance:
        keep[zero | easy] = False
        for g in range(groups.size(0)):
            if zero[g] or easy[g]:
                continue
            pos = (groups[g] > 0).nonzero().flatten()
            neg = (groups[g] <= 0).nonzero().flatten()
            if len(neg) > len(pos):
                order = torch.randperm(len(neg), generator=generator)
                keep[g, neg[order[len(pos):]]] = False
    stats = {
        "zero_spread_fraction": zero.float().mean().item(),
        "easy_group_fraction": (easy & ~zero).float().mean().item(),
        "kept_fraction": keep.float().mean().item(),
    }
    return keep.view(-1), stats


def regroup_advantages(rewards: Any, keep: Any, group_size: int, scale: str) -> Any:
    """GRPO advantages over the kept rollouts of each group (dropped ones get 0)."""
    import torch

    r = rewards.view(-1, group_size)
    k = keep.view(-1, group_size).float()
    n = k.sum(dim=1, keepdim=True).clamp(min=1.0)
    mean = (r * k).sum(dim=1, keepdim=True) / n
    adv = r - mean
    if scale == "group":
        std = torch.sqrt(((r - mean) ** 2 * k).sum(dim=1, keepdim=True) / n)
        adv = adv / (std + 1e-4)
    elif scale == "batch":
        kept = rewards[keep]
        std = kept.std(unbiased=False) if kept.numel() > 1 else torch.tensor(0.0)
        adv = adv / (std + 1e-4)
    return (adv * k).view(-1)


_TRAINER_CLASS: type | None = None


def _trainer_class() -> type:
    global _TRAINER_CLASS
    if _TRAINER_CLASS is None:
        _TRAINER_CLASS = _define_trainer_class()
    return _TRAINER_CLASS


def _define_trainer_class() -> type:
    from trl import GRPOTrainer

    class StabilizedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with the paper's reward rebalancing and per-step logs of what sampling used."""

        def __init__(self, *args: Any, rl_config: RLConfig, rebalance: bool,
                     sampling_copy: SamplingCopy | None = None, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.rl_config = rl_config
            self.rebalance = rebalance
            self._last_rewards_per_func = None
            self.rebalance_log: list[dict[str, float]] = []
            self.logprob_temperature_follows = False
            self.importance_sampling_off_reason = ""
            self.sampling_copy = sampling_copy  # bf16 rollouts on a CPU (SamplingCopy); None: the policy samples
            self.follow_temperature(float(self.temperature))

        def follow_temperature(self, temp: float) -> None:
            """Move the temperature bound into the log-prob head of the policy (and of the reference model) to
            ``temp``. Looked up on every call: on a CPU the stage swaps TRL's head for a plain one before
            training. Where no head is found while annealing, vLLM's importance-sampling correction goes off."""
            policy = fused_head_temperature_cells(self.model)
            ref = fused_head_temperature_cells(self.ref_model) if getattr(self, "ref_model", None) is not None else []
            for cell in policy + ref:
                cell.cell_contents = temp
            self.logprob_temperature_follows = bool(policy)
            r = self.rl_config
            if policy or not (r.anneal_temperature and r.temperature_start != r.temperature_end):
                return
            if not getattr(self, "_warned_unfollowed", False):
                self._warned_unfollowed = True
                log.warning("rl: the log-prob temperature could not be found on the model: the training log-probs "
                            "stay at temperature_start=%s while sampling anneals", r.temperature_start)
            if self.use_vllm and self.vllm_importance_sampling_correction:
                # exp(sum log p(T_start) - log p(T)) over a long rollout is no correction: turn it off.
                self.vllm_importance_sampling_correction = False
                self.importance_sampling_off_reason = (
                    "vLLM importance-sampling correction turned off while annealing: the training log-probs "
                    "cannot follow the sampling temperature in this TRL")
                log.warning("rl: %s", self.importance_sampling_off_reason)

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            """Rollouts through thinkforge's sampler (thinkforge.engines.sampler: the same nucleus distribution,
            finished rows leave the batch; bench_sampling.py) where TRL would call `generate`; vLLM, continuous
            batching, images and sampling options the sampler does not implement keep TRL's own path."""
            import torch
            from trl.models import unwrap_model_for_generation
            from trl.trainer.utils import pad

            gc = getattr(self, "generation_config", None)  # absent where vLLM samples
            plain = gc is not None and (getattr(gc, "top_k", None) in (None, 0) and getattr(gc, "min_p", None) is None
                                        and getattr(gc, "repetition_penalty", None) in (None, 1.0) and gc.do_sample)
            if (self.use_vllm or getattr(self, "use_transformers_continuous_batching", False) or images
                    or multimodal_fields or not plain):
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                     has_tool_images)
            rows = [torch.tensor(ids) for ids in prompt_ids]
            ids = pad(rows, padding_value=self._tokenizer.pad_token_id, padding_side="left")
            mask = pad([torch.ones_like(t) for t in rows], padding_value=0, padding_side="left")
            device = self.accelerator.device
            with (unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                              gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                                              generation_kwargs=self.generation_kwargs,
                                              gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs)
                  as unwrapped, torch.no_grad(), self._dist.summon_full_params(self.model_wrapped, recurse=False)):
                # bf16 sampling where training runs in bf16 (as vLLM samples): a bf16 copy on a CPU, else autocast
                policy = self.sampling_copy.refreshed() if self.sampling_copy is not None else unwrapped
                with contextlib.nullcontext() if self.sampling_copy is not None else self.accelerator.autocast():
                    completions = sample(policy, ids.to(device), mask.to(device), n=1, temperature=gc.temperature,
                                         top_p=gc.top_p if gc.top_p is not None else 1.0,
                                         max_new_tokens=self.max_completion_length,
                                         eos_ids=set(self.eos_token_ids),
                                         generator=None)  # the global RNG, as TRL's generate: checkpoints restore it
            return completions, None

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            out = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            self._last_rewards_per_func = out  # gathered over all processes
            return out

        def _sampling_temperature(self) -> float:
            if self.use_vllm and getattr(self, "vllm_generation", None) is not None:
                return float(self.vllm_generation.temperature)
            gc = getattr(self, "generation_config", None)
            return float(gc.temperature if gc is not None and gc.temperature is not None else self.temperature)

        def _generate_and_score_completions(self, inputs):
            import torch

            temperature = self._sampling_temperature()
            out = super()._generate_and_score_completions(inputs)
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["temperature"].append(temperature)
            rpf = self._last_rewards_per_func
            if rpf is None:
                return out
            weights = self.reward_weights.to(rpf.device).unsqueeze(0)
            rewards = torch.nan_to_num((rpf * weights).nansum(dim=1), nan=-1.0)
            group = self.num_generations if mode == "train" else self.num_generations_eval
            gen = torch.Generator().manual_seed(int(self.args.seed) * 100003 + int(self.state.global_step))
            keep, stats = rebalance_mask(rewards.cpu(), group, self.rl_config, gen,
                                         rebalance=self.rebalance and mode == "train")
            # TRL's own share uses isclose(std, 0); report the epsilon-based one (the same number the drop uses).
            zs = self._metrics[mode].get("frac_reward_zero_std")
            if zs:
                zs[-1] = stats["zero_spread_fraction"]
            if self.rebalance and mode == "train":
                n_local = out["completion_mask"].size(0)
                part = slice(self.accelerator.process_index * n_local, (self.accelerator.process_index + 1) * n_local)
                keep_local = keep[part].to(out["completion_mask"].device)
                adv = regroup_advantages(rewards.cpu(), keep, group, self.scale_rewards)[part]
                out["advantages"] = adv.to(out["advantages"].device, out["advantages"].dtype)
                out["completion_mask"] = out["completion_mask"] * keep_local.unsqueeze(1).to(out["completion_mask"].dtype)
                loss_mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
                out["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
                for k in ("easy_group_fraction", "kept_fraction"):
                    self._metrics[mode][f"rebalance/{k}"].append(stats[k])
            self.rebalance_log.append(stats)
            return out

    return StabilizedGRPOTrainer


# ------------------------------------------------------------------------------------------- the stage


def vllm_window(rl: RLConfig, prompt_lengths: list[int]) -> int:
    """The colocated vLLM engine's context window (``max_model_len``) for these prompt token counts:
    ``rl.vllm_max_model_length``, or the longest prompt plus ``max_completion_tokens`` when that is 0."""
    longest = max(prompt_lengths, default=0)
    if not rl.vllm_max_model_length:
        return longest + rl.max_completion_tokens
    if longest >= rl.vllm_max_model_length:
        raise ValueError(f"rl.vllm_max_model_length ({rl.vllm_max_model_length}) leaves no room for a completion: the "
                         f"longest RL prompt has {longest} tokens")
    over = sum(n + rl.max_completion_tokens > rl.vllm_max_model_length for n in prompt_lengths)
    if over:
        log.warning("rl: %d of %d prompts leave less than max_completion_tokens=%d in vllm_max_model_length=%d: "
                    "their rollouts end at the window", over, len(prompt_lengths), rl.max_completion_tokens,
                    rl.vllm_max_model_length)
    return rl.vllm_max_model_length


def rl(cfg: Recipe, model_path: str | Path, prompts_path: str | Path, out_dir: str | Path,
       metrics: Any = None) -> TrainResult:
    from datasets import Dataset
    from trl import GRPOConfig

    r = cfg.rl
    start = time.time()
    if r.use_vllm and not on_gpu():
        raise RuntimeError("rl.use_vllm needs a CUDA GPU (vLLM rollouts in TRL's colocate mode); "
                           "set rl.use_vllm=false to sample with transformers on this machine")
    model, tok = load_student(cfg, model_path)
    copy = SamplingCopy(model) if SamplingCopy.applies(model, r.bf16) else None  # one per stage: 2 bytes a weight
    rows = select_prompts(read_rows(prompts_path, RL_PROMPT_FIELDS, "rl"), r)
    extra: dict[str, Any] = {}
    if r.prompt_optimization:
        rows, extra["prompt_optimization"] = optimize_prompts(cfg, model, tok, rows, copy=copy)
        log.info("rl: prompt optimization kept %d of %d prompts", len(rows), extra["prompt_optimization"]["candidates"])
    if r.reward_rebalancing:
        n = len(rows)
        rows = oversample_hard(rows, r)
        extra["oversampled"] = len(rows) - n
    prompts = [render_prompt(tok, x["problem"], cfg.template) for x in rows]
    data = Dataset.from_dict({
        "prompt": prompts,
        "answer": [x["answer"] for x in rows],
        "answer_type": [x.get("answer_type", "math") for x in rows],
    }).shuffle(seed=cfg.run.seed)
    vllm: dict[str, Any] = {}
    if r.use_vllm:
        # TRL tokenizes a text prompt with the tokenizer's defaults: count the same way
        window = vllm_window(r, [len(ids) for ids in tok(text=prompts)["input_ids"]])
        extra["vllm_max_model_length"] = window
        vllm = dict(
            vllm_mode="colocate", vllm_gpu_memory_utilization=r.vllm_gpu_memory_utilization,
            vllm_max_model_length=window,
            vllm_importance_sampling_correction=r.vllm_importance_sampling_correction,
            vllm_importance_sampling_mode=r.vllm_importance_sampling_mode,
            vllm_importance_sampling_clip_max=r.vllm_importance_sampling_clip_max,
            vllm_importance_sampling_clip_min=r.vllm_importance_sampling_clip_min or None,
        )
    args = training_args(
        GRPOConfig, cfg, "rl", Path(out_dir) / "trainer",
        num_generations=r.num_generations, max_completion_length=r.max_completion_tokens,
        temperature=r.temperature_start, top_p=r.top_p, beta=r.beta, use_vllm=r.use_vllm,
        loss_type=r.loss_type, scale_rewards=r.scale_rewards, epsilon=r.epsilon,
        epsilon_high=r.epsilon_high or None, mask_truncated_completions=r.mask_truncated_completions,
        importance_sampling_level=r.importance_sampling_level,
        log_completions=False, **vllm,
    )
    checker = None
    if r.reward_check_samples and distributed_rank_world()[1] > 1:
        extra["reward_check"] = {"skipped": "needs one process (the policy's weights are sharded or replicated)"}
    elif r.reward_check_samples:
        checker = Verifier(mode=cfg.extraction(r.reward_extraction))
    reward = VerifierReward(cfg.extraction(cfg.rl.reward_extraction))
    anneal = _temperature_callback(r)
    try:
        if checker is not None:
            check_rows = reward_check_rows(rows, r)
            before = pass_rates(cfg, model, tok, check_rows, checker, copy)
        trainer = _trainer_class()(model=model, reward_funcs=[reward], args=args, train_dataset=data,
                                   processing_class=tok, callbacks=[anneal, *callbacks(metrics, model)],
                                   rl_config=r, rebalance=r.reward_rebalancing, sampling_copy=copy)
        anneal.trainer = trainer
        info = fit(trainer, cfg, "rl", t=r, model_path=model_path, data_path=prompts_path,
                   work_dir=Path(out_dir) / "trainer", metrics=metrics)
        if checker is not None:
            after = pass_rates(cfg, trainer.model, tok, check_rows, checker, copy)
            extra["reward_check"] = {
                "prompts": len(check_rows), "samples": r.reward_check_samples, "temperature": r.temperature_end,
                "before": statistics.fmean(before.values()), "after": statistics.fmean(after.values()),
                **paired_bootstrap(before, after, seed=cfg.run.seed)}
            log.info("rl: reward check on %d prompts at T=%s: pass rate %.3f -> %.3f", len(check_rows),
                     r.temperature_end, extra["reward_check"]["before"], extra["reward_check"]["after"])
    finally:
        reward.close()
        if checker is not None:
            checker.close()
    extra["logprob_temperature_follows"] = trainer.logprob_temperature_follows
    if trainer.importance_sampling_off_reason:
        extra["importance_sampling_off"] = trainer.importance_sampling_off_reason
    used = [h["temperature"] for h in trainer.state.log_history if "temperature" in h]
    return finish(trainer, tok, out_dir, len(rows), start, metric="reward", cfg=cfg,
                  temperatures=[t for _, t in anneal.used], sampled_temperatures=used, **extra, **info)
