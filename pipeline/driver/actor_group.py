"""A group of Ray actors of one plain class, created with explicit resources and called with a timeout.

A group with `max_restarts` != 0 survives a dead actor: Ray restarts it, and `map_shards` gives the
restarted actor its state back (`on_restart`) and resubmits the shard it lost. A `packed` group (the learner
group's ranks) is placed with a placement group of one bundle per actor on as few nodes as possible (PACK),
unless it is created inside one already (a Tune trial's, which holds its bundles).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pipeline.errors import TokenforgeError, TransientStorageError
from pipeline.runtime.weights import StaleWeights


class ActorTimeout(TokenforgeError):
    """An actor did not answer within trainer.actor_timeout_s (the run may restart the pipeline)."""


class ActorFailed(Exception):
    """An actor's method raised an error that is not the user's input (a CUDA fault, a full local disk): the run
    may restart the pipeline from its last checkpoint."""


@dataclass
class ShardCalls:
    """One method call per shard, in flight on the actors of a group (ActorGroup.submit_shards)."""

    method: str
    shards: list[pa.Table]
    refs: list[ray.ObjectRef]
    kwargs: dict[str, Any]


ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def failure_cause(error: BaseException) -> str:
    """`Type: first line` of a failure, without the colour codes Ray puts around a remote task's name."""
    text = ANSI_COLOUR.sub("", str(error)).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


