"""The run report: base vs final model on every benchmark (with the paired bootstrap of the gain),
the per-stage ablation table (base / +mid-train / +SFT / +DPO / +RL, with a plot), the registry's
promotion decision and per-stage summaries.

Written as Markdown (printed in the terminal) and HTML (KFP visualization artifacts). The HTML page
(:func:`report_page`) renders the Markdown with markdown-it-py (raw HTML in it is escaped) and adds the
ablation chart, each trainer's curves (its log history), the completion-length histograms base vs final
and a few example problems with both models' answers side by side (escaped: completions are untrusted
text). Charts are PNGs embedded as base64 and a Content-Security-Policy allows nothing but those and the
inline style, so the page is one self-contained file that loads nothing from the network.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any, Iterable

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
            row["readings"] = _readings(cfg, bm, fm)
        rows.append(row)
    return rows


def _readings(cfg: Recipe, base: dict[str, Any], final: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """base/final pass@1 and the paired gain under each stricter reading both results carry (READINGS)."""
    out = {}
    for name, fpp in (final.get("per_problem_by_reading") or {}).items():
        bpp = (base.get("per_problem_by_reading") or {}).get(name)
        if bpp is None or name == cfg.evaluate.extraction:
            continue
        out[name] = {"base": base["readings"][name], "final": final["readings"][name],
                     "gain": paired_bootstrap(bpp, fpp, samples=cfg.evaluate.bootstrap_samples, seed=cfg.run.seed)}
    return out


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
        if r.get("readings"):
            lines.append("  - pass@1 by how answers are read (a stricter reading counts fewer answers): " + "; ".join(
                f"{name} {_pct(x['base'])} -> {_pct(x['final'])}"
                + (f" ({100 * x['gain']['delta']:+.1f} [{100 * x['gain']['ci_low']:+.1f}, "
                   f"{100 * x['gain']['ci_high']:+.1f}])" if x.get("gain") else "")
                for name, x in r["readings"].items()))
        elif e.extraction == "fallback":
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
        metric = s["metric"]
        values = [h[metric] for h in s.get("history") or []
                  if isinstance(h, dict) and h.get(metric) is not None and "train_runtime" not in h]
        q = len(values) // 4
        if q:  # one step is noisy (an RL reward over 16 rollouts): the first and last quarters' means
            trend += (f" (mean of the first {q} steps {sum(values[:q]) / q:.3f}, "
                      f"of the last {q} {sum(values[-q:]) / q:.3f})")
        check = (s.get("extra") or {}).get("reward_check") or {}
        if "skipped" in check:
            trend += f"; reward check skipped: {check['skipped']}"
        elif check:  # the same prompts at one temperature: what the policy learned, without the annealing
            trend += (f"; its {check['prompts']} prompts at T={check['temperature']:g} pass {_pct(check['before'])} "
                      f"before, {_pct(check['after'])} after ({100 * check['delta']:+.1f} points, 95% "
                      f"[{100 * check['ci_low']:+.1f}, {100 * check['ci_high']:+.1f}])")
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
    per_problem: list[dict[str, dict[str, float]]] = []  # of each row so far, for the step against the last
    for label, title in STAGE_ROWS:
        res = results.get(label)
        if not res or res.get("skipped"):
            skipped[label] = (res or {}).get("reason", "not evaluated")
            continue
        if label == "final" and not cfg.rl.enabled:
            title = "final (RL off)"
        row = {"label": label, "title": title, "benchmarks": {}}
        for b, m in res.get("benchmarks", {}).items():
            cell = {"pass@1": m["pass@1"], "pass@1_se": m["pass@1_se"], "k": m.get("k"), "n": m.get("n_problems"),
                    "boxed": (m.get("readings") or {}).get("boxed")}
            prev = next((p for p in reversed(per_problem) if b in p), None)
            if prev is not None and m.get("per_problem"):  # the step this stage made, paired over problems
                cell["vs_previous"] = paired_bootstrap(prev[b], m["per_problem"],
                                                       samples=cfg.evaluate.bootstrap_samples, seed=cfg.run.seed)
            row["benchmarks"][b] = cell
        per_problem.append({b: m["per_problem"] for b, m in res.get("benchmarks", {}).items() if m.get("per_problem")})
        rows.append(row)
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
    boxed = [b for b in t["benchmarks"] if any((r["benchmarks"].get(b) or {}).get("boxed") is not None
                                               for r in t["rows"])]
    head = ["model", *(f"{b} pass@1" for b in t["benchmarks"]), *(f"{b} change [95% CI]" for b in t["benchmarks"]),
            *(f"{b} boxed only" for b in boxed)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in t["rows"]:
        cells = [r["title"]]
        for b in t["benchmarks"]:
            m = r["benchmarks"].get(b)
            cells.append(f"{_pct(m['pass@1'])} ± {_pct(m['pass@1_se'])}" if m else "-")
        for b in t["benchmarks"]:
            g = (r["benchmarks"].get(b) or {}).get("vs_previous")
            cells.append(f"{100 * g['delta']:+.1f} [{100 * g['ci_low']:+.1f}, {100 * g['ci_high']:+.1f}]" if g else "-")
        cells += [_pct((r["benchmarks"].get(b) or {}).get("boxed")) for b in boxed]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "change: pass@1 points against the row above, with a paired bootstrap 95% interval over problems."]
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
    return to_html(md, charts=[("pass@1 by stage", png)] if png else [])


CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:1em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
         "vertical-align:top;text-align:left}th{background:#f4f4f4}code{background:#f4f4f4;padding:0 2px}"
         "img{max-width:100%;display:block;margin:0.5em 0}"
         "pre{white-space:pre-wrap;max-height:14em;overflow:auto;margin:0;font-size:12px;max-width:42em}"
         ".ok{color:#1a7f37;font-weight:bold}.bad{color:#c62828;font-weight:bold}")


def _markdown_it():
    from markdown_it import MarkdownIt

    # js-default: CommonMark plus tables and strikethrough, with raw HTML off (escaped as text)
    return MarkdownIt("js-default")


def _img(alt: str, png: bytes) -> str:
    return (f"<img alt='{html.escape(alt, quote=True)}' "
            f"src='data:image/png;base64,{base64.b64encode(png).decode()}'/>")


def to_html(md: str, charts: Iterable[tuple[str, bytes]] = (), sections: Iterable[str] = ()) -> str:
    """A self-contained HTML page of the Markdown report: the Markdown rendered (tables, **bold**, lists;
    raw HTML escaped), `charts` (alt text, PNG) after the title and `sections` (HTML built here, its text
    escaped) at the end. Nothing external: the CSP forbids every fetch but data: images."""
    body = _markdown_it().render(md)
    imgs = "".join(_img(alt, png) for alt, png in charts if png)
    if imgs:
        body = body.replace("</h1>", "</h1>\n" + imgs, 1) if "</h1>" in body else imgs + body
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
            f"<title>thinkforge report</title><style>{STYLE}</style></head><body>\n"
            + body + "".join(sections) + "\n</body></html>")


# --- the HTML report's charts and examples ----------------------------------------------------------

CURVES = (("loss", "loss"), ("reward", "reward (mean)"), ("kl", "KL to reference"), ("temperature", "temperature"))


def _points(history: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    pts = []
    for i, h in enumerate(history):
        v = h.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            pts.append((float(h.get("step", i)), float(v)))
    return pts


def training_curves(histories: dict[str, list[dict[str, Any]]]) -> bytes:
    """A PNG of each trainer's log history: loss per step for every trained stage, and reward, KL and
    temperature per step for RL; b"" when no history holds any of them."""
    panels = [(key, title, [(stage, pts) for stage, h in histories.items() if (pts := _points(h or [], key))])
              for key, title in CURVES]
    panels = [p for p in panels if p[2]]
    if not panels:
        return b""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.2 * rows), dpi=100, squeeze=False)
    for ax, (key, title, series) in zip(axes.flat, panels):
        for stage, pts in series:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="." if len(pts) < 40 else None, label=stage)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("training curves (each trainer's log history)")
    fig.tight_layout()
    return _png(fig, plt)


def _png(fig: Any, plt: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def length_histograms(base: list[dict[str, Any]], final: list[dict[str, Any]]) -> bytes:
    """A PNG: completion lengths (tokens) of the base and final models' eval samples, one panel per
    benchmark; b"" without samples."""
    benches = list(dict.fromkeys(s.get("benchmark", "") for s in [*base, *final]))
    lengths = {(label, b): [s["num_tokens"] for s in samples if s.get("benchmark", "") == b
                            and isinstance(s.get("num_tokens"), (int, float))]
               for label, samples in (("base", base), ("final", final)) for b in benches}
    benches = [b for b in benches if lengths[("base", b)] or lengths[("final", b)]]
    if not benches:
        return b""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(benches), figsize=(5.5 * len(benches), 3.2), dpi=100, squeeze=False)
    for ax, b in zip(axes.flat, benches):
        everything = lengths[("base", b)] + lengths[("final", b)]
        lo, hi = min(everything), max(everything)
        bins = [lo + (hi - lo + 1) * i / 20 for i in range(21)]
        for label, color in (("base", "#888888"), ("final", "#1f77b4")):
            if lengths[(label, b)]:
                ax.hist(lengths[(label, b)], bins=bins, alpha=0.55, color=color, label=f"{label} (n={len(lengths[(label, b)])})")
        ax.set_title(f"{b}: completion length")
        ax.set_xlabel("tokens")
        ax.set_ylabel("samples")
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return _png(fig, plt)


def example_pairs(base: list[dict[str, Any]], final: list[dict[str, Any]], n: int = 4) -> list[dict[str, Any]]:
    """Up to `n` problems with the first sample of each model: problems the final model fixed first, then
    ones it broke, then the rest (in file order)."""
    first: dict[str, dict[tuple[str, str], dict[str, Any]]] = {"base": {}, "final": {}}
    for label, samples in (("base", base), ("final", final)):
        for s in samples:
            first[label].setdefault((s.get("benchmark", ""), str(s.get("problem_id"))), s)
    keys = [k for k in first["final"] if k in first["base"]]

    def outcome(k: tuple[str, str]) -> int:
        b, f = bool(first["base"][k].get("correct")), bool(first["final"][k].get("correct"))
        return 0 if f and not b else 1 if b and not f else 2

    seen: dict[tuple[str, int], int] = {}
    order = {}
    for k in keys:  # within an outcome the benchmarks take turns, each in file order
        o = outcome(k)
        seen[(k[0], o)] = seen.get((k[0], o), -1) + 1
        order[k] = (o, seen[(k[0], o)])
    keys.sort(key=order.__getitem__)
    return [{"benchmark": k[0], "problem_id": k[1], "gold": first["final"][k].get("gold"),
             "base": first["base"][k], "final": first["final"][k]} for k in keys[:n]]


def _answer_cell(s: dict[str, Any], limit: int = 1200) -> str:
    ok = bool(s.get("correct"))
    verdict = f"<span class='{'ok' if ok else 'bad'}'>{'correct' if ok else 'wrong'}</span>"
    extracted = s.get("extracted")
    text = str(s.get("completion") or "")
    if len(text) > limit:
        text = text[:limit] + " [...]"
    return (f"{verdict}: answer <code>{html.escape(str(extracted if extracted not in (None, '') else '-'))}</code>, "
            f"{html.escape(str(s.get('num_tokens', '?')))} tokens<pre>{html.escape(text)}</pre>")


def examples_html(pairs: list[dict[str, Any]]) -> str:
    """The example problems as an HTML table; every value from the samples is escaped."""
    if not pairs:
        return ""
    rows = ["<h2>Examples: base vs final</h2>",
            "<p>The first sample of each model on a few problems (ones the final model fixed first); "
            "completions are shown as plain text.</p>",
            "<table class='examples'><tr><th>problem</th><th>gold</th><th>base</th><th>final</th></tr>"]
    for p in pairs:
        rows.append(f"<tr><td>{html.escape(p['benchmark'])} <code>{html.escape(p['problem_id'])}</code></td>"
                    f"<td><code>{html.escape(str(p['gold']))}</code></td>"
                    f"<td>{_answer_cell(p['base'])}</td><td>{_answer_cell(p['final'])}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


def report_page(md: str, ablation_png: bytes = b"", histories: dict[str, list[dict[str, Any]]] | None = None,
                base_samples: list[dict[str, Any]] | None = None, final_samples: list[dict[str, Any]] | None = None,
                examples: int = 4) -> str:
    """The HTML report: the Markdown report rendered, then the ablation chart, the training curves, the
    completion-length histograms and the example problems (each only when its inputs exist)."""
    base_samples, final_samples = base_samples or [], final_samples or []
    charts = [("pass@1 by stage", ablation_png), ("training curves", training_curves(histories or {})),
              ("completion length, base vs final", length_histograms(base_samples, final_samples))]
    charts_html = "".join(f"<h2>{html.escape(alt.capitalize())}</h2>{_img(alt, png)}" for alt, png in charts if png)
    return to_html(md, sections=[charts_html, examples_html(example_pairs(base_samples, final_samples, examples))])
