"""`tokenforge validate-cluster FILE`: Ray's own schema validation plus tokenforge's security checks.

Offline: Ray's `prepare_config` (merge with the provider's defaults) and `validate_config` (the
autoscaler's JSON schema: unknown keys, fractional resources, ...), then:
- every `ray start --head` binds the dashboard / Jobs API to loopback (`--dashboard-host=127.0.0.1`);
  0.0.0.0 exposes a remote-code-execution endpoint (CVE-2023-48022);
- every `ray start` runs with `RAY_AUTH_MODE=token`;
- an AWS security group opens no port but SSH (22), and no rule with IpProtocol -1 (every port); SSH
  open to 0.0.0.0/0 is a warning. What this file cannot show is said as NOT CHECKED, never as "SSH only":
  security groups named by id in a node type's node_config (their rules live in AWS), and the firewalls of
  the other providers (gcp: the VPC's firewall rules; azure: the network security group; kuberay: Kubernetes
  Services and NetworkPolicies; local: the machines' own firewalls);
- the ports are settings of the start commands (docs/cluster.md, "Ports"): the metrics exporter's port is
  fixed (`--metrics-export-port`: it serves Prometheus samples without a token, so it must be firewalled,
  which a random port cannot be), the workers join the head's `--port`, no two settings share a port, and
  no fixed port lies in the worker port range;
- provider `local`: no worker in `worker_ips` is the head (`head_ip`), none is listed twice;
- a Ray auth token copied by file_mounts is made private (`chmod 600`) by the setup commands of the head
  and of the workers: rsync copies the local file's mode, 0644 where it was made with umask 022;
- a file mount of the checkout (`.`) keeps `.venv` and `.git` out (rsync_exclude, or an rsync_filter):
  a local venv is GBs and tens of thousands of files, copied to every node;
- given a run's config (`--config`, overrides): its learner's ranks (`learner.num_workers`, each with
  `learner.num_gpus` / `num_cpus` / `resources`) fit one node type, or span several nodes of one type within
  its max_workers (a multi-node group; said, not refused).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import yaml

from pipeline.errors import TokenforgeError

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class ClusterConfigError(TokenforgeError):
    """A cluster YAML fails Ray's validation or a security check."""


def validate_cluster(path: str | Path, run_config=None) -> list[str]:
    """Raise ClusterConfigError naming the file and the problem; return a summary of what was checked.
    `run_config`: a TrainConfig whose learner must fit the cluster's node types."""
    path = Path(path)
    if not path.is_file():
        raise ClusterConfigError(f"cluster file {str(path)!r} does not exist")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ClusterConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(config, dict) or "provider" not in config:
        raise ClusterConfigError(f"{path}: a Ray cluster config is a mapping with a `provider` section")
    provider = config["provider"].get("type")
    if (
        provider == "kuberay"
    ):  # KubeRay makes the nodes from a RayCluster resource; Ray's launcher schema does not apply
        schema = "Ray schema: NOT CHECKED: provider kuberay is not a `ray up` file (KubeRay starts the nodes)"
    else:
        check_with_ray(path, config)
        schema = "Ray schema: ok (prepare_config + validate_config)"
    check_local_nodes(path, config)
    head = [c for c in config.get("head_start_ray_commands", []) if "ray start" in c]
    workers = [c for c in config.get("worker_start_ray_commands", []) if "ray start" in c]
    if not head:
        raise ClusterConfigError(f"{path}: head_start_ray_commands has no `ray start --head` command")
    for command in head:
        check_dashboard_host(path, command)
    for command in head + workers:
        check_token_auth(path, command)
    settings = check_port_settings(path, head, workers)
    ports = check_open_ports(path, config)
    tokens = check_token_private(path, config)
    check_checkout_excludes(path, config)
    learner = [] if run_config is None else [check_learner_fits(path, config, run_config)]
    return [
        schema,
        f"dashboard/Jobs API on loopback: ok ({len(head)} head start command(s))",
        f"RAY_AUTH_MODE=token: ok ({len(head) + len(workers)} start command(s))",
        settings,
        ports,
        f"auth token private on every node: ok ({', '.join(tokens) or 'no token in file_mounts'})",
        "checkout sync keeps .venv and .git out: ok",
        *learner,
    ]


