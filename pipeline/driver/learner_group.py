"""The driver's side of the learner group (learner.num_workers > 1): forming it, and the calls every rank takes.

Each learner rank is built as a single learner (its model whole on its node, a resumed checkpoint's weights and
optimizer state loaded), then `form_learner_group` makes them one process group: rank 0 picks a rendezvous
address on its node and every rank joins at once and shards its model (actors/learner.py `join_group`,
pipeline/runtime/learner_group.py). From then on every call that touches the model is a collective that every
rank must take, in the same order: `train_step` (each rank reads the whole batch, one object in the object
store), the weights' gather for a sync, and a checkpoint's save. Rank 0 answers for the group.
"""

from __future__ import annotations

import pyarrow as pa
import ray

from actors.learner import Learner
from pipeline.config import TrainConfig
from pipeline.driver.actor_group import ActorGroup
from pipeline.runtime.learner_group import group_address


def start_learners(
    config: TrainConfig, model_path: str, run_id: str, timeout_s: float, resume: tuple[str, str] | None = None
) -> ActorGroup:
    """The learner's learner.num_workers actors, each with learner.num_cpus / num_gpus (decided, or null: none) /
    resources, starting from `model_path` or the published checkpoint `resume` = (storage URI, directory), formed
    into one group when there are several."""
    learner, gpus = config.learner, config.learner.num_gpus or 0
    group = ActorGroup(
        Learner,
        learner.num_workers,
        role="learner",
        run_id=run_id,
        num_cpus=learner.num_cpus,
        num_gpus=gpus,
        resources=learner.resources,
        timeout_s=timeout_s,
        init_args=(config, model_path, model_path, gpus > 0, resume),
        packed=True,
    )
    try:
        if learner.num_workers > 1:
            form_learner_group(group)
    except BaseException:
        group.close()
        raise
    return group


def rendezvous_address(group: ActorGroup, actor) -> str:
    """host:port, free now on the node of `actor` (one of `group`'s): where a process group it is rank 0 of meets."""
    return group.get([actor.__ray_call__.remote(lambda _: group_address())])[0]


def form_learner_group(group: ActorGroup) -> None:
    """Make the group's actors ranks 0..N-1 of one process group (all join at once; returns when they have)."""
    address = rendezvous_address(group, group.actors[0])
    world = len(group.actors)
    group.get([actor.join_group.remote(address, rank, world) for rank, actor in enumerate(group.actors)])


def save_learner(group: ActorGroup, storage_uri: str, directory: str) -> dict[str, dict]:
    """Every rank's files of a checkpoint, uploaded to `directory` of the run's storage by each rank: the
    manifest's entries of them all."""
    saved = group.get([actor.save.remote(storage_uri, directory) for actor in group.actors])  # fails at the first
    return {name: entry for files in saved for name, entry in files.items()}


def submit_train_step(group: ActorGroup, batch: pa.Table, step: int) -> list[ray.ObjectRef]:
    """Start train_step on every rank with the same batch (put once); rank 0's result, the first, is the group's
    (its metrics are reduced over the ranks)."""
    batch_ref = ray.put(batch) if len(group.actors) > 1 else batch
    return [actor.train_step.remote(batch_ref, step=step) for actor in group.actors]
