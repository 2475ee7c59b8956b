#!/usr/bin/env bash
# The prepared GPU check, as the device tool runs it on a lent machine (repo root, $OUT set):
#   ZHLLM_COMMIT=<the commit, written out here: no .git travels> bash bench/gpu_check.sh
# Uses that machine's python3 (or $PYTHON), PyTorch, Triton and transformers as they are: no install, PYTHONPATH=. .
# Wheels placed in bench/.wheels/ (carried; e.g. Liger-Kernel) are unpacked into a private folder first.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G "bench/.wheels/*.whl" > /dev/null; then
  "${PYTHON:-python3}" -m pip install -q --no-deps --no-index --target /tmp/zhllm-wheels bench/.wheels/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/zhllm-wheels"
fi
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
