"""What every training stage shares: arguments from the config, data rendering, checkpoints, saving, results.

One setup for mid-train, SFT, DPO and RL (open-r1 repeats ~40 lines per script; we don't):

- :func:`training_args` turns a :class:`TrainConfig` into TRL/transformers arguments (CPU or GPU, bf16,
  DeepSpeed when the stage runs under ``accelerate launch``, periodic checkpoints when object storage
  is configured);
- :func:`fit` runs ``trainer.train()`` with checkpoints in object storage: every ``save_steps`` a
  complete Trainer checkpoint (weights, optimizer, scheduler, RNG, trainer state = data position) is
  uploaded by :class:`thinkforge.checkpoints.CheckpointSync` under
  ``<storage.prefix>/<run>/<stage>/checkpoints/<fingerprint>/checkpoint-<step>`` (manifest last, the
  newest ``keep_checkpoints`` kept), and a restarted stage (a KFP retry, a preempted pod) resumes from
  the newest complete one that loads (:func:`thinkforge.checkpoints.restore`): one that verifies but
  does not load (:func:`thinkforge.checkpoints.check_loadable`) is passed over for the previous complete
  one, with an error logged and the skip recorded (``unusable_checkpoints``) instead of crashing every
  retry; a local save that fails (a full disk) raises an error naming the checkpoint directory
  (:func:`thinkforge.checkpoints.guard_saves`);
- :func:`finish` saves the model (safetensors) and summarizes the log history;
- a NaN/inf loss or gradient norm stops training at once (:class:`NonFiniteGuard`, added by :func:`fit`):
  a :class:`FloatingPointError` names the stage, the step and the last good checkpoint, nothing
  non-finite is ever uploaded as a checkpoint, and the stage's metrics show the loss, the step and
  ``thinkforge_stage_status{status="failed"}``.

The fingerprint ties checkpoints to one attempt at one piece of work (the stage's settings, the
model, template and seed, the input data and the input model), so a new run under the same run name
with other settings or data never resumes someone else's weights. ``THINKFORGE_CHECKPOINT_PREFIX``
pins the prefix explicitly (every worker of a multi-node job uses the same one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thinkforge.config import Recipe, TrainConfig
from thinkforge.models import follow_pointer, load_model, load_tokenizer, save_model

log = logging.getLogger("thinkforge.train")

ENV_CHECKPOINT_PREFIX = "THINKFORGE_CHECKPOINT_PREFIX"
ENV_LAUNCHED = "THINKFORGE_LAUNCHED"  # set by thinkforge.launch for the processes it starts
ENV_DEEPSPEED_CONFIG = "THINKFORGE_DEEPSPEED_CONFIG"


@dataclass
class TrainResult:
    steps: int
    examples: int
    metric: str  # what first/last hold: "loss", or "reward" for RL
    first: float | None
    last: float | None
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def checkpointing(cfg: Recipe, t: TrainConfig) -> bool:
    """Periodic checkpoints go to object storage when an endpoint is configured and save_steps > 0."""
    from thinkforge.storage import ENV_ENDPOINT

    return t.save_steps > 0 and bool(cfg.storage.endpoint or os.environ.get(ENV_ENDPOINT))


def training_args(config_cls: type, cfg: Recipe, stage: str, out_dir: str | Path, **extra: Any) -> Any:
    """TRL/transformers arguments from the recipe's ``stage`` config; with object storage configured
    (:func:`checkpointing`) it saves every ``save_steps`` steps (the local copies are rotated to
    ``keep_checkpoints``; :func:`fit` uploads them)."""
    t: TrainConfig = getattr(cfg, stage)
    seed = cfg.run.seed
    checkpoints = checkpointing(cfg, t)
    gpu = on_gpu()
    # Under `accelerate launch --use_deepspeed` the Trainer takes DeepSpeed from accelerate's plugin (and
    # fills the config's "auto" values once the processes are up); passing `deepspeed=` here as well
    # would fill them before, with a world size of 1.
    ds = os.environ.get(ENV_DEEPSPEED_CONFIG) if os.environ.get(ENV_LAUNCHED) else None
    if ds and not gpu:
        # DeepSpeed on CPU: without a backend named, accelerate treats the launch as one process
        # (num_processes=1), so "auto" batch sizes and data sharding come out wrong; gloo gives the real size.
        extra.setdefault("ddp_backend", "gloo")
    save: dict[str, Any] = {"save_strategy": "no"}
    if checkpoints:
        save = {"save_strategy": "steps", "save_steps": t.save_steps, "save_total_limit": t.keep_checkpoints}
    extra = {**_trackers(cfg, stage), **extra}
    return config_cls(
        output_dir=str(out_dir),
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        # bf16 autocast on a GPU, and on a CPU in one process (AMX / AVX512-BF16 make it ~2x faster than
        # fp32 there); multi-process CPU launches keep fp32, as accelerate's launch flags say (launch.py).
        bf16=t.bf16 and (gpu or not os.environ.get(ENV_LAUNCHED)),
        use_cpu=not gpu and not ds,  # DeepSpeed on CPU runs without --cpu (DESIGN.md section 3)
        gradient_checkpointing=t.gradient_checkpointing,
        # Log a NaN/inf loss as it is: the Trainer's default filter replaces it with the window's
        # average, which would hide a diverged run from the logs, the metrics and NonFiniteGuard.
        logging_nan_inf_filter=False,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=not sys.stderr.isatty(),
        **save,
        **extra,
    )


def _trackers(cfg: Recipe, stage: str) -> dict[str, Any]:
    """``report_to`` and ``run_name`` for the stage's experiment trackers (none by default: no tracker, no
    network calls). A run is named ``<run.name>-<run.id>-<stage>`` (the id from THINKFORGE_RUN_ID in a pod
    when the config has none) in the experiment (wandb project) ``tracking.experiment`` or ``run.name``;
    MLflow's server is ``tracking.uri``, else MLFLOW_TRACKING_URI. transformers' MLflow/wandb callbacks
    read these from the environment when training starts, so they are set here, in the stage's process."""
    t: TrainConfig = getattr(cfg, stage)
    if not t.report_to:
        return {"report_to": []}
    import importlib.util

    run, tracking = cfg.run, cfg.tracking
    packages = {"mlflow": "mlflow-skinny (pip install 'thinkforge[tracking]')", "wandb": "wandb",
                "tensorboard": "tensorboard"}
    modules = {"mlflow": ("mlflow",), "wandb": ("wandb",), "tensorboard": ("tensorboard", "tensorboardX")}
    missing = [f"{r} needs {packages[r]}" for r in t.report_to
               if not any(importlib.util.find_spec(m) for m in modules[r])]
    if missing:
        raise RuntimeError(f"{stage}.report_to {list(t.report_to)}: {'; '.join(missing)}, not installed in this image")
    if not run.id and os.environ.get("THINKFORGE_RUN_ID"):  # components.common.load_config sets it so too
        run = run.model_copy(update={"id": os.environ["THINKFORGE_RUN_ID"]})
    name = f"{run.label()}-{stage}"
    experiment = tracking.experiment or run.name
    if "mlflow" in t.report_to:
        os.environ["MLFLOW_EXPERIMENT_NAME"] = experiment
        os.environ["MLFLOW_TAGS"] = json.dumps({"thinkforge.run": run.name, "thinkforge.run_id": run.id,
                                                "thinkforge.stage": stage})
        uri = tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        if uri:
            os.environ["MLFLOW_TRACKING_URI"] = uri
            import mlflow  # the callback keeps a URI set earlier in this process: make it this one

            mlflow.set_tracking_uri(uri)
    if "wandb" in t.report_to:
        os.environ.setdefault("WANDB_PROJECT", experiment)
    return {"report_to": list(t.report_to), "run_name": name}


