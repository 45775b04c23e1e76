"""Stage 6, RL: GRPO with a +1/-1 verifiable reward and the paper's small-model stabilizers.

- reward: +1 when the final answer verifies against the reference (the shared verifier), else -1
- prompt selection: keep RL prompts whose pass rate lies in [prompt_min_pass_rate, prompt_max_pass_rate]
  (prompts every rollout solves carry no gradient; neither do prompts none solves)
- temperature annealing: rollout temperature decays linearly from temperature_start to temperature_end
  over the first `anneal_fraction` of the steps, then holds
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from thinkforge.config import RLConfig, Recipe
from thinkforge.records import RL_PROMPT_FIELDS, EmptyDataError
from thinkforge.stages.train import TrainResult, callbacks, finish, load_student, read_rows, training_args
from thinkforge.templates import render_prompt
from thinkforge.verify import Verifier


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

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is not None and self.used:
                logs["temperature"] = self.used[-1][1]

    return TemperatureAnnealing()


def select_prompts(rows: list[dict[str, Any]], rl: RLConfig) -> list[dict[str, Any]]:
    keep = [r for r in rows if rl.prompt_min_pass_rate <= r.get("pass_rate", 0.0) <= rl.prompt_max_pass_rate]
    if not keep:
        raise EmptyDataError(
            f"RL prompt selection kept 0 of {len(rows)} prompts: no pass rate in "
            f"[{rl.prompt_min_pass_rate}, {rl.prompt_max_pass_rate}]"
        )
    return keep


def rl(cfg: Recipe, model_path: str | Path, prompts_path: str | Path, out_dir: str | Path,
       metrics: Any = None) -> TrainResult:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    r = cfg.rl
    start = time.time()
    model, tok = load_student(cfg, model_path)
    rows = select_prompts(read_rows(prompts_path, RL_PROMPT_FIELDS, "rl"), r)
    data = Dataset.from_dict({
        "prompt": [render_prompt(tok, x["problem"], cfg.template) for x in rows],
        "answer": [x["answer"] for x in rows],
        "answer_type": [x.get("answer_type", "math") for x in rows],
    }).shuffle(seed=cfg.run.seed)
    args = training_args(
        GRPOConfig, r, Path(out_dir) / "trainer", cfg.run.seed,
        num_generations=r.num_generations, max_completion_length=r.max_completion_tokens,
        temperature=r.temperature_start, top_p=r.top_p, beta=r.beta, use_vllm=r.use_vllm,
        vllm_mode="colocate", log_completions=False,
    )
    reward = VerifierReward(cfg.evaluate.extraction)
    anneal = _temperature_callback(r)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=data,
                          processing_class=tok, callbacks=[anneal, *callbacks(metrics, model)])
    anneal.trainer = trainer
    try:
        trainer.train()
    finally:
        reward.close()
    return finish(trainer, tok, out_dir, len(rows), start, metric="reward",
                  temperatures=[t for _, t in anneal.used])
