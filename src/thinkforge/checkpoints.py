"""Checkpoints in object storage, so training survives preemption.

An HF ``Trainer`` checkpoint directory (``checkpoint-<step>``) already holds everything resuming needs:
weights (safetensors), optimizer, LR scheduler, grad scaler, RNG states and ``trainer_state.json``
(whose ``global_step`` fixes the data position: on resume the Trainer skips the batches already seen
in the current epoch). This module moves those directories to and from object storage:

- :class:`CheckpointSync`, a ``TrainerCallback``: after the Trainer writes ``checkpoint-<step>``, it
  uploads it to ``<prefix>/checkpoint-<step>`` with :meth:`ObjectStore.upload_dir` (the
  ``_MANIFEST.json`` completion marker is written last), then prunes remote checkpoints: the newest
  ``keep`` complete ones stay, older complete ones are deleted, and so are the incomplete ones this
  writer owns (it started them: an upload of its own that failed). An incomplete checkpoint some other
  writer started may be an upload in progress (two writers on one prefix): it is never deleted. A
  killed writer's leftover is rewritten, and so owned, by the retry when its training passes that step
  again (same prefix, same settings, same save steps). The new checkpoint is complete before anything
  is pruned, so a kill at any moment leaves at least one complete checkpoint once the first upload
  finished.
- :func:`restore_latest`: downloads the newest complete remote checkpoint (sha256-verified, falling
  back to the previous one if it is corrupt, lacks an object, or, given ``check`` such as
  :func:`check_loadable`, verifies but does not load) and returns the local path to pass to
  ``trainer.train(resume_from_checkpoint=...)``; ``None`` when there is none (a fresh start). Each
  fallback is logged with the checkpoint and the reason.
- :func:`guard_saves`: a local checkpoint save that fails (a full disk) removes the partial
  ``checkpoint-<step>`` directory and raises an error naming it and the step; nothing is uploaded.

Uploads are synchronous (training waits): a background upload would race the Trainer's own
``save_total_limit`` rotation of local directories. The callback uploads from the main process only,
after a barrier over all ranks (each writes its own RNG state and ZeRO shards into the checkpoint);
that is complete for single-node runs (all ranks write into one local ``checkpoint-<step>``). For
multi-node runs without a shared filesystem, each node's shards would need their own upload.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from thinkforge.ranks import wait_for_every_rank
from thinkforge.storage import (
    DISK_ERRNOS,
    ChecksumError,
    CredentialsError,
    DiskWriteError,
    IncompleteError,
    NotFound,
    ObjectStore,
    PermissionDenied,
    StorageError,
    check_key,
)

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


def prune(store: ObjectStore, prefix: str, keep: int, protect: str | None = None,
          owned: Iterable[str] = ()) -> list[str]:
    """Delete remote checkpoints beyond the newest ``keep`` complete ones, and the incomplete ones in
    ``owned`` (the prefixes the calling writer started), except ``protect`` (a prefix being written).
    An incomplete checkpoint not in ``owned`` is someone else's upload, perhaps still in progress: it
    stays. Returns the deleted prefixes."""
    if keep < 1:
        raise ValueError("keep must be >= 1")
    mine = {check_key(k) for k in owned}
    ckpts = remote_checkpoints(store, prefix)
    complete = [c for c in ckpts if c[2]]
    keep_keys = {c[1] for c in complete[-keep:]}
    if protect:
        keep_keys.add(check_key(protect))
    deleted = []
    for _, key, ok in ckpts:
        if key in keep_keys or (not ok and key not in mine):
            continue
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
    trains for long without a remote checkpoint. Refused credentials and denied writes
    (:class:`thinkforge.storage.CredentialsError`, :class:`thinkforge.storage.PermissionDenied`: an
    expired session token, a revoked key or policy) raise at once in either mode: they do not recover by
    themselves, and every further step would train without a remote checkpoint. ``metrics`` is an optional
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
        self.owned: set[str] = set()  # checkpoint prefixes this writer started uploading (and did not prune)

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
        self.owned.add(key)  # before the first byte: a failed upload of ours is ours to prune
        manifest = self.store.upload_dir(local_dir, key)
        self._inc("checkpoint_uploads_total")
        self._inc("checkpoint_upload_bytes_total", manifest["total_bytes"])
        self._inc("checkpoint_upload_seconds_total", time.monotonic() - t0)
        self.uploaded.append(step)
        log.info("checkpoints: step %d -> %s (%d bytes, %.1fs)", step, self.store.uri(key),
                 manifest["total_bytes"], time.monotonic() - t0)
        for gone in prune(self.store, self.prefix, self.keep, protect=key, owned=self.owned):
            self.owned.discard(gone)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        # Every rank writes its own part of checkpoint-<step> (RNG state, ZeRO optimizer shards) and reaches
        # this callback when it is done; the Trainer has no barrier between those writes and the callback,
        # so without one rank 0 would upload (and a manifest would vouch for) a checkpoint another rank is
        # still writing.
        wait_for_every_rank()
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
            if isinstance(e, (CredentialsError, PermissionDenied)):
                last = f"checkpoint-{self.uploaded[-1]}" if self.uploaded else "none"
                raise type(e)(
                    f"checkpoint upload at step {step} refused: {e}. Training stops: refused credentials or a "
                    f"denied write do not recover by retrying (last uploaded checkpoint of this run: {last})"
                ) from e
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


class CheckpointLoadError(RuntimeError):
    """A checkpoint that verified (every sha256 matches its manifest) but cannot be loaded to resume."""


def _torch_load_check(path: Path) -> None:
    import torch

    try:
        from transformers.trainer_pt_utils import safe_globals
    except ImportError:  # pragma: no cover - older/newer transformers
        import contextlib

        safe_globals = contextlib.nullcontext  # type: ignore[assignment]
    with safe_globals():  # what the Trainer allows in rng_state.pth (numpy's RNG state)
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            torch.load(path, map_location="cpu", weights_only=True)  # a legacy (non-zip) file


def _model_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """Full shapes of the model's parameters and buffers; a ZeRO-3 partitioned parameter counts by its
    ``ds_shape``, an empty placeholder without one is left out (nothing to compare)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        shape = getattr(t, "ds_shape", None)
        if shape is None and t.numel() == 0:
            continue
        out[name] = tuple(shape if shape is not None else t.shape)
    return out


