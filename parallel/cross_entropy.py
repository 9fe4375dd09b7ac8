"""The LM head and the cross-entropy fused, in chunks of tokens: the [N, V] logits never exist at once, and never
in fp32.

    loss = mean_i [ logsumexp_v (x_i . w_v) - x_i . w_{t_i} ]        x [N, d], w [V, d], targets t [N]

Per chunk of `chunk_size` rows: logits = x_c @ w^T in the compute dtype (bf16 on the GPU), the log-sum-exp in
fp32 per row, and at once the gradient of the mean loss, g = (softmax - onehot) / N, in the compute dtype; then
dx_c = g @ w and dw += g^T @ x_c (fp32 accumulation over the chunks, inside the GEMM on CUDA). The backward only
scales the saved dx and dw by the incoming gradient, so the head's matmul is not recomputed (the approach of
Liger-Kernel's fused linear cross-entropy; written here because it must also run vocabulary-parallel and on the
CPU).

Vocabulary-parallel (`group` = the tensor-parallel group): each rank holds rows [first, first + V / tp) of w and
gets the global targets. Per chunk the row maxima are all-reduced (max), then the sums of exp and the target's
logit (on the rank that holds it, 0 elsewhere) in one all-reduce (sum), so every rank has the same loss; each
rank's dx is its partial sum over its vocabulary slice, which the head input's backward all-reduce adds up
(parallel/layers.py `head_input`).

On CUDA with the whole vocabulary on the rank, one Triton kernel per chunk takes each row's log-sum-exp (online,
one read) and overwrites the row with its gradient (a second read, mostly from L2); vocabulary-parallel, the row
statistics and the gradient are two torch.compile'd functions with the all-reduces between them; on the CPU
plain torch ops. No fp32 copy of the logits either way (the kernel against the two functions: benchmarks/
results/, README).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from parallel.comm import all_reduce_max, all_reduce_sum

CHUNK_SIZE = 8192  # rows per chunk: [8192, 51200] bf16 logits are 0.8 GiB
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _loss_and_grad_rows(logits_ptr, target_ptr, loss_ptr, V, stride, scale, BLOCK: tl.constexpr):
    """Row r: loss[r] = logsumexp(l_r) - l_r[t_r], then l_r <- (softmax(l_r) - onehot(t_r)) * scale, in place in
    the logits' dtype (t_r = -1: no target column)."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    t = tl.load(target_ptr + row)
    t_logit = tl.load(base + tl.maximum(t, 0)).to(tl.float32)  # read before the row is overwritten
    t_logit = tl.where(t >= 0, t_logit, 0.0)
    m = float("-inf")  # the running row max; s: per-lane sums of exp(l - m)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))  # finite: every block holds a column < V
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    lse = m + tl.log(tl.sum(s, 0))
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        p = tl.exp(tl.load(base + cols, mask=mask, other=0.0).to(tl.float32) - lse)
        tl.store(base + cols, (tl.where(cols == t, p - 1.0, p) * scale).to(logits_ptr.dtype.element_ty), mask=mask)
    tl.store(loss_ptr + row, lse - t_logit)


def loss_and_grad_rows(logits: torch.Tensor, local_target: torch.Tensor, scale: float, block: int = 0,
                       num_warps: int = 8) -> torch.Tensor:
    """Per-row loss fp32 [n] of logits [n, V] (rows contiguous) against `local_target` [n] (-1: none); the
    logits become (softmax - onehot) * scale. The default block (4096; 64 under the interpreter, whose cost grows
    with it) and warps: the best of benchmarks/bench_step_pieces.py's sweep on an H200."""
    n, V = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    block = min(triton.next_power_of_2(V), block or (64 if _INTERPRET else 4096))
    if n:
        _loss_and_grad_rows[(n,)](logits, local_target, loss, V, logits.stride(0), scale, BLOCK=block,
                                  num_warps=num_warps)
    return loss


def _row_stats(logits: torch.Tensor, local_target: torch.Tensor):
    """[n, V] logits, [n] target columns (-1: not in this slice) -> row max, sum of exp(l - max), target logit,
    all fp32 [n]."""
    lf = logits.float()
    m = lf.amax(1)
    s = torch.exp(lf - m[:, None]).sum(1)
    hit = local_target >= 0
    t = torch.where(hit, lf.gather(1, local_target.clamp(min=0)[:, None])[:, 0], 0.0)
    return m, s, t


def _grad(logits: torch.Tensor, local_target: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    """(softmax - onehot) * scale in the logits' dtype."""
    p = torch.exp(logits.float() - lse[:, None])
    cols = torch.arange(logits.shape[1], device=logits.device)
    p = p - (cols[None, :] == local_target[:, None]).float()
    return (p * scale).to(logits.dtype)


_compiled = {}


def _fn(fn, cuda: bool):
    """`fn`, torch.compile'd (once, static shapes) on CUDA."""
    if not cuda:
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, targets, first, group, chunk_size, with_grad, dtype):
        N, cuda = x.shape[0], x.is_cuda
        row_stats, grad = _fn(_row_stats, cuda), _fn(_grad, cuda)
        one_kernel = cuda and group is None and with_grad
        ctx.dtypes = x.dtype, w.dtype
        x, w = x.to(dtype), w.to(dtype)  # the compute dtype; the gradients go back in the inputs' dtypes
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        dx = torch.empty_like(x) if with_grad else None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if with_grad else None
        for s in range(0, N, chunk_size):
            xc = x[s:s + chunk_size]
            logits = xc @ w.t()  # [n, V_local]
            local = targets[s:s + chunk_size] - first
            local = torch.where((local >= 0) & (local < w.shape[0]), local, -1)
            if one_kernel:  # the loss and, in place of the logits, the gradient
                loss += loss_and_grad_rows(logits, local, 1.0 / N).sum()
                g = logits
            else:
                m, sumexp, target_logit = row_stats(logits, local)
                if group is not None:
                    local_max = m.clone()
                    all_reduce_max(m, group)
                    # the local sum of exp was taken against the local max: rescale it to the global one
                    sumexp, target_logit = all_reduce_sum(torch.stack([sumexp * torch.exp(local_max - m),
                                                                       target_logit]), group)
                lse = m + torch.log(sumexp)
                loss += (lse - target_logit).sum()
                g = grad(logits, local, lse, 1.0 / N) if with_grad else None
            if with_grad:
                dx[s:s + chunk_size] = g @ w
                if cuda:  # one cuBLAS call: bf16 inputs accumulated into the fp32 dw (beta = 1)
                    dw = torch.addmm(dw, g.t(), xc, out_dtype=torch.float32)
                else:  # the CPU has no addmm with out_dtype: rounded per chunk, summed in fp32
                    dw += (g.t() @ xc).float()
        ctx.save_for_backward(dx, dw)
        return loss / N

    @staticmethod
    def backward(ctx, g):
        dx, dw = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        return (dx * g).to(x_dtype), (dw * g).to(w_dtype), None, None, None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype,
                         group=None, first: int = 0, chunk_size: int = CHUNK_SIZE) -> torch.Tensor:
    """Mean cross-entropy of the logits x @ weight^T against `targets`, fused and chunked (module docstring),
    computed in `dtype`.

    x [N, d], weight [V_local, d]; targets [N] int64 global ids; `group`/`first`: the tensor-parallel group and
    the first vocabulary row this rank holds (None/0: the whole vocabulary here)."""
    with_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(x, weight, targets, first, group, chunk_size, with_grad, dtype)
