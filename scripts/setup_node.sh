#!/usr/bin/env bash
# Sets up one node of a tokenforge Ray cluster. `ray up` runs it from the cluster files' setup commands,
# on every node, from the checkout that file_mounts synced to ~/tokenforge:
#
#     bash ~/tokenforge/scripts/setup_node.sh cpu              # the head: the CPU build of torch
#     bash ~/tokenforge/scripts/setup_node.sh cuda             # GPU nodes: PyPI's torch (the CUDA build on Linux)
#     bash ~/tokenforge/scripts/setup_node.sh cuda INDEX_URL   # a build from another index, e.g.
#                                                              # https://download.pytorch.org/whl/cu126
#
# 1. A virtualenv, ~/tokenforge-venv: Debian 12 and Ubuntu 23.04+ refuse `pip install` into the system
#    Python (PEP 668, "externally-managed-environment").
# 2. The first line of ~/.bashrc puts that venv first on PATH, turns Ray token auth on and gives this
#    cluster's Ray its own temp dir (RAY_TMPDIR=~/.tokenforge-ray, unless set already: on a machine shared
#    with other Ray clusters, /tmp/ray may be another user's, and `ray status` or a `ray submit` script
#    would find their cluster there), for every shell Ray opens on the node: `ray start`, `ray submit`
#    (which runs `python`), job drivers, `ray exec`, `ray attach`, and `ray status` typed on the node.
# 3. torch at the version constraints.txt pins, in the build this node needs. CPU: from pip's configured
#    sources if they hold the CPU build (a wheelhouse or mirror), else from PyTorch's CPU index
#    (https://download.pytorch.org/whl/cpu); where neither has it, one line says so and what to do. PyPI's
#    Linux torch wheel is the CUDA build, which pulls ~2.7 GB of nvidia-* packages: right on GPU nodes only.
# 4. tokenforge from the synced checkout, every dependency pinned by constraints.txt.
#
# Idempotent: `ray up` on a running cluster runs it again and reuses the venv.
set -euo pipefail

build=${1:-}
index=${2:-}
if [[ $build != cpu && $build != cuda ]]; then
    echo "usage: setup_node.sh cpu|cuda [TORCH_INDEX_URL]" >&2
    exit 2
fi
checkout=${TOKENFORGE_CHECKOUT:-$HOME/tokenforge}
venv=$HOME/tokenforge-venv
cpu_index=https://download.pytorch.org/whl/cpu

# 1. The venv (python3-venv provides `python3 -m venv` on Debian/Ubuntu).
if [[ ! -x $venv/bin/python ]]; then
    if ! python3 -m venv "$venv" 2>/dev/null; then
        rm -rf "$venv"
        if command -v apt-get >/dev/null && sudo -n true 2>/dev/null; then
            echo "setup_node: installing python3-venv"
            sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >/dev/null
            python3 -m venv "$venv"
        else
            echo "setup_node: \`python3 -m venv\` fails on $(hostname): install python3-venv on this node (apt-get install python3-venv)" >&2
            exit 1
        fi
    fi
fi

# 2. One line at the top of ~/.bashrc (above Debian's "not interactive: return" guard); an older version of
#    it (same marker) is replaced.
marker="# tokenforge: venv, Ray token auth and temp dir (scripts/setup_node.sh)"
line='case ":$PATH:" in *":$HOME/tokenforge-venv/bin:"*) ;; *) export PATH="$HOME/tokenforge-venv/bin:$PATH";; esac; export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$HOME/.ray/auth_token" RAY_TMPDIR="${RAY_TMPDIR:-$HOME/.tokenforge-ray}"'
if ! grep -qxF "$line  $marker" ~/.bashrc 2>/dev/null; then
    { echo "$line  $marker"; grep -vF "# tokenforge: venv" ~/.bashrc 2>/dev/null || true; } > ~/.bashrc.tokenforge
    mv ~/.bashrc.tokenforge ~/.bashrc
fi

# 3. torch, the build this node needs, at the pinned version.
pip=("$venv/bin/pip" install -q --disable-pip-version-check)
version=$(sed -n 's/^torch==\([^ #]*\).*/\1/p' "$checkout/constraints.txt")
if [[ -z $version ]]; then
    echo "setup_node: $checkout/constraints.txt pins no torch version (a line torch==X.Y.Z)" >&2
    exit 1
fi
if [[ -n $index ]]; then
    "${pip[@]}" "torch==$version" --index-url "$index"
elif [[ $build == cuda ]]; then
    "${pip[@]}" "torch==$version"
elif "$venv/bin/pip" install -q --disable-pip-version-check --dry-run --no-deps "torch==$version+cpu" >/dev/null 2>&1; then
    "${pip[@]}" "torch==$version+cpu"  # pip's configured sources hold the CPU build
elif "$venv/bin/pip" --isolated index versions torch --index-url "$cpu_index" --retries 1 --timeout 20 2>/dev/null | grep -qF "$version+cpu"; then
    "${pip[@]}" "torch==$version" --index-url "$cpu_index"
else  # --isolated: PyTorch's index alone, not the configured sources that were just found without the CPU build
    echo "setup_node: torch $version+cpu is in neither pip's configured sources nor $cpu_index (unreachable from $(hostname)?): mirror that wheel into a wheelhouse that pip.conf's find-links names, or take PyPI's CUDA build (~5.7 GB) with \`setup_node.sh cuda\` in head_setup_commands" >&2
    exit 1
fi

# 4. tokenforge and its pinned dependencies.
"${pip[@]}" -c "$checkout/constraints.txt" -e "$checkout"
echo "setup_node: $("$venv/bin/python" -c 'import torch, ray; print(f"torch {torch.__version__}, ray {ray.__version__}")') in $venv"
