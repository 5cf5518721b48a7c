"""A group of Ray actors of one plain class, created with explicit resources and called with a timeout."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import ray

from pipeline.errors import TokenforgeError


class ActorGroup:
    def __init__(
        self,
        cls: type,
        count: int,
        *,
        role: str,
        run_id: str,
        num_cpus: float,
        num_gpus: float,
        timeout_s: float,
        init_args: tuple = (),
        max_restarts: int = 0,
    ):
        self.role, self.timeout_s = role, timeout_s
        remote_cls = ray.remote(cls)
        self.actors = [
            remote_cls.options(
                name=f"tokenforge-{run_id}-{role}-{i}", num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts
            ).remote(*init_args)
            for i in range(count)
        ]

    def get(self, refs: list) -> list:
        """Results of `refs`, or an error naming the role if one takes longer than the timeout."""
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TokenforgeError(
                f"{self.role} actor gave no answer within {self.timeout_s:.0f}s (trainer.actor_timeout_s)"
            ) from None
        except ray.exceptions.RayTaskError as error:
            cause = error.as_instanceof_cause()
            if isinstance(cause, TokenforgeError):
                raise TokenforgeError(f"{self.role}: {cause}") from None
            raise

    def call_all(self, method: str, *args: Any, **kwargs: Any) -> list:
        return self.get([getattr(a, method).remote(*args, **kwargs) for a in self.actors])

    def submit_shards(self, method: str, table: pa.Table, **kwargs: Any) -> list:
        """Split `table` into one contiguous shard per actor and start `method(shard, **kwargs)` on each."""
        size = -(-table.num_rows // len(self.actors))  # ceil
        shards = [table.slice(start, size) for start in range(0, table.num_rows, size)]
        return [getattr(actor, method).remote(shard, **kwargs) for actor, shard in zip(self.actors, shards)]

    def map_shards(self, method: str, table: pa.Table, **kwargs: Any) -> pa.Table:
        """`method` over shards of `table`, results concatenated in row order."""
        return pa.concat_tables(self.get(self.submit_shards(method, table, **kwargs)))