def read_rows(path: str | Path, fields: dict[str, type], stage: str) -> list[dict[str, Any]]:
    """Training records; an empty set stops the stage with the file named instead of training on nothing."""
    from thinkforge.records import EmptyDataError, read_jsonl

    rows = read_jsonl(path, fields)
    if not rows:
        raise EmptyDataError(f"{stage}: no training records in {path}")
    return rows


def load_student(cfg: Recipe, model_path: str | Path) -> tuple[Any, Any]:
    tok = load_tokenizer(model_path, cfg.model.trust_remote_code)
    model = load_model(model_path, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                       seed=cfg.run.seed)
    return model, tok


def callbacks(metrics: Any, model: Any) -> list[Any]:
    """Trainer callbacks every stage gets: Prometheus metrics (MFU from 6 x parameters FLOPs per token)."""
    if metrics is None:
        return []
    from thinkforge.metrics import MetricsCallback

    n_params = sum(p.numel() for p in model.parameters())
    return [MetricsCallback(metrics, flops_per_token=6 * n_params)]


# -------------------------------------------------------------------------------------- non-finite loss

#: Logged values that must stay finite; the first NaN/inf one stops training.
FINITE_LOG_KEYS = ("loss", "grad_norm", "eval_loss")


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True  # not a number: not ours to judge


