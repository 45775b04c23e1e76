"""The chart's Grafana dashboard and PrometheusRule use exactly the metrics thinkforge exports.

Also: the expressions parse (``promtool check rules``) and the alerts fire on the situations they
are named for (``promtool test rules``). promtool comes with Debian's ``prometheus`` package
(``scripts/install-test-services.sh``); without it those checks skip.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from thinkforge.metrics import CATALOG, exported_names

ROOT = Path(__file__).resolve().parents[1]
FILES = ROOT / "helm" / "thinkforge" / "files"
DASHBOARD = FILES / "grafana-dashboard.json"
RULES = FILES / "prometheus-rules.yaml"
PROMTOOL = os.environ.get("THINKFORGE_PROMTOOL_BIN", "/usr/bin/promtool")
NAME_RE = re.compile(r"\bthinkforge_[a-z0-9_]+")
# Grafana's variables and macros, replaced by values that keep the PromQL valid.
GRAFANA_SUBST = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$run_id": ".*", "$stage": ".*"}


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _rules() -> dict[str, Any]:
    return yaml.safe_load(RULES.read_text())


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(_panels(p.get("panels", [])))
    return out


def dashboard_exprs() -> list[str]:
    d = _dashboard()
    exprs = [t["expr"] for p in _panels(d["panels"]) for t in p.get("targets", []) if t.get("expr")]
    for v in d["templating"]["list"]:
        q = v.get("query")
        if v["type"] == "query":
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def rule_exprs() -> list[str]:
    return [r["expr"] for g in _rules()["groups"] for r in g["rules"]]


def referenced_names(exprs: list[str]) -> set[str]:
    return {n for e in exprs for n in NAME_RE.findall(e)}


def known(name: str) -> bool:
    """A name a scrape of thinkforge can show. Counters are exposed as ``<family>_total`` (and
    ``<family>_created``), which the catalog names already are; histogram/summary samples add
    ``_bucket``/``_sum``/``_count`` to a catalog name. A counter's bare family name
    (``thinkforge_filter_kept``) is not a series, so it is not accepted."""
    if name in exported_names():
        return True
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and base in CATALOG and CATALOG[base].type in ("histogram", "summary"):
            return True
    return False


def test_name_rules_match_prometheus_client():
    assert known("thinkforge_filter_kept_total") and known("thinkforge_filter_kept_created")
    assert not known("thinkforge_filter_kept")  # a counter family's bare name is never exported
    assert not known("thinkforge_train_loss_total") and not known("thinkforge_no_such_metric")


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_referenced_metric_is_exported(source):
    exprs = dashboard_exprs() if source == "dashboard" else rule_exprs()
    names = referenced_names(exprs)
    assert names, f"no thinkforge metric referenced in the {source}"
    unknown = sorted(n for n in names if not known(n))
    assert not unknown, f"{source} references metrics the code does not export: {unknown}"


def test_dashboard_shows_every_metric():
    shown = referenced_names(dashboard_exprs())
    missing = sorted(set(CATALOG) - shown)
    assert not missing, f"catalog metrics without a dashboard panel: {missing}"


def test_dashboard_structure():
    d = _dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["run_id"]["type"] == "query" and "run_id" in variables["run_id"]["query"]["query"]
    assert variables["stage"]["type"] == "query" and variables["stage"]["includeAll"]
    assert '$run_id' in variables["stage"]["query"]["query"]
    panels = _panels(d["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = {p["title"] for p in panels if p["type"] == "row"}
    assert {"Generation", "Filter", "Training", "RL (GRPO)", "Evaluation", "Checkpoint uploads"} <= titles
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            # Every query follows the run and stage pickers.
            assert 'run_id=~"$run_id"' in t["expr"] and 'stage=~"$stage"' in t["expr"], (p["title"], t["expr"])


def test_required_alerts_exist():
    alerts = {r["alert"]: r for g in _rules()["groups"] for r in g["rules"] if "alert" in r}
    stalled = [a for a in alerts.values()
               if "thinkforge_stage_last_progress_timestamp_seconds" in a["expr"] and "thinkforge_stage_up" in a["expr"]]
    assert stalled, "no stalled-stage alert"
    nan = [a for a in alerts.values()
           if re.search(r"thinkforge_train_loss\s*!=\s*thinkforge_train_loss|is_?nan", a["expr"], re.I)]
    assert nan, "no NaN-loss alert"
    errors = [a for a in alerts.values()
              if "rate(thinkforge_generate_http_errors_total" in a["expr"] and "thinkforge_generate_requests_total" in a["expr"]]
    assert errors, "no generation error-rate alert"
    for a in alerts.values():
        assert a["labels"]["severity"] in ("info", "warning", "critical")
        assert a["annotations"]["summary"] and a["annotations"]["description"]


# -- promtool: expressions parse, alerts fire -------------------------------------------------------


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    if not os.access(PROMTOOL, os.X_OK):
        pytest.skip(f"{PROMTOOL} not found: bash scripts/install-test-services.sh")
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_rules_file_is_valid_for_prometheus(tmp_path):
    r = _promtool("check", "rules", str(RULES), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_queries_parse(tmp_path):
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        if expr.startswith("label_values("):
            expr = re.fullmatch(r"label_values\((.*),\s*\w+\)", expr).group(1)
        for k, v in GRAFANA_SUBST.items():
            expr = expr.replace(k, v)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    (tmp_path / "dash.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = _promtool("check", "rules", "dash.yml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def _expected(alertname: str, labels: dict[str, str], value: str = "") -> dict[str, Any]:
    """An alert as promtool reports it: the rule's labels plus ``labels``, templated annotations."""
    rule = next(r for g in _rules()["groups"] for r in g["rules"] if r.get("alert") == alertname)

    def render(text: str) -> str:
        text = re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels[m.group(1)], text)
        return re.sub(r"\{\{\s*\$value[^}]*\}\}", value, text)

    return {"exp_labels": {**rule.get("labels", {}), **labels},
            "exp_annotations": {k: render(v) for k, v in rule.get("annotations", {}).items()}}


