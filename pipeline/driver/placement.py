"""Where the actors run: joining Ray, the learner's device, the resources every actor needs, and the
autoscaler on a cluster whose GPU nodes start at zero.

- `connect_ray`: `ray.address` or RAY_ADDRESS, else a local Ray.
- `decide_learner_gpus`: an explicit `learner.num_gpus` wins; else 1 GPU when the cluster has one, or
  can get one from its autoscaler within `ray.autoscale_wait_s`; else the CPU, said in one line
  (never silently). With a critic actor (`critic.placement=actor`) and `critic.num_gpus` null, the critic
  follows the learner: on the CPU beside a CPU learner; beside a GPU learner, a GPU of its own when the
  cluster has one more, else in the learner's process on its GPU (said in one line), never a CPU critic
  beside a GPU learner.
- `ensure_resources`: fail fast, naming the actor or the keys to lower, when the cluster cannot hold the
  actors, each on one node; on a cluster with an autoscaler (`has_autoscaler`; `ray.autoscale_wait_s`
  null waits AUTO_WAIT_S there, 0 elsewhere) first ask for one bundle per actor and wait;
  `withdraw_resource_request` withdraws the request once the actors are placed or the run ends.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import time
from pathlib import Path

import ray

from pipeline.config import TrainConfig, config_with
from pipeline.errors import TokenforgeError


def connect_ray(config: TrainConfig) -> None:
    """Join `ray.address` or RAY_ADDRESS if given (after checking that it answers: Ray itself would retry an
    unreachable address forever), else start a local Ray."""
    if ray.is_initialized():
        return
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address, "ray.address" if config.ray.address else "RAY_ADDRESS")
        ray.init(address=address)
    else:
        make_token_private()
        ray.init(num_cpus=config.ray.num_cpus, include_dashboard=False)


PROBE_TIMEOUT_S = 10.0


def check_reachable(address: str, key: str) -> None:
    """One line naming `key` unless a Ray GCS answers at a `host:port` (or `ray://host:port`) address within
    PROBE_TIMEOUT_S: Ray itself retries an unreachable GCS for minutes (a closed port) or for ever (a server that
    accepts and never answers), in C++, where Ctrl-C cannot stop it. Here each wait is Python's, so Ctrl-C works.
    Other forms ("auto", a dashboard's http:// address) are left to Ray."""
    match = re.fullmatch(r"(ray://)?([^:/\s]+|\[[0-9a-fA-F:.]+\]):(\d+)", address.strip())
    if match is None:
        return
    client, host, port = match.group(1), match.group(2).strip("[]"), int(match.group(3))
    problem = None
    try:  # a name that does not resolve, a closed port, a host that drops packets
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as error:
        problem = (
            "timed out" if isinstance(error, TimeoutError) else (error.strerror or str(error) or type(error).__name__)
        )
    tls = os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")  # a plaintext handshake would fail there
    if problem is None and not client and not tls:
        import grpc

        channel = grpc.insecure_channel(f"{match.group(2)}:{port}")  # the GCS speaks gRPC (HTTP/2) from the first byte
        try:
            grpc.channel_ready_future(channel).result(timeout=PROBE_TIMEOUT_S)
        except grpc.FutureTimeoutError:
            problem = f"a server accepts connections there but no Ray GCS answered within {PROBE_TIMEOUT_S:g}s"
        finally:
            channel.close()
    if problem:
        raise TokenforgeError(
            f"{key}={address!r}: no Ray cluster answers there ({problem}); start one (ray start --head) and give the "
            f"head's GCS address host:port (ray start prints it), or unset {key} to start a local Ray"
        )


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
    """Ray resources of every actor: each learner rank, its critic's actor (critic.placement=actor), then each rollout
    worker, then each reward worker (learner.num_gpus must be decided: see decide_learner_gpus)."""

    def bundle(cpus: float, gpus: float, custom: dict[str, float]) -> dict[str, float]:
        return {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **custom}

    rollout, reward, critic = config.rollout, config.reward, config.critic
    return [
        *[bundle(config.learner.num_cpus, config.learner.num_gpus or 0.0, config.learner.resources)]
        * config.learner.num_workers,
        *([bundle(critic.num_cpus, critic.num_gpus or 0.0, {})] if critic_actor(config) else []),
        *[bundle(rollout.num_cpus_per_worker, rollout.num_gpus_per_worker, rollout.resources_per_worker)]
        * rollout.num_workers,
        *[bundle(reward.num_cpus_per_worker, reward.num_gpus_per_worker, reward.resources_per_worker)]
        * reward.num_workers,
    ]


def critic_actor(config: TrainConfig) -> bool:
    """Whether the critic is an actor of its own."""
    return config.critic is not None and config.critic.placement == "actor"


AUTO_WAIT_S = (
    900.0  # ray.autoscale_wait_s null, on a cluster with an autoscaler: a cloud GPU node takes minutes to start
)
READONLY_NODE_TYPE = re.compile(r"node_[0-9a-f]{56}")  # how Ray's monitor names the nodes it only mirrors


def has_autoscaler() -> bool:
    """Whether an autoscaler that can start nodes watches this cluster. Ray's monitor runs on every head node and
    writes its status to the GCS (`ray status` reads it); without an autoscaling config (a plain `ray start --head`)
    it only mirrors the nodes that joined, each as a node type named after its id (node_<id>). An autoscaler
    started with a config (`ray up`, KubeRay) names its node types after the config; autoscaler v2 also stores the
    config's node groups in the GCS."""
    from ray._private import ray_constants
    from ray._private.state import state
    from ray.experimental.internal_kv import _internal_kv_get

    groups = state.get_cluster_config()
    if groups is not None and any(group.max_count != 0 for group in groups.node_group_configs):
        return True
    status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    report = json.loads(status).get("autoscaler_report") if status else None
    if not report:
        return False
    types = {
        *report.get("active_nodes", {}),
        *(report.get("idle_nodes") or {}),
        *report.get("pending_launches", {}),
        *(node[1] for node in report.get("pending_nodes", [])),
        *(node[1] for node in report.get("failed_nodes", [])),
    }
    return any(not READONLY_NODE_TYPE.fullmatch(node_type) for node_type in types)


def autoscale_wait(config: TrainConfig) -> float:
    """Seconds to wait for the autoscaler: ray.autoscale_wait_s, or if null AUTO_WAIT_S on a cluster with an
    autoscaler and 0 (fail at once: nothing can come) on one without."""
    if config.ray.autoscale_wait_s is not None:
        return config.ray.autoscale_wait_s
    return AUTO_WAIT_S if has_autoscaler() else 0.0


def waited_for(wait: float, config: TrainConfig) -> str:
    """How a one-line error says what was waited for, or which setting would have waited."""
    if wait:
        return f" (after waiting ray.autoscale_wait_s={wait:g}s for the autoscaler)"
    if config.ray.autoscale_wait_s is None:
        return (
            " (the cluster has no autoscaler to add a node; set ray.autoscale_wait_s to wait that many seconds"
            " anyway, e.g. for a node you start yourself)"
        )
    return " (ray.autoscale_wait_s=0: set seconds to wait for new nodes, or null to wait where an autoscaler runs)"


REQUESTED = False  # whether this process has an autoscaler request standing (withdraw_resource_request)


def request_and_wait(bundles: list[dict[str, float]], ready, wait_s: float) -> bool:
    """Ask the autoscaler for `bundles` (one per actor) and wait up to `wait_s` for `ready()`."""
    from ray.autoscaler.sdk import request_resources

    global REQUESTED
    REQUESTED = True
    request_resources(bundles=[{r: a for r, a in b.items() if a > 0} for b in bundles])
    deadline = time.time() + wait_s
    while not ready() and time.time() < deadline:
        time.sleep(2)
    return ready()


def withdraw_resource_request() -> None:
    """Withdraw this process's autoscaler request, if it made one (so idle nodes can scale down): once the actors
    are placed, and when the run ends however it ends."""
    from ray.autoscaler.sdk import request_resources

    global REQUESTED
    if REQUESTED and ray.is_initialized():
        request_resources(bundles=[])
        REQUESTED = False


def decide_learner_gpus(config: TrainConfig) -> TrainConfig:
    """`config` with learner.num_gpus decided and the critic placed beside it (see the module docstring)."""
    return place_critic(config if config.learner.num_gpus is not None else learner_gpus(config))


def place_critic(config: TrainConfig) -> TrainConfig:
    """critic.num_gpus decided for a critic actor (learner.num_gpus decided): see the module docstring."""
    if not critic_actor(config) or config.critic.num_gpus is not None:
        return config
    if not config.learner.num_gpus:
        return config_with(config, {"critic.num_gpus": 0.0})
    if ray.cluster_resources().get("GPU", 0) >= config.learner.num_workers * config.learner.num_gpus + 1:
        return config_with(config, {"critic.num_gpus": 1.0})
    if config.learner.num_workers > 1:  # a learner group's rank 0 holds no whole model to share with a critic
        raise TokenforgeError(
            f"the critic needs a GPU of its own beside the {config.learner.num_workers} learner ranks' and the "
            "cluster has none to spare; set critic.num_gpus=0 for a CPU critic, or add a GPU"
        )
    print(
        "tokenforge: the critic runs in the learner's process, on its GPU: the cluster has no GPU for a critic "
        "actor of its own; set critic.num_gpus=0 for a CPU actor",
        flush=True,
    )
    return config_with(config, {"critic.placement": "learner"})


def learner_gpus(config: TrainConfig) -> TrainConfig:
    """`config` with learner.num_gpus (null) decided."""

    def has_gpu() -> bool:
        return ray.cluster_resources().get("GPU", 0) >= 1

    wait = 0.0 if has_gpu() else autoscale_wait(config)
    if wait:
        print(
            f"tokenforge: waiting up to {wait:g}s for the autoscaler to start a GPU node for the learner "
            "(ray.autoscale_wait_s; learner.num_gpus=0 runs it on CPU at once)",
            flush=True,
        )
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


def node_totals() -> list[dict[str, float]]:
    """The total resources of each live node."""
    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def fits_no_node(bundle: dict[str, float], nodes: list[dict[str, float]]) -> bool:
    """Whether no single node has every resource of `bundle` (an actor runs on one node)."""
    return not any(all(amount <= node.get(r, 0) + 1e-9 for r, amount in bundle.items() if amount > 0) for node in nodes)


def described(resources: dict[str, float]) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in resources.items() if amount > 0) or "nothing"


