"""The HTML report in a real headless browser (Debian's chromium, `bash scripts/install-test-services.sh`).

The report task runs on small synthetic but realistic inputs: eval results scored by the evaluate
stage's own scoring, samples files as evaluate writes them, and trainer log histories as each training
stage's summary artifact holds them. Chromium renders the page: the screenshot must be a
non-blank PNG, and the DOM must show the Markdown rendered (bold as <strong>, tables), every chart
<img> decoded, the example table, and the untrusted completions as text (no injected elements).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from thinkforge.components.common import report_component
from thinkforge.config import Recipe
from thinkforge.stages.evaluate import score_benchmark

CHROMIUM = os.environ.get("THINKFORGE_CHROMIUM_BIN") or shutil.which("chromium") or "/usr/bin/chromium"
EVIL = "<script>document.title='pwned'</script><img src=x onerror=alert(1)> **not bold**"


def _chromium() -> str:
    if Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    msg = f"chromium not found ({CHROMIUM}): install it with `bash scripts/install-test-services.sh`"
    if os.environ.get("THINKFORGE_REQUIRE_SERVICES") == "1" or os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def _browser(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--hide-scrollbars", f"--user-data-dir={tmp / 'profile'}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _art(path: Path) -> SimpleNamespace:
    return SimpleNamespace(path=str(path), uri=f"file://{path}", metadata={})


class _Metrics:
    def __init__(self):
        self.logged = {}

    def log_metric(self, key, value):
        self.logged[key] = value


def _samples(label: str, bench: str, n: int, k: int) -> list[dict]:
    """Eval samples as evaluate writes them (after scoring): the final model is right more often and writes
    longer chains of thought."""
    out = []
    for i in range(n):
        for j in range(k):
            right = (i + j) % (2 if label == "final" else 3) == 0
            tokens = (180 if label == "final" else 90) + 37 * ((i * k + j) % 7)
            gold = str(i + 3)
            text = (f"Let me think step by step about problem {i}.\nFirst, 2 + {i} = {i + 2}. "
                    + (f"So the answer is \\boxed{{{gold}}}." if right else f"So the answer is \\boxed{{{i}}}."))
            if label == "base" and i == 2 and j == 0:
                text = EVIL  # completions are untrusted text
            out.append({"benchmark": bench, "problem_id": f"{bench}-{i}", "sample_index": j, "gold": gold,
                        "answer_type": "math", "completion": text, "num_tokens": tokens,
                        "finish_reason": "stop", "correct": right, "reason": "match" if right else "mismatch",
                        "extracted": gold if right else str(i), "rule": "boxed"})
    return out


def _histories() -> dict[str, list[dict]]:
    def sft_like(first: float, steps: int) -> list[dict]:
        h = [{"loss": first * 0.97 ** s + 0.02 * (s % 3), "learning_rate": 1e-5, "grad_norm": 1.0,
              "epoch": s / steps, "step": s} for s in range(1, steps + 1)]
        return h + [{"train_runtime": 12.0, "train_loss": h[-1]["loss"], "epoch": 1.0, "step": steps}]

    rl = [{"loss": 0.01 * (s % 4), "reward": -0.8 + 0.05 * s, "reward_std": 0.6, "kl": 0.002 * s,
           "temperature": 1.0 - 0.3 * min(1.0, s / 20), "completions/mean_length": 200 + 3 * s, "step": s}
          for s in range(1, 31)]
    return {"midtrain": sft_like(2.4, 40), "sft": sft_like(1.6, 30), "dpo": sft_like(0.69, 20), "rl": rl}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report-html")
    cfg = Recipe.model_validate({"run": {"name": "html-report"}, "evaluate": {
        "benchmarks": [{"name": "math500", "source": "x"}, {"name": "gsm8k", "source": "y"}],
        "k": 4, "pass_k": [1, 4], "bootstrap_samples": 200, "per_stage": True}})
    (tmp / "config.json").write_text(cfg.model_dump_json())
    results, samples = {}, {}
    for label in ("base", "midtrain", "sft", "dpo", "final"):
        benches = {}
        shown = "base" if label in ("base", "midtrain") else "final"
        folder = tmp / f"samples-{label}"
        folder.mkdir()
        for bench, n in (("math500", 12), ("gsm8k", 10)):
            rows = _samples(shown, bench, n, 4)
            if label == "sft":
                rows = [{**r, "correct": r["correct"] or r["sample_index"] == 3} for r in rows]
            (folder / f"samples-{bench}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            benches[bench] = score_benchmark(rows, [1, 4])
        (tmp / f"results-{label}.json").write_text(json.dumps({"label": label, "benchmarks": benches}))
        results[label] = _art(tmp / f"results-{label}.json")
        samples[label] = _art(folder)
    summaries = {}
    for stage in ("midtrain", "sft", "dpo", "rl"):
        h = _histories()[stage]
        (tmp / f"summary-{stage}.json").write_text(json.dumps(
            {"steps": len(h), "examples": 64, "metric": "loss", "first": h[0]["loss"], "last": h[-2]["loss"],
             "seconds": 30.0, "history": h}))
        summaries[stage] = _art(tmp / f"summary-{stage}.json")
    summaries.update(generate=None, filter=None)
    outs = {name: _art(tmp / name) for name in ("report.md", "report.html", "ablation.md", "ablation.html")}
    report_component(_art(tmp / "config.json"), results, summaries, None, outs["report.md"], outs["report.html"],
                     outs["ablation.md"], outs["ablation.html"], _Metrics(),
                     samples={"base": samples["base"], "final": samples["final"]})
    page = tmp / "report.html"
    shot = tmp / "report.png"
    _browser([f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri()], tmp)
    dom = _browser(["--dump-dom", "--virtual-time-budget=10000", page.as_uri()], tmp).stdout
    # The same page with a probe that records, once loaded, how each <img> decoded (the report's own CSP
    # forbids scripts, so the probe's copy allows inline ones and nothing else).
    html_text = page.read_text()
    probe = tmp / "probe.html"
    probe.write_text(html_text.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';", 1)
                     .replace("</body>", "<script>window.addEventListener('load',function(){var d=document."
                              "createElement('pre');d.id='probe';d.textContent=JSON.stringify(Array.from("
                              "document.images).map(function(i){return [i.alt,i.complete,i.naturalWidth,"
                              "i.naturalHeight]}));document.body.appendChild(d)});</script></body>", 1))
    probed = _browser(["--dump-dom", "--virtual-time-budget=10000", probe.as_uri()], tmp).stdout
    return SimpleNamespace(tmp=tmp, html=html_text, shot=shot, dom=dom, probed=probed,
                           md=(tmp / "report.md").read_text())


def test_the_screenshot_is_a_real_page(rendered):
    from PIL import Image, ImageStat

    data = rendered.shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000, len(data)
    img = Image.open(io.BytesIO(data)).convert("L")
    assert img.size == (1200, 3000)
    stddev = ImageStat.Stat(img).stddev[0]
    assert stddev > 10, f"the screenshot is nearly blank (grey-level stddev {stddev:.1f})"
    # text and charts reach far down the page, not only its top
    lower = img.crop((0, 1500, 1200, 3000))
    assert ImageStat.Stat(lower).stddev[0] > 5


def test_markdown_is_rendered_not_shown(rendered):
    assert "**" in rendered.md  # the Markdown report has bold ...
    assert re.search(r"<strong>fallback</strong>", rendered.dom), "bold is not rendered as <strong>"
    assert "**fallback**" not in rendered.dom
    assert "<table>" in rendered.dom and "<th>benchmark</th>" in rendered.dom and "<td>math500</td>" in rendered.dom
    assert "<h2>By stage (ablation)</h2>" in rendered.dom and "<td>+DPO</td>" in rendered.dom


def test_every_chart_is_an_inline_png_the_browser_decoded(rendered):
    from PIL import Image

    uris = re.findall(r"src=['\"]data:image/png;base64,([A-Za-z0-9+/=]+)['\"]", rendered.html)
    assert len(uris) == 3  # ablation, training curves, completion-length histograms
    for uri in uris:
        img = Image.open(io.BytesIO(base64.b64decode(uri)))
        assert img.format == "PNG" and img.width > 300 and img.height > 200
    probe = re.search(r"<pre id=\"probe\">(.*?)</pre>", rendered.probed, re.S)
    assert probe, rendered.probed[-2000:]
    images = json.loads(probe.group(1).replace("&quot;", '"'))
    assert {alt for alt, *_ in images} == {"pass@1 by stage", "training curves", "completion length, base vs final"}
    for alt, complete, width, height in images:
        assert complete and width > 300 and height > 200, (alt, width, height)


def test_the_page_is_self_contained(rendered):
    assert "Content-Security-Policy" in rendered.html and "default-src 'none'" in rendered.html
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", rendered.html)
    assert "<script" not in rendered.html.lower()  # the report itself carries no script at all


def test_examples_side_by_side_with_untrusted_text_escaped(rendered):
    dom = rendered.dom
    assert "<h2>Examples: base vs final</h2>" in dom
    table = dom.split("<h2>Examples: base vs final</h2>", 1)[1]
    assert "<th>base</th><th>final</th>" in table
    rows = re.findall(r"<tr><td>(math500|gsm8k) <code>([^<]+)</code>", table)
    assert len(rows) == 4 and {b for b, _ in rows} == {"math500", "gsm8k"}  # the benchmarks take turns
    assert table.count("class=\"ok\"") >= 4  # the final model fixed these: they come first
    # the hostile completion is text: no element came out of it, and Markdown inside it is not bold
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in table
    assert "<img src=\"x\"" not in dom and "pwned</title>" not in dom
    assert "<strong>not bold</strong>" not in dom


def test_the_curves_come_from_each_training_stages_summary(rendered):
    from thinkforge.stages.report import training_curves

    assert training_curves({}) == b""  # no history, no chart
    assert "training curves" in rendered.html
    # a stage that is off, or a summary with no history (generate, filter), is left out without error
    from thinkforge.components.common import report_histories

    rl = json.loads((rendered.tmp / "summary-rl.json").read_text())
    got = report_histories({"rl": rl, "sft": {"steps": 3}, "dpo": {"skipped": True}, "generate": {"history": []}})
    assert list(got) == ["rl"] and {"reward", "kl", "temperature"} <= set(got["rl"][0])
