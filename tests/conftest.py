"""Test set-up, and the one place that decides how Triton kernels run in the suite.

No GPU: the kernels run under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, which must be set before
triton is first imported, so here, at collection time), and the tests marked `interpreted` run.
A GPU: nothing is interpreted; tests/test_cuda_kernels.py runs the compiled kernels on it, and the
interpreter-only tests (CPU tensors into Triton kernels) are skipped.
"""
import os

import pytest
import torch

INTERPRETED = not torch.cuda.is_available()
if INTERPRETED:
    os.environ["TRITON_INTERPRET"] = "1"
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Triton kernels on CPU tensors: only under the interpreter
interpreted = pytest.mark.skipif(not INTERPRETED, reason="Triton kernels on CPU tensors: interpreter runs only "
                                 "(a GPU runs them compiled in tests/test_cuda_kernels.py)")
