"""Stage metrics end to end: a real Pushgateway and Prometheus (tests/plugins/prometheus.py), the
/metrics endpoint, push failures, the catalog's strictness, the Trainer callback, progress and logs."""

from __future__ import annotations

import io
import json
import logging
import math
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from plugins.prometheus import free_port
from prometheus_client.parser import text_string_to_metric_families

from thinkforge import metrics as tm
from thinkforge.config import MetricsConfig, Recipe
from thinkforge.metrics import CATALOG, StageMetrics
from thinkforge.progress import configure_logging, get_logger, progress, progress_enabled, redact


def _run_id(tag: str) -> str:
    return f"test-{tag}-{uuid.uuid4().hex[:8]}"


def _smoke_filter(rollouts: list[dict], out: Path, m: StageMetrics) -> int:
    """A stage-shaped filter: keeps rollouts whose answer matches, writes them, counts both."""
    kept = []
    for r in rollouts:
        if r["extracted"] is None:
            m.inc("thinkforge_filter_dropped_total", reason="no_answer")
        elif r["extracted"] != r["answer"]:
            m.inc("thinkforge_filter_dropped_total", reason="wrong_answer")
        else:
            kept.append(r)
            m.inc("filter_kept_total")  # the short form of the same name
    out.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return len(kept)


# -- the real services ----------------------------------------------------------------------------


def test_filter_stage_counts_reach_prometheus(prometheus, pushgateway, tmp_path):
    run_id = _run_id("filter")
    rollouts = [{"answer": "4", "extracted": "4"}] * 7 + [{"answer": "4", "extracted": "5"}] * 3 + [
        {"answer": "4", "extracted": None}
    ]
    cfg = MetricsConfig(push_url=pushgateway.url, push_interval_s=0.2)
    out = tmp_path / "kept.jsonl"
    with StageMetrics("filter", run_id, recipe="smoke", model="tiny-llama", cfg=cfg) as m:
        n_kept = _smoke_filter(rollouts, out, m)
        # While the stage runs the interval pusher keeps it visible as up.
        prometheus.wait_for(f'thinkforge_stage_up{{run_id="{run_id}",stage="filter"}} == 1')
    # A short stage with a long push interval is still recorded: the final push on exit.
    with StageMetrics("evaluate", run_id, "smoke", "tiny-llama", MetricsConfig(push_url=pushgateway.url, push_interval_s=3600)) as e:
        e.set("thinkforge_eval_accuracy", 0.625, benchmark="word-problems", metric="pass@1")

    assert n_kept == len(out.read_text().splitlines()) == 7
    sel = f'run_id="{run_id}"'
    status = prometheus.wait_for(
        f'thinkforge_stage_status{{{sel},status="success"}} == 1', lambda r: len(r) == 2
    )
    assert {s["metric"]["stage"] for s in status} == {"filter", "evaluate"}
    kept = prometheus.query(f"thinkforge_filter_kept_total{{{sel}}}")
    assert len(kept) == 1 and float(kept[0]["value"][1]) == n_kept == 7
    labels = kept[0]["metric"]
    assert labels["stage"] == "filter" and labels["recipe"] == "smoke" and labels["model"] == "tiny-llama"
    assert labels["job"] == tm.PUSH_JOB  # honor_labels keeps the pushed job/grouping labels
    dropped = prometheus.values(prometheus.query(f"thinkforge_filter_dropped_total{{{sel}}}"), "reason")
    assert dropped == {"wrong_answer": 3.0, "no_answer": 1.0}
    up = prometheus.values(prometheus.query(f"thinkforge_stage_up{{{sel}}}"), "stage")
    assert up == {"filter": 0.0, "evaluate": 0.0}
    acc = prometheus.query(f'thinkforge_eval_accuracy{{{sel},benchmark="word-problems",metric="pass@1"}}')
    assert [float(s["value"][1]) for s in acc] == [0.625]
    assert m.pushes_ok >= 2 and m.pushes_failed == 0
    # Pushgateway groups are keyed by run and stage.
    groups = [g["labels"] for g in pushgateway.groups()["data"]]
    assert {"job": tm.PUSH_JOB, "run_id": run_id, "stage": "filter"} in groups
    assert {"job": tm.PUSH_JOB, "run_id": run_id, "stage": "evaluate"} in groups


