"""Where the actors run: joining Ray, the learner's device, the resources every actor needs, and the
autoscaler on a cluster whose GPU nodes start at zero.

- `connect_ray`: `ray.address` or RAY_ADDRESS, else a local Ray.
- `decide_learner_gpus`: an explicit `learner.num_gpus` wins; else 1 GPU when the cluster has one, or
  can get one from its autoscaler within `ray.autoscale_wait_s`; else the CPU, said in one line
  (never silently).
- `ensure_resources`: fail fast, naming the keys to lower, when the cluster can never hold the actors;
  on an autoscaling cluster first ask for one bundle per actor (so each must fit on a node, as it must
  in reality) and wait; `clear_resource_request` withdraws the request once the actors are placed.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import ray

from pipeline.config import TrainConfig, config_with
from pipeline.errors import TokenforgeError


def connect_ray(config: TrainConfig) -> None:
    """Join `ray.address` or RAY_ADDRESS if given, else start a local Ray."""
    if ray.is_initialized():
        return
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        make_token_private()
        ray.init(num_cpus=config.ray.num_cpus, include_dashboard=False)


def make_token_private() -> None:
    """Before a local Ray starts with token auth: Ray 2.60 writes the token it generates with the default umask
    (0644: any local user could read it and act on the cluster). Write it first, 0600, as Ray would
    (secrets.token_hex(32), where Ray looks); an existing token file of ours is made 0600 too."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as token:
            token.write(secrets.token_hex(32))
    elif path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
        path.chmod(0o600)
        print(f"tokenforge: made the Ray auth token private (chmod 600 {path})", flush=True)


def actor_bundles(config: TrainConfig) -> list[dict[str, float]]:
    """Ray resources of every actor: the learner, then each rollout worker, then each reward worker
    (learner.num_gpus must be decided: see decide_learner_gpus)."""

    def bundle(cpus: float, gpus: float, custom: dict[str, float]) -> dict[str, float]:
        return {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **custom}

    rollout, reward = config.rollout, config.reward
    return [
        bundle(config.learner.num_cpus, config.learner.num_gpus or 0.0, config.learner.resources),
        *[bundle(rollout.num_cpus_per_worker, rollout.num_gpus_per_worker, rollout.resources_per_worker)] * rollout.num_workers,
        *[bundle(reward.num_cpus_per_worker, reward.num_gpus_per_worker, reward.resources_per_worker)] * reward.num_workers,
    ]


def request_and_wait(bundles: list[dict[str, float]], ready, wait_s: float) -> bool:
    """Ask the autoscaler for `bundles` (one per actor) and wait up to `wait_s` for `ready()`."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{r: a for r, a in b.items() if a > 0} for b in bundles])
    deadline = time.time() + wait_s
    while not ready() and time.time() < deadline:
        time.sleep(2)
    return ready()


def clear_resource_request() -> None:
    """Withdraw an autoscaler request (so idle nodes can scale down once the actors are placed)."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[])


def decide_learner_gpus(config: TrainConfig) -> TrainConfig:
    """`config` with learner.num_gpus decided (see the module docstring)."""
    if config.learner.num_gpus is not None:
        return config

    def has_gpu() -> bool:
        return ray.cluster_resources().get("GPU", 0) >= 1

    wait = config.ray.autoscale_wait_s
    if has_gpu() or (wait > 0 and request_and_wait([{"GPU": 1.0}], has_gpu, wait)):
        return config_with(config, {"learner.num_gpus": 1.0})
    print(
        "tokenforge: the learner runs on CPU: the Ray cluster has no GPU"
        + (f" (none came within ray.autoscale_wait_s={wait:g}s)" if wait else "")
        + "; set learner.num_gpus=0 to choose the CPU, or 1 to wait for a GPU",
        flush=True,
    )
    return config_with(config, {"learner.num_gpus": 0.0})


def missing_resources(bundles: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """resource -> (needed in total, the cluster's total) for every resource the cluster lacks."""
    wanted: dict[str, float] = {}
    for bundle in bundles:
        for name, amount in bundle.items():
            wanted[name] = wanted.get(name, 0) + amount
    have = ray.cluster_resources()
    return {r: (amount, have.get(r, 0)) for r, amount in wanted.items() if amount > have.get(r, 0) + 1e-9}


def ensure_resources(config: TrainConfig, bundles: list[dict[str, float]] | None = None) -> None:
    """Fail fast when the cluster can never hold these bundles (default: this config's actors). With
    `ray.autoscale_wait_s` > 0, first ask Ray's autoscaler for them, one bundle per actor, and wait."""
    bundles = actor_bundles(config) if bundles is None else bundles
    wait = config.ray.autoscale_wait_s
    if missing_resources(bundles) and wait > 0:
        request_and_wait(bundles, lambda: not missing_resources(bundles), wait)
    for resource, (amount, have) in missing_resources(bundles).items():
        raise TokenforgeError(
            f"the actors need {amount:g} {resource} in total but the Ray cluster has {have:g}"
            + (f" (after waiting ray.autoscale_wait_s={wait:g}s for the autoscaler)" if wait else "")
            + "; lower learner.num_cpus/num_gpus/resources, rollout.*_per_worker, reward.*_per_worker or the worker counts"
        )


def torch_threads(configured: int | None) -> int:
    """Intra-op threads for torch in this actor: `configured`, else the CPUs Ray reserved for it (at least 1),
    so that actors running at once on one node do not oversubscribe its cores."""
    if configured is not None:
        return configured
    context = ray.get_runtime_context() if ray.is_initialized() else None
    in_actor = context is not None and context.get_actor_id() is not None  # not the driver, not outside Ray
    return max(1, int(context.get_assigned_resources().get("CPU", 1.0))) if in_actor else 1
