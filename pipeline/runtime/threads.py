"""Torch thread counts inside an actor."""

from __future__ import annotations

import ray


def torch_threads(configured: int | None) -> int:
    """Intra-op threads for torch in this actor: `configured`, else the CPUs Ray reserved for it (at least 1),
    so that actors running at once on one node do not oversubscribe its cores."""
    if configured is not None:
        return configured
    context = ray.get_runtime_context() if ray.is_initialized() else None
    in_actor = context is not None and context.get_actor_id() is not None  # not the driver, not outside Ray
    return max(1, int(context.get_assigned_resources().get("CPU", 1.0))) if in_actor else 1