def test_real_filter_stage_kept_matches_output(prometheus, pushgateway, tmp_path):
    """The filter stage's own result, recorded the way its component does, equals its output."""
    pytest.importorskip("thinkforge.verify", reason="thinkforge.verify not built yet")
    filt = pytest.importorskip("thinkforge.stages.filter")
    rows = []
    for i in range(4):
        for j, ans in enumerate(["7", "7", "3"]):
            rows.append({"problem_id": f"p{i}", "sample_index": j, "problem": f"{i} + 7 - {i}?",
                         "answer": "7", "completion": f"so \\boxed{{{ans}}}", "finish_reason": "stop"})
    src = tmp_path / "rollouts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_id = _run_id("realfilter")
    with StageMetrics("filter", run_id, "smoke", "tiny", MetricsConfig(push_url=pushgateway.url)) as m:
        res = filt.filter_rollouts(Recipe(), src, tmp_path / "out")
        m.inc("thinkforge_filter_kept_total", res.kept)
        for reason, n in res.counts.items():
            if reason != "correct" and n:
                m.inc("thinkforge_filter_dropped_total", n, reason=reason)
    n_out = len((tmp_path / "out" / "midtrain.jsonl").read_text().splitlines())
    got = prometheus.wait_for(f'thinkforge_filter_kept_total{{run_id="{run_id}"}}')
    assert float(got[0]["value"][1]) == n_out == res.kept


def test_metrics_endpoint_serves_values():
    port = free_port()
    cfg = MetricsConfig(http_port=port)
    with StageMetrics("sft", _run_id("http"), "smoke", "tiny", cfg, http_addr="127.0.0.1") as m:
        m.set("thinkforge_train_loss", 1.5)
        m.inc("thinkforge_generate_http_errors_total", 2, code="503")
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {(s.name, s.labels.get("code")): s.value
               for f in text_string_to_metric_families(body) for s in f.samples}
    assert samples[("thinkforge_train_loss", None)] == 1.5
    assert samples[("thinkforge_generate_http_errors_total", "503")] == 2
    assert samples[("thinkforge_stage_up", None)] == 1
    with pytest.raises(OSError):  # the server is gone after the stage
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


# -- failure handling -------------------------------------------------------------------------------


