"""Stage 1, generate: sample chain-of-thought rollouts of the training problems from the teacher."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from thinkforge.config import Recipe
from thinkforge.engines import SamplingParams, make_engine
from thinkforge.metrics import StageMetrics
from thinkforge.progress import progress
from thinkforge.records import write_jsonl
from thinkforge.sources import load_problems


@dataclass
class GenerateResult:
    problems: int
    rollouts: int
    imported: int
    output_tokens: int
    seconds: float


def rollout_record(problem: dict, index: int, completion: str, finish_reason: str, num_tokens: int,
                   teacher: str) -> dict:
    return {
        "problem_id": problem["id"],
        "sample_index": index,
        "problem": problem["problem"],
        "answer": problem["answer"],
        "answer_type": problem.get("answer_type", "math"),
        "completion": completion,
        "finish_reason": finish_reason,
        "num_tokens": num_tokens,
        "teacher": teacher,
    }


def generate(cfg: Recipe, out_path: str | Path, teacher_path: str | None = None,
             metrics: StageMetrics | None = None) -> GenerateResult:
    """Write rollout records (see thinkforge.records) to `out_path`.

    Problems that already carry a completion (import mode, e.g. a public CoT data set) are passed
    through as rollouts without sampling.
    """
    g = cfg.generate
    start = time.time()
    problems = load_problems(cfg.data.train, limit=cfg.data.train_limit)
    imported = [p for p in problems if "completion" in p]
    todo = [p for p in problems if "completion" not in p or g.sample_imported]
    teacher = teacher_path or g.teacher or cfg.model.student
    m = metrics or StageMetrics.disabled("generate")
    m.set("generate_prompts_planned", len(todo))
    records = [rollout_record(p, 0, p["completion"], "stop", 0, "imported") for p in imported]
    tokens = 0
    if todo:
        engine = make_engine(g.engine, teacher, cfg.template, dtype=g.dtype, batch_size=g.batch_size,
                             trust_remote_code=cfg.model.trust_remote_code,
                             tensor_parallel_size=g.tensor_parallel_size, endpoint=g.endpoint,
                             endpoint_model=g.endpoint_model, seed=cfg.run.seed)
        params = SamplingParams(n=g.samples_per_prompt, temperature=g.temperature, top_p=g.top_p,
                                max_new_tokens=g.max_new_tokens, seed=cfg.run.seed)
        bar = progress(len(todo), desc="generate", unit="prompt")
        done = 0

        def advance(k: int) -> None:
            nonlocal done
            done += k
            bar.update(k)
            m.set("generate_prompts_done", done)

        try:
            outs = engine.generate([p["problem"] for p in todo], params, progress=advance)
        finally:
            bar.close()
            engine.close()
        for p, comps in zip(todo, outs):
            first = 1 if "completion" in p else 0  # index 0 is the imported trace
            for i, c in enumerate(comps, start=first):
                text = f"<think>\n{c.reasoning}\n</think>\n\n{c.text}" if c.reasoning else c.text
                records.append(rollout_record(p, i, text, c.finish_reason, c.num_tokens, str(teacher)))
                tokens += c.num_tokens
    write_jsonl(out_path, records)
    seconds = time.time() - start
    sampled = len(records) - len(imported)
    m.inc("generate_samples_total", sampled)
    m.inc("generate_output_tokens_total", tokens)
    m.set("generate_samples_per_second", sampled / seconds)
    m.set("generate_output_tokens_per_second", tokens / seconds)
    return GenerateResult(len(problems), len(records), len(imported), tokens, seconds)
