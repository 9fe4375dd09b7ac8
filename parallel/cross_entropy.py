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

On CUDA the per-chunk softmax and gradient run as one torch.compile'd function (bf16 logits read once for the
row statistics and once for the gradient, no fp32 copy); on the CPU as plain torch ops.
"""
from __future__ import annotations

import torch

from parallel.comm import all_reduce_max, all_reduce_sum

CHUNK_SIZE = 8192  # rows per chunk: [8192, 51200] bf16 logits are 0.8 GiB


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
            m, sumexp, target_logit = row_stats(logits, local)
            if group is not None:
                local_max = m.clone()
                all_reduce_max(m, group)
                # the local sum of exp was taken against the local max: rescale it to the global one
                sumexp, target_logit = all_reduce_sum(torch.stack([sumexp * torch.exp(local_max - m),
                                                                   target_logit]), group)
            lse = m + torch.log(sumexp)
            loss += (lse - target_logit).sum()
            if with_grad:
                g = grad(logits, local, lse, 1.0 / N)
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