def check_learner_fits(path: Path, config: dict, run_config) -> str:
    """Where the run's learner ranks go: the node types with the most ranks per node first. One line, or
    ClusterConfigError when no node type holds a rank, or none holds them all within its max_workers."""
    learner = run_config.learner
    ranks = learner.num_workers
    node_types = config.get("available_node_types", {})
    gpus = learner.num_gpus
    if gpus is None:  # null: a GPU where the cluster has one (decide_learner_gpus)
        gpus = 1.0 if any(n.get("resources", {}).get("GPU", 0) for n in node_types.values()) else 0.0
    bundle = {"CPU": learner.num_cpus, "GPU": gpus, **learner.resources}
    bundle = {k: v for k, v in bundle.items() if v}
    fits = {}  # node type -> (ranks per node, nodes it may have)
    for name, node in node_types.items():
        resources = node.get("resources", {})
        per_node = min((int(resources.get(k, 0) // v) for k, v in bundle.items()), default=ranks)
        if per_node:
            nodes = 1 if name == config.get("head_node_type") else max(1, node.get("max_workers", 1))
            fits[name] = (per_node, nodes)
    wanted = ", ".join(f"{k}: {v:g}" for k, v in bundle.items())
    unlisted = [name for name, node in node_types.items() if not node.get("resources")]
    if not fits and unlisted:  # Ray fills those in from the instance type, which this file does not show
        return f"learner: NOT CHECKED (node types {', '.join(unlisted)} list no resources; a rank needs {wanted})"
    if not fits:
        raise ClusterConfigError(
            f"{path}: no node type holds a learner rank ({wanted}: learner.num_cpus / num_gpus / resources); "
            "add such a node type or lower those keys"
        )
    name, (per_node, nodes) = max(fits.items(), key=lambda item: item[1][0])
    what = f"learner.num_workers={ranks} ranks of {{{wanted}}}"
    if per_node >= ranks:
        return f"learner: ok ({what} fit one {name} node)"
    spans = [(n, -(-ranks // p)) for n, (p, most) in fits.items() if -(-ranks // p) <= most]
    if not spans:
        raise ClusterConfigError(
            f"{path}: {what} fit on no single node type (at most {per_node} per {name} node, {nodes} such nodes); "
            "lower learner.num_workers or add nodes with more GPUs"
        )
    name, count = min(spans, key=lambda span: span[1])
    return f"learner: ok ({what} span {count} {name} nodes: a multi-node group, NCCL between the nodes)"


def check_with_ray(path: Path, config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)  # no INFO chatter about filled-in defaults
    try:
        validate_config(prepare_config(config))
    except Exception as error:  # noqa: BLE001 - jsonschema, ValueError, KeyError...: all mean an invalid file
        message = getattr(error, "message", None) or str(error)
        where = "/".join(str(p) for p in getattr(error, "absolute_path", [])) or "config"
        raise ClusterConfigError(f"{path}: Ray rejects {where}: {message.splitlines()[0]}") from None


def check_dashboard_host(path: Path, command: str) -> None:
    match = re.search(r"--dashboard-host[= ](\S+)", command)
    if not match:
        raise ClusterConfigError(
            f"{path}: `ray start --head` does not set --dashboard-host; add --dashboard-host=127.0.0.1 "
            "(the dashboard/Jobs API must not be reachable from the network; use `ray dashboard` to port-forward)"
        )
    if match.group(1).strip("'\"") not in LOOPBACK:
        raise ClusterConfigError(
            f"{path}: --dashboard-host={match.group(1)} exposes the Jobs API, which runs code for anyone who "
            "reaches it "
            "(CVE-2023-48022); use --dashboard-host=127.0.0.1 and `ray dashboard` to port-forward"
        )


def check_token_auth(path: Path, command: str) -> None:
    mode = re.search(r"RAY_AUTH_MODE=(\S+?)[;\s]", command + " ")
    if not mode or mode.group(1).strip("'\"") != "token":
        raise ClusterConfigError(
            f"{path}: `{command.strip()[:80]}` starts Ray without token auth; "
            "prefix it with `export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.ray/auth_token;`"
        )


NOT_CHECKED = {  # providers whose firewall is not in the cluster file: where it is instead
    "local": "provider local has no security group; Ray's GCS, raylet and agent ports listen on the network, "
    'guarded only by token auth: firewall them to the cluster\'s machines (docs/cluster.md, "Ports")',
    "gcp": "provider gcp: the firewall is the VPC network's firewall rules, not in this file "
    "(`gcloud compute firewall-rules list`): allow SSH (22) only from outside the cluster",
    "azure": "provider azure: the network security group comes from Ray's template or your resource group, not from "
    "this file (`az network nsg rule list`): allow SSH (22) only from outside the cluster",
    "kuberay": "provider kuberay: reachability is set by Kubernetes Services and NetworkPolicies, not by this file: "
    "expose no Ray port outside the cluster",
}


def check_open_ports(path: Path, config: dict) -> str:
    """Raise unless the AWS security group opens SSH (22) only; return the summary line, with a warning for SSH
    open to the whole internet and a plain NOT CHECKED for every firewall this file does not hold."""
    provider = config["provider"].get("type")
    if provider != "aws":
        reason = NOT_CHECKED.get(
            provider,
            f"provider {provider}: its firewall is not in this file; allow SSH (22) only from outside the cluster",
        )
        return f"open ports: NOT CHECKED: {reason}"
    group = config["provider"].get("security_group") or {}
    world = False
    for rule in group.get("IpPermissions", []):
        if str(rule.get("IpProtocol")) == "-1":
            raise ClusterConfigError(
                f"{path}: provider.security_group has a rule with IpProtocol -1, which opens every port and protocol; "
                "open SSH (22) only and reach the dashboard through `ray dashboard` (an SSH port-forward)"
            )
        ports = (rule.get("FromPort"), rule.get("ToPort"))
        if ports != (22, 22):
            raise ClusterConfigError(
                f"{path}: provider.security_group opens ports {ports[0]}-{ports[1]}; open SSH (22) only "
                "and reach the dashboard through `ray dashboard` (an SSH port-forward)"
            )
        world |= any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", []))
        world |= any(r.get("CidrIpv6") == "::/0" for r in rule.get("Ipv6Ranges", []))
    # A node type that names its own groups (SecurityGroupIds, or Groups of a network interface) does not get
    # provider.security_group: the rules of those groups live in AWS, and this offline check cannot see them.
    named = {}
    for name, node_type in (config.get("available_node_types") or {}).items():
        node_config = node_type.get("node_config") or {}
        ids = list(node_config.get("SecurityGroupIds") or [])
        ids += [g for nic in node_config.get("NetworkInterfaces") or [] for g in nic.get("Groups") or []]
        if ids:
            named[name] = ids
    line = "open ports: SSH only"
    if named:
        rest = [name for name in config.get("available_node_types") or {} if name not in named]
        line += f" for {', '.join(rest) or 'no node type'} (provider.security_group)"
    if world:
        line += "; WARNING: SSH is open to the whole internet (0.0.0.0/0): restrict CidrIp to your address range"
    if named:
        listed = "; ".join(f"{name}: {', '.join(ids)}" for name, ids in named.items())
        line += (
            f"; NOT CHECKED: node types with their own security groups ({listed}): their rules are in AWS, not in "
            "this file (`aws ec2 describe-security-groups --group-ids ...`): they must open SSH (22) only"
        )
    return line


def check_local_nodes(path: Path, config: dict) -> None:
    """Provider local: every worker is another machine than the head, listed once."""
    provider = config["provider"]
    if provider.get("type") != "local":
        return
    workers = [str(ip) for ip in provider.get("worker_ips") or []]
    if str(provider.get("head_ip")) in workers:
        raise ClusterConfigError(
            f"{path}: provider.worker_ips lists the head ({provider['head_ip']}); a machine is the head or a worker, "
            "not both: remove it from worker_ips (the head runs work too)"
        )
    twice = sorted({ip for ip in workers if workers.count(ip) > 1})
    if twice:
        raise ClusterConfigError(
            f"{path}: provider.worker_ips lists {', '.join(twice)} more than once; list each machine once"
        )


# The ports of a Ray node, each a setting of the start commands (docs/cluster.md, "Ports"): flag -> what listens.
PORT_FLAGS = {
    "--port": "GCS",
    "--ray-client-server-port": "Ray client server",
    "--dashboard-port": "dashboard and Jobs API",
    "--dashboard-agent-listen-port": "dashboard agent (HTTP: job submission)",
    "--dashboard-agent-grpc-port": "dashboard agent (gRPC)",
    "--runtime-env-agent-port": "runtime-env agent",
    "--metrics-export-port": "metrics exporter (Prometheus, no token)",
    "--node-manager-port": "raylet",
    "--object-manager-port": "object manager",
}
# Two Prometheus servers of the head with no `ray start` flag: Ray reads their ports from these variables.
PORT_VARIABLES = {
    "AUTOSCALER_METRIC_PORT": "autoscaler metrics (Prometheus, no token)",
    "DASHBOARD_METRIC_PORT": "dashboard metrics (Prometheus, no token)",
}
WORKER_RANGE = ("--min-worker-port", "--max-worker-port")


def port_settings(command: str) -> dict[str, int]:
    """The port settings of one start command: {flag or variable: port}, as written in it."""
    found = {}
    for name in [*PORT_FLAGS, *WORKER_RANGE]:
        match = re.search(rf"(?<!\S){re.escape(name)}[= ](\d+)\b", command)
        if match:
            found[name] = int(match.group(1))
    for name in PORT_VARIABLES:
        match = re.search(rf"\b{name}=(\d+)\b", command)
        if match:
            found[name] = int(match.group(1))
    return found


def check_port_settings(path: Path, head: list[str], workers: list[str]) -> str:
    """Fixed metrics port on every node, workers joining the head's GCS port, no port used twice, none in the
    worker range; return the summary line listing the head's ports."""
    gcs_port = None
    for role, commands in (("head", head), ("worker", workers)):
        for command in commands:
            settings = port_settings(command)
            where = f"{role}_start_ray_commands"
            if "--metrics-export-port" not in settings:
                raise ClusterConfigError(
                    f"{path}: `ray start` in {where} leaves --metrics-export-port unset: Ray then serves its metrics "
                    "without a token on a random port no firewall rule can name; add --metrics-export-port=8090 "
                    '(docs/cluster.md, "Ports")'
                )
            single = {name: port for name, port in settings.items() if name not in WORKER_RANGE}
            if role == "head":
                gcs_port = single.setdefault("--port", 6379)
            else:
                joined = re.search(r"--address[= ]\S*:(\d+)", command)
                if joined and gcs_port is not None and int(joined.group(1)) != gcs_port:
                    raise ClusterConfigError(
                        f"{path}: {where} joins port {joined.group(1)} but the head's --port is {gcs_port}; "
                        "make the worker's --address=$RAY_HEAD_IP:PORT match the head's --port"
                    )
            by_port: dict[int, list[str]] = {}
            for name, port in single.items():
                by_port.setdefault(port, []).append(name)
            for port, names in by_port.items():
                if len(names) > 1:
                    raise ClusterConfigError(
                        f"{path}: {where} gives port {port} to {' and '.join(names)}; give each its own port"
                    )
            low, high = settings.get("--min-worker-port", 10002), settings.get("--max-worker-port", 19999)
            for name, port in single.items():
                if low <= port <= high:
                    raise ClusterConfigError(
                        f"{path}: {where} puts {name}={port} inside the worker port range {low}-{high} "
                        "(--min-worker-port/--max-worker-port); move one of them"
                    )
    listed = ", ".join(f"{port} {name.lstrip('-')}" for name, port in port_settings(head[0]).items())
    return f"ports: ok (head: {listed})"


PRIVATE_MODES = r"(?:0?600|u=rw,go=|go-rwx|og-rwx)"


def check_token_private(path: Path, config: dict) -> list[str]:
    """Every auth token that file_mounts copies is chmod'ed private by the head's and the workers' setup."""
    tokens = [remote for remote in (config.get("file_mounts") or {}) if "auth_token" in remote]
    common = config.get("setup_commands") or []
    roles = {
        "head": common + (config.get("head_setup_commands") or []),
        "worker": common + (config.get("worker_setup_commands") or []),
    }
    for token in tokens:
        pattern = re.compile(rf"chmod\s+{PRIVATE_MODES}\s+{re.escape(token)}(?:\s|;|&|$)")
        for role, commands in roles.items():
            if not any(pattern.search(command) for command in commands):
                raise ClusterConfigError(
                    f"{path}: file_mounts copies the Ray auth token to {token} but no {role} setup command makes it "
                    f"private; add `chmod 600 {token}` to setup_commands (rsync keeps the local file's mode, often "
                    "0644)"
                )
    return tokens


def check_checkout_excludes(path: Path, config: dict) -> None:
    """A mount of the checkout itself must not copy the local venv and git history to every node."""
    checkout = [
        remote for remote, local in (config.get("file_mounts") or {}).items() if str(local).rstrip("/") in (".", "")
    ]
    if not checkout or config.get("rsync_filter"):
        return
    excluded = {str(p).strip("/").removeprefix("**/").removesuffix("/**") for p in config.get("rsync_exclude") or []}
    missing = [name for name in (".venv", ".git") if name not in excluded]
    if missing:
        raise ClusterConfigError(
            f"{path}: file_mounts copies this checkout to {checkout[0]} with {' and '.join(missing)} in it "
            "(a local venv is GBs); "
            "add rsync_exclude: [.git, /.venv/, /runs/, /tune_results/, __pycache__/] (or an rsync_filter)"
        )
