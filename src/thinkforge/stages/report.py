"""The run report: base vs final model on every benchmark, with per-stage summaries.

Written as Markdown (printed in the terminal) and HTML (a KFP visualization artifact).
"""

from __future__ import annotations

import html
from typing import Any

from thinkforge.config import Recipe
from thinkforge.scoring import paired_bootstrap

EXTRACTION_RULES = {
    "strict": "the last \\boxed{} answer, else 'the answer is ...'; nothing else counts",
    "fallback": "the last \\boxed{} answer, else 'the answer is ...', else the last number in the text",
}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def compare(cfg: Recipe, base: dict[str, Any] | None, final: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per benchmark: base and final metrics and the paired bootstrap of the pass@1 gain."""
    rows = []
    for name, fm in final["benchmarks"].items():
        row: dict[str, Any] = {"benchmark": name, "final": fm, "k": fm["k"], "n": fm["n_problems"]}
        bm = (base or {}).get("benchmarks", {}).get(name)
        if bm is not None:
            row["base"] = bm
            row["gain"] = paired_bootstrap(bm["per_problem"], fm["per_problem"],
                                           samples=cfg.evaluate.bootstrap_samples, seed=cfg.run.seed)
        rows.append(row)
    return rows


def markdown(cfg: Recipe, rows: list[dict[str, Any]], stages: dict[str, dict[str, Any]]) -> str:
    e = cfg.evaluate
    lines = [f"# thinkforge report: {cfg.run.name}", "",
             f"Protocol: k={e.k} samples per problem, temperature {e.temperature}, top_p {e.top_p}, "
             f"max {e.max_new_tokens} new tokens, seed {cfg.run.seed}. Answer extraction: **{e.extraction}** "
             f"({EXTRACTION_RULES[e.extraction]}). pass@1 is the mean over samples (± standard error); "
             "the gain's 95% interval is a paired bootstrap over problems.", ""]
    ks = sorted({k for k in e.pass_k if k > 1})
    head = ["benchmark", "problems", "base pass@1", "final pass@1", "gain [95% CI]"]
    head += [f"final cons@{r['k']}" for r in rows[:1]] + [f"base/final pass@{k}" for k in ks]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        f, b, g = r["final"], r.get("base"), r.get("gain")
        cells = [r["benchmark"], str(r["n"]),
                 f"{_pct(b['pass@1'])} ± {_pct(b['pass@1_se'])}" if b else "-",
                 f"{_pct(f['pass@1'])} ± {_pct(f['pass@1_se'])}",
                 f"{100 * g['delta']:+.1f} [{100 * g['ci_low']:+.1f}, {100 * g['ci_high']:+.1f}]" if g else "-",
                 _pct(f.get(f"cons@{r['k']}"))]
        cells += [f"{_pct((b or {}).get(f'pass@{k}'))} / {_pct(f.get(f'pass@{k}'))}" for k in ks]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for r in rows:
        f, b = r["final"], r.get("base")
        bits = [f"final: mean {f.get('mean_tokens', 0):.0f} tokens, truncated {_pct(f.get('truncation_rate'))}%"]
        if b:
            bits.insert(0, f"base: mean {b.get('mean_tokens', 0):.0f} tokens, "
                           f"truncated {_pct(b.get('truncation_rate'))}%")
        rules = ", ".join(f"{k} {v}" for k, v in sorted(f.get("correct_by_rule", {}).items()))
        lines.append(f"- {r['benchmark']}: " + "; ".join(bits) + (f"; correct answers by rule: {rules}" if rules else ""))
        g = r.get("gain")
        if g:
            verdict = "excludes zero" if g["ci_low"] > 0 or g["ci_high"] < 0 else "includes zero"
            lines.append(f"  - gain {100 * g['delta']:+.1f} points over {g['n_problems']} problems; "
                         f"the 95% interval {verdict}")
    if stages:
        lines += ["", "## Stages", "", "| stage | summary |", "|---|---|"]
        for name, summary in stages.items():
            lines.append(f"| {name} | {_summarize(summary)} |")
    return "\n".join(lines) + "\n"


def _summarize(s: dict[str, Any]) -> str:
    if s.get("skipped"):
        return "skipped"
    if "counts" in s:
        dropped = ", ".join(f"{k} {v}" for k, v in s["counts"].items() if k != "correct" and v)
        return (f"kept {s['kept']} of {s['rollouts']} rollouts (dropped: {dropped or 'none'}); "
                f"SFT {s['sft']}, DPO pairs {s['dpo_pairs']}, RL prompts {s['rl_prompts']}")
    if "rollouts" in s:
        return f"{s['rollouts']} rollouts of {s['problems']} problems, {s['output_tokens']} tokens, {s['seconds']:.0f}s"
    if "steps" in s:
        first, last = s.get("first"), s.get("last")
        trend = f"{s['metric']} {first:.3f} -> {last:.3f}" if first is not None and last is not None else ""
        return f"{s['steps']} steps on {s['examples']} examples, {trend}, {s['seconds']:.0f}s"
    return ", ".join(f"{k}={v}" for k, v in s.items() if not isinstance(v, (dict, list)))


def to_html(md: str) -> str:
    """A self-contained HTML page of the Markdown report (tables and lists; no external assets)."""
    out, in_table = ["<html><head><meta charset='utf-8'><style>body{font-family:sans-serif;max-width:1100px}"
                     "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}</style></head><body>"], False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if set("".join(cells)) <= {"-"}:
                continue
            if not in_table:
                out.append("<table>")
                in_table = True
                out.append("<tr>" + "".join(f"<th>{c}</th>" for c in cells) + "</tr>")
            else:
                out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.strip().startswith("- "):
            out.append(f"<p style='margin-left:{2 + line.index('-')}em'>&bull; {html.escape(line.strip()[2:])}</p>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        out.append("</table>")
    return "\n".join(out + ["</body></html>"])