class _NonFiniteGuardLogic:
    """Stop training at the first non-finite loss, gradient norm or validation loss, and never let a
    checkpoint with non-finite weights be uploaded.

    - ``on_log``: a NaN/inf in :data:`FINITE_LOG_KEYS` raises :class:`FloatingPointError` naming the
      stage, the step, the values and the last good checkpoint. It runs before the step's save, so
      the diverged step is never checkpointed.
    - ``on_save``: runs before :class:`thinkforge.checkpoints.CheckpointSync` (``fit`` adds it first)
      and raises if any weight is NaN/inf, so the upload of a poisoned checkpoint never starts.

    The stage's metrics get ``train_loss`` and ``train_step`` of the bad step; the exception leaving
    ``StageMetrics`` sets ``thinkforge_stage_status{status="failed"}``. ``sync`` (set by ``fit``) is the
    CheckpointSync whose last upload is the last good checkpoint.
    """

    def __init__(self, stage: str, metrics: Any = None) -> None:
        self.stage = stage
        self.metrics = metrics
        self.sync: Any = None
        self.resumed: tuple[str, int] | None = None  # (uri, step) of the checkpoint this attempt resumed from
        self.tripped_at: int | None = None

    def last_good(self) -> str:
        s = self.sync
        if s is not None and s.uploaded:
            step = s.uploaded[-1]
            return f"last good checkpoint: {s.store.uri(f'{s.prefix}/checkpoint-{step}')} (step {step})"
        if self.resumed is not None:
            return f"last good checkpoint: {self.resumed[0]} (step {self.resumed[1]})"
        if s is not None:
            return "no checkpoint was uploaded before it"
        return "no checkpoints configured (storage.endpoint and save_steps)"

    def _trip(self, step: int, what: str, logs: dict[str, Any] | None = None) -> None:
        self.tripped_at = step
        if self.metrics is not None:
            try:
                if logs and "loss" in logs:
                    self.metrics.set("train_loss", float(logs["loss"]))
                self.metrics.set("train_step", step)
            except Exception:  # noqa: BLE001 - metrics never hide the real error
                log.debug("%s: metrics not recorded", self.stage, exc_info=True)
        msg = (f"{self.stage}: {what} at step {step}; training stopped, nothing saved from this step on; "
               f"{self.last_good()}")
        log.error("%s", msg)
        raise FloatingPointError(msg)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        bad = {k: logs[k] for k in FINITE_LOG_KEYS if logs and k in logs and not _finite(logs[k])}
        if bad:
            self._trip(state.global_step, "non-finite " + ", ".join(f"{k} {float(v)}" for k, v in bad.items()), logs)
        return control

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        name = first_nonfinite_parameter(model) if model is not None else None
        if name is not None:
            self._trip(state.global_step, f"non-finite weights ({name}); checkpoint not uploaded")
        return control


