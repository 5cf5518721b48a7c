"""A real multi-node Ray cluster on this machine, started as users start one (`ray start --head`, then
`ray start --address` per node; 127.0.0.1, token auth). Each node has its own temp dir, as on a
separate machine, and may get its own view of a directory (a private mount namespace with an empty
tmpfs over it), so a node reading another node's local files fails as it would across machines.
Only this cluster's own processes are ever signalled (found by their temp dir)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent


GIVEN_PORTS: set[int] = set()  # every port handed out in this process: the OS may offer a closed one again


def free_ports(count: int) -> list[int]:
    """`count` ports free now and never handed out before by this process."""
    sockets, ports = [], []
    while len(ports) < count:  # the sockets stay open until all are drawn, so no port comes twice in one call
        sockets.append(socket.socket())
        sockets[-1].bind(("127.0.0.1", 0))
        port = sockets[-1].getsockname()[1]
        if port not in GIVEN_PORTS:
            ports.append(port)
    for s in sockets:
        s.close()
    GIVEN_PORTS.update(ports)
    return ports


def node_ports() -> list[str]:
    manager, objects, agent, agent_grpc, runtime_env, metrics, first_worker = free_ports(7)
    first_worker = 10000 + first_worker % 20000  # a block of 100 worker ports below the ephemeral range (32768-)
    return [
        f"--node-manager-port={manager}",
        f"--object-manager-port={objects}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}",
        f"--min-worker-port={first_worker}",
        f"--max-worker-port={first_worker + 99}",
    ]


def processes_of(temp_dir: str) -> list[int]:
    """PIDs whose command line mentions this temp dir (a node's raylet, agents, workers; the head's GCS)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and temp_dir in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def can_mask() -> bool:
    """Whether this machine lets a process mount a tmpfs in a private mount namespace."""
    return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0


class LocalCluster:
    def __init__(self, extra_env: dict[str, str] | None = None):
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            **(extra_env or {}),
        }
        self.env.pop("RAY_ADDRESS", None)
        gcs, self.dashboard, self.client = free_ports(3)
        self.gcs = f"127.0.0.1:{gcs}"
        self.nodes: list[str] = []  # temp dirs, the head's first

    def start_head(self, cpus: float, resources: str = "{}") -> str:
        return self._start(
            [
                "--head",
                f"--port={self.gcs.split(':')[1]}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard}",
                f"--ray-client-server-port={self.client}",
            ],
            cpus,
            resources,
            0,
            None,
        )

    def start_autoscaling_head(self, cpus: float, worker_types: dict[str, dict]) -> str:
        """A head with Ray's own autoscaler watching it, as `ray up` starts one, but with Ray's fake multi-node
        provider: a node it launches is a set of processes on this machine, and a node lost (killed) is replaced
        like a cloud instance. `worker_types`: the cluster file's available_node_types (resources, min/max_workers)."""
        from ray.autoscaler._private.monitor import BASE_READONLY_CONFIG  # every key a cluster file may leave out

        config = {
            **BASE_READONLY_CONFIG,
            "cluster_name": "tokenforge-test",
            "max_workers": 8,
            "idle_timeout_minutes": 5,
            "provider": {
                "type": "fake_multinode",
                "gcs_address": self.gcs,
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
            },
            "available_node_types": {
                **worker_types,
                "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
            },
        }
        path = Path(tempfile.mkdtemp(prefix="tf-autoscaler-")) / "cluster.json"
        path.write_text(json.dumps(config))
        # the autoscaler runs every second and gives up on a silent node after 10 s (defaults: 5 s, 30 s)
        self.env.update(
            {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "10"}
        )
        return self._start(
            [
                "--head",
                f"--port={self.gcs.split(':')[1]}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard}",
                f"--ray-client-server-port={self.client}",
                f"--autoscaling-config={path}",
            ],
            cpus,
            "{}",
            0,
            None,
        )

    def autoscaled_nodes(self) -> dict[str, list[int]]:
        """instance id -> PIDs of each node the autoscaler launched (its raylet and what the raylet started: each
        has the instance id in its environment)."""
        nodes: dict[str, list[int]] = {}
        for proc in Path("/proc").iterdir():
            try:
                environ = (proc / "environ").read_bytes().split(b"\0") if proc.name.isdigit() else []
            except OSError:
                continue
            for entry in environ:
                if entry.startswith(b"RAY_CLOUD_INSTANCE_ID=") and self.gcs.encode() in (proc / "cmdline").read_bytes():
                    nodes.setdefault(entry.split(b"=", 1)[1].decode(), []).append(int(proc.name))
        return nodes

    def add_node(self, cpus: float, resources: str = "{}", gpus: int = 0, masked: Path | None = None) -> str:
        """A worker node; `gpus` are advertised to Ray only (this machine has none); `masked`: a directory
        this node sees as an empty tmpfs (its own local disk)."""
        return self._start([f"--address={self.gcs}"], cpus, resources, gpus, masked)

    def _start(self, role: list[str], cpus: float, resources: str, gpus: int, masked: Path | None) -> str:
        temp_dir = tempfile.mkdtemp(prefix="tf-ray-", dir="/tmp")  # short: Ray's socket paths live below it
        command = [
            str(BIN / "ray"),
            "start",
            *role,
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={cpus}",
            f"--num-gpus={gpus}",
            f"--resources={resources}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            *node_ports(),
        ]
        if masked is not None:
            line = " ".join(f"'{part}'" for part in command)
            command = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "bash",
                "-c",
                f"mount -t tmpfs tmpfs '{masked}' && exec {line}",
            ]
        self.nodes.append(temp_dir)
        subprocess.run(command, env=self.env, check=True, capture_output=True, timeout=180)
        return temp_dir

    def kill_node(self, temp_dir: str) -> None:
        """SIGKILL every process of one node (its raylet first): the node is lost, as when a machine dies."""
        kill(processes_of(temp_dir))

    def shutdown(self) -> None:
        for temp_dir in self.nodes:  # the head first: its autoscaler launches no node after this
            self.kill_node(temp_dir)
        for pids in self.autoscaled_nodes().values():
            kill(pids)
