"""Collectives for parallel/ and for callers outside it (moe/, train/ call these, never torch.distributed).

The differentiable exchanges are autograd functions paired with their conjugates: the expert all-to-all here;
the tensor-parallel copy/reduce pairs are megatron-core's (`tensor_parallel.mappings`), used by parallel/tensor.py.
"""
from __future__ import annotations

from typing import NamedTuple

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


class Peers(NamedTuple):
    """The ranks whose tokens form one batch for a decision that needs all of them: the capacity step under
    expert parallelism (moe/capacity.py). Their batch is the ranks' tokens concatenated in rank order; every rank
    holds the same number of tokens (one micro-batch shape), checked where it costs no host sync (CPU).
    Size 1 (the default, one process): every method is the identity and nothing is communicated."""
    group: object = None
    rank: int = 0
    size: int = 1

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """[size * N, ...] every rank's t [N, ...], in rank order (not differentiable)."""
        if self.size == 1:
            return t
        if not t.is_cuda:
            n = torch.tensor([t.shape[0]])
            sizes = [torch.empty_like(n) for _ in range(self.size)]
            dist.all_gather(sizes, n, group=self.group)
            if len(set(int(s) for s in sizes)) > 1:
                raise ValueError(f"the capacity step over the expert-parallel group needs the same token count on "
                                 f"every rank, got {[int(s) for s in sizes]}; use equal micro-batches or "
                                 "moe.capacity.scope=source")
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts)

    def own(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a gathered [size * N, ...] tensor."""
        n = t.shape[0] // self.size
        return t[self.rank * n:(self.rank + 1) * n]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over the peers."""
        return all_reduce_sum(t, self.group) if self.size > 1 else t


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
