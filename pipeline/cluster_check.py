"""`tokenforge validate-cluster FILE`: Ray's own schema validation plus tokenforge's security checks.

Offline: Ray's `prepare_config` (merge with the provider's defaults) and `validate_config` (the
autoscaler's JSON schema: unknown keys, fractional resources, ...), then:
- every `ray start --head` binds the dashboard / Jobs API to loopback (`--dashboard-host=127.0.0.1`);
  0.0.0.0 exposes a remote-code-execution endpoint (CVE-2023-48022);
- every `ray start` runs with `RAY_AUTH_MODE=token`;
- an AWS security group opens no port but SSH (22).
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
    check_open_ports(path, config)
    return [
        "Ray schema: ok (prepare_config + validate_config)",
        f"dashboard/Jobs API on loopback: ok ({len(head)} head start command(s))",
        f"RAY_AUTH_MODE=token: ok ({len(head) + len(workers)} start command(s))",
        "open ports: SSH only",
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


def check_open_ports(path: Path, config: dict) -> None:
    group = config.get("provider", {}).get("security_group") or {}
    for rule in group.get("IpPermissions", []):
        ports = (rule.get("FromPort"), rule.get("ToPort"))
        if ports != (22, 22):
            raise ClusterConfigError(
                f"{path}: provider.security_group opens ports {ports[0]}-{ports[1]}; open SSH (22) only "
                "and reach the dashboard through `ray dashboard` (an SSH port-forward)"
            )
