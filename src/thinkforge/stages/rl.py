"""Stage 6, RL: GRPO with a +1/-1 verifiable reward and the paper's small-model stabilizers.

- reward: +1 when the final answer verifies against the reference (the shared verifier), else -1
- prompt selection: keep RL prompts whose pass rate (from the filter stage) lies in
  [prompt_min_pass_rate, prompt_max_pass_rate]
- prompt optimization (``rl.prompt_optimization``): before RL, sample every candidate prompt
  ``prompt_opt_samples`` times with the current model (the HF engine), over ``prompt_opt_rounds``
  rounds (each round re-samples the survivors and pools the samples), and keep the prompts whose
  measured pass rate lies in the band and whose response lengths are uniform (coefficient of
  variation <= ``prompt_opt_max_length_cv``); the kept prompts carry the measured statistics
- reward rebalancing (``rl.reward_rebalancing``), inspired by DAPO: hard prompts (pass rate <=
  ``hard_pass_rate``) appear ``hard_oversample`` times per epoch; in each generation batch a group
  (the rollouts of one prompt) is dropped when its accuracy is above ``max_group_accuracy`` or its
  reward spread (population std) is below ``min_reward_spread`` (never an exact ``std == 0``
  test); in the groups that stay, every positive rollout is kept and an equal number of negatives
  is sampled. Dropped rollouts stay in the batch (shapes unchanged) with their completion masked
  out of the loss and a zero advantage; advantages are re-normalized over the kept rollouts
- temperature annealing: the rollout temperature decays linearly from temperature_start to
  temperature_end over the first ``anneal_fraction`` of the steps, then holds; it is set on the
  trainer before each step where TRL samples with it (the HF generation config, or vLLM)
- logged each step (and exported through thinkforge.metrics.LOG_KEYS): reward mean/std
  (``reward``, ``reward_std``), the share of zero-spread groups (``frac_reward_zero_std``, with the
  epsilon above), completion length, KL (when ``beta`` > 0: TRL computes it against a reference
  model only then), and the temperature used (``temperature``)
- rollouts: HF ``generate`` on CPU; vLLM in TRL's colocate mode on a GPU with ``rl.use_vllm``

TRL computes the training log-probabilities at the temperature it was built with
(``temperature_start``); annealing changes the sampling temperature only.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

from thinkforge.config import RLConfig, Recipe
from thinkforge.records import RL_PROMPT_FIELDS, EmptyDataError
from thinkforge.stages.train import TrainResult, callbacks, checkpointing, finish, fit, load_student, on_gpu, \
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
            tr = self.trainer
            tr.temperature = temp
            if getattr(tr, "generation_config", None) is not None:
                tr.generation_config.temperature = temp
            if isinstance(getattr(tr, "generation_kwargs", None), dict):
                tr.generation_kwargs["temperature"] = temp
            if getattr(tr, "vllm_generation", None) is not None:
                tr.vllm_generation.temperature = temp
            self.used.append((state.global_step, temp))

    return TemperatureAnnealing()


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


def optimize_prompts(cfg: Recipe, model: Any, tokenizer: Any, rows: list[dict[str, Any]],
                     verifier: Verifier | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sample candidates with the current model and keep those inside the pass-rate band whose response
    lengths are uniform. Returns (kept rows with measured pass_rate/mean_length/length_cv, stats)."""
    from thinkforge.engines.base import SamplingParams
    from thinkforge.engines.hf import HFEngine

    r = cfg.rl
    candidates = rows[:r.prompt_opt_max_candidates] if r.prompt_opt_max_candidates else list(rows)
    if on_gpu():  # sample on this process's GPU, where the Trainer would put the policy anyway
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    engine = HFEngine(model, cfg.template, tokenizer=tokenizer, batch_size=max(r.prompt_opt_samples, 32))
    own = verifier is None
    verifier = verifier or Verifier(mode=cfg.evaluate.extraction)
    samples: dict[str, list[tuple[bool, int]]] = {c["id"]: [] for c in candidates}
    alive = list(candidates)
    rounds: list[dict[str, int]] = []
    reasons = {"pass_rate_low": 0, "pass_rate_high": 0, "length_spread": 0}

    def verdict(c: dict[str, Any]) -> str | None:
        s = samples[c["id"]]
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
            params = SamplingParams(n=r.prompt_opt_samples, temperature=r.temperature_start, top_p=r.top_p,
                                    max_new_tokens=r.max_completion_tokens, seed=cfg.run.seed * 1000 + rnd)
            outs = engine.generate([c["problem"] for c in alive], params)
            items = [(c["answer"], o.text, c.get("answer_type", "math")) for c, os_ in zip(alive, outs) for o in os_]
            verdicts = iter(verifier.verify_many(items))
            for c, os_ in zip(alive, outs):
                samples[c["id"]].extend((next(verdicts).correct, o.num_tokens) for o in os_)
            before = len(alive)
            survivors = []
            for c in alive:
                why = verdict(c)
                if why is None:
                    survivors.append(c)
                elif rnd == r.prompt_opt_rounds - 1 or why != "length_spread":
                    reasons[why] += 1  # a spread may still settle with more samples; a band miss rarely does
                else:
                    survivors.append(c)
            alive = survivors if rnd < r.prompt_opt_rounds - 1 else [c for c in survivors if verdict(c) is None]
            rounds.append({"round": rnd, "sampled": before, "kept": len(alive)})
    finally:
        model.train()
        if own:
            verifier.close()
    kept = []
    for c in alive:
        s = samples[c["id"]]
        lengths = [n for _, n in s]
        kept.append({**c, "pass_rate": sum(ok for ok, _ in s) / len(s), "mean_length": statistics.fmean(lengths),
                     "length_cv": length_cv(lengths)})
    stats = {"candidates": len(candidates), "kept": len(kept), "rounds": rounds, "dropped": reasons}
    if not kept:
        raise EmptyDataError(
            f"RL prompt optimization kept 0 of {len(candidates)} prompts (pass rate band "
            f"[{r.prompt_min_pass_rate}, {r.prompt_max_pass_rate}], length CV <= {r.prompt_opt_max_length_cv}): "
            + ", ".join(f"{k}={v}" for k, v in reasons.items())
        )
    return kept, stats


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

        def __init__(self, *args: Any, rl_config: RLConfig, rebalance: bool, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.rl_config = rl_config
            self.rebalance = rebalance
            self._last_rewards_per_func = None
            self.rebalance_log: list[dict[str, float]] = []

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
    rows = select_prompts(read_rows(prompts_path, RL_PROMPT_FIELDS, "rl"), r)
    extra: dict[str, Any] = {}
    if r.prompt_optimization:
        rows, extra["prompt_optimization"] = optimize_prompts(cfg, model, tok, rows)
        log.info("rl: prompt optimization kept %d of %d prompts", len(rows), extra["prompt_optimization"]["candidates"])
    if r.reward_rebalancing:
        n = len(rows)
        rows = oversample_hard(rows, r)
        extra["oversampled"] = len(rows) - n
    data = Dataset.from_dict({
        "prompt": [render_prompt(tok, x["problem"], cfg.template) for x in rows],
        "answer": [x["answer"] for x in rows],
        "answer_type": [x.get("answer_type", "math") for x in rows],
    }).shuffle(seed=cfg.run.seed)
    vllm = dict(vllm_mode="colocate", vllm_gpu_memory_utilization=r.vllm_gpu_memory_utilization) if r.use_vllm else {}
    args = training_args(
        GRPOConfig, r, Path(out_dir) / "trainer", cfg.run.seed, checkpoints=checkpointing(cfg, r),
        num_generations=r.num_generations, max_completion_length=r.max_completion_tokens,
        temperature=r.temperature_start, top_p=r.top_p, beta=r.beta, use_vllm=r.use_vllm,
        log_completions=False, **vllm,
    )
    reward = VerifierReward(cfg.evaluate.extraction)
    anneal = _temperature_callback(r)
    trainer = _trainer_class()(model=model, reward_funcs=[reward], args=args, train_dataset=data,
                               processing_class=tok, callbacks=[anneal, *callbacks(metrics, model)],
                               rl_config=r, rebalance=r.reward_rebalancing)
    anneal.trainer = trainer
    try:
        info = fit(trainer, cfg, "rl", t=r, model_path=model_path, data_path=prompts_path,
                   work_dir=Path(out_dir) / "trainer", metrics=metrics)
    finally:
        reward.close()
    used = [h["temperature"] for h in trainer.state.log_history if "temperature" in h]
    return finish(trainer, tok, out_dir, len(rows), start, metric="reward",
                  temperatures=[t for _, t in anneal.used], sampled_temperatures=used, **extra, **info)
