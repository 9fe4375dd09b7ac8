"""Token dispatchers: from the router's choices to rows grouped by expert (the experts' input), and back.

    rows, handle = dispatcher.dispatch(x [T, d], routing, capacity)   # ExpertRows for this rank's experts
    y = dispatcher.combine(experts(rows), handle)                      # [T, d], gates applied

Both dispatchers sort the T*k assignments by expert (moe/kernels/sort.py), stably, so within an expert the
rows keep token order. Assignments the capacity step did not keep (`routing.kept`) are sorted into an extra
bin after the last expert: they are never computed, and their slots add nothing in the combine.

`LocalDispatcher` (one expert-parallel rank: every expert is here). No rows move: the experts get the tokens
and the sort, and read row order[p] // k at grouped position p (the scatter kernels read it in place, the
other backends gather once). The combine sums the k outputs of a token weighted by the gates; on the GPU in one
pass that reads them by index (moe/kernels/rows.py `combine_rows`; backward one pass for the rows and one for
the gate gradient), elsewhere by putting each row back in its slot t*k+j first.

`AllToAllDispatcher` (expert parallelism over the `ep` ranks of an expert group). Expert e lives on ep rank
e // E_local as its local expert e % E_local (contiguous blocks), so sorting by global expert also sorts by
destination rank. One call on each rank, e.g. ep = 2, E = 4 (rank 0 holds experts 0, 1; rank 1 holds 2, 3):

    1. sort this rank's assignments by expert            rank 0: [e0 e0 e1 | e2 e3 e3]   rank 1: [e1 | e2 e2]
    2. exchange the per-expert counts                    (parallel/comm.py `exchange_counts`, [E] int64)
    3. the split sizes to the host: THE ONE HOST SYNC    rank 0 sends [3, 3], receives [3, 1]
    4. all-to-all the rows, uneven splits                rank 0 receives [e0 e0 e1 | e1]: by source, then expert
    5. sort the received rows by local expert            rank 0: [e0 e0 | e1 e1], stable (source rank, then the
                                                         source's token order, within an expert)
    6. the experts, on ExpertRows of the received rows (top_k 1: each received row is one assignment)
    7. undo 5, all-to-all back with the splits swapped, put each row in its slot, gates on the source rank
The backward replays the two exchanges in reverse with the saved splits (no host sync). A rank that sends or
receives nothing still joins every exchange; the experts keep an empty output in the autograd graph of both
(moe/experts/base.py), so every rank runs the same collectives in backward too.

Assignments marked `routing.intra` (Intra-GPU Rectification, moe/rectify.py: always to an expert of this
rank) are not sent: they join the received rows before step 5, so the experts compute them in the same call and
their outputs stay here (the split sizes carry their count, in the same host sync). The local dispatcher treats
them like any other assignment.

The load-balance and z losses are the router's, on the source rank, before dispatch: expert parallelism does
not change them. Capacity under expert parallelism (moe/capacity.py): decided on the source rank over the
group's batch, so `capacity`, the bound on the rows an expert receives, means the same in every layout.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from moe.experts.base import ExpertRows
from moe.kernels import rows as R
from moe.kernels.sort import Sorted, sort_by_expert
from moe.routing import Routing
from parallel.comm import Peers, all_to_all, exchange_counts
from parallel.state import ParallelState


class Handle(NamedTuple):
    """What the combine needs from the dispatch."""
    sort: Sorted  # this rank's assignments sorted by (global) expert
    weights: torch.Tensor  # [T, k] gates
    kept: torch.Tensor | None  # [T, k] bool, None: all kept
    splits: tuple[list[int], list[int]] | None = None  # all-to-all only: rows sent to / received from each rank
    regroup: torch.Tensor | None = None  # all-to-all only: received row at each grouped position
    num_intra: int = 0  # all-to-all only: assignments computed here (routing.intra), after the received rows


DEBUG = os.environ.get("MOETRON_DEBUG") == "1"  # check values on the GPU too (a host sync per layer)


def check_routing(x: torch.Tensor, routing: Routing) -> None:
    """Clear errors for a routing the router never produces but a caller of the dispatcher can: shapes and
    dtypes always; the expert ids' range where reading them costs no host sync (CPU), or with MOETRON_DEBUG=1."""
    ids = routing.expert_ids
    if ids.dim() != 2 or ids.shape[0] != x.shape[0] or ids.dtype != torch.int64:
        raise ValueError(f"routing: expert_ids of shape {tuple(ids.shape)} and dtype {ids.dtype} for {x.shape[0]} "
                         "tokens; expected [tokens, k] int64")
    if routing.weights.shape != ids.shape:
        raise ValueError(f"routing: weights of shape {tuple(routing.weights.shape)}, expected {tuple(ids.shape)}")
    if (DEBUG or not ids.is_cuda) and ids.numel() and not torch.compiler.is_compiling():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= routing.num_experts:
            raise ValueError(f"routing: expert ids in [{low}, {high}], outside [0, {routing.num_experts}) experts")


