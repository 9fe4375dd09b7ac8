"""The fused, chunked LM head + cross-entropy (parallel/cross_entropy.py) against the plain path: logits in full,
F.cross_entropy. Vocabulary-parallel equality is checked by tests/test_parallel.py (tp=2 against one process)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import interpreted
from parallel.cross_entropy import _grad, _row_stats, linear_cross_entropy, loss_and_grad_rows


def plain(x, w, targets):
    return F.cross_entropy((x @ w.t()).float(), targets)


@pytest.mark.parametrize("N,chunk", [(37, 8), (64, 64), (5, 100)])  # several chunks, a ragged last; one; one short
def test_fp32_loss_and_gradients_equal_the_plain_path(N, chunk):
    torch.manual_seed(0)
    V, d = 53, 24
    x0, w0 = torch.randn(N, d), torch.randn(V, d) * 0.3
    targets = torch.randint(0, V, (N,))
    grads = []
    for fused in (False, True):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = linear_cross_entropy(x, w, targets, torch.float32, chunk_size=chunk) if fused else plain(x, w, targets)
        (2.5 * loss).backward()  # a scaled incoming gradient
        grads.append((loss.detach(), x.grad, w.grad))
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_low_precision_close_to_fp32_and_gradients_in_the_inputs_dtype():
    """Computed in fp16 (bf16 on the GPU) from fp32 inputs: loss and gradients close to the fp32 ones, the
    gradients returned in fp32 for the fp32 inputs (the master weights of mixed precision)."""
    torch.manual_seed(1)
    N, V, d = 96, 200, 32
    x0, w0 = torch.randn(N, d), torch.randn(V, d) * 0.1
    targets = torch.randint(0, V, (N,))
    out = {}
    for dtype in (torch.float32, torch.float16):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = linear_cross_entropy(x, w, targets, dtype, chunk_size=40)
        loss.backward()
        assert loss.dtype == x.grad.dtype == w.grad.dtype == torch.float32
        out[dtype] = (loss.detach(), x.grad, w.grad)
    for want, got in zip(out[torch.float32], out[torch.float16]):
        assert ((got - want).norm() / want.norm()).item() < 5e-3


def test_no_gradient_work_without_grad():
    x, w = torch.randn(10, 8, requires_grad=True), torch.randn(12, 8, requires_grad=True)
    targets = torch.randint(0, 12, (10,))
    with torch.no_grad():
        loss = linear_cross_entropy(x, w, targets, torch.float32, chunk_size=4)
    torch.testing.assert_close(loss, plain(x, w, targets).detach())
    assert loss.grad_fn is None


@interpreted
@pytest.mark.parametrize("n,V", [(6, 300), (3, 53), (4, 128)])  # a ragged last block, one short block, two whole
def test_one_kernel_loss_and_gradient_rows_equal_the_two_functions(n, V):
    """The CUDA path's Triton kernel (under the interpreter, fp32) against the functions of the vocabulary-parallel
    and CPU paths, on fresh logits; targets in the first and the last column, and -1 (not in this slice)."""
    logits = torch.randn(n, V) * 3
    target = torch.randint(0, V, (n,))
    target[0], target[1], target[-1] = V - 1, 0, -1
    m, s, t = _row_stats(logits, target)
    lse = m + torch.log(s)
    want_grad = _grad(logits, target, lse, 0.25)
    got = logits.clone()
    loss = loss_and_grad_rows(got, target, 0.25)
    torch.testing.assert_close(loss, lse - t, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got, want_grad, rtol=1e-5, atol=1e-7)
