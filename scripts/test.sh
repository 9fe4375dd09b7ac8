#!/usr/bin/env bash
# Run the whole test suite (sets up .venv and the embedded corpus first if needed); on a GPU machine the CUDA
# tests run too (tests/conftest.py). SYSTEM_PYTHON=1: with $PYTHON (default python3) as it is (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py=.venv/bin/python
if [ "${SYSTEM_PYTHON:-0}" = 1 ]; then py=${PYTHON:-python3}; fi
exec "$py" -m pytest "$@"
