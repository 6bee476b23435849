#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py says what it measures): run it once whenever a machine with one CUDA
# GPU is at hand, and record its lines in benchmarks/RESULTS.md. Under 8 minutes on an H100; never part of the tests.
#
#   bash benchmarks/gpu_check.sh [--train-steps 300] [--parts parity,train,decode,fsdp]
#
# It runs sparkgpt from this checkout (PYTHONPATH) with the Python that has CUDA torch and transformers ($PYTHON,
# default python3). On a machine with no network, carry what it cannot fetch: wheels of missing packages in .whl/,
# and the Shakespeare corpus in .gpu/corpora/shakespeare/ (a copy of ~/.cache/sparkgpt/corpora/shakespeare).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sparkgpt-site \
        .whl/*.whl
    export PYTHONPATH=/tmp/sparkgpt-site
fi
if [ -d .gpu/corpora ]; then
    export SPARKGPT_CACHE="$PWD/.gpu"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 480 "$PYTHON" benchmarks/gpu_check.py "$@"