def test_push_to_dead_url_logs_once_and_never_raises(caplog):
    cfg = MetricsConfig(push_url=f"http://127.0.0.1:{free_port()}", push_interval_s=0.05)
    caplog.set_level(logging.DEBUG, logger="thinkforge.metrics")
    # Attach directly: configure_logging() elsewhere may have stopped propagation to the root.
    logging.getLogger("thinkforge.metrics").addHandler(caplog.handler)
    with StageMetrics("rl", _run_id("dead"), "smoke", "tiny", cfg, push_timeout_s=1) as m:
        m.set("thinkforge_rl_reward_mean", 0.5)
        time.sleep(0.4)
        assert m.push() is False
    logging.getLogger("thinkforge.metrics").removeHandler(caplog.handler)
    assert m.pushes_failed >= 3 and m.pushes_ok == 0
    warnings = [r for r in set(caplog.records) if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "push to http://127.0.0.1" in warnings[0].getMessage()
    assert m.status == "success" and m.get("thinkforge_stage_status", status="success") == 1


def test_failed_stage_records_failed_and_reraises():
    m = StageMetrics.disabled(stage="dpo")
    with pytest.raises(RuntimeError, match="boom"), m:
        m.set("train_loss", float("nan"))
        raise RuntimeError("boom")
    assert m.status == "failed"
    assert m.get("thinkforge_stage_status", status="failed") == 1
    assert m.get("thinkforge_stage_status", status="success") == 0
    assert m.get("thinkforge_stage_up") == 0
    assert math.isnan(m.get("thinkforge_train_loss"))


def test_checkpoint_upload_helper():
    m = StageMetrics.disabled(stage="sft")
    with m.upload(1000):
        time.sleep(0.01)
    with pytest.raises(ConnectionError), m.upload(500):
        raise ConnectionError("s3 down")
    assert m.get("thinkforge_checkpoint_upload_bytes_total") == 1000
    assert m.get("thinkforge_checkpoint_uploads_total") == 1
    assert m.get("thinkforge_checkpoint_upload_failures_total") == 1
    assert m.get("thinkforge_checkpoint_upload_seconds_total") >= 0.01


def test_only_rank_zero_serves_and_pushes(monkeypatch):
    cfg = MetricsConfig(push_url="http://127.0.0.1:1", http_port=9999)
    monkeypatch.setenv("RANK", "1")
    assert not StageMetrics("sft", "r", cfg=cfg).enabled
    assert StageMetrics("sft", "r", cfg=cfg, all_ranks=True).enabled
    monkeypatch.setenv("RANK", "0")
    assert StageMetrics("sft", "r", cfg=cfg).enabled


def test_clean_sys_exit_counts_as_success():
    m = StageMetrics.disabled()
    with pytest.raises(SystemExit), m:
        raise SystemExit(0)
    assert m.status == "success"


def test_unknown_names_and_labels_fail_at_the_call():
    m = StageMetrics.disabled()
    with pytest.raises(KeyError, match="did you mean thinkforge_filter_kept_total"):
        m.inc("thinkforge_filter_kept")
    with pytest.raises(KeyError):
        m.set("thinkforge_train_los", 1.0)
    with pytest.raises(KeyError, match="reason"):
        m.inc("thinkforge_filter_dropped_total")  # missing its reason label
    with pytest.raises(KeyError):
        m.set("thinkforge_train_loss", 1.0, reason="x")  # a label it does not take
    with pytest.raises(TypeError):
        m.set("thinkforge_filter_kept_total", 3)  # counters only go up
    assert m.push() is False and not m.enabled


def test_disabled_stage_records_and_tracks_progress():
    m = StageMetrics.disabled(stage="generate", run_id="r1", recipe="default", model="m")
    with m:
        t0 = m.get("thinkforge_stage_last_progress_timestamp_seconds")
        time.sleep(0.01)
        m.set("thinkforge_generate_prompts_planned", 10)
        assert m.get("thinkforge_stage_last_progress_timestamp_seconds") == t0  # a total is not progress
        m.set("thinkforge_generate_prompts_done", 3)
        assert m.get("thinkforge_stage_last_progress_timestamp_seconds") > t0
        m.inc("thinkforge_generate_samples_total", 12)
    assert m.get("thinkforge_generate_prompts_done") == 3
    assert m.get("thinkforge_generate_samples_total") == 12
    assert m.get("thinkforge_stage_duration_seconds") > 0
    text = m.exposition().decode()
    assert 'thinkforge_generate_prompts_done{model="m",recipe="default",run_id="r1",stage="generate"} 3.0' in text


def test_catalog_is_complete_and_consistent():
    for d in CATALOG.values():
        assert d.name.startswith("thinkforge_") and d.help
        assert (d.type == "counter") == d.name.endswith("_total"), d.name
        assert d.labels[:4] == ("run_id", "stage", "recipe", "model")
        assert d.name in (tm.__doc__ or ""), f"{d.name} missing from the docstring table"
    needed = {
        "thinkforge_stage_up", "thinkforge_stage_last_progress_timestamp_seconds", "thinkforge_stage_duration_seconds",
        "thinkforge_stage_status", "thinkforge_generate_prompts_done", "thinkforge_generate_prompts_planned",
        "thinkforge_generate_samples_per_second", "thinkforge_generate_output_tokens_per_second",
        "thinkforge_generate_http_errors_total", "thinkforge_generate_http_retries_total",
        "thinkforge_filter_kept_total", "thinkforge_filter_dropped_total", "thinkforge_train_loss",
        "thinkforge_train_learning_rate", "thinkforge_train_grad_norm", "thinkforge_train_tokens_per_second",
        "thinkforge_train_mfu", "thinkforge_train_gpu_memory_peak_bytes", "thinkforge_train_step",
        "thinkforge_train_epoch", "thinkforge_rl_reward_mean", "thinkforge_rl_reward_std",
        "thinkforge_rl_zero_spread_fraction", "thinkforge_rl_completion_length_mean", "thinkforge_rl_kl",
        "thinkforge_rl_temperature", "thinkforge_eval_accuracy", "thinkforge_checkpoint_upload_bytes_total",
        "thinkforge_checkpoint_upload_seconds_total", "thinkforge_checkpoint_upload_failures_total",
    }
    assert needed <= set(CATALOG)
    assert CATALOG["thinkforge_eval_accuracy"].extra_labels == ("benchmark", "metric")


def test_for_recipe_labels():
    r = Recipe()
    m = StageMetrics.for_recipe("sft", r, recipe_name="default")
    assert m.base == {"run_id": r.run.name, "stage": "sft", "recipe": "default", "model": r.model.student}
    assert not m.enabled


def test_import_stays_light():
    code = "import sys, thinkforge.metrics; assert 'transformers' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- the Trainer callback ---------------------------------------------------------------------------


def test_metrics_callback_maps_trl_logs():
    from transformers import TrainerCallback, TrainerControl, TrainerState

    m = StageMetrics.disabled(stage="rl")
    cb = tm.MetricsCallback(m, flops_per_token=6e6, peak_flops_per_device=1e10, world_size=1)
    assert isinstance(cb, TrainerCallback)
    state = TrainerState(global_step=0, max_steps=10, epoch=0.0)
    cb.on_train_begin(None, state, TrainerControl())
    assert m.get("thinkforge_train_max_steps") == 10
    state.global_step, state.epoch = 4, 0.4
    cb.record({"loss": 0.5, "num_tokens": 1000.0}, state, now=100.0)  # sets the tokens baseline
    state.global_step, state.epoch = 5, 0.5
    logs = {
        "loss": 1.25, "learning_rate": 1e-5, "grad_norm": 0.75, "num_tokens": 3000.0,
        "reward": 0.25, "reward_std": 0.5, "frac_reward_zero_std": 0.375, "completions/mean_length": 120.0,
        "completions/clipped_ratio": 0.0625, "kl": 0.01, "temperature": 0.8, "entropy": 1.0,
        "rewards/CorrectnessReward/mean": 0.25,
    }
    cb.record(logs, state, now=102.0)
    expect = {
        "thinkforge_train_loss": 1.25, "thinkforge_train_learning_rate": 1e-5, "thinkforge_train_grad_norm": 0.75,
        "thinkforge_train_step": 5, "thinkforge_train_epoch": 0.5, "thinkforge_rl_reward_mean": 0.25,
        "thinkforge_rl_reward_std": 0.5, "thinkforge_rl_zero_spread_fraction": 0.375,
        "thinkforge_rl_completion_length_mean": 120.0, "thinkforge_rl_completion_clipped_fraction": 0.0625,
        "thinkforge_rl_kl": 0.01, "thinkforge_rl_temperature": 0.8,
        "thinkforge_train_tokens_per_second": 1000.0,  # (3000 - 1000) tokens / 2 s
        "thinkforge_train_mfu": 0.6,  # 1000 tok/s * 6e6 FLOP/tok / 1e10 FLOP/s
    }
    for name, value in expect.items():
        assert m.get(name) == pytest.approx(value), name
    assert m.get("thinkforge_train_gpu_memory_peak_bytes") is None  # no GPU here
    # The callback entry points Trainer calls.
    cb.on_log(None, state, TrainerControl(), logs={"loss": float("nan"), "epoch": 0.6})
    assert math.isnan(m.get("thinkforge_train_loss")) and m.get("thinkforge_train_epoch") == 0.6
    state.global_step = 6
    cb.on_step_end(None, state, TrainerControl())
    assert m.get("thinkforge_train_step") == 6
    cb.on_evaluate(None, state, TrainerControl(), metrics={"eval_loss": 0.9})
    assert m.get("thinkforge_train_eval_loss") == 0.9
    cb.on_log(None, state, TrainerControl(), logs={"rewards/margins": 0.3, "rewards/accuracies": 0.75})
    assert m.get("thinkforge_dpo_reward_margin") == pytest.approx(0.3)
    assert m.get("thinkforge_dpo_reward_accuracy") == 0.75


def test_every_mapped_log_key_targets_a_gauge():
    for key, name in tm.LOG_KEYS.items():
        assert CATALOG[name].type == "gauge", key


# -- progress bars and logs -------------------------------------------------------------------------


def test_progress_quiet_off_tty_unless_forced(monkeypatch):
    monkeypatch.delenv("THINKFORGE_PROGRESS", raising=False)
    assert progress_enabled(io.StringIO()) is False
    bar = progress(range(3), "filter", "rollout")
    assert bar.disable and list(bar) == [0, 1, 2]
    monkeypatch.setenv("THINKFORGE_PROGRESS", "1")
    buf = io.StringIO()
    with progress(5, "generate", "prompt", file=buf) as bar:
        bar.update(5)
    assert "generate" in buf.getvalue() and "5/5" in buf.getvalue()
    monkeypatch.setenv("THINKFORGE_PROGRESS", "0")
    assert progress_enabled() is False


@pytest.fixture
def restore_logging():
    root = logging.getLogger("thinkforge")
    saved = (list(root.handlers), root.propagate, root.level)
    yield
    root.handlers[:], root.propagate, root.level = saved[0], saved[1], saved[2]


def test_structured_logs_carry_run_id_and_redact(monkeypatch, restore_logging):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    monkeypatch.setenv("THINKFORGE_S3_SECRET_KEY", "minio-secret-123")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.delenv("THINKFORGE_LOG_FORMAT", raising=False)
    buf = io.StringIO()
    configure_logging("run-42", stage="generate", stream=buf)
    get_logger("generate").info("token hf_abcdefghijklmnop, s3 %s, url http://u:pw12345@h:9000/x, false",
                                "minio-secret-123")
    line = buf.getvalue().strip()
    assert " INFO run_id=run-42 stage=generate thinkforge.generate: " in line
    assert "hf_abc" not in line and "minio-secret" not in line and "pw12345" not in line
    assert "token ***" in line and "http://u:***@h:9000/x" in line and line.endswith("false")
    assert redact("plain text") == "plain text"
    monkeypatch.setenv("THINKFORGE_LOG_FORMAT", "json")
    configure_logging("run-42", stage="filter", stream=buf)
    get_logger("thinkforge.filter").warning("kept %d", 7)
    rec = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert rec["run_id"] == "run-42" and rec["stage"] == "filter" and rec["message"] == "kept 7"
    assert rec["level"] == "WARNING"
