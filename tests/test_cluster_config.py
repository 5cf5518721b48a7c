"""`tokenforge validate-cluster`: the shipped cluster files pass; insecure or broken variants are rejected."""

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.cluster_check import ClusterConfigError, validate_cluster

REPO = Path(__file__).parent.parent
SHIPPED = [REPO / "cluster.yaml", REPO / "cluster.local.yaml"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_cluster_files_pass(path, capsys):
    main(["validate-cluster", str(path)])
    out = capsys.readouterr().out
    assert "auth token private on every node: ok (~/.ray/auth_token)" in out and "keeps .venv and .git out: ok" in out
    expected = (
        "open ports: SSH only; WARNING: SSH is open to the whole internet (0.0.0.0/0)"
        if path.name == "cluster.yaml"
        else "open ports: NOT CHECKED: provider local has no security group"
    )
    assert expected in out


def broken(tmp_path: Path, change) -> Path:
    config = copy.deepcopy(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    change(config)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def set_head_command(config, old, new):
    config["head_start_ray_commands"] = [c.replace(old, new) for c in config["head_start_ray_commands"]]


CASES = {
    "fractional resources": (
        lambda c: c["available_node_types"]["gpu_rollout"]["resources"].update(GPU=0.5),
        "Ray rejects available_node_types/gpu_rollout/resources/GPU: 0.5 is not of type 'integer'",
    ),
    "unknown key": (
        lambda c: c.update(max_wrokers=3),
        "Ray rejects config: Additional properties are not allowed ('max_wrokers' was unexpected)",
    ),
    "dashboard on 0.0.0.0": (
        lambda c: set_head_command(c, "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"),
        "--dashboard-host=0.0.0.0 exposes the Jobs API",
    ),
    "dashboard host unset": (
        lambda c: set_head_command(c, "--dashboard-host=127.0.0.1", ""),
        "does not set --dashboard-host",
    ),
    "auth disabled": (
        lambda c: set_head_command(c, "RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled"),
        "starts Ray without token auth",
    ),
    "worker without auth": (
        lambda c: c.update(worker_start_ray_commands=["ray stop", "ray start --address=$RAY_HEAD_IP:6379"]),
        "`ray start --address=$RAY_HEAD_IP:6379` starts Ray without token auth",
    ),
    "token left as copied": (
        lambda c: c.update(setup_commands=[]),
        "copies the Ray auth token to ~/.ray/auth_token but no head setup command makes it private; "
        "add `chmod 600 ~/.ray/auth_token`",
    ),
    "token private on the head only": (
        lambda c: c.update(setup_commands=[], head_setup_commands=["chmod 0600 ~/.ray/auth_token"]),
        "no worker setup command makes it private",
    ),
    "chmod of another file": (
        lambda c: c.update(setup_commands=["chmod 600 ~/.ray/auth_token.bak"]),
        "no head setup command makes it private",
    ),
    "checkout shipped with its venv": (
        lambda c: c.pop("rsync_exclude"),
        "copies this checkout to ~/tokenforge with .venv and .git in it",
    ),
    "checkout shipped with its git history": (lambda c: c.update(rsync_exclude=["/.venv/"]), "with .git in it"),
    "every port and protocol": (
        lambda c: c["provider"]["security_group"]["IpPermissions"].append(
            {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}
        ),
        "has a rule with IpProtocol -1, which opens every port and protocol",
    ),
    "dashboard port open": (
        lambda c: c["provider"]["security_group"]["IpPermissions"].append(
            {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "TCP"}
        ),
        "opens ports 8265-8265; open SSH (22) only",
    ),
    "metrics port random": (
        lambda c: set_head_command(c, "--metrics-export-port=8090", ""),
        "`ray start` in head_start_ray_commands leaves --metrics-export-port unset",
    ),
    "workers join another port": (
        lambda c: set_head_command(c, "--port=6379", "--port=6380"),
        "worker_start_ray_commands joins port 6379 but the head's --port is 6380",
    ),
    "one port twice": (
        lambda c: set_head_command(c, "--runtime-env-agent-port=8079", "--runtime-env-agent-port=8078"),
        "head_start_ray_commands gives port 8078 to --dashboard-agent-grpc-port and --runtime-env-agent-port",
    ),
    "port inside the worker range": (
        lambda c: set_head_command(c, "--metrics-export-port=8090", "--metrics-export-port=10500"),
        "puts --metrics-export-port=10500 inside the worker port range 10002-19999",
    ),
    "metrics variable inside the worker range": (
        lambda c: set_head_command(c, "DASHBOARD_METRIC_PORT=44227", "DASHBOARD_METRIC_PORT=12000"),
        "puts DASHBOARD_METRIC_PORT=12000 inside the worker port range",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_broken_variants_are_rejected(tmp_path, case, capsys):
    change, message = CASES[case]
    path = broken(tmp_path, change)
    with pytest.raises(ClusterConfigError, match=re.escape(message)):
        validate_cluster(path)
    with pytest.raises(SystemExit) as exit_:  # the command: one line, exit code 2
        main(["validate-cluster", str(path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tokenforge: error: ") and message in err and "Traceback" not in err


def local_variant(tmp_path: Path, head_ip, worker_ips) -> Path:
    config = yaml.safe_load((REPO / "cluster.local.yaml").read_text())
    config["provider"].update(head_ip=head_ip, worker_ips=worker_ips)
    path = tmp_path / "cluster.local.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_worker_is_not_the_head(tmp_path):
    with pytest.raises(
        ClusterConfigError,
        match=re.escape("provider.worker_ips lists the head (10.0.0.10); a machine is the head or a worker"),
    ):
        validate_cluster(local_variant(tmp_path, "10.0.0.10", ["10.0.0.11", "10.0.0.10"]))
    with pytest.raises(ClusterConfigError, match=re.escape("provider.worker_ips lists 10.0.0.11 more than once")):
        validate_cluster(local_variant(tmp_path, "10.0.0.10", ["10.0.0.11", "10.0.0.11"]))
    validate_cluster(local_variant(tmp_path, "10.0.0.10", ["10.0.0.11", "10.0.0.12"]))


def test_node_level_security_groups_are_not_called_ssh_only(tmp_path):
    """A node type with SecurityGroupIds (or a network interface's Groups) does not use provider.security_group:
    its rules are in AWS, so the line says NOT CHECKED and names the groups instead of "SSH only"."""

    def own_groups(config):
        config["available_node_types"]["gpu_rollout"]["node_config"]["SecurityGroupIds"] = ["sg-0123456789abcdef0"]
        config["available_node_types"]["gpu_learner"]["node_config"]["NetworkInterfaces"] = [
            {"DeviceIndex": 0, "SubnetId": "subnet-01", "Groups": ["sg-0fedcba9876543210"]}
        ]

    line = next(
        checked for checked in validate_cluster(broken(tmp_path, own_groups)) if checked.startswith("open ports")
    )
    assert line.startswith("open ports: SSH only for head (provider.security_group); WARNING")
    assert (
        "NOT CHECKED: node types with their own security groups "
        "(gpu_learner: sg-0fedcba9876543210; gpu_rollout: sg-0123456789abcdef0)" in line
    )


PROVIDERS = {
    "gcp": (
        {"type": "gcp", "region": "us-west1", "availability_zone": "us-west1-a", "project_id": "my-project"},
        "open ports: NOT CHECKED: provider gcp: the firewall is the VPC network's firewall rules",
    ),
    "azure": (
        {"type": "azure", "location": "westus2", "resource_group": "tokenforge"},
        "open ports: NOT CHECKED: provider azure: the network security group",
    ),
    "kuberay": (
        {"type": "kuberay", "namespace": "default"},
        "open ports: NOT CHECKED: provider kuberay: reachability is set by Kubernetes Services and NetworkPolicies",
    ),
}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_other_providers_say_what_is_not_checked(tmp_path, provider, capsys):
    """The firewall of gcp, azure and kuberay is not in the cluster file: the output says so, never "SSH only";
    the checks that the file can answer (dashboard host, token auth, ports, token mode, excludes) still run."""
    section, expected = PROVIDERS[provider]

    def move(config):
        config["provider"] = section
        for node_type in config["available_node_types"].values():
            node_type["node_config"] = {}

    path = broken(tmp_path, move)
    main(["validate-cluster", str(path)])
    out = capsys.readouterr().out
    assert expected in out and "SSH only" not in out and "ports: ok (head: 6379 port" in out
    if provider == "kuberay":
        assert "Ray schema: NOT CHECKED: provider kuberay is not a `ray up` file" in out
    path = broken(
        tmp_path, lambda c: (move(c), set_head_command(c, "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"))
    )
    with pytest.raises(ClusterConfigError, match="exposes the Jobs API"):
        validate_cluster(path)


def test_check_ports_names_the_busy_port_and_its_setting(tmp_path):
    """scripts/check_ports.py, as the start commands run it: a port held by another process is one line naming
    the port and the setting, exit 2, and `ray start` is not run; free ports run the command (here `ray start
    --help` stands in for a real start)."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        command = ["ray", "start", "--head", f"--dashboard-agent-listen-port={port}", "--metrics-export-port=0"]
        result = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "check_ports.py"), *command],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"check_ports: port {port} (dashboard agent (HTTP: job submission)) is in use on "
        f"{socket.gethostname()}; choose a free port for --dashboard-agent-listen-port= "
        "in the cluster file's head_start_ray_commands"
    )
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_ports.py"), "ray", "start", f"--port={port}", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    assert result.returncode == 0 and "--metrics-export-port" in result.stdout  # the port is free again: ray ran


def test_missing_or_unreadable_files(tmp_path):
    with pytest.raises(ClusterConfigError, match="does not exist"):
        validate_cluster(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ClusterConfigError, match="a mapping with a `provider` section"):
        validate_cluster(tmp_path / "bad.yaml")


def test_rsync_filter_counts_as_excludes(tmp_path):
    path = broken(tmp_path, lambda c: (c.pop("rsync_exclude"), c.update(rsync_filter=[".gitignore"])))
    validate_cluster(path)


def test_nodes_install_the_torch_the_readme_installs():
    """constraints.txt pins torch (nodes install exactly that version) and it is the README's torch==X."""
    pins = re.findall(r"^torch==(\S+)", (REPO / "constraints.txt").read_text(), re.M)
    readme = set(re.findall(r"torch==(\d[\w.]*)", (REPO / "README.md").read_text()))
    assert len(pins) == 1 and readme == {pins[0]}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_nodes_set_up_by_node_type(path):
    """Head: the CPU torch build; workers: the CUDA build; both through the venv of scripts/setup_node.sh."""
    config = yaml.safe_load(path.read_text())
    assert config["head_setup_commands"] == ["bash ~/tokenforge/scripts/setup_node.sh cpu"]
    assert config["worker_setup_commands"] == ["bash ~/tokenforge/scripts/setup_node.sh cuda"]
    assert not any("pip install" in c for c in config["setup_commands"])  # no pip into the system Python (PEP 668)


def test_setup_node_refuses_an_unknown_build():
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "setup_node.sh"), "gpu"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and "usage: setup_node.sh cpu|cuda" in result.stderr


def test_ssh_open_to_a_narrow_range_is_no_warning(tmp_path):
    def narrow(config):
        for rule in config["provider"]["security_group"]["IpPermissions"]:
            rule["IpRanges"] = [{"CidrIp": "203.0.113.0/24"}]

    lines = validate_cluster(broken(tmp_path, narrow))
    assert "open ports: SSH only" in lines and not any("WARNING" in line for line in lines)


def test_a_local_ray_token_is_made_private(monkeypatch, tmp_path):
    """Ray 2.60 writes the token of a new local cluster 0644; tokenforge writes it first, 0600, and makes an
    existing token file of the user's 0600."""
    from pipeline.driver.placement import make_token_private

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    token = tmp_path / ".ray" / "auth_token"
    make_token_private()
    assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text()) == 64
    before = token.read_text()
    token.chmod(0o644)
    make_token_private()
    assert token.stat().st_mode & 0o777 == 0o600 and token.read_text() == before  # the same token, kept
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    token.unlink()
    make_token_private()
    assert not token.exists()  # no token auth, no token


def test_setup_node_says_in_one_line_where_no_cpu_torch_is(tmp_path):
    """`setup_node.sh cpu` where neither pip's sources nor PyTorch's CPU index has the pinned CPU build (here a
    version that exists nowhere; on this machine the index is unreachable too): one line naming the index and the
    two ways out, not pip's ResolutionImpossible after 5 retries."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "constraints.txt").write_text("torch==0.0.1\n")
    env = {**os.environ, "HOME": str(tmp_path), "TOKENFORGE_CHECKOUT": str(checkout)}
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "setup_node.sh"), "cpu"], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "setup_node: torch 0.0.1+cpu is in neither pip's configured sources nor https://download.pytorch.org/whl/cpu"
        )
    )
    assert (
        "ResolutionImpossible" not in result.stderr
        and "take PyPI's CUDA build (~5.7 GB) with `setup_node.sh cuda`" in result.stderr
    )
    bashrc = (tmp_path / ".bashrc").read_text().splitlines()
    assert len(bashrc) == 1 and 'RAY_TMPDIR="${RAY_TMPDIR:-$HOME/.tokenforge-ray}"' in bashrc[0]


def test_cluster_entry_never_joins_some_cluster_it_found(tmp_path):
    """scripts/cluster_entry.py joins the head this user started (the address in $RAY_TMPDIR/ray/ray_current_cluster),
    never RAY_ADDRESS=auto, which picks any cluster it finds on a shared machine: without that file, one line,
    exit 2."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for extra in ({"RAY_TMPDIR": str(tmp_path)}, {"RAY_TMPDIR": str(tmp_path), "RAY_ADDRESS": "auto"}):
        result = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "cluster_entry.py"), "train"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, **extra},
            cwd=tmp_path,
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.startswith(
            "cluster_entry: no Ray head started by this user on this node "
            f"({tmp_path}/ray/ray_current_cluster is missing"
        )


@pytest.mark.parametrize(
    ("ranks", "expected"),
    [
        (4, "learner: ok (learner.num_workers=4 ranks of {CPU: 1, GPU: 1} fit one gpu_learner node)"),
        (8, "span 2 gpu_learner nodes: a multi-node group"),
        (12, "error: .*cluster.yaml: learner.num_workers=12 ranks of {CPU: 1, GPU: 1} fit on no single node type"),
    ],
)
def test_a_configured_learner_group_is_checked_against_the_node_types(capsys, ranks, expected):
    """The documented job (docs/cluster.md): the gpu_learner node type's 4 GPUs hold 4 ranks; 8 span its 2 nodes."""
    try:
        main(["validate-cluster", str(REPO / "cluster.yaml"), f"learner.num_workers={ranks}", "learner.num_gpus=1"])
    except SystemExit:
        pass
    captured = capsys.readouterr()
    assert re.search(re.escape(expected) if "error" not in expected else expected, captured.out + captured.err)


def test_node_types_without_resources_leave_the_learner_unchecked(tmp_path, capsys):
    """Ray fills an AWS node type's empty resources in from its instance type: validate-cluster cannot tell whether
    the learner ranks fit, and says so instead of refusing."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    for node in config["available_node_types"].values():
        node["resources"] = {}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["validate-cluster", str(path), "learner.num_workers=4", "learner.num_gpus=1"])
    assert (
        "learner: NOT CHECKED (node types gpu_learner, gpu_rollout, head list no resources" in capsys.readouterr().out
    )
