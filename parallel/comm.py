"""Collectives for parallel/ and for callers outside it (moe/, train/ call these, never torch.distributed).

The differentiable exchanges are autograd functions paired with their conjugates: the expert all-to-all here;
the tensor-parallel copy/reduce pairs are megatron-core's (`tensor_parallel.mappings`), used by parallel/tensor.py.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """In-place sum over `group` (the default group when None); a no-op in a single process."""
    if is_distributed() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def exchange_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """The even all-to-all of per-expert counts: counts [P * n] holds, at r * n + e, what this rank sends to
    local expert e of rank r; the result holds, at s * n + e, what rank s sends to this rank's expert e."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts, group=group)
    return out


def all_reduce_max(t: torch.Tensor, group=None) -> torch.Tensor:
    """In-place maximum over `group`; a no-op in a single process."""
    if is_distributed() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all along dim 0; its backward is the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((sum(ctx.in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Rows x[sum(in_splits[:r]) : ...+in_splits[r]] go to rank r of `group`; returns the rows received,
    grouped by source rank (out_splits[r] from rank r). Differentiable, any device and backend (gloo, nccl)."""
    return _AllToAll.apply(x, out_splits, in_splits, group)