def _sort(routing: Routing, intra_bin: bool = False) -> Sorted:
    """The assignments sorted by expert; ones not kept sorted into the last bin, after the experts. intra_bin:
    kept assignments marked `intra` into bin E (not sent) and the ones not kept into bin E + 1."""
    E = routing.num_experts
    if routing.kept is None:
        return sort_by_expert(routing.expert_ids, E)
    if not intra_bin or routing.intra is None:
        return sort_by_expert(torch.where(routing.kept, routing.expert_ids, E), E + 1)
    sent = routing.kept & ~routing.intra
    return sort_by_expert(torch.where(sent, routing.expert_ids, torch.where(routing.kept, E, E + 1)), E + 2)


def _local_experts(srt: Sorted, num_experts: int) -> Sorted:
    """The sort record without the bin of assignments not kept."""
    return srt._replace(counts=srt.counts[:num_experts], offsets=srt.offsets[:num_experts])


def _weighted_sum(y_slots: torch.Tensor, handle: Handle) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * y_slots[t * k + j]: y_slots [T*k, d] in slot order, weights [T, k] -> [T, d].
    An elementwise multiply-and-sum: several times faster than the [T,1,k] x [T,k,d] batched matmul at small
    widths."""
    T, k = handle.weights.shape
    if handle.kept is not None:  # the slots of assignments not kept hold whatever the experts left there
        y_slots = torch.where(handle.kept.view(-1, 1), y_slots, 0)
    y_TKD = y_slots.view(T, k, y_slots.shape[-1])  # explicit width: T may be 0 (a rank with no tokens)
    return (y_TKD * handle.weights.to(y_slots.dtype).unsqueeze(-1)).sum(1)


class GatedCombine(torch.autograd.Function):
    """y [M, d] grouped, order [M] (the slot at each grouped position), weights [T, k] -> out [T, d]:
    out[t] = sum_j w[t, j] * y[pos(t, j)], pos the inverse of order. Backward: dy_grouped[p] = w[s] * dy[s // k]
    (s = order[p]) and dw[t, j] = <y[pos(t, j)], dy[t]>, one Triton pass each."""

    @staticmethod
    def forward(ctx, y, order, weights):
        T, k = weights.shape
        pos = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        pos = pos.view(T, k)
        ctx.save_for_backward(y, order, pos, weights)
        return R.combine_rows(y, pos, weights)

    @staticmethod
    def backward(ctx, dy):
        y, order, pos, weights = ctx.saved_tensors
        dy = dy.contiguous()
        dy_grouped = R.pad_rows(dy, order, weights.shape[1], weights.reshape(-1))
        return dy_grouped, None, R.row_dots(y, pos, dy).to(weights.dtype)


class LocalDispatcher:
    """Every expert on this rank: the experts read the tokens through the sort, nothing moves."""
    peers = Peers()  # the capacity step's group: this process alone

    def local_experts(self, num_experts: int) -> range:
        return range(num_experts)

    def dispatch(self, x: torch.Tensor, routing: Routing, capacity: int | None = None) -> tuple[ExpertRows, Handle]:
        srt = _sort(routing)
        rows = ExpertRows(x, _local_experts(srt, routing.num_experts), routing.top_k, capacity)
        return rows, Handle(srt, routing.weights, routing.kept)

    def combine(self, y: torch.Tensor, handle: Handle) -> torch.Tensor:
        """y [T*k, d] in grouped order -> [T, d]."""
        if y.is_cuda and handle.kept is None:
            return GatedCombine.apply(y, handle.sort.order, handle.weights)
        y_slots = torch.empty_like(y).index_copy_(0, handle.sort.order, y)  # slot order t*k+j
        return _weighted_sum(y_slots, handle)


class AllToAllDispatcher:
    """Expert parallelism over the ranks of `group` (see the module docstring)."""

    def __init__(self, group, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size
        self.peers = Peers(group, rank, size)

    def local_experts(self, num_experts: int) -> range:
        if num_experts % self.size:
            raise ValueError(f"moe.num_experts={num_experts} is not divisible by parallel.expert={self.size}")
        n = num_experts // self.size
        return range(self.rank * n, (self.rank + 1) * n)

    def dispatch(self, x: torch.Tensor, routing: Routing, capacity: int | None = None) -> tuple[ExpertRows, Handle]:
        P, E, k = self.size, routing.num_experts, routing.top_k
        n = E // P  # local experts
        srt = _sort(routing, intra_bin=True)
        send_counts = srt.counts[:E]  # [E] rows for each expert, destination rank e // n
        recv_counts = exchange_counts(send_counts, self.group)  # [P * n]: from source s for local expert e at s*n+e
        num_intra = srt.counts[E:E + 1] if srt.counts.numel() > E + 1 else srt.counts.new_zeros(1)
        splits = torch.cat([send_counts.view(P, n).sum(1), recv_counts.view(P, n).sum(1), num_intra]).tolist()
        send, recv, L = splits[:P], splits[P:2 * P], splits[2 * P]  # the host sync
        S, M = sum(send), sum(recv)
        tokens = srt.order[:S + L] // k  # sent, then computed here; the others sorted after every expert
        x_recv = all_to_all(x[tokens[:S]], recv, send, self.group)  # [M, d]
        local_ids = torch.repeat_interleave(torch.arange(n, device=x.device).repeat(P), recv_counts,
                                            output_size=M)  # [M] local expert of each received row
        if L:  # Intra-GPU Rectification: this rank's tokens for its own experts, beside the received rows
            intra_ids = routing.expert_ids.reshape(-1)[srt.order[S:S + L]] - self.rank * n
            x_recv, local_ids = torch.cat([x_recv, x[tokens[S:]]]), torch.cat([local_ids, intra_ids])
        regroup = sort_by_expert(local_ids, n)
        rows = ExpertRows(x_recv, regroup, 1, capacity)
        return rows, Handle(srt, routing.weights, None, (send, recv), regroup.order, L)

    def combine(self, y: torch.Tensor, handle: Handle) -> torch.Tensor:
        """y [M, d], the received rows' outputs grouped by local expert -> [T, d]."""
        send, recv = handle.splits
        M, L = sum(recv), handle.num_intra
        y_recv = torch.index_copy(torch.zeros_like(y), 0, handle.regroup, y)  # back in received order
        y_sorted = all_to_all(y_recv[:M], send, recv, self.group)  # [sent, d] in this rank's sorted order
        if L:  # the rows computed here follow the sent ones in the sort
            y_sorted = torch.cat([y_sorted, y_recv[M:]])
        T, k = handle.weights.shape
        y_slots = torch.index_copy(y_sorted.new_zeros(T * k, y.shape[1]), 0, handle.sort.order[:sum(send) + L],
                                   y_sorted)  # slot order t*k+j; slots not kept stay zero
        return _weighted_sum(y_slots, handle)


def build_dispatcher(ps: ParallelState) -> LocalDispatcher | AllToAllDispatcher:
    """The dispatcher for this rank's expert group."""
    return AllToAllDispatcher(ps.ep_group, ps.ep_rank, ps.ep_size) if ps.ep_size > 1 else LocalDispatcher()
