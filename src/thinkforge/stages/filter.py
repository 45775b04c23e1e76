"""Stage 2, filter: keep rollouts whose final answer verifies, and derive every training set.

Each rollout gets exactly one verdict reason, checked in this order:
unverifiable_gold, unfinished_thinking (opened <think> never closed), truncated (hit the token
limit), no_answer, over_length, timeout (the verifier's hard limit), wrong_answer, correct.

Outputs (record formats in thinkforge.records):
- midtrain.jsonl: every accepted rollout (the mid-train corpus)
- sft.jsonl: a compact subset: at most `sft_per_prompt` accepted rollouts per prompt (shortest first),
  hardest prompts (lowest pass rate) first when `sft_max_examples` caps the total
- dpo.jsonl: preference pairs from the same prompt, chosen = verified correct, rejected = incorrect
- rl_prompts.jsonl: every problem with its pass rate, mean completion length and length spread
- verdicts.jsonl: every rollout with its verdict; summary.json: counts per reason
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thinkforge.config import Recipe
from thinkforge.metrics import StageMetrics
from thinkforge.records import ROLLOUT_FIELDS, EmptyDataError, iter_jsonl, write_json, write_jsonl
from thinkforge.verify import Verifier

REJECT_ORDER = ("unverifiable_gold", "unfinished_thinking", "truncated", "no_answer", "over_length", "timeout",
                "wrong_answer")


@dataclass
class FilterResult:
    rollouts: int
    kept: int
    counts: dict[str, int]
    sft: int
    dpo_pairs: int
    rl_prompts: int
    pass_rate_histogram: list[int] = field(default_factory=list)


def _reason(rec: dict[str, Any], verdict_reason: str, cfg: Recipe) -> str:
    if verdict_reason == "unverifiable_gold":
        return verdict_reason
    if cfg.template.think and "<think>" in rec["completion"] and "</think>" not in rec["completion"]:
        return "unfinished_thinking"
    if rec.get("finish_reason") == "length":
        return "truncated"
    if verdict_reason in ("no_answer", "timeout"):
        return verdict_reason
    cap = cfg.filter.max_completion_tokens
    if cap and rec.get("num_tokens", 0) > cap:
        return "over_length"
    return "correct" if verdict_reason == "correct" else "wrong_answer"


def filter_rollouts(cfg: Recipe, rollouts_path: str | Path, out_dir: str | Path,
                    metrics: StageMetrics | None = None) -> FilterResult:
    out = Path(out_dir)
    m = metrics or StageMetrics.disabled("filter")
    rollouts = list(iter_jsonl(rollouts_path, ROLLOUT_FIELDS))
    with Verifier(mode=cfg.evaluate.extraction) as verifier:
        verdicts = verifier.verify_many([(r["answer"], r["completion"], r.get("answer_type", "math")) for r in rollouts])
    by_problem: dict[str, list[dict[str, Any]]] = defaultdict(list)
    counts: Counter[str] = Counter()
    annotated = []
    for rec, v in zip(rollouts, verdicts):
        reason = _reason(rec, v.reason, cfg)
        counts[reason] += 1
        row = {**rec, "correct": reason == "correct", "reason": reason, "extracted": v.extracted, "rule": v.rule,
               "answer_correct": v.correct}
        row.pop("v", None)
        annotated.append(row)
        by_problem[rec["problem_id"]].append(row)

    accepted = [r for r in annotated if r["correct"]]
    m.inc("filter_kept_total", len(accepted))  # also when 0, so the series exists
    for reason in REJECT_ORDER:
        m.inc("filter_dropped_total", counts.get(reason, 0), reason=reason)
    if len(accepted) < cfg.filter.min_kept:
        detail = ", ".join(f"{k}={counts.get(k, 0)}" for k in ("correct", *REJECT_ORDER))
        raise EmptyDataError(
            f"filter kept {len(accepted)} of {len(rollouts)} rollouts from {rollouts_path} "
            f"(filter.min_kept={cfg.filter.min_kept}); counts per reason: {detail}"
        )

    stats = {}
    for pid, rows in by_problem.items():
        # Pass rate counts a correct final answer; the RL stage samples its own lengths later.
        lengths = [r.get("num_tokens", 0) for r in rows]
        mean_len = statistics.fmean(lengths) if lengths else 0.0
        stats[pid] = {
            "pass_rate": sum(r["answer_correct"] for r in rows) / len(rows),
            "mean_length": mean_len,
            "length_cv": (statistics.pstdev(lengths) / mean_len) if mean_len else 0.0,
        }

    midtrain = [_sft_row(r) for r in accepted]
    sft = _select_sft(accepted, stats, cfg)
    pairs = _pairs(by_problem, cfg.filter.dpo_pairs_per_prompt)
    rl_prompts = [
        {"id": pid, "problem": rows[0]["problem"], "answer": rows[0]["answer"],
         "answer_type": rows[0].get("answer_type", "math"), **stats[pid]}
        for pid, rows in by_problem.items()
    ]
    hist = [0] * 5
    for s in stats.values():
        hist[min(4, int(s["pass_rate"] * 5))] += 1

    write_jsonl(out / "verdicts.jsonl", annotated)
    write_jsonl(out / "midtrain.jsonl", midtrain)
    write_jsonl(out / "sft.jsonl", sft)
    write_jsonl(out / "dpo.jsonl", pairs)
    write_jsonl(out / "rl_prompts.jsonl", rl_prompts)
    result = FilterResult(len(rollouts), len(accepted), {k: counts.get(k, 0) for k in ("correct", *REJECT_ORDER)},
                          len(sft), len(pairs), len(rl_prompts), hist)
    write_json(out / "summary.json", result.__dict__)
    return result


def _sft_row(r: dict[str, Any]) -> dict[str, Any]:
    return {"problem_id": r["problem_id"], "problem": r["problem"], "completion": r["completion"]}


def _select_sft(accepted: list[dict[str, Any]], stats: dict[str, dict], cfg: Recipe) -> list[dict[str, Any]]:
    per_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in accepted:
        per_prompt[r["problem_id"]].append(r)
    chosen = []
    for pid in sorted(per_prompt, key=lambda p: (stats[p]["pass_rate"], p)):
        rows = sorted(per_prompt[pid], key=lambda r: (r.get("num_tokens", 0), r["sample_index"]))
        chosen.extend(rows[: cfg.filter.sft_per_prompt])
    cap = cfg.filter.sft_max_examples
    return [_sft_row(r) for r in (chosen[:cap] if cap else chosen)]


def _pairs(by_problem: dict[str, list[dict[str, Any]]], per_prompt: int) -> list[dict[str, Any]]:
    pairs = []
    for pid, rows in by_problem.items():
        good = [r for r in rows if r["correct"]]
        # Rejected: a completed rollout whose answer is wrong (a clear contrast), then other failures.
        bad = sorted((r for r in rows if not r["answer_correct"]),
                     key=lambda r: (r["reason"] != "wrong_answer", r["sample_index"]))
        for g, b in list(zip(good, bad))[:per_prompt]:
            pairs.append({"problem_id": pid, "problem": g["problem"], "chosen": g["completion"],
                          "rejected": b["completion"]})
    return pairs


def html_report(result: FilterResult) -> str:
    """A small self-contained HTML page: counts per reason and the pass-rate histogram as bars."""
    def bars(items: list[tuple[str, int]]) -> str:
        top = max([v for _, v in items] + [1])
        rows = "".join(
            f"<tr><td>{label}</td><td>{v}</td><td><div style='background:#4a7;height:12px;"
            f"width:{int(300 * v / top)}px'></div></td></tr>" for label, v in items)
        return f"<table>{rows}</table>"

    bins = [f"{20 * i}-{20 * (i + 1)}%" for i in range(5)]
    return (
        "<html><head><meta charset='utf-8'></head><body style='font-family:sans-serif'>"
        f"<h2>Filter: kept {result.kept} of {result.rollouts} rollouts</h2>"
        f"<h3>Rollouts by verdict</h3>{bars(list(result.counts.items()))}"
        f"<h3>Problems by pass rate</h3>{bars(list(zip(bins, result.pass_rate_histogram)))}"
        f"<p>SFT examples {result.sft}, DPO pairs {result.dpo_pairs}, RL prompts {result.rl_prompts}</p>"
        "</body></html>"
    )
