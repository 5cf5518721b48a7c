"""A group of Ray actors of one plain class, created with explicit resources and called with a timeout."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import ray

from pipeline.errors import TokenforgeError


def shard_bounds(num_rows: int, parts: int) -> list[tuple[int, int]]:
    """(start, length) of at most `parts` contiguous, near-equal, non-empty shards covering num_rows rows."""
    size = max(1, -(-num_rows // parts))  # ceil
    return [(start, min(size, num_rows - start)) for start in range(0, num_rows, size)]


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
        resources: dict[str, float],
        timeout_s: float,
        init_args: tuple = (),
        max_restarts: int = 0,
    ):
        self.role, self.timeout_s = role, timeout_s
        self.run_id, self.init_args, self.replaced = run_id, init_args, 0
        self.remote_cls = ray.remote(cls)
        self.options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "resources": resources, "max_restarts": max_restarts}
        self.actors = [self._start(f"{i}") for i in range(count)]

    def _start(self, suffix: str):
        name = f"tokenforge-{self.run_id}-{self.role}-{suffix}"
        return self.remote_cls.options(name=name, **self.options).remote(*self.init_args)

    def replace(self, i: int) -> None:
        """Kill actor i for good and start a fresh one in its place; returns once it is up."""
        ray.kill(self.actors[i], no_restart=True)
        self.replaced += 1
        self.actors[i] = self._start(f"{i}-{self.replaced}")
        self.get([self.actors[i].__ray_ready__.remote()])

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

    def node_ids(self) -> list[str]:
        """The Ray node each actor runs on."""
        return self.get([a.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()) for a in self.actors])

    def call_all(self, method: str, *args: Any, **kwargs: Any) -> list:
        return self.get([getattr(a, method).remote(*args, **kwargs) for a in self.actors])

    def submit_shards(self, method: str, table: pa.Table, **kwargs: Any) -> list:
        """Split `table` into one contiguous shard per actor and start `method(shard, **kwargs)` on each."""
        shards = [table.slice(start, length) for start, length in shard_bounds(table.num_rows, len(self.actors))]
        return [getattr(actor, method).remote(shard, **kwargs) for actor, shard in zip(self.actors, shards)]

    def map_shards(self, method: str, table: pa.Table, **kwargs: Any) -> pa.Table:
        """`method` over shards of `table`, results concatenated in row order."""
        return pa.concat_tables(self.get(self.submit_shards(method, table, **kwargs)))