def check_loadable(path: str | Path, model: Any = None) -> None:
    """Raise :class:`CheckpointLoadError` unless what ``Trainer.train(resume_from_checkpoint=path)``
    reads loads: ``trainer_state.json`` (with its ``global_step``), the weights (every ``*.safetensors``
    header, and, given ``model``, a shape that matches each of its parameters), and every ``*.pt`` /
    ``*.pth`` (optimizer, scheduler, scaler, RNG states) as the Trainer loads them (``weights_only``,
    memory-mapped, so nothing large is read into memory)."""
    d = Path(path)
    state = d / "trainer_state.json"
    try:
        st = json.loads(state.read_text())
        if not isinstance(st, dict) or not isinstance(st.get("global_step"), int):
            raise ValueError("no integer global_step")
    except (OSError, ValueError) as e:
        raise CheckpointLoadError(f"{state}: {type(e).__name__}: {e}") from e
    weights = sorted(d.glob("*.safetensors"))
    others = [p for p in d.iterdir() if p.is_dir() and p.name.startswith(("global_step", "pytorch_model_fsdp"))]
    if not weights and not (d / "pytorch_model.bin").exists() and not others:
        raise CheckpointLoadError(f"{d}: no model weights (*.safetensors) in the checkpoint")
    expected = _model_shapes(model) if model is not None else {}
    found = 0
    for w in weights:
        try:
            from safetensors import safe_open

            with safe_open(str(w), framework="pt") as f:
                for name in f.keys():
                    shape = tuple(f.get_slice(name).get_shape())
                    want = expected.get(name)
                    if want is not None:
                        found += 1
                        if want != shape:
                            raise ValueError(f"tensor {name} has shape {shape}, the model's is {want}")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointLoadError(f"{w}: {type(e).__name__}: {e}") from e
    if expected and weights and not found and not any(w.name.startswith("adapter_") for w in weights):
        raise CheckpointLoadError(f"{d}: none of the model's parameters is in {', '.join(w.name for w in weights)}")
    for f in sorted([*d.glob("*.pt"), *d.glob("*.pth"), *d.glob("pytorch_model.bin")]):
        try:
            _torch_load_check(f)
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, pickle errors, ...
            raise CheckpointLoadError(f"{f}: {type(e).__name__}: {str(e)[:300]}") from e


@dataclass
class Restored:
    """What :func:`restore` found: the local path (None: start fresh) and the checkpoints it passed over."""

    path: Path | None = None
    step: int | None = None
    uri: str | None = None
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {step, uri, reason}, newest first