_GUARD_CLASS: type | None = None


def NonFiniteGuard(stage: str, metrics: Any = None) -> Any:  # noqa: N802 - used like a class
    """A :class:`_NonFiniteGuardLogic` that is a ``transformers.TrainerCallback`` (built on first use,
    so importing this module does not import transformers)."""
    global _GUARD_CLASS
    if _GUARD_CLASS is None:
        from transformers import TrainerCallback

        class NonFiniteGuard(_NonFiniteGuardLogic, TrainerCallback):
            __doc__ = _NonFiniteGuardLogic.__doc__

        _GUARD_CLASS = NonFiniteGuard
    return _GUARD_CLASS(stage, metrics)


def first_nonfinite_parameter(model: Any) -> str | None:
    """The name of the first parameter holding a NaN/inf (None when all are finite). Sharded (ZeRO-3)
    placeholders are empty and pass."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() and not bool(torch.isfinite(p).all()):
                return name
    return None


# ------------------------------------------------------------------------------------------ checkpoints


def _hash_file(h: Any, path: Path) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)


def fingerprint(cfg: Recipe, stage: str, model_path: str | Path, data_path: str | Path) -> str:
    """What one attempt at a stage is: its settings, model/template/seed, the data bytes, the input model.

    The input model counts by its config and the names and sizes of its files (hashing gigabytes of
    weights on every start would cost more than it protects)."""
    h = hashlib.sha256()
    h.update(json.dumps({"stage": stage, "settings": getattr(cfg, stage).model_dump(),
                         "model": cfg.model.model_dump(), "template": cfg.template.model_dump(),
                         "seed": cfg.run.seed}, sort_keys=True).encode())
    data = Path(data_path)
    if data.is_file():
        _hash_file(h, data)
    mdir = follow_pointer(Path(model_path)) if Path(model_path).exists() else Path(str(model_path))
    if mdir.is_dir():
        for f in sorted(mdir.iterdir()):
            if f.is_file():
                h.update(f"{f.name}:{f.stat().st_size}".encode())
                if f.name == "config.json":
                    _hash_file(h, f)
    else:
        h.update(str(model_path).encode())
    return h.hexdigest()[:16]


def checkpoint_prefix(store: Any, cfg: Recipe, stage: str, model_path: str | Path, data_path: str | Path) -> str:
    pinned = os.environ.get(ENV_CHECKPOINT_PREFIX)
    if pinned:
        return pinned.strip("/")
    return store.run_prefix(*cfg.run.scope(), stage, "checkpoints", fingerprint(cfg, stage, model_path, data_path))


def _latest_local(root: Path) -> Path | None:
    from thinkforge.checkpoints import checkpoint_step
    from thinkforge.storage import local_is_complete

    found = [(checkpoint_step(p.name), p) for p in root.glob("checkpoint-*") if local_is_complete(p)]
    found = [(s, p) for s, p in found if s is not None]
    return max(found)[1] if found else None


def fit(trainer: Any, cfg: Recipe, stage: str, t: TrainConfig, model_path: str | Path, data_path: str | Path,
        work_dir: str | Path, metrics: Any = None) -> dict[str, Any]:
    """``trainer.train()`` with checkpoints in object storage and resume; returns what happened
    (``{"resumed_from": step or None, "checkpoint_prefix": uri or None}``)."""
    from thinkforge.stages.lm_head import use_plain_lm_head

    use_plain_lm_head(trainer)  # CPU only: TRL's tiled head is built for GPU kernels
    info: dict[str, Any] = {"resumed_from": None, "checkpoint_prefix": None}
    resume: str | None = None
    guard = NonFiniteGuard(stage, metrics)
    trainer.add_callback(guard)  # before CheckpointSync: its on_save vetoes a non-finite checkpoint
    if checkpointing(cfg, t):
        from thinkforge.checkpoints import CheckpointSync, check_loadable, checkpoint_step, guard_saves, restore
        from thinkforge.storage import ObjectStore

        store = ObjectStore.from_config(cfg.storage)
        prefix = checkpoint_prefix(store, cfg, stage, model_path, data_path)
        info["checkpoint_prefix"] = store.uri(prefix)
        acc = trainer.accelerator
        restored_dir = Path(work_dir) / "restored"
        if acc.is_main_process:
            store.ensure_bucket()
        if acc.is_local_main_process:
            got = restore(store, prefix, restored_dir, check=lambda p: check_loadable(p, trainer.model))
            path = got.path
            if got.skipped:
                info["unusable_checkpoints"] = got.skipped
                log.warning("%s: passed over %s; %s", stage,
                            ", ".join(f"{s['uri']} ({s['reason'][:200]})" for s in got.skipped),
                            f"resuming from step {got.step} instead" if path is not None
                            else "no usable checkpoint left: starting from the beginning")
        acc.wait_for_everyone()
        if not acc.is_local_main_process:
            path = _latest_local(restored_dir)
        if path is not None:
            resume = str(path)
            info["resumed_from"] = checkpoint_step(path.name)
            guard.resumed = (store.uri(f"{prefix}/checkpoint-{info['resumed_from']}"), info["resumed_from"])
            log.info("%s: resuming from %s (step %s)", stage, store.uri(prefix), info["resumed_from"])
        guard.sync = CheckpointSync(store, prefix, keep=t.keep_checkpoints, metrics=metrics)
        trainer.add_callback(guard.sync)
        guard_saves(trainer, stage)
    trainer.train(resume_from_checkpoint=resume)
    return info


# ---------------------------------------------------------------------------------------------- results


def finish(trainer: Any, tokenizer: Any, out_dir: str | Path, examples: int, start: float,
           metric: str = "loss", *, cfg: Recipe, **extra: Any) -> TrainResult:
    """Save the trained model (safetensors) and summarize the run's log history.

    The saved folder is the model and nothing else (:func:`thinkforge.models.finalize_model_dir`): the
    Trainer's ``<out>/trainer`` (local checkpoints, restored checkpoints, DPO's reference cache),
    ``training_args.bin`` and any pickle are removed once the weights are written; its
    ``generation_config.json`` carries the recipe's evaluation protocol and its chat template the
    recipe's system message."""
    from thinkforge.models import finalize_model_dir

    history = [h for h in trainer.state.log_history if "loss" in h or metric in h]
    values = [h[metric] for h in history if metric in h and h[metric] is not None]
    bad = next((h for h in history if not math.isfinite(float(h.get("loss") or 0.0))), None)
    if bad is not None:
        raise FloatingPointError(f"loss became {bad['loss']} at step {bad.get('step')}; model not saved")
    if getattr(trainer, "is_deepspeed_enabled", False) or trainer.args.world_size > 1:
        # Sharded (ZeRO-3) or replicated weights: the Trainer gathers them and writes from rank 0.
        trainer.save_model(str(out_dir))
        if trainer.accelerator.is_main_process:
            tokenizer.save_pretrained(out_dir)
            finalize_model_dir(out_dir, cfg, tokenizer)  # it removes the Trainer's leftovers too
    else:
        save_model(trainer.model, tokenizer, out_dir, cfg=cfg)
    return TrainResult(
        steps=trainer.state.global_step,
        examples=examples,
        metric=metric,
        first=values[0] if values else None,
        last=values[-1] if values else None,
        seconds=time.time() - start,
        history=trainer.state.log_history,
        extra=extra,
    )
