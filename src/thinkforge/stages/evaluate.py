"""Stage 7, evaluate: k samples per problem per benchmark; pass@1 (mean over samples, with its standard
error), cons@k, unbiased pass@k, length and truncation; every sample kept for re-scoring."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from thinkforge.config import Recipe
from thinkforge.engines import SamplingParams, make_engine
from thinkforge.metrics import StageMetrics
from thinkforge.progress import progress
from thinkforge.records import write_json, write_jsonl
from thinkforge.scoring import score_samples
from thinkforge.sources import load_problems
from thinkforge.verify import Verifier


def score_records(records: list[dict[str, Any]], ks: list[int], mode: str) -> list[dict[str, Any]]:
    """Verify eval samples (gold, completion) in place and return them; shared with `thinkforge score`."""
    with Verifier(mode=mode) as verifier:
        verdicts = verifier.verify_many([(s["gold"], s["completion"], s.get("answer_type", "math")) for s in records])
    for s, v in zip(records, verdicts):
        s.update(correct=v.correct, reason=v.reason, extracted=v.extracted, rule=v.rule)
    return records


def evaluate(cfg: Recipe, model_path: str | Path, out_dir: str | Path, label: str = "model",
             metrics: StageMetrics | None = None) -> dict[str, Any]:
    """Evaluate one model on every configured benchmark; writes samples-<bench>.jsonl and results.json."""
    e = cfg.evaluate
    m = metrics or StageMetrics.disabled("evaluate")
    out = Path(out_dir)
    start = time.time()
    engine = make_engine(e.engine, str(model_path), cfg.template, dtype=e.dtype, batch_size=e.batch_size,
                         trust_remote_code=cfg.model.trust_remote_code, seed=cfg.run.seed)
    results: dict[str, Any] = {"label": label, "model": str(model_path), "extraction": e.extraction,
                               "protocol": {"temperature": e.temperature, "top_p": e.top_p,
                                            "max_new_tokens": e.max_new_tokens, "seed": cfg.run.seed},
                               "benchmarks": {}}
    try:
        for bench in e.benchmarks:
            problems = load_problems(bench.source, limit=bench.limit)
            k = bench.k or e.k
            params = SamplingParams(n=k, temperature=e.temperature, top_p=e.top_p,
                                    max_new_tokens=e.max_new_tokens, seed=cfg.run.seed)
            m.set("eval_problems_planned", len(problems), benchmark=bench.name)
            bar = progress(len(problems), desc=f"evaluate {label} {bench.name}", unit="problem")
            done = 0

            def advance(n: int, name: str = bench.name) -> None:
                nonlocal done
                done += n
                bar.update(n)
                m.set("eval_problems_done", done, benchmark=name)

            try:
                outs = engine.generate([p["problem"] for p in problems], params, progress=advance)
            finally:
                bar.close()
            samples = []
            for p, comps in zip(problems, outs):
                for i, c in enumerate(comps):
                    samples.append({
                        "benchmark": bench.name, "problem_id": p["id"], "sample_index": i, "gold": p["answer"],
                        "answer_type": p.get("answer_type", "math"), "completion": c.text,
                        "num_tokens": c.num_tokens, "finish_reason": c.finish_reason,
                        **{key: p[key] for key in ("subject", "level") if key in p},
                    })
            score_records(samples, e.pass_k, e.extraction)
            write_jsonl(out / f"samples-{bench.name}.jsonl", samples)
            scores = score_samples(samples, ks=[*e.pass_k, k])
            rules: dict[str, int] = {}
            for s in samples:
                if s["correct"]:
                    rules[s["rule"] or "none"] = rules.get(s["rule"] or "none", 0) + 1
            scores["correct_by_rule"] = rules
            results["benchmarks"][bench.name] = scores
            for key, value in scores.items():
                if key.startswith(("pass@", "cons@")) and not key.endswith("_se"):
                    m.set("eval_accuracy", value, benchmark=bench.name, metric=key)
    finally:
        engine.close()
    results["seconds"] = time.time() - start
    write_json(out / "results.json", results)
    return results