def restore(store: ObjectStore, prefix: str, local_dir: str | Path,
            check: Callable[[Path], None] | None = None) -> Restored:
    """Download the newest usable complete remote checkpoint into ``local_dir/checkpoint-<step>``.

    Incomplete checkpoints (no manifest) are never used. One that fails its checksum, lacks an object
    its manifest lists, or makes ``check(path)`` raise (it verifies but does not load, e.g.
    :func:`check_loadable`) is skipped for the next older complete one: the error is logged, the local
    copy removed, and the skip recorded in ``skipped``. A local disk error is not a reason to fall back:
    it propagates, naming the path.
    """
    prefix = check_key(prefix)
    complete = [(s, k) for s, k, ok in remote_checkpoints(store, prefix) if ok]
    out = Restored()
    for step, key in reversed(complete):
        dest = Path(local_dir) / f"checkpoint-{step}"
        try:
            path = store.download_dir(key, dest)
        except (ChecksumError, IncompleteError, NotFound) as e:
            log.error("checkpoints: %s unusable (%s); trying an older one", store.uri(key), e)
            out.skipped.append({"step": step, "uri": store.uri(key), "reason": str(e)})
            continue
        if check is not None:
            try:
                check(path)
            except CheckpointLoadError as e:
                shutil.rmtree(path, ignore_errors=True)  # no local rank may pick it up
                older = "the previous complete checkpoint" if step != complete[0][0] else "a fresh start"
                log.error("checkpoints: %s verifies but does not load (%s); falling back to %s",
                          store.uri(key), e, older)
                out.skipped.append({"step": step, "uri": store.uri(key), "reason": f"does not load: {e}"})
                continue
        log.info("checkpoints: restored step %d from %s", step, store.uri(key))
        out.path, out.step, out.uri = path, step, store.uri(key)
        return out
    return out


def restore_latest(store: ObjectStore, prefix: str, local_dir: str | Path,
                   check: Callable[[Path], None] | None = None) -> Path | None:
    """Download the newest complete remote checkpoint into ``local_dir/checkpoint-<step>``.

    Returns that path (for ``trainer.train(resume_from_checkpoint=...)``), or None when ``prefix``
    holds no usable complete checkpoint. Incomplete checkpoints (no manifest) are never used; one that
    fails its checksum (or ``check``) is skipped for the next older complete one (with an error logged).
    See :func:`restore`.
    """
    return restore(store, prefix, local_dir, check).path


# ------------------------------------------------------------------------------------- local saves


class CheckpointSaveError(RuntimeError):
    """Writing a local checkpoint failed (not a disk-full error with a known errno: see DiskWriteError)."""


_ERRNO_TEXT = re.compile(r"os error (\d+)|\[Errno (\d+)\]")


def _errno_of(exc: BaseException) -> int | None:
    """The errno behind a save failure: an OSError in the chain, or the text safetensors (Rust: "(os
    error 27)") or a C++ writer leaves in its message."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        m = _ERRNO_TEXT.search(str(e))
        if m:
            return int(m.group(1) or m.group(2))
        for code in DISK_ERRNOS:
            if os.strerror(code) in str(e):
                return code
        e = e.__cause__ or e.__context__
    return None


def guard_saves(trainer: Any, stage: str) -> None:
    """Make a failed local checkpoint save (``Trainer._save_checkpoint``) remove its partial
    ``checkpoint-<step>`` directory and raise an error naming that directory and the step: a
    :class:`thinkforge.storage.DiskWriteError` (an ``OSError`` with the errno) for a full disk or a file
    over a size limit, else :class:`CheckpointSaveError`. The save's callbacks (the upload) never run."""
    real = getattr(trainer, "_save_checkpoint", None)
    if real is None or getattr(real, "_thinkforge_guarded", False):
        return

    def save(model: Any, trial: Any, *args: Any, **kwargs: Any) -> Any:
        step = trainer.state.global_step
        out = Path(trainer.args.output_dir) / f"checkpoint-{step}"
        try:
            return real(model, trial, *args, **kwargs)
        except Exception as e:
            shutil.rmtree(out, ignore_errors=True)
            code = _errno_of(e)
            what = (f"{stage}: saving the step-{step} checkpoint failed; the partial directory was removed and "
                    "nothing was uploaded")
            if code in DISK_ERRNOS:
                raise DiskWriteError(code, out, f"{what}; {type(e).__name__}: {str(e)[:300]}") from e
            raise CheckpointSaveError(f"{what}: {out}: {type(e).__name__}: {str(e)[:300]}") from e

    save._thinkforge_guarded = True  # type: ignore[attr-defined]
    trainer._save_checkpoint = save
