#!/usr/bin/env bash
# Device-machine entry (repo root): install carried wheels from .whl/ if any, then run gpu_check.py.
set -euo pipefail
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv || true
python3 benchmarks/gpu_check.py "$@"
