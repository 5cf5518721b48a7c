"""Entry script for `ray submit` (the SSH path): runs a tokenforge command on the head node against
the running cluster.

    ray submit cluster.yaml scripts/cluster_entry.py -- tune tune_configs/reward_weights.yaml
    ray submit cluster.yaml scripts/cluster_entry.py -- train -c examples/words.yaml

`ray submit` copies this file to the head and runs it there with `python` (the node's venv, first on
PATH: scripts/setup_node.sh); it joins the cluster this user's `ray start --head` started on this node,
whose address Ray wrote to $RAY_TMPDIR/ray/ray_current_cluster (RAY_TMPDIR: set by setup_node.sh), never
`RAY_ADDRESS=auto`, which on a machine shared with other Ray clusters may pick another user's; and it runs from
the synced checkout (~/tokenforge, see file_mounts), so relative input paths in the arguments (configs, specs,
data) resolve as they do on your machine. Relative output paths (output_dir, tune.storage_path) go
under ~/tokenforge-outputs on the head, as in a Ray job (pipeline/run_paths.py; set
TOKENFORGE_OUTPUT_ROOT to change it).
"""

import os
import sys
from pathlib import Path


def own_cluster_address() -> str:
    """The GCS address `ray start --head` wrote into this user's Ray temp dir; exit 2 with one line if none."""
    address_file = Path(os.environ.get("RAY_TMPDIR") or "/tmp") / "ray" / "ray_current_cluster"
    if not os.environ.get("RAY_TMPDIR") or not address_file.is_file():
        print(
            f"cluster_entry: no Ray head started by this user on this node ({address_file} is missing; RAY_TMPDIR="
            f"{os.environ.get('RAY_TMPDIR', '')!r}): start the cluster with `ray up` and this checkout's cluster file "
            "(scripts/setup_node.sh sets RAY_TMPDIR in ~/.bashrc)",
            file=sys.stderr,
        )
        sys.exit(2)
    return address_file.read_text().strip()


if os.environ.get("RAY_ADDRESS", "auto") == "auto":  # never "auto": it may pick another user's cluster
    os.environ["RAY_ADDRESS"] = own_cluster_address()
os.environ.setdefault("RAY_AUTH_MODE", "token")
checkout = Path(os.environ.get("TOKENFORGE_CHECKOUT", "~/tokenforge")).expanduser()
if checkout.is_dir():
    os.chdir(checkout)

from pipeline.cli import main
from pipeline.run_paths import JOB_OUTPUT_ROOT, OUTPUT_ROOT_ENV

os.environ.setdefault(OUTPUT_ROOT_ENV, str(Path(JOB_OUTPUT_ROOT).expanduser()))

main(sys.argv[1:])
