#!/usr/bin/env bash
# Set up everything a fresh machine needs, idempotently: a virtualenv in .venv, the pinned dependencies
# (the CPU build of torch where there is no CUDA), and the embedded corpus with its tokenizer in corpus/.
#   PYTHON=python3.12 bash scripts/setup.sh       # pick the interpreter (default python3, >= 3.11)
#   TORCH_INDEX=URL bash scripts/setup.sh   # the index for the CPU build of torch on a machine without CUDA
#   SYSTEM_PYTHON=1 bash scripts/setup.sh   # no .venv, no installs: $PY as it is, its imports checked (a machine
#                                           # without network that has the dependencies, e.g. the GPU image with
#                                           # the wheels of ../shared/tools/gpu-wheels.sh on PYTHONPATH)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${SYSTEM_PYTHON:-0}" = 1 ]; then
  $PY -W ignore -c "import torch, triton, numpy, yaml, sentencepiece, megatron.core, pytest" || {
    echo "setup: SYSTEM_PYTHON=1 but $PY lacks a dependency (above); install it or drop SYSTEM_PYTHON" >&2; exit 1; }
  exec $PY scripts/prepare_corpus.py
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
stamp=.venv/.requirements.sha
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat $stamp 2>/dev/null)" != "$want" ]; then
  torch_pin=$(grep '^torch==' requirements.txt)
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    # No CUDA: take the CPU build of torch, from a local wheel where pip has one, else the CPU index.
    if ! "${pip[@]}" install --no-index --no-deps "$torch_pin" 2>/dev/null; then
      echo "setup: no CUDA: installing the CPU build of $torch_pin"
      "${pip[@]}" install "$torch_pin" --index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
    fi
  fi
  echo "setup: installing requirements.txt (a few minutes the first time)"
  "${pip[@]}" install -r requirements.txt
  echo "$want" > $stamp
fi
.venv/bin/python scripts/prepare_corpus.py
