#!/usr/bin/env bash
# Create .venv (if missing) and install socseg with its pinned dependencies, test tools and the
# documentation tools (the `docs` extra: tests/test_docs.py builds the MkDocs site) and napari (the
# `napari` extra: the viewer plugin and its tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# An NVIDIA GPU (its driver answers `nvidia-smi -L`) adds the `gpu` extra: TensorFlow's CUDA
# libraries as pip wheels. SOCSEG_GPU=0 or 1 overrides the detection.
extras=test
gpu=${SOCSEG_GPU:-auto}
if [ "$gpu" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then gpu=1; else gpu=0; fi
fi
[ "$gpu" = 1 ] && extras=test,gpu
# SOCSEG_TOOLS (default "docs,napari") adds the documentation tools and the napari plugin's
# viewer; the quick start sets it empty and drops the test tools too (SOCSEG_NO_TEST=1): a user
# who only runs the pipeline needs none of them.
tools=${SOCSEG_TOOLS-docs,napari}
[ "${SOCSEG_NO_TEST:-0}" = 1 ] && extras=${extras/test/} && extras=${extras#,}
all=$(echo "$extras,$tools" | sed 's/^,*//; s/,*$//')
echo "setup_env: installing socseg${all:+[$all]}" >&2
.venv/bin/python -m pip install --quiet -e ".${all:+[$all]}"
