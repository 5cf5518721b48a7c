"""Checks that the ports of a `ray start` command are free on this node, then runs the command.

The cluster files' start commands run `ray start` through it (docs/cluster.md, "Ports"):

    python ~/tokenforge/scripts/check_ports.py ray start --head --port=6379 --dashboard-port=8265 ...

Ray itself does not always notice a busy port: with the dashboard agent's port taken, `ray start` reports
success, the agent logs "HTTP service will be disabled" and every `ray job submit` fails with HTTP 500. So
every port the command sets (its port flags, and AUTOSCALER_METRIC_PORT / DASHBOARD_METRIC_PORT from the
environment) is bound here first; each busy one is one line on stderr naming the port and the setting to
change in the cluster file, and the exit code is 2. Busy ports inside the worker range
(--min-worker-port..--max-worker-port) are skipped by Ray's raylet, so they are only counted, and an error
only when none is free. Unset ports are not checked: Ray picks them itself.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: pipeline/ without installing it

from pipeline.cluster_check import PORT_FLAGS, PORT_VARIABLES, WORKER_RANGE, port_settings  # noqa: E402


def is_free(port: int) -> bool:
    """Whether a server could listen on port on every address (a listener on any address makes it busy).
    SO_REUSEADDR: a port left in TIME_WAIT by the cluster's previous run counts as free, as it is for Ray."""
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 on this node
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
                sock.listen()
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    return False
                if family == socket.AF_INET:
                    raise
    return True


def busy_ports(command: list[str]) -> list[str]:
    """One line per busy port the command (and the environment) sets."""
    line = " ".join(command)
    role = "head_start_ray_commands" if "--head" in command else "worker_start_ray_commands"
    settings = port_settings(line)
    for name in PORT_VARIABLES:
        if name in os.environ and name not in settings:
            settings[name] = int(os.environ[name])
    problems = []
    for name, port in settings.items():
        if name in WORKER_RANGE or is_free(port):
            continue
        what = PORT_FLAGS.get(name) or PORT_VARIABLES[name]
        setting = f"{name}=" if name.startswith("--") else f"{name}= (exported before ray start)"
        problems.append(
            f"check_ports: port {port} ({what}) is in use on {socket.gethostname()}; "
            f"choose a free port for {setting} in the cluster file's {role}"
        )
    if settings.keys() & set(WORKER_RANGE):
        low, high = settings.get("--min-worker-port", 10002), settings.get("--max-worker-port", 19999)
        taken = [port for port in range(low, high + 1) if not is_free(port)]
        if len(taken) == high - low + 1:
            problems.append(
                f"check_ports: every worker port {low}-{high} is in use on {socket.gethostname()}; "
                f"choose another range for --min-worker-port/--max-worker-port in the cluster file's {role}"
            )
        elif taken:
            print(
                f"check_ports: {len(taken)} of the worker ports {low}-{high} are in use; Ray skips them",
                file=sys.stderr,
            )
    return problems


def main(command: list[str]) -> None:
    if command[:2] != ["ray", "start"]:
        sys.exit("usage: check_ports.py ray start [OPTIONS]")
    problems = busy_ports(command)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        sys.exit(2)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