def test_alerts_fire_when_they_should(tmp_path):
    (tmp_path / "rules.yml").write_text(RULES.read_text())
    base = 'run_id="{run}",stage="{stage}",recipe="r",model="m",job="thinkforge"'

    def s(metric: str, run: str, stage: str, values: str, extra: str = "") -> dict[str, str]:
        labels = base.format(run=run, stage=stage) + (f",{extra}" if extra else "")
        return {"series": f"{metric}{{{labels}}}", "values": values}

    tests = [
        {   # stalled: up with a frozen progress timestamp; a progressing and a finished stage stay quiet
            "interval": "1m",
            "input_series": [
                s("thinkforge_stage_up", "hung", "generate", "1x40"),
                s("thinkforge_stage_last_progress_timestamp_seconds", "hung", "generate", "0x40"),
                s("thinkforge_stage_up", "busy", "sft", "1x40"),
                s("thinkforge_stage_last_progress_timestamp_seconds", "busy", "sft", "0+60x40"),
                s("thinkforge_stage_up", "done", "filter", "0x40"),
                s("thinkforge_stage_last_progress_timestamp_seconds", "done", "filter", "0x40"),
            ],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "ThinkforgeStageStalled", "exp_alerts": []},
                {"eval_time": "30m", "alertname": "ThinkforgeStageStalled",
                 "exp_alerts": [_expected("ThinkforgeStageStalled", {"run_id": "hung", "stage": "generate"})]},
            ],
        },
        {   # NaN and Inf loss fire at once; a finite loss does not; scrape + push duplicates give one alert
            "interval": "1m",
            "input_series": [
                s("thinkforge_train_loss", "nan", "sft", "2 1.5 NaN NaN"),
                s("thinkforge_train_loss", "nan", "sft", "2 1.5 NaN NaN", 'instance="pod:9400"'),
                s("thinkforge_stage_last_progress_timestamp_seconds", "nan", "sft", "0+60x4"),
                s("thinkforge_train_loss", "inf", "rl", "1 Inf Inf Inf"),
                s("thinkforge_stage_last_progress_timestamp_seconds", "inf", "rl", "0+60x4"),
                s("thinkforge_train_loss", "fine", "dpo", "1 0.9 0.8 0.7"),
                s("thinkforge_stage_last_progress_timestamp_seconds", "fine", "dpo", "0+60x4"),
            ],
            "alert_rule_test": [
                {"eval_time": "1m", "alertname": "ThinkforgeLossNaN",
                 "exp_alerts": [_expected("ThinkforgeLossNaN", {"run_id": "inf", "stage": "rl"})]},
                {"eval_time": "3m", "alertname": "ThinkforgeLossNaN",
                 "exp_alerts": [_expected("ThinkforgeLossNaN", {"run_id": "inf", "stage": "rl"}),
                                _expected("ThinkforgeLossNaN", {"run_id": "nan", "stage": "sft"})]},
            ],
        },
        {   # generation errors: 50% of requests failing fires after 2 minutes; 1% does not
            "interval": "1m",
            "input_series": [
                s("thinkforge_generate_requests_total", "bad", "generate", "0+100x20"),
                s("thinkforge_generate_http_errors_total", "bad", "generate", "0+30x20", 'code="503"'),
                s("thinkforge_generate_http_errors_total", "bad", "generate", "0+20x20", 'code="timeout"'),
                s("thinkforge_generate_requests_total", "ok", "generate", "0+100x20"),
                s("thinkforge_generate_http_errors_total", "ok", "generate", "0+1x20", 'code="503"'),
            ],
            "alert_rule_test": [
                {"eval_time": "2m", "alertname": "ThinkforgeGenerationErrorRate", "exp_alerts": []},
                {"eval_time": "10m", "alertname": "ThinkforgeGenerationErrorRate",
                 "exp_alerts": [_expected("ThinkforgeGenerationErrorRate", {"run_id": "bad", "stage": "generate"}, "50%")]},
            ],
        },
        {   # a failed stage, and checkpoint upload failures
            "interval": "1m",
            "input_series": [
                s("thinkforge_stage_status", "broke", "dpo", "0 1 1", 'status="failed"'),
                s("thinkforge_stage_status", "broke", "dpo", "1 0 0", 'status="running"'),
                s("thinkforge_stage_last_progress_timestamp_seconds", "broke", "dpo", "0 60 60"),
                s("thinkforge_checkpoint_upload_failures_total", "broke", "sft", "0 0 1"),
            ],
            "alert_rule_test": [
                {"eval_time": "0m", "alertname": "ThinkforgeStageFailed", "exp_alerts": []},
                {"eval_time": "2m", "alertname": "ThinkforgeStageFailed",
                 "exp_alerts": [_expected("ThinkforgeStageFailed", {"run_id": "broke", "stage": "dpo"})]},
                {"eval_time": "2m", "alertname": "ThinkforgeCheckpointUploadFailing",
                 "exp_alerts": [_expected("ThinkforgeCheckpointUploadFailing", {"run_id": "broke", "stage": "sft"})]},
            ],
        },
    ]
    doc = {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    r = _promtool("test", "rules", "tests.yml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
