"""The driver's side of rollout.weight_sync: one object per strategy, each publishing a policy version to the rollout
workers, giving it to a worker that missed it, and reporting how long the workers took to load it.

- object_store (ObjectStoreSync): the learner publishes each version as one PackedWeights object; every rollout
  worker fetches it (one shared copy per node, pipeline/runtime/weights.py).
- collective (BroadcastSync): the learner broadcasts each version over a group of its own with the rollout workers
  (gloo, or NCCL through ray.util.collective; pipeline/runtime/broadcast.py), apart from a learner group's. A
  rollout worker that Ray restarts is not in the group; it gets the last broadcast version through the object store
  (`published_weights`) and the group is formed again, with the new process, before the next broadcast.

Both answer `publish(version)`, `give(worker, version)`, `loaded_seconds()`, and hold `weights`: the ObjectRef of
the published PackedWeights that a worker fetches (None while a broadcast's are only in the learner)."""

from __future__ import annotations

import ray

from pipeline.driver.actor_group import ACTOR_LOST, ActorFailed, ActorGroup
from pipeline.driver.learner_group import rendezvous_address
from pipeline.errors import TokenforgeError
from pipeline.runtime.broadcast import device_of, join, leave, nccl_available, receive, send
from pipeline.runtime.weights import packed_weights, published_weights, weight_layout


class WeightSync:
    """What both strategies share: the published version's ObjectRef (`weights`) and the calls in flight that
    publish it (`pending`: each worker's receive, and a broadcast's send)."""

    def __init__(self, learner: ActorGroup, rollout: ActorGroup, run_id: str, timeout_s: float):
        self.learner, self.rollout = learner, rollout
        self.weights: ray.ObjectRef | None = None  # the last published version, in the object store
        self.pending: list[ray.ObjectRef] = []  # the calls that publish it, not waited for

    def give(self, worker, version: int) -> None:
        """A restarted rollout worker (or one whose broadcast failed) holds other weights: give it the published
        ones through the object store."""
        if self.weights is not None:
            self.rollout.get([worker.receive_weights.remote([self.weights], version)])

    def loaded_seconds(self) -> float | None:
        """The slowest worker's receive-and-load seconds of the last published version (and a broadcast's send),
        once; None: nothing published since the last call, or a worker was restarted meanwhile."""
        refs, self.pending = self.pending, []
        if not refs:
            return None
        try:
            return max(self.rollout.get(refs))
        except ACTOR_LOST:  # a worker was restarted (and given the weights then, or when it next generates)
            self.worker_replaced()
            return None

    def worker_replaced(self) -> None:
        """A rollout worker runs in a new process."""


class ObjectStoreSync(WeightSync):
    """rollout.weight_sync=object_store: one object in the object store that each rollout worker fetches."""

    def publish(self, version: int) -> None:
        """Put the learner's weights in the object store as `version`; every worker loads them after the call it
        is running (never mid-generation)."""
        # every learner rank takes the call (a group gathers its shards: a collective); rank 0's holds the
        # weights, one object that the rollout workers of a node share
        self.weights = [a.__ray_call__.remote(packed_weights) for a in self.learner.actors][0]
        self.pending = [worker.receive_weights.remote([self.weights], version) for worker in self.rollout.actors]


class BroadcastSync(WeightSync):
    """rollout.weight_sync=collective: forms the group, and publishes a version as one send and N receives."""

    def __init__(self, learner: ActorGroup, rollout: ActorGroup, run_id: str, timeout_s: float):
        super().__init__(learner, rollout, run_id, timeout_s)
        self.run_id, self.formations = run_id, 0
        self.name = ""  # the group's name: a new one each time it is formed (no rendezvous key is ever reused)
        # a broadcast that a dead member cut short fails after this long (not after trainer.actor_timeout_s)
        self.timeout_s = min(timeout_s, 120.0)
        self.backend: str | None = None  # nccl when every member computes on a GPU, else gloo
        self.formed = False
        self.sent = False  # a version was broadcast (the learner holds it: published_weights)

    def form(self) -> None:
        """(Re)form the group: every member leaves any earlier one, then all join at once."""
        learner, workers = self.learner.actors[0], self.rollout.actors
        members = [learner, *workers]
        devices = self.rollout.get([m.__ray_call__.remote(device_of) for m in members])
        on_gpu = {d.startswith("cuda") for d in devices}
        if len(on_gpu) > 1 and any(d.startswith("cuda") for d in devices[1:]):
            raise TokenforgeError(
                f"rollout.weight_sync=collective needs the rollout workers on the learner's kind of device (learner: "
                f"{devices[0]}, rollout workers: {', '.join(devices[1:])}); use rollout.weight_sync=object_store"
            )
        self.backend = "nccl" if on_gpu == {True} else "gloo"
        if self.backend == "nccl" and not self.learner.get([learner.__ray_call__.remote(nccl_available)])[0]:
            raise TokenforgeError(
                "rollout.weight_sync=collective between GPUs broadcasts over NCCL, which ray.util.collective reaches "
                "through cupy: pip install cupy-cuda12x on the GPU nodes, or use rollout.weight_sync=object_store"
            )
        self.rollout.get([m.__ray_call__.remote(leave, self.name) for m in members])
        self.formations += 1
        self.name = f"tokenforge-{self.run_id}-weights-{self.formations}"
        # every learner rank takes part in gathering the weights (a learner group's collective); rank 0's is the layout
        layout = self.learner.get([a.__ray_call__.remote(weight_layout) for a in self.learner.actors])[0]
        address = rendezvous_address(self.learner, learner)
        joins = [
            m.__ray_call__.remote(
                join, len(members), rank, self.name, self.backend, self.timeout_s, address, layout if rank else None
            )
            for rank, m in enumerate(members)
        ]
        self.rollout.get(joins)
        self.formed = True

    def publish(self, version: int) -> None:
        """Broadcast the learner's weights as `version` (one send, each worker's receive), not waited for."""
        if not self.formed:
            self.form()
        self.weights = None  # not in the object store (give() puts them there if a worker needs them)
        # a learner group's other ranks take part in gathering the weights that rank 0 sends
        sending = [a.__ray_call__.remote(send, self.name, self.backend) for a in self.learner.actors]
        self.sent = True
        self.pending = [*(w.__ray_call__.remote(receive, self.name, version) for w in self.rollout.actors), *sending]

    def give(self, worker, version: int) -> None:
        if self.weights is None and self.sent:
            self.weights = self.learner.actors[0].__ray_call__.remote(published_weights)  # the last broadcast's
        self.worker_replaced()
        super().give(worker, version)

    def worker_replaced(self) -> None:
        self.formed = False  # a new process is not in the group: form it again before the next broadcast

    def loaded_seconds(self) -> float | None:
        try:
            return super().loaded_seconds()
        except ActorFailed:
            # a broadcast failed (a member died mid-way): the workers it missed were given the weights through the
            # object store when they refused to generate with old ones (StaleWeights); form the group again
            self.formed = False
            self.rollout.faults["fault/broadcast_failures"] += 1
            return None


WEIGHT_SYNCS = {"object_store": ObjectStoreSync, "collective": BroadcastSync}  # rollout.weight_sync -> strategy
