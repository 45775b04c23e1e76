"""The run report: base vs final model on every benchmark (with the paired bootstrap of the gain),
the per-stage ablation table (base / +mid-train / +SFT / +DPO / +RL, with a plot), the registry's
promotion decision and per-stage summaries.

Written as Markdown (printed in the terminal) and HTML (KFP visualization artifacts; the plot is a PNG
embedded as base64, so the page is self-contained).
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from thinkforge.answers import STRICT_RULES
from thinkforge.config import Recipe
from thinkforge.evalsets import CATALOG
from thinkforge.scoring import paired_bootstrap

STAGE_ROWS = (("base", "base"), ("midtrain", "+mid-train"), ("sft", "+SFT"), ("dpo", "+DPO"), ("final", "+RL"))

EXTRACTION_RULES = {
    "strict": "the last \\boxed{} answer, else 'the answer is ...'; nothing else counts",
    "fallback": "the last \\boxed{} answer, else 'the answer is ...', else the last inline math expression "
                "when no number follows it, else the last number in the text",
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


def _strict_pass1(scores: dict[str, Any], k: int) -> float | None:
    """pass@1 had extraction been strict: fallback tries \\boxed, then "the answer is", then the last number, so
    a sample is correct under strict exactly when it was correct through one of the first two rules."""
    rules, n = scores.get("correct_by_rule"), scores.get("n_problems")
    if rules is None or not n or not k:
        return None
    return sum(v for rule, v in rules.items() if rule in STRICT_RULES) / (n * k)


def markdown(cfg: Recipe, rows: list[dict[str, Any]], stages: dict[str, dict[str, Any]],
             ablation: dict[str, Any] | None = None, decision: dict[str, Any] | None = None) -> str:
    e = cfg.evaluate
    ks_used = ", ".join(f"{r['benchmark']} k={r['k']}" for r in rows) or f"k={e.k}"
    lines = [f"# thinkforge report: {cfg.run.name}", "",
             f"Protocol: samples per problem {ks_used}; temperature {e.temperature}, top_p {e.top_p}, "
             f"max {e.max_new_tokens} new tokens, seed {cfg.run.seed}. Answer extraction: **{e.extraction}** "
             f"({EXTRACTION_RULES[e.extraction]}). pass@1 is the mean over samples (± standard error); "
             "the gain's 95% interval is a paired bootstrap over problems.", ""]
    ks = sorted({k for k in e.pass_k if k > 1})
    head = ["benchmark", "problems", "base pass@1", "final pass@1", "gain [95% CI]", "final cons@k"]
    head += [f"base/final pass@{k}" for k in ks]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        f, b, g = r["final"], r.get("base"), r.get("gain")
        cells = [r["benchmark"], str(r["n"]),
                 f"{_pct(b['pass@1'])} ± {_pct(b['pass@1_se'])}" if b else "-",
                 f"{_pct(f['pass@1'])} ± {_pct(f['pass@1_se'])}",
                 f"{100 * g['delta']:+.1f} [{100 * g['ci_low']:+.1f}, {100 * g['ci_high']:+.1f}]" if g else "-",
                 f"{_pct(f.get('cons@' + str(r['k'])))} (k={r['k']})"]
        cells += [f"{_pct((b or {}).get(f'pass@{k}'))} / {_pct(f.get(f'pass@{k}'))}" for k in ks]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for r in rows:
        f, b = r["final"], r.get("base")
        bits = [f"final: mean {f.get('mean_tokens', 0):.0f} tokens, truncated {_pct(f.get('truncation_rate'))}%"]
        if f.get("error_rate"):
            bits.append(f"engine errors {_pct(f['error_rate'])}%")
        if b:
            bits.insert(0, f"base: mean {b.get('mean_tokens', 0):.0f} tokens, "
                           f"truncated {_pct(b.get('truncation_rate'))}%")
        by_rule = [(label, x["correct_by_rule"]) for label, x in (("base", b), ("final", f))
                   if x and x.get("correct_by_rule")]
        if by_rule:
            bits.append("correct answers by rule: " + "; ".join(
                f"{label} " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())) for label, c in by_rule))
        lines.append(f"- {r['benchmark']}: " + "; ".join(bits))
        if e.extraction == "fallback":
            strict = [(label, _strict_pass1(x, r["k"])) for label, x in (("base", b), ("final", f)) if x]
            if all(v is not None for _, v in strict):
                lines.append("  - under strict extraction (no last-number fallback) pass@1 would read " + ", ".join(
                    f"{label} {_pct(v)}" for label, v in strict))
        g = r.get("gain")
        if g:
            verdict = "excludes zero" if g["ci_low"] > 0 or g["ci_high"] < 0 else "includes zero"
            lines.append(f"  - gain {100 * g['delta']:+.1f} points over {g['n_problems']} problems; "
                         f"the 95% interval {verdict}")
        for key in ("subject", "level"):
            groups = f.get(f"by_{key}")
            if groups:
                n = f.get(f"by_{key}_n", {})
                lines.append(f"  - final pass@1 by {key}: " + ", ".join(
                    f"{g_} {_pct(v)}" + (f" (n={n[g_]})" if g_ in n else "") for g_, v in groups.items()))
    if ablation and len(ablation["rows"]) > 2:
        lines += ["", "## By stage (ablation)", "", *ablation_lines(ablation)]
    if decision is not None:
        lines += ["", "## Registry", "", *registry_lines(decision)]
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


def registry_lines(decision: dict[str, Any]) -> list[str]:
    if not decision.get("published"):
        return [f"Not published: {decision.get('reason', 'registry off')}."]
    verdict = "**promoted** to champion" if decision["promoted"] else "**not promoted**"
    lines = [f"Published `{decision['name']}` version `{decision['version']}` at `{decision['where']}`; "
             f"{verdict}: {decision['reason']}."]
    b = decision.get("gate", {}).get("bootstrap")
    if b:
        lines.append(f"- gain over the champion on {decision['gate']['benchmark']}: {100 * b['delta']:+.1f} points, "
                     f"paired bootstrap 95% interval [{100 * b['ci_low']:+.1f}, {100 * b['ci_high']:+.1f}]")
    return lines


# --- the ablation table: the model after each stage ---------------------------------------------


def ablation(cfg: Recipe, results: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """pass@1 ± SE by stage and benchmark from the evaluate tasks' results (label -> results; skipped
    or missing ones are left out and listed)."""
    rows, skipped = [], {}
    for label, title in STAGE_ROWS:
        res = results.get(label)
        if not res or res.get("skipped"):
            skipped[label] = (res or {}).get("reason", "not evaluated")
            continue
        if label == "final" and not cfg.rl.enabled:
            title = "final (RL off)"
        rows.append({"label": label, "title": title, "benchmarks": {
            b: {"pass@1": m["pass@1"], "pass@1_se": m["pass@1_se"], "k": m.get("k"), "n": m.get("n_problems")}
            for b, m in res.get("benchmarks", {}).items()}})
    benches: list[str] = []
    for r in rows:
        benches += [b for b in r["benchmarks"] if b not in benches]
    return {"rows": rows, "benchmarks": benches, "skipped": skipped}


def _paper(cfg: Recipe, bench: str) -> dict[str, float]:
    for b in cfg.evaluate.benchmarks:
        if b.name == bench:
            key = (b.dataset or b.name).lower()
            return dict(CATALOG[key].paper) if key in CATALOG else {}
    return {}


def ablation_lines(t: dict[str, Any]) -> list[str]:
    head = ["model", *(f"{b} pass@1" for b in t["benchmarks"])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in t["rows"]:
        cells = [r["title"]]
        for b in t["benchmarks"]:
            m = r["benchmarks"].get(b)
            cells.append(f"{_pct(m['pass@1'])} ± {_pct(m['pass@1_se'])}" if m else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if t.get("paper"):
        lines += ["", "Published (Phi-4-Mini-Reasoning, pass@1 %; its own protocol, so compare trends, not numbers): "
                  + "; ".join(f"{b}: " + ", ".join(f"{lbl} {v:.1f}" for lbl, v in vals.items())
                              for b, vals in t["paper"].items())]
    if t.get("skipped"):
        lines += ["", "Not evaluated: " + "; ".join(f"{lbl} ({why})" for lbl, why in t["skipped"].items())]
    return lines


def ablation_markdown(cfg: Recipe, table: dict[str, Any]) -> str:
    table = {**table, "paper": {b: _paper(cfg, b) for b in table["benchmarks"] if _paper(cfg, b)}}
    e = cfg.evaluate
    return "\n".join([f"# {cfg.run.name}: pass@1 after each stage", "",
                      f"Each row is the model after that stage, evaluated with the same protocol (temperature "
                      f"{e.temperature}, top_p {e.top_p}, max {e.max_new_tokens} new tokens, seed {cfg.run.seed}, "
                      f"extraction {e.extraction}); ± is the standard error over problems.", "",
                      *ablation_lines(table)]) + "\n"


def ablation_plot(table: dict[str, Any]) -> bytes:
    """A PNG: pass@1 (%) by stage, one line per benchmark, standard-error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    xs = list(range(len(table["rows"])))
    for b in table["benchmarks"]:
        pts = [(x, r["benchmarks"][b]) for x, r in zip(xs, table["rows"]) if b in r["benchmarks"]]
        ax.errorbar([x for x, _ in pts], [100 * m["pass@1"] for _, m in pts],
                    yerr=[100 * m["pass@1_se"] for _, m in pts], marker="o", capsize=3, label=b)
    ax.set_xticks(xs, [r["title"] for r in table["rows"]])
    ax.set_ylabel("pass@1 (%)")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    ax.set_title("pass@1 after each stage")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def ablation_html(md: str, png: bytes) -> str:
    img = (f"<img alt='pass@1 by stage' src='data:image/png;base64,{base64.b64encode(png).decode()}'/>"
           if png else "")
    page = to_html(md)
    return page.replace("</h1>", "</h1>" + img, 1) if "</h1>" in page else page.replace("<body>", "<body>" + img, 1)


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
