"""`tokenforge validate-cluster FILE`: Ray's own schema validation plus tokenforge's security checks.

Offline: Ray's `prepare_config` (merge with the provider's defaults) and `validate_config` (the
autoscaler's JSON schema: unknown keys, fractional resources, ...), then:
- every `ray start --head` binds the dashboard / Jobs API to loopback (`--dashboard-host=127.0.0.1`);
  0.0.0.0 exposes a remote-code-execution endpoint (CVE-2023-48022);
- every `ray start` runs with `RAY_AUTH_MODE=token`;
- an AWS security group opens no port but SSH (22), and no rule with IpProtocol -1 (every port); SSH
  open to 0.0.0.0/0 is a warning; for provider `local` (no security group) it says what it could not check;
- a Ray auth token copied by file_mounts is made private (`chmod 600`) by the setup commands of the head
  and of the workers: rsync copies the local file's mode, 0644 where it was made with umask 022;
- a file mount of the checkout (`.`) keeps `.venv` and `.git` out (rsync_exclude, or an rsync_filter):
  a local venv is GBs and tens of thousands of files, copied to every node.
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


def validate_cluster(path: str | Path) -> list[str]:
    """Raise ClusterConfigError naming the file and the problem; return a summary of what was checked."""
    path = Path(path)
    if not path.is_file():
        raise ClusterConfigError(f"cluster file {str(path)!r} does not exist")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ClusterConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(config, dict) or "provider" not in config:
        raise ClusterConfigError(f"{path}: a Ray cluster config is a mapping with a `provider` section")
    check_with_ray(path, config)
    head = [c for c in config.get("head_start_ray_commands", []) if "ray start" in c]
    workers = [c for c in config.get("worker_start_ray_commands", []) if "ray start" in c]
    if not head:
        raise ClusterConfigError(f"{path}: head_start_ray_commands has no `ray start --head` command")
    for command in head:
        check_dashboard_host(path, command)
    for command in head + workers:
        check_token_auth(path, command)
    ports = check_open_ports(path, config)
    tokens = check_token_private(path, config)
    check_checkout_excludes(path, config)
    return [
        "Ray schema: ok (prepare_config + validate_config)",
        f"dashboard/Jobs API on loopback: ok ({len(head)} head start command(s))",
        f"RAY_AUTH_MODE=token: ok ({len(head) + len(workers)} start command(s))",
        ports,
        f"auth token private on every node: ok ({', '.join(tokens) or 'no token in file_mounts'})",
        "checkout sync keeps .venv and .git out: ok",
    ]


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
            f"{path}: --dashboard-host={match.group(1)} exposes the Jobs API, which runs code for anyone who reaches it "
            "(CVE-2023-48022); use --dashboard-host=127.0.0.1 and `ray dashboard` to port-forward"
        )


def check_token_auth(path: Path, command: str) -> None:
    mode = re.search(r"RAY_AUTH_MODE=(\S+?)[;\s]", command + " ")
    if not mode or mode.group(1).strip("'\"") != "token":
        raise ClusterConfigError(
            f"{path}: `{command.strip()[:80]}` starts Ray without token auth; "
            "prefix it with `export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.ray/auth_token;`"
        )


def check_open_ports(path: Path, config: dict) -> str:
    """Raise unless the security group opens SSH (22) only; return the summary line, with a warning for SSH
    open to the whole internet and a plain statement of what cannot be checked for provider `local`."""
    if config["provider"].get("type") == "local":
        return ("open ports: NOT CHECKED: provider local has no security group; Ray's GCS, raylet and agent ports listen "
                "on the network, guarded only by token auth: firewall them to the cluster's machines (docs/cluster.md)")
    group = config.get("provider", {}).get("security_group") or {}
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
    if world:
        return "open ports: SSH only; WARNING: SSH is open to the whole internet (0.0.0.0/0): restrict CidrIp to your address range"
    return "open ports: SSH only"


PRIVATE_MODES = r"(?:0?600|u=rw,go=|go-rwx|og-rwx)"


def check_token_private(path: Path, config: dict) -> list[str]:
    """Every auth token that file_mounts copies is chmod'ed private by the head's and the workers' setup."""
    tokens = [remote for remote in (config.get("file_mounts") or {}) if "auth_token" in remote]
    common = config.get("setup_commands") or []
    roles = {"head": common + (config.get("head_setup_commands") or []), "worker": common + (config.get("worker_setup_commands") or [])}
    for token in tokens:
        pattern = re.compile(rf"chmod\s+{PRIVATE_MODES}\s+{re.escape(token)}(?:\s|;|&|$)")
        for role, commands in roles.items():
            if not any(pattern.search(command) for command in commands):
                raise ClusterConfigError(
                    f"{path}: file_mounts copies the Ray auth token to {token} but no {role} setup command makes it "
                    f"private; add `chmod 600 {token}` to setup_commands (rsync keeps the local file's mode, often 0644)"
                )
    return tokens


def check_checkout_excludes(path: Path, config: dict) -> None:
    """A mount of the checkout itself must not copy the local venv and git history to every node."""
    checkout = [remote for remote, local in (config.get("file_mounts") or {}).items() if str(local).rstrip("/") in (".", "")]
    if not checkout or config.get("rsync_filter"):
        return
    excluded = {str(p).strip("/").removeprefix("**/").removesuffix("/**") for p in config.get("rsync_exclude") or []}
    missing = [name for name in (".venv", ".git") if name not in excluded]
    if missing:
        raise ClusterConfigError(
            f"{path}: file_mounts copies this checkout to {checkout[0]} with {' and '.join(missing)} in it (a local venv is GBs); "
            "add rsync_exclude: [.git, /.venv/, /runs/, /tune_results/, __pycache__/] (or an rsync_filter)"
        )
