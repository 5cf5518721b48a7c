"""`tokenforge validate-cluster`: the shipped cluster files pass; insecure or broken variants are rejected."""

import copy
import re
import subprocess
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
    expected = ("open ports: SSH only; WARNING: SSH is open to the whole internet (0.0.0.0/0)" if path.name == "cluster.yaml"
                else "open ports: NOT CHECKED: provider local has no security group")
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
    "fractional resources": (lambda c: c["available_node_types"]["gpu_rollout"]["resources"].update(GPU=0.5), "Ray rejects available_node_types/gpu_rollout/resources/GPU: 0.5 is not of type 'integer'"),
    "unknown key": (lambda c: c.update(max_wrokers=3), "Ray rejects config: Additional properties are not allowed ('max_wrokers' was unexpected)"),
    "dashboard on 0.0.0.0": (lambda c: set_head_command(c, "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"), "--dashboard-host=0.0.0.0 exposes the Jobs API"),
    "dashboard host unset": (lambda c: set_head_command(c, "--dashboard-host=127.0.0.1", ""), "does not set --dashboard-host"),
    "auth disabled": (lambda c: set_head_command(c, "RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled"), "starts Ray without token auth"),
    "worker without auth": (lambda c: c.update(worker_start_ray_commands=["ray stop", "ray start --address=$RAY_HEAD_IP:6379"]), "`ray start --address=$RAY_HEAD_IP:6379` starts Ray without token auth"),
    "token left as copied": (lambda c: c.update(setup_commands=[]), "copies the Ray auth token to ~/.ray/auth_token but no head setup command makes it private; add `chmod 600 ~/.ray/auth_token`"),
    "token private on the head only": (lambda c: c.update(setup_commands=[], head_setup_commands=["chmod 0600 ~/.ray/auth_token"]), "no worker setup command makes it private"),
    "chmod of another file": (lambda c: c.update(setup_commands=["chmod 600 ~/.ray/auth_token.bak"]), "no head setup command makes it private"),
    "checkout shipped with its venv": (lambda c: c.pop("rsync_exclude"), "copies this checkout to ~/tokenforge with .venv and .git in it"),
    "checkout shipped with its git history": (lambda c: c.update(rsync_exclude=["/.venv/"]), "with .git in it"),
    "every port and protocol": (lambda c: c["provider"]["security_group"]["IpPermissions"].append({"IpProtocol": "-1", "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}), "has a rule with IpProtocol -1, which opens every port and protocol"),
    "dashboard port open": (lambda c: c["provider"]["security_group"]["IpPermissions"].append({"FromPort": 8265, "ToPort": 8265, "IpProtocol": "TCP"}), "opens ports 8265-8265; open SSH (22) only"),
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
    result = subprocess.run(["bash", str(REPO / "scripts" / "setup_node.sh"), "gpu"], capture_output=True, text=True, timeout=30)
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
