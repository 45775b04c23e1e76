"""The training processes of one stage as a group: a barrier, and a clean exit from the group.

Both are no-ops in one process (no ``torch.distributed`` group initialized), so the code that calls them
runs unchanged on one process, under ``accelerate launch`` and in a Trainer job's pods."""

from __future__ import annotations


def _group():
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a training dependency
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def wait_for_every_rank() -> None:
    """A barrier over the training processes (a no-op in one process)."""
    dist = _group()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()


def leave_process_group() -> None:
    """Wait for every rank, then close the process group: a rank that exits while its gloo peers still
    hold connections can abort in their background threads, and accelerate then fails the whole launch."""
    dist = _group()
    if dist is not None:
        dist.barrier()
        dist.destroy_process_group()
