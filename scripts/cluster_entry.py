"""Entry script for `ray submit` (the SSH path): runs a tokenforge command on the head node against
the running cluster.

    ray submit cluster.yaml scripts/cluster_entry.py -- tune tune_configs/reward_weights.yaml
    ray submit cluster.yaml scripts/cluster_entry.py -- train -c examples/words.yaml

`ray submit` copies this file to the head and runs it there with `python` (the node's venv, first on
PATH: scripts/setup_node.sh); it attaches to the cluster (RAY_ADDRESS=auto) and runs from the synced
checkout (~/tokenforge, see file_mounts), so relative input paths in the arguments (configs, specs,
data) resolve as they do on your machine. Relative output paths (output_dir, tune.storage_path) go
under ~/tokenforge-outputs on the head, as in a Ray job (pipeline/run_paths.py; set
TOKENFORGE_OUTPUT_ROOT to change it).
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_ADDRESS", "auto")  # join the cluster this head runs, never start a new Ray
os.environ.setdefault("RAY_AUTH_MODE", "token")
checkout = Path(os.environ.get("TOKENFORGE_CHECKOUT", "~/tokenforge")).expanduser()
if checkout.is_dir():
    os.chdir(checkout)

from pipeline.cli import main
from pipeline.run_paths import JOB_OUTPUT_ROOT, OUTPUT_ROOT_ENV

os.environ.setdefault(OUTPUT_ROOT_ENV, str(Path(JOB_OUTPUT_ROOT).expanduser()))

main(sys.argv[1:])