def unplaceable(named: list[tuple[str, dict[str, float]]]) -> str | None:
    """Why the cluster cannot hold these (name, bundle) actors now, or None if it can: the resources short in
    total, else an actor that fits no single node (named, with the largest node's resources)."""
    for resource, (amount, have) in missing_resources([bundle for _, bundle in named]).items():
        return f"the actors need {amount:g} {resource} in total but the Ray cluster has {have:g}"
    nodes = node_totals()
    for name, bundle in named:
        if fits_no_node(bundle, nodes):
            largest = {r: max((node.get(r, 0) for node in nodes), default=0) for r in bundle}
            return (
                f"the {name} asks {described(bundle)} on one node, but no Ray node has that "
                f"(the most any node has: {described(largest)})"
            )
    return None


def named_bundles(config: TrainConfig) -> list[tuple[str, dict[str, float]]]:
    """(actor, its Ray resources) for every actor of this config, in actor_bundles' order."""
    names = [
        *(
            ["learner"]
            if config.learner.num_workers == 1
            else [f"learner rank {i}" for i in range(config.learner.num_workers)]
        ),
        *(["critic"] if critic_actor(config) else []),
        *["rollout worker"] * config.rollout.num_workers,
        *["reward worker"] * config.reward.num_workers,
    ]
    return list(zip(names, actor_bundles(config)))


def ensure_resources(config: TrainConfig, named: list[tuple[str, dict[str, float]]] | None = None) -> None:
    """Fail fast when the cluster cannot hold these (name, bundle) actors (default: this config's), each on one
    node. On a cluster with an autoscaler (see autoscale_wait) first ask it for them, one bundle per actor, and
    wait: a lost node's replacement, GPU nodes that start at zero."""
    named = named_bundles(config) if named is None else named
    reason = unplaceable(named)
    wait = autoscale_wait(config) if reason else 0.0
    if wait:
        print(
            f"tokenforge: {reason}: asking the autoscaler and waiting up to {wait:g}s (ray.autoscale_wait_s)",
            flush=True,
        )
        request_and_wait([bundle for _, bundle in named], lambda: unplaceable(named) is None, wait)
    reason = unplaceable(named)
    if reason:
        raise TokenforgeError(
            reason
            + waited_for(wait, config)
            + "; lower learner.num_cpus/num_gpus/resources, "
            + ("critic.num_cpus/num_gpus (or set critic.placement=learner), " if critic_actor(config) else "")
            + "rollout.*_per_worker, reward.*_per_worker or the worker counts"
        )
