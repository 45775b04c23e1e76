"""Checkpoints in object storage, so training survives preemption.

An HF ``Trainer`` checkpoint directory (``checkpoint-<step>``) already holds everything resuming needs:
weights (safetensors), optimizer, LR scheduler, grad scaler, RNG states and ``trainer_state.json``
(whose ``global_step`` fixes the data position: on resume the Trainer skips the batches already seen
in the current epoch). This module moves those directories to and from object storage:

- :class:`CheckpointSync`, a ``TrainerCallback``: after the Trainer writes ``checkpoint-<step>``, it
  uploads it to ``<prefix>/checkpoint-<step>`` with :meth:`ObjectStore.upload_dir` (the
  ``_MANIFEST.json`` completion marker is written last), then prunes remote checkpoints: the newest
  ``keep`` complete ones stay, older complete ones and every incomplete leftover (a writer killed
  mid-upload) are deleted. The new checkpoint is complete before anything is pruned, so a kill at any
  moment leaves at least one complete checkpoint once the first upload finished.
- :func:`restore_latest`: downloads the newest complete remote checkpoint (sha256-verified, falling
  back to the previous one if it is corrupt) and returns the local path to pass to
  ``trainer.train(resume_from_checkpoint=...)``; ``None`` when there is none (a fresh start).

Uploads are synchronous (training waits): a background upload would race the Trainer's own
``save_total_limit`` rotation of local directories. The callback uploads from the main process only;
that is complete for single-node runs (all ranks write into one local ``checkpoint-<step>``). For
multi-node runs without a shared filesystem, each node's shards would need their own upload.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

from thinkforge.storage import ChecksumError, IncompleteError, ObjectStore, StorageError, check_key

log = logging.getLogger("thinkforge.checkpoints")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

try:  # transformers is a dependency of training only; the listing helpers work without it
    from transformers import TrainerCallback as _CallbackBase
except ImportError:  # pragma: no cover
    _CallbackBase = object  # type: ignore[assignment,misc]


def checkpoint_step(name: str) -> int | None:
    """``checkpoint-12`` (or ``.../checkpoint-12``) -> 12; anything else -> None."""
    m = CHECKPOINT_RE.match(name.rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def remote_checkpoints(store: ObjectStore, prefix: str) -> list[tuple[int, str, bool]]:
    """Every remote ``checkpoint-<step>`` under ``prefix`` as (step, key prefix, complete), by step."""
    prefix = check_key(prefix)
    out = []
    for p in store.list_prefixes(prefix):
        step = checkpoint_step(p)
        if step is not None:
            out.append((step, p, store.is_complete(p)))
    return sorted(out)


def prune(store: ObjectStore, prefix: str, keep: int, protect: str | None = None) -> list[str]:
    """Delete remote checkpoints beyond the newest ``keep`` complete ones, and every incomplete one
    (except ``protect``, a prefix being written). Returns the deleted prefixes."""
    if keep < 1:
        raise ValueError("keep must be >= 1")
    ckpts = remote_checkpoints(store, prefix)
    complete = [c for c in ckpts if c[2]]
    keep_keys = {c[1] for c in complete[-keep:]}
    if protect:
        keep_keys.add(check_key(protect))
    deleted = []
    for _, key, _ in ckpts:
        if key not in keep_keys:
            store.delete_prefix(key)
            deleted.append(key)
    if deleted:
        log.info("checkpoints: pruned %s", ", ".join(k.rsplit("/", 1)[-1] for k in deleted))
    return deleted


class CheckpointSync(_CallbackBase):  # type: ignore[misc,valid-type]
    """Upload each checkpoint the Trainer saves to ``<prefix>/checkpoint-<step>`` and keep the newest ``keep``.

    ``on_error``: ``"raise"`` stops training when an upload fails after the store's retries;
    ``"warn"`` (default) logs an error, counts it, and lets training go on (the next save tries
    again), but raises once ``max_consecutive_failures`` uploads in a row have failed, so a run never
    trains for long without a remote checkpoint. ``metrics`` is an optional
    :class:`thinkforge.metrics.StageMetrics` (the ``checkpoint_*`` counters).
    """

    def __init__(
        self,
        store: ObjectStore,
        prefix: str,
        keep: int = 2,
        *,
        on_error: str = "warn",
        max_consecutive_failures: int = 3,
        metrics: Any = None,
    ) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        if on_error not in ("raise", "warn"):
            raise ValueError("on_error must be 'raise' or 'warn'")
        self.store = store
        self.prefix = check_key(prefix)
        self.keep = keep
        self.on_error = on_error
        self.max_consecutive_failures = max(1, max_consecutive_failures)
        self.metrics = metrics
        self.failures = 0
        self.uploaded: list[int] = []

    def _inc(self, name: str, amount: float = 1) -> None:
        if self.metrics is not None:
            try:
                self.metrics.inc(name, amount)
            except Exception:  # noqa: BLE001 - metrics never break training
                log.debug("checkpoints: metric %s not recorded", name, exc_info=True)

    def sync(self, local_dir: str | Path, step: int) -> None:
        """Upload one local checkpoint directory as ``checkpoint-<step>`` and prune."""
        key = f"{self.prefix}/checkpoint-{step}"
        t0 = time.monotonic()
        manifest = self.store.upload_dir(local_dir, key)
        self._inc("checkpoint_uploads_total")
        self._inc("checkpoint_upload_bytes_total", manifest["total_bytes"])
        self._inc("checkpoint_upload_seconds_total", time.monotonic() - t0)
        self.uploaded.append(step)
        log.info("checkpoints: step %d -> %s (%d bytes, %.1fs)", step, self.store.uri(key),
                 manifest["total_bytes"], time.monotonic() - t0)
        prune(self.store, self.prefix, self.keep, protect=key)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if not getattr(state, "is_world_process_zero", True):
            return control
        step = state.global_step
        local = Path(args.output_dir) / f"checkpoint-{step}"
        if not local.is_dir():
            log.warning("checkpoints: %s not found after save; nothing uploaded", local)
            return control
        try:
            self.sync(local, step)
            self.failures = 0
        except StorageError as e:
            self.failures += 1
            self._inc("checkpoint_upload_failures_total")
            if self.on_error == "raise" or self.failures >= self.max_consecutive_failures:
                raise StorageError(
                    f"checkpoint upload at step {step} failed ({self.failures} in a row): {e}"
                ) from e
            log.error("checkpoints: upload of step %d failed (%d in a row; training goes on): %s",
                      step, self.failures, e)
        return control


def latest_complete(store: ObjectStore, prefix: str) -> tuple[int, str] | None:
    """(step, key prefix) of the newest complete remote checkpoint, or None."""
    complete = [(s, k) for s, k, ok in remote_checkpoints(store, prefix) if ok]
    return complete[-1] if complete else None


def restore_latest(store: ObjectStore, prefix: str, local_dir: str | Path) -> Path | None:
    """Download the newest complete remote checkpoint into ``local_dir/checkpoint-<step>``.

    Returns that path (for ``trainer.train(resume_from_checkpoint=...)``), or None when ``prefix``
    holds no complete checkpoint. Incomplete checkpoints (no manifest) are never used; one that fails
    its checksum is skipped for the next older complete one (with an error logged).
    """
    prefix = check_key(prefix)
    complete = [(s, k) for s, k, ok in remote_checkpoints(store, prefix) if ok]
    for step, key in reversed(complete):
        dest = Path(local_dir) / f"checkpoint-{step}"
        try:
            path = store.download_dir(key, dest)
        except (ChecksumError, IncompleteError) as e:
            log.error("checkpoints: %s unusable (%s); trying an older one", store.uri(key), e)
            continue
        log.info("checkpoints: restored step %d from %s", step, store.uri(key))
        return path
    return None