ACTOR_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)  # died, or restarting


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
        packed: bool = False,
    ):
        self.role, self.timeout_s = role, timeout_s
        self.run_id, self.init_args, self.replaced = run_id, init_args, 0
        self.faults: Counter = Counter()  # restarts and resubmitted shards since the last take_faults()
        self.remote_cls = ray.remote(cls)
        self.options = {
            "num_cpus": num_cpus,
            "num_gpus": num_gpus,
            "resources": resources,
            "max_restarts": max_restarts,
        }
        self.placement_group, self.actors = None, []
        if packed and count > 1 and get_current_placement_group() is None:
            bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {}), **resources}
            self.placement_group = placement_group([bundle] * count, strategy="PACK")
            if not self.placement_group.wait(timeout_s):
                self.close()
                raise ActorTimeout(
                    f"the {count} {role} actors could not be placed within {timeout_s:.0f}s (trainer.actor_timeout_s)"
                )
        self.actors = [self._start(f"{i}", i) for i in range(count)]

    def _start(self, suffix: str, bundle: int = 0):
        name = f"tokenforge-{self.run_id}-{self.role}-{suffix}"
        options = dict(self.options)
        if self.placement_group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.placement_group, placement_group_bundle_index=bundle
            )
        return self.remote_cls.options(name=name, **options).remote(*self.init_args)

    def close(self) -> None:
        """Kill every actor of the group (and free its placement group)."""
        for actor in self.actors:
            ray.kill(actor)
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None

    def replace(self, i: int) -> None:
        """Kill actor i for good and start a fresh one in its place; returns once it is up."""
        ray.kill(self.actors[i], no_restart=True)
        self.replaced += 1
        self.actors[i] = self._start(f"{i}-{self.replaced}", i)
        self.get([self.actors[i].__ray_ready__.remote()])

    def get(self, refs: list) -> list:
        """Results of `refs`, or an error naming the role if one takes longer than the timeout. The first failure
        raises at once, not once the others are done: a learner group's other ranks wait in a collective for the
        one that died."""
        try:
            pending, deadline = list(refs), time.monotonic() + self.timeout_s
            while len(pending) > 1:
                done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
                if not done:
                    raise ray.exceptions.GetTimeoutError
                ray.get(done)  # raises if it failed
            return ray.get(refs, timeout=max(0.0, deadline - time.monotonic()))
        except ray.exceptions.GetTimeoutError:
            raise ActorTimeout(
                f"{self.role} actor gave no answer within {self.timeout_s:.0f}s (trainer.actor_timeout_s)"
            ) from None
        except ray.exceptions.ActorDiedError as error:
            if not error.actor_init_failed:
                raise
            # the constructor raised (bad config the driver could not check, e.g. LoRA target modules): no restart
            # can help, so it is not a fault to recover from; Ray's message ends with the constructor's error
            raise TokenforgeError(f"{self.role} could not start: {str(error).strip().splitlines()[-1]}") from None
        except ray.exceptions.RayTaskError as error:
            cause = error.cause  # the actor's own exception (str(error) holds the remote traceback)
            if isinstance(cause, StaleWeights):
                raise StaleWeights(str(cause)) from None
            if isinstance(cause, TokenforgeError):  # TransientStorageError stays one: the run retries it
                kind = TransientStorageError if isinstance(cause, TransientStorageError) else TokenforgeError
                raise kind(f"{self.role}: {cause}") from None
            raise ActorFailed(f"{self.role}: {failure_cause(cause)}") from error

    def placements(self) -> list[dict[str, str]]:
        """Where each actor runs: Ray node id and address, and the torch device it computes on."""

        def where(instance) -> dict[str, str]:
            context = ray.get_runtime_context()
            node = context.get_node_id()
            address = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node), "?")
            return {"node_id": node, "node_ip": address, "device": str(getattr(instance, "device", "cpu"))}

        return self.get([a.__ray_call__.remote(where) for a in self.actors])

    def call_all(self, method: str, *args: Any, **kwargs: Any) -> list:
        """`method(*args, **kwargs)` on every actor; an actor Ray restarts meanwhile gets the call again."""
        refs = [getattr(a, method).remote(*args, **kwargs) for a in self.actors]
        return [
            self._survive(i, ref, lambda actor: getattr(actor, method).remote(*args, **kwargs))
            for i, ref in enumerate(refs)
        ]

    def map_shards(
        self, method: str, table: pa.Table, on_restart: Callable[[Any], dict] | None = None, **kwargs: Any
    ) -> pa.Table:
        """`method(shard, **kwargs)` over one contiguous shard of `table` per actor, results concatenated in
        row order (see submit_shards / shard_results)."""
        results = dict(self.shard_results(self.submit_shards(method, table, **kwargs), on_restart))
        return pa.concat_tables([results[i] for i in range(len(results))])

    def submit_shards(self, method: str, table: pa.Table, **kwargs: Any) -> ShardCalls:
        """Start `method(shard, **kwargs)` on one contiguous shard of `table` per actor; returns at once."""
        shards = [table.slice(start, length) for start, length in shard_bounds(table.num_rows, len(self.actors))]
        refs = [getattr(actor, method).remote(shard, **kwargs) for actor, shard in zip(self.actors, shards)]
        return ShardCalls(method, shards, refs, kwargs)

    def shard_results(
        self, calls: ShardCalls, on_restart: Callable[[Any], dict] | None = None
    ) -> Iterator[tuple[int, Any]]:
        """(shard index, result) of each call as soon as it is done, in the order they finish. A shard whose
        actor dies (or was restarted since it got its state: StaleWeights) is resubmitted once Ray has
        restarted the actor and `on_restart(actor)` has given it back its state (e.g. the current weights);
        the keyword arguments `on_restart` returns replace those of the first call (e.g. the weights' version)."""
        pending = {ref: i for i, ref in enumerate(calls.refs)}

        def resubmit(i: int) -> Callable:
            def again(actor, **changed):
                self.faults["fault/resubmitted_shards"] += 1
                return getattr(actor, calls.method).remote(calls.shards[i], **{**calls.kwargs, **changed})

            return again

        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.timeout_s)
            ref = ready[0] if ready else next(iter(pending))  # none in time: get() names the timeout
            i = pending.pop(ref)
            yield i, self._survive(i, ref, resubmit(i), on_restart)

    def _survive(self, i: int, ref, again: Callable, on_restart: Callable[[Any], dict] | None = None) -> Any:
        """The result of `ref` on actor i. If the actor died (a group with max_restarts only), wait for Ray
        to restart it, give it its state back (`on_restart`, which returns keyword arguments for the new call)
        and run `again(actor, **those)` instead (twice at most)."""
        for attempt in range(3):
            try:
                return self.get([ref])[0]
            except (*ACTOR_LOST, StaleWeights):
                if attempt == 2 or self.options["max_restarts"] == 0:
                    raise
                actor = self.actors[i]
                self.wait_restarted(actor)
                self.faults[f"fault/{self.role}_restarts"] += 1
                ref = again(actor, **(on_restart(actor) if on_restart is not None else {}))

    def wait_restarted(self, actor) -> None:
        """Block until Ray has restarted `actor` (up to the group's timeout)."""
        deadline = time.time() + self.timeout_s
        while True:
            try:
                self.get([actor.__ray_ready__.remote()])
                return
            except ACTOR_LOST:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)

    def take_faults(self) -> dict[str, float]:
        faults, self.faults = self.faults, Counter()
        return {k: float(v) for k, v in faults.items()}
