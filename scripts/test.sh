#!/usr/bin/env bash
# Run the whole CPU test suite (sets up .venv and the embedded corpus first if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
