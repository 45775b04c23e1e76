"""Prometheus metrics of every thinkforge stage: one catalog of stable names, two ways out.

Every series carries the labels ``run_id``, ``stage``, ``recipe`` and ``model``; a few add the
extra labels named in the table. Names are the exact PromQL names: counters end in ``_total``
(``prometheus_client`` exposes a counter family ``x`` as the sample ``x_total``). Dashboards
(``helm/thinkforge/files/grafana-dashboard.json``) and alerts (``prometheus-rules.yaml``) use
only these names; ``tests/test_dashboards.py`` checks that.

======================================================  =======  =================  ==============================================
name                                                    type     extra labels       meaning
======================================================  =======  =================  ==============================================
thinkforge_stage_up                                     gauge                       1 while the stage runs, 0 once it has ended
thinkforge_stage_start_timestamp_seconds                gauge                       Unix time the stage started
thinkforge_stage_last_progress_timestamp_seconds        gauge                       Unix time of the last unit of progress
                                                                                    (stalled-stage alert: up == 1 and old)
thinkforge_stage_duration_seconds                       gauge                       seconds since start (final value at the end)
thinkforge_stage_status                                 gauge    status             1 for the current status (running, success,
                                                                                    failed), 0 for the others
thinkforge_generate_prompts_done                        gauge                       prompts whose samples are all generated
thinkforge_generate_prompts_planned                     gauge                       prompts this generation stage will process
thinkforge_generate_samples_total                       counter                     completions generated
thinkforge_generate_output_tokens_total                 counter                     completion tokens generated
thinkforge_generate_samples_per_second                  gauge                       recent completions per second
thinkforge_generate_output_tokens_per_second            gauge                       recent completion tokens per second
thinkforge_generate_requests_total                      counter                     engine/HTTP requests sent (incl. retries)
thinkforge_generate_http_errors_total                   counter  code               failed requests by HTTP status (or "timeout",
                                                                                    "connection")
thinkforge_generate_http_retries_total                  counter  code               requests retried, by the code that caused it
thinkforge_filter_kept_total                            counter                     rollouts accepted (answer verified)
thinkforge_filter_dropped_total                         counter  reason             rollouts rejected, by reason (wrong_answer,
                                                                                    no_answer, too_long, duplicate, ...)
thinkforge_train_loss                                   gauge                       last logged training loss
thinkforge_train_eval_loss                              gauge                       last validation loss
thinkforge_train_learning_rate                          gauge                       current learning rate
thinkforge_train_grad_norm                              gauge                       last gradient norm (before clipping)
thinkforge_train_tokens_per_second                      gauge                       training tokens per second (all devices)
thinkforge_train_mfu                                    gauge                       model FLOPs utilization, 0..1 (when the
                                                                                    FLOPs per token and peak FLOP/s are known)
thinkforge_train_gpu_memory_peak_bytes                  gauge                       peak allocated GPU memory of this process
thinkforge_train_step                                   gauge                       optimizer steps done
thinkforge_train_max_steps                              gauge                       optimizer steps planned
thinkforge_train_epoch                                  gauge                       fractional epoch
thinkforge_dpo_reward_margin                            gauge                       DPO mean implicit reward margin chosen-rejected
thinkforge_dpo_reward_accuracy                          gauge                       DPO share of pairs with chosen > rejected
thinkforge_rl_reward_mean                               gauge                       GRPO mean reward of the last batch
thinkforge_rl_reward_std                                gauge                       GRPO reward standard deviation
thinkforge_rl_zero_spread_fraction                      gauge                       share of groups whose rewards are all equal
                                                                                    (they carry no gradient)
thinkforge_rl_completion_length_mean                    gauge                       mean completion length, tokens
thinkforge_rl_completion_clipped_fraction               gauge                       share of completions cut at the length limit
thinkforge_rl_kl                                        gauge                       KL to the reference policy
thinkforge_rl_temperature                               gauge                       rollout temperature (annealed)
thinkforge_eval_accuracy                                gauge    benchmark, metric  score in 0..1, e.g. metric="pass@1"
thinkforge_eval_problems_done                           gauge    benchmark          problems scored so far
thinkforge_eval_problems_planned                        gauge    benchmark          problems to score
thinkforge_checkpoint_uploads_total                     counter                     checkpoint uploads completed
thinkforge_checkpoint_upload_bytes_total                counter                     bytes uploaded
thinkforge_checkpoint_upload_seconds_total              counter                     seconds spent uploading
thinkforge_checkpoint_upload_failures_total             counter                     uploads that failed (after retries)
======================================================  =======  =================  ==============================================

Use from a stage::

    with StageMetrics("filter", run_id, recipe="default", model=student, cfg=recipe.metrics) as m:
        m.inc("thinkforge_filter_kept_total", 7)
        m.inc("thinkforge_filter_dropped_total", 3, reason="wrong_answer")

Names may be given without the ``thinkforge_`` prefix (``m.inc("filter_kept_total")``); anything
not in the catalog raises ``KeyError`` at the call. Metrics marked *progress* in ``CATALOG`` bump
``thinkforge_stage_last_progress_timestamp_seconds`` when they change.

Two ways out, both from ``MetricsConfig``: ``http_port`` > 0 serves ``/metrics`` while the stage
runs (the chart's PodMonitor scrapes it); ``push_url`` pushes to a Pushgateway every
``push_interval_s`` and once at the end, grouped by ``{run_id, stage}``. A push failure is logged
(once per kind of failure) and never raised. When both a scrape and a push reach Prometheus, the
same series arrives twice with different ``job``/``instance`` labels: aggregate with
``max by (...)`` (as the dashboard does).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, push_to_gateway

if TYPE_CHECKING:  # pragma: no cover
    from thinkforge.config import MetricsConfig, Recipe

log = logging.getLogger("thinkforge.metrics")

PREFIX = "thinkforge_"
BASE_LABELS = ("run_id", "stage", "recipe", "model")
PUSH_JOB = "thinkforge"
STATUSES = ("running", "success", "failed")


@dataclass(frozen=True)
class MetricDef:
    """One catalog entry. ``name`` is the PromQL name (counters end in ``_total``)."""

    name: str
    type: str  # "gauge" | "counter"
    help: str
    extra_labels: tuple[str, ...] = ()
    progress: bool = False  # a change counts as progress for the stalled-stage alert

    @property
    def labels(self) -> tuple[str, ...]:
        return BASE_LABELS + self.extra_labels

    @property
    def family(self) -> str:
        """The name prometheus_client registers (a counter's name without ``_total``)."""
        return self.name[: -len("_total")] if self.type == "counter" else self.name


def _g(name: str, help: str, *extra: str, progress: bool = False) -> MetricDef:
    return MetricDef(PREFIX + name, "gauge", help, tuple(extra), progress)


def _c(name: str, help: str, *extra: str, progress: bool = False) -> MetricDef:
    assert name.endswith("_total"), name
    return MetricDef(PREFIX + name, "counter", help, tuple(extra), progress)


_DEFS = [
    # stage lifecycle
    _g("stage_up", "1 while the stage runs, 0 once it has ended."),
    _g("stage_start_timestamp_seconds", "Unix time the stage started."),
    _g("stage_last_progress_timestamp_seconds", "Unix time of the stage's last unit of progress."),
    _g("stage_duration_seconds", "Seconds since the stage started (final value once it ends)."),
    _g("stage_status", "1 for the stage's current status (running, success, failed), 0 for the others.", "status"),
    # generation
    _g("generate_prompts_done", "Prompts whose samples are all generated.", progress=True),
    _g("generate_prompts_planned", "Prompts the generation stage will process."),
    _c("generate_samples_total", "Completions generated.", progress=True),
    _c("generate_output_tokens_total", "Completion tokens generated.", progress=True),
    _g("generate_samples_per_second", "Recent completions per second."),
    _g("generate_output_tokens_per_second", "Recent completion tokens per second."),
    _c("generate_requests_total", "Engine/HTTP requests sent, retries included."),
    _c("generate_http_errors_total", "Failed requests by HTTP status code (or timeout/connection).", "code"),
    _c("generate_http_retries_total", "Requests retried, by the code that caused the retry.", "code"),
    # filter
    _c("filter_kept_total", "Rollouts accepted (final answer verified).", progress=True),
    _c("filter_dropped_total", "Rollouts rejected, by reason.", "reason", progress=True),
    # training (mid-train, SFT, DPO, RL)
    _g("train_loss", "Last logged training loss."),
    _g("train_eval_loss", "Last validation loss."),
    _g("train_learning_rate", "Current learning rate."),
    _g("train_grad_norm", "Last gradient norm (before clipping)."),
    _g("train_tokens_per_second", "Training tokens per second, all devices."),
    _g("train_mfu", "Model FLOPs utilization 0..1 (when FLOPs per token and peak FLOP/s are known)."),
    _g("train_gpu_memory_peak_bytes", "Peak allocated GPU memory of this process."),
    _g("train_step", "Optimizer steps done.", progress=True),
    _g("train_max_steps", "Optimizer steps planned."),
    _g("train_epoch", "Fractional epoch."),
    _g("dpo_reward_margin", "DPO mean implicit reward margin, chosen minus rejected."),
    _g("dpo_reward_accuracy", "DPO share of pairs whose chosen reward exceeds the rejected one."),
    # RL
    _g("rl_reward_mean", "GRPO mean reward of the last logged batch."),
    _g("rl_reward_std", "GRPO reward standard deviation of the last logged batch."),
    _g("rl_zero_spread_fraction", "Share of prompt groups whose rewards are all equal (no gradient)."),
    _g("rl_completion_length_mean", "Mean completion length in tokens."),
    _g("rl_completion_clipped_fraction", "Share of completions cut at the length limit."),
    _g("rl_kl", "KL divergence to the reference policy."),
    _g("rl_temperature", "Rollout sampling temperature."),
    # evaluation
    _g("eval_accuracy", "Benchmark score in 0..1 by metric (e.g. pass@1).", "benchmark", "metric"),
    _g("eval_problems_done", "Benchmark problems scored so far.", "benchmark", progress=True),
    _g("eval_problems_planned", "Benchmark problems to score.", "benchmark"),
    # checkpoints
    _c("checkpoint_uploads_total", "Checkpoint uploads completed.", progress=True),
    _c("checkpoint_upload_bytes_total", "Checkpoint bytes uploaded.", progress=True),
    _c("checkpoint_upload_seconds_total", "Seconds spent uploading checkpoints."),
    _c("checkpoint_upload_failures_total", "Checkpoint uploads that failed after retries."),
]

CATALOG: dict[str, MetricDef] = {d.name: d for d in _DEFS}
"""Every metric thinkforge exports, by PromQL name."""

_PROGRESS_TS = PREFIX + "stage_last_progress_timestamp_seconds"


def metric_def(name: str) -> MetricDef:
    """The catalog entry for ``name`` (with or without the ``thinkforge_`` prefix); KeyError otherwise."""
    d = CATALOG.get(name) or CATALOG.get(PREFIX + name)
    if d is None:
        close = difflib.get_close_matches(name if name.startswith(PREFIX) else PREFIX + name, CATALOG, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown thinkforge metric {name!r}{hint}")
    return d


def exported_names() -> set[str]:
    """Every series name a scrape can show: catalog names plus counters' ``_created`` samples."""
    out = set(CATALOG)
    out |= {d.family + "_created" for d in CATALOG.values() if d.type == "counter"}
    return out


class StageMetrics:
    """The metrics of one stage run, in a registry of its own.

    ``StageMetrics(stage, run_id, recipe, model, cfg)``; use as a context manager. Entering starts
    the ``/metrics`` server (``cfg.http_port`` > 0) and the pusher thread (``cfg.push_url`` set);
    leaving records the status (success, or failed when an exception escapes), pushes once more
    and stops both. Nothing here raises into the stage except catalog/label errors at the call.

    - ``set(name, value, **extra_labels)``: a gauge; ``inc(name, amount=1, **extra_labels)``: a
      counter (or gauge); ``get(name, **extra_labels)``: read a value back (None if never set).
    - ``observe_progress()``: bump the last-progress timestamp (metrics marked ``progress`` in the
      catalog do it themselves).
    - ``upload(nbytes)``: context manager timing one checkpoint upload.
    - ``push()``: push now (False on failure, never raises); ``exposition()``: the text format.
    - ``StageMetrics.disabled(...)``: no server, no pushes, values still recorded.
    - ``StageMetrics.for_recipe(stage, recipe, run_id="", recipe_name="")``: labels from a Recipe.

    In a multi-process job only rank 0 (``RANK`` unset or 0) serves and pushes unless
    ``all_ranks=True``; other ranks record locally.
    """

    def __init__(
        self,
        stage: str,
        run_id: str,
        recipe: str = "",
        model: str = "",
        cfg: MetricsConfig | None = None,
        *,
        push_timeout_s: float = 5.0,
        http_addr: str = "0.0.0.0",
        all_ranks: bool = False,
    ) -> None:
        self.stage = stage
        self.run_id = run_id
        self.base = {"run_id": run_id, "stage": stage, "recipe": recipe, "model": model}
        self.push_url = (getattr(cfg, "push_url", "") or "").rstrip("/")
        self.push_interval_s = float(getattr(cfg, "push_interval_s", 15.0) or 15.0)
        self.http_port = int(getattr(cfg, "http_port", 0) or 0)
        rank = _process_rank()
        if rank and not all_ranks and (self.push_url or self.http_port):
            # Several ranks would fight over one port and overwrite one push group: rank 0 speaks.
            log.debug("metrics: rank %d records locally only (no /metrics, no pushes)", rank)
            self.push_url, self.http_port = "", 0
        self.http_addr = http_addr
        self.push_timeout_s = push_timeout_s
        self.registry = CollectorRegistry()
        self._metrics: dict[str, Gauge | Counter] = {}
        for d in CATALOG.values():
            cls = Counter if d.type == "counter" else Gauge
            self._metrics[d.name] = cls(d.family, d.help, labelnames=d.labels, registry=self.registry)
        self._lock = threading.Lock()
        self._push_failures: set[str] = set()
        self._push_failing = False
        self.pushes_ok = 0
        self.pushes_failed = 0
        self._stop = threading.Event()
        self._pusher: threading.Thread | None = None
        self._server: Any = None
        self._server_thread: threading.Thread | None = None
        self._start: float | None = None
        self._start_mono: float | None = None
        self.status = "created"

    # -- construction helpers ------------------------------------------------------------------

    @classmethod
    def disabled(cls, stage: str = "test", run_id: str = "local", recipe: str = "", model: str = "") -> StageMetrics:
        """A StageMetrics with no server and no pushes; values still land in ``.registry``."""
        return cls(stage, run_id, recipe, model, cfg=None)

    @classmethod
    def for_recipe(
        cls, stage: str, recipe: Recipe, run_id: str = "", recipe_name: str = "", **kwargs: Any
    ) -> StageMetrics:
        """Labels from a Recipe: run_id defaults to ``recipe.run.label()`` (name and KFP run id), model to
        ``recipe.model.student``."""
        return cls(
            stage,
            run_id or recipe.run.label(),
            recipe_name or recipe.run.name,
            recipe.model.student,
            recipe.metrics,
            **kwargs,
        )

    @property
    def enabled(self) -> bool:
        return bool(self.push_url or self.http_port)

    # -- recording -------------------------------------------------------------------------------

    def _child(self, d: MetricDef, extra: dict[str, Any]) -> Any:
        if set(extra) != set(d.extra_labels):
            want = ", ".join(d.extra_labels) or "none"
            raise KeyError(f"{d.name} takes extra labels ({want}), got ({', '.join(sorted(extra)) or 'none'})")
        return self._metrics[d.name].labels(**self.base, **{k: str(v) for k, v in extra.items()})

    def set(self, name: str, value: float, **extra_labels: Any) -> None:
        """Set a gauge. KeyError for a name outside the catalog or wrong extra labels."""
        d = metric_def(name)
        if d.type != "gauge":
            raise TypeError(f"{d.name} is a counter: use inc()")
        self._child(d, extra_labels).set(float(value))
        if d.progress:
            self.observe_progress()

    def inc(self, name: str, amount: float = 1, **extra_labels: Any) -> None:
        """Increase a counter (or gauge) by ``amount`` (>= 0 for counters)."""
        d = metric_def(name)
        self._child(d, extra_labels).inc(amount)
        if d.progress and amount:
            self.observe_progress()

    def get(self, name: str, **extra_labels: Any) -> float | None:
        """The current value of one series of this stage (None when never set)."""
        d = metric_def(name)
        if set(extra_labels) != set(d.extra_labels):
            raise KeyError(f"{d.name} takes extra labels ({', '.join(d.extra_labels) or 'none'})")
        labels = {**self.base, **{k: str(v) for k, v in extra_labels.items()}}
        return self.registry.get_sample_value(d.name, labels)

    @contextlib.contextmanager
    def upload(self, nbytes: int) -> Iterator[None]:
        """Time a checkpoint upload of ``nbytes``: counts bytes, seconds and uploads on success,
        a failure (then re-raises) otherwise. ``with m.upload(size): client.put(...)``."""
        t0 = time.monotonic()
        try:
            yield
        except BaseException:
            self.inc(PREFIX + "checkpoint_upload_failures_total")
            raise
        self.inc(PREFIX + "checkpoint_upload_seconds_total", time.monotonic() - t0)
        self.inc(PREFIX + "checkpoint_upload_bytes_total", nbytes)
        self.inc(PREFIX + "checkpoint_uploads_total")

    def observe_progress(self) -> None:
        """Record that the stage made progress now (feeds the stalled-stage alert)."""
        self._metrics[_PROGRESS_TS].labels(**self.base).set(time.time())

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (what ``/metrics`` serves)."""
        return generate_latest(self.registry)

    # -- lifecycle -------------------------------------------------------------------------------

    def _set_status(self, status: str) -> None:
        self.status = status
        g = self._metrics[PREFIX + "stage_status"]
        for s in STATUSES:
            g.labels(**self.base, status=s).set(1.0 if s == status else 0.0)

    def _update_duration(self) -> None:
        if self._start_mono is not None:
            self._metrics[PREFIX + "stage_duration_seconds"].labels(**self.base).set(
                time.monotonic() - self._start_mono
            )

    def start(self) -> StageMetrics:
        self._start = time.time()
        self._start_mono = time.monotonic()
        self._metrics[PREFIX + "stage_up"].labels(**self.base).set(1)
        self._metrics[PREFIX + "stage_start_timestamp_seconds"].labels(**self.base).set(self._start)
        self.observe_progress()
        self._update_duration()
        self._set_status("running")
        if self.http_port:
            self._start_server()
        if self.push_url:
            self._stop.clear()
            self._pusher = threading.Thread(target=self._push_loop, name=f"metrics-pusher-{self.stage}", daemon=True)
            self._pusher.start()
        return self

    def finish(self, ok: bool = True) -> None:
        self._stop.set()
        if self._pusher is not None:
            self._pusher.join(timeout=self.push_timeout_s + 1)
            self._pusher = None
        self._metrics[PREFIX + "stage_up"].labels(**self.base).set(0)
        self._update_duration()
        self._set_status("success" if ok else "failed")
        if self.push_url:
            self.push()
        if self._server is not None:
            try:
                self._server.shutdown()
                self._server.server_close()
            except Exception as e:  # pragma: no cover - never fail the stage on teardown
                log.warning("metrics: stopping /metrics server failed: %s", e)
            self._server = None

    def __enter__(self) -> StageMetrics:
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        ok = exc_type is None or (exc_type is SystemExit and getattr(exc, "code", 1) in (0, None))
        self.finish(ok=ok)

    def _start_server(self) -> None:
        from prometheus_client import start_http_server

        try:
            self._server, self._server_thread = start_http_server(self.http_port, self.http_addr, self.registry)
            log.info("metrics: serving /metrics on %s:%d", self.http_addr, self.http_port)
        except OSError as e:
            log.error("metrics: cannot serve /metrics on port %d (%s); continuing without it", self.http_port, e)
            self._server = None

    # -- pushing ---------------------------------------------------------------------------------

    def _push_loop(self) -> None:
        # First push at once (in this thread, so an unreachable gateway never delays the stage).
        self.push()
        while not self._stop.wait(self.push_interval_s):
            self.push()

    def push(self) -> bool:
        """Push the registry to the Pushgateway now. Returns False on failure; never raises."""
        if not self.push_url:
            return False
        self._update_duration()
        try:
            with self._lock:
                push_to_gateway(
                    self.push_url,
                    job=PUSH_JOB,
                    registry=self.registry,
                    grouping_key={"run_id": self.run_id, "stage": self.stage},
                    timeout=self.push_timeout_s,
                )
        except Exception as e:  # noqa: BLE001 - a metrics outage must never stop training
            self.pushes_failed += 1
            self._push_failing = True
            kind = _failure_kind(e)
            if kind not in self._push_failures:
                self._push_failures.add(kind)
                log.warning(
                    "metrics: push to %s failed (%s: %s); training goes on, further %s failures are not logged",
                    self.push_url, kind, _short(e), kind,
                )
            else:
                log.debug("metrics: push failed again (%s)", kind)
            return False
        self.pushes_ok += 1
        if self._push_failing:
            self._push_failing = False
            log.info("metrics: push to %s works again", self.push_url)
        return True


def _process_rank() -> int:
    for var in ("RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(var):
            try:
                return int(os.environ[var])
            except ValueError:
                continue
    return 0


def _failure_kind(e: BaseException) -> str:
    code = getattr(e, "code", None)
    if isinstance(code, int):
        return f"HTTP {code}"
    reason = getattr(e, "reason", None)
    if isinstance(reason, BaseException):
        return type(reason).__name__
    return type(e).__name__


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]


# -- Trainer/TRL callback ---------------------------------------------------------------------------

#: Trainer/TRL log key -> catalog name (gauges set as logged).
LOG_KEYS: dict[str, str] = {
    "loss": PREFIX + "train_loss",
    "learning_rate": PREFIX + "train_learning_rate",
    "grad_norm": PREFIX + "train_grad_norm",
    "epoch": PREFIX + "train_epoch",
    "eval_loss": PREFIX + "train_eval_loss",
    "rewards/margins": PREFIX + "dpo_reward_margin",
    "rewards/accuracies": PREFIX + "dpo_reward_accuracy",
    "reward": PREFIX + "rl_reward_mean",
    "reward_std": PREFIX + "rl_reward_std",
    "frac_reward_zero_std": PREFIX + "rl_zero_spread_fraction",
    "completions/mean_length": PREFIX + "rl_completion_length_mean",
    "completions/clipped_ratio": PREFIX + "rl_completion_clipped_fraction",
    "kl": PREFIX + "rl_kl",
    "temperature": PREFIX + "rl_temperature",
}


class _MetricsCallbackLogic:
    """The body of MetricsCallback, free of transformers so it can be defined without importing it."""

    def __init__(
        self,
        metrics: StageMetrics,
        flops_per_token: float | None = None,
        peak_flops_per_device: float | None = None,
        world_size: int | None = None,
    ) -> None:
        self.metrics = metrics
        self.flops_per_token = flops_per_token
        self.peak_flops_per_device = peak_flops_per_device
        self.world_size = world_size
        self._last_tokens: float | None = None
        self._last_time: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._last_time = time.monotonic()
        # A fresh run counts tokens from 0; a resumed one gets its baseline from the first log.
        self._last_tokens = 0.0 if not getattr(state, "global_step", 0) else None
        if getattr(state, "max_steps", 0):
            self.metrics.set(PREFIX + "train_max_steps", state.max_steps)
        if self.world_size is None:
            self.world_size = int(getattr(args, "world_size", 1) or 1)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.metrics.set(PREFIX + "train_step", state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.record(logs or {}, state)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kw: Any) -> None:
        if metrics and "eval_loss" in metrics:
            self._set(PREFIX + "train_eval_loss", metrics["eval_loss"])

    def _set(self, name: str, value: Any) -> None:
        try:
            v = float(value)
        except (TypeError, ValueError):
            return
        self.metrics.set(name, v)

    def record(self, logs: dict[str, Any], state: Any = None, now: float | None = None) -> None:
        """Map one Trainer/TRL log dict (and the TrainerState) to gauges."""
        now = time.monotonic() if now is None else now
        for key, name in LOG_KEYS.items():
            if key in logs:
                self._set(name, logs[key])
        if state is not None:
            if getattr(state, "global_step", None) is not None:
                self.metrics.set(PREFIX + "train_step", state.global_step)
            if "epoch" not in logs and getattr(state, "epoch", None) is not None:
                self._set(PREFIX + "train_epoch", state.epoch)
        tokens = logs.get("num_tokens")
        if tokens is None and state is not None:
            tokens = getattr(state, "num_input_tokens_seen", None) or None
        if tokens is not None:
            tokens = float(tokens)
            if self._last_time is not None and self._last_tokens is not None and now > self._last_time:
                tps = (tokens - self._last_tokens) / (now - self._last_time)
                if tps >= 0:
                    self.metrics.set(PREFIX + "train_tokens_per_second", tps)
                    if self.flops_per_token and self.peak_flops_per_device:
                        peak = self.peak_flops_per_device * max(1, self.world_size or 1)
                        self.metrics.set(PREFIX + "train_mfu", tps * self.flops_per_token / peak)
            self._last_tokens, self._last_time = tokens, now
        elif self._last_time is None:
            self._last_time = now
        mem = _gpu_peak_memory()
        if mem is not None:
            self.metrics.set(PREFIX + "train_gpu_memory_peak_bytes", mem)


def _gpu_peak_memory() -> float | None:
    torch = sys.modules.get("torch")  # never import torch just for this
    try:
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            return float(torch.cuda.max_memory_allocated())
    except Exception:  # noqa: BLE001
        return None
    return None


_CALLBACK_CLASS: type | None = None


def _callback_class() -> type:
    global _CALLBACK_CLASS
    if _CALLBACK_CLASS is None:
        from transformers import TrainerCallback

        class MetricsCallback(_MetricsCallbackLogic, TrainerCallback):
            """Trainer/TRL callback: ``MetricsCallback(metrics, flops_per_token=None,
            peak_flops_per_device=None, world_size=None)``. Maps log keys (``LOG_KEYS``) to the
            training/RL gauges, tokens/s from ``num_tokens`` deltas, MFU when both FLOP figures
            are given, peak GPU memory when CUDA is in use, and step/epoch from the state."""

        MetricsCallback.__module__ = __name__
        MetricsCallback.__qualname__ = "MetricsCallback"
        _CALLBACK_CLASS = MetricsCallback
    return _CALLBACK_CLASS


def __getattr__(name: str) -> Any:
    # `from thinkforge.metrics import MetricsCallback` imports transformers only then.
    if name == "MetricsCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilization: achieved FLOP/s over peak FLOP/s (use ``6 * n_params`` per
    training token for a dense decoder, ignoring attention)."""
    if peak_flops <= 0 or math.isnan(tokens_per_second):
        return float("nan")
    return tokens_per_second * flops_per_token / peak_flops
