"""Every rank runs the same backend: under torch.distributed (initialised, more than one rank), a key that this
process has not decided yet is decided by rank 0 (its cache file, else its measurement, else the static order)
and broadcast; every rank keeps rank 0's decision.

Each rank asks at the same point of its program (DDP runs the same forward and backward on every rank, with the
same shapes), so the broadcasts pair up; a rank that calls with a shape the others do not would wait for them.
Only rank 0 reads and writes the cache file here. A process group that is not initialised, or has one rank,
decides alone.
"""
from __future__ import annotations

from typing import Callable

from resaspp_ops.autotune.decision import RANK0, Decision


def collective() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if collective() else 0


def rank0_decides(decide: Callable[[], Decision]) -> Decision:
    """Rank 0's decide(), on every rank. An error on rank 0 is raised on every rank (none is left waiting)."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        try:
            decision = decide()
        except Exception as exc:
            dist.broadcast_object_list([{"error": f"{type(exc).__name__}: {exc}"}], src=0)
            raise
        dist.broadcast_object_list([decision.as_dict()], src=0)
        return decision
    received = [None]
    dist.broadcast_object_list(received, src=0)
    if "error" in received[0]:
        raise RuntimeError(f"resaspp_ops backend='auto': rank 0 failed to decide: {received[0]['error']}")
    return Decision.from_dict(received[0]).with_source(RANK0)
