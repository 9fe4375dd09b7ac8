"""Expert parallelism: each of the `ep` ranks of an expert group holds E / ep experts, tokens travel to them.

Expert e lives on ep rank e // E_local as its local expert e % E_local (contiguous blocks), so sorting the
assignments by global expert id also groups them by destination rank. One MoE call on each rank of the group:

    1. sort the [T*k] assignments by expert                     (moe/permute.py, on the device)
    2. exchange the per-expert counts                           (even all_to_all_single of [E] int64)
    3. split sizes to the host: THE ONE HOST SYNC of the layer  (`.tolist()` of [2*ep] sums, forward only)
    4. all-to-all the rows with uneven splits                   -> [M, d], by source rank then local expert
    5. regroup by local expert (stable: source rank, then the source's token order, within an expert)
    6. the backend, any of them, on a Routing with local ids, k=1, weights 1 (and one-hot probs)
    7. undo 5, all-to-all back with the splits swapped, unsort, and weight by the gates on the source rank
The backward replays the two exchanges in reverse with the saved splits (no host sync). A rank that sends or
receives nothing, or an expert with no tokens, still joins every exchange, and the layer's output stays in the
autograd graph of both exchanges, so every rank runs the same collectives in backward too (a rank that receives
nothing skips the backend and gives its expert weights zero gradients).

Backends under expert parallelism see only the M rows they received:
- `padded`: capacity C = max(ceil(cf * M / E_local), min_capacity), computed at the destination from the rows
  all sources sent. With even loads M ~ ep * k * T * E_local / E, so C ~ ep * ceil(cf * k * T / E): the per
  source rank capacity of a one-process run, times the number of sources, pooled (a source may use room that
  another left). Drops follow the received order: position policy = by source rank, then the source's slot
  order; the probability policy has all weights 1 here, so it falls back to that order. Rectify-Router needs
  the router logits and is refused with parallel.expert > 1 (train/config.py).
- the load-balance and z losses are computed by the router on the source rank, before dispatch, from that
  rank's tokens: expert parallelism does not change them (see parallel/README.md for their scope).
- the dropped count is counted where the drop happens (the destination rank).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe.permute import sort_by_expert
from moe.routing import Routing
from parallel.comm import all_to_all


class ExpertParallel:
    """The dispatcher of one expert group: `shard` the experts at build time, then call it per MoE layer."""

    def __init__(self, group, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size

    def shard(self, experts: nn.Module) -> nn.Module:
        """A backend of the same class holding this rank's E / ep experts, sliced from the full `experts`
        (built by the caller with the global seed, so every shard equals the one-process initialisation).
        Builds the local module without touching the global RNG; marks its parameters `expert_parallel`."""
        E = experts.num_experts
        if E % self.size:
            raise ValueError(f"moe.num_experts={E} is not divisible by parallel.expert={self.size}")
        n = E // self.size
        lo = self.rank * n
        with torch.random.fork_rng(devices=[]):
            local = type(experts)(experts.cfg, n, experts.hidden_size, experts.ffn_hidden_size,
                                  experts.activation, experts.init_std, experts.output_std)
        full = dict(experts.named_parameters())
        with torch.no_grad():
            for name, p in local.named_parameters():
                if full[name].shape[0] != E:
                    raise ValueError(f"expert parameter {name} {tuple(full[name].shape)} is not stacked [E, ...]")
                p.copy_(full[name][lo:lo + n])
                p.expert_parallel = True
        return local

    def __call__(self, experts: nn.Module, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, d] and the router's Routing (global expert ids) -> (y [T, d] gated, dropped count)."""
        (T, k), d, P = routing.expert_ids.shape, x_TD.shape[1], self.size
        E = routing.num_experts
        n = E // P  # local experts
        srt = sort_by_expert(routing.expert_ids, E)
        recv_counts = torch.empty_like(srt.counts)  # [P * n]: rows from source s for local expert e at s*n+e
        dist.all_to_all_single(recv_counts, srt.counts, group=self.group)
        splits = torch.cat([srt.counts.view(P, n).sum(1), recv_counts.view(P, n).sum(1)]).tolist()  # host sync
        send, recv = splits[:P], splits[P:]
        M = sum(recv)
        x_recv = all_to_all(x_TD[srt.order // k], recv, send, self.group)  # [M, d]
        local_ids = torch.repeat_interleave(torch.arange(n, device=x_TD.device).repeat(P), recv_counts,
                                            output_size=M)  # [M] local expert of each received row
        ids, regroup = torch.sort(local_ids, stable=True)
        x_grouped = x_recv[regroup]
        ones = torch.ones(M, 1, dtype=torch.float32, device=x_TD.device)
        zero = ones.new_zeros(())
        local = Routing(ids.unsqueeze(1), ones, F.one_hot(ids, n).float(), zero, zero, n)
        if M:
            y_grouped, num_dropped = experts(x_grouped, local)
        else:  # nothing received: skip the backend (not all take 0 rows), but keep both exchanges and the
            # expert weights in this rank's backward graph so that it joins the backward all-to-alls
            y_grouped = x_grouped * sum((p.sum() for p in experts.parameters()), x_grouped.new_zeros(()))
            num_dropped = torch.zeros((), dtype=torch.int64, device=x_TD.device)
        y_recv = torch.index_copy(torch.zeros_like(y_grouped), 0, regroup, y_grouped)
        y_sorted = all_to_all(y_recv, send, recv, self.group)  # [T*k, d] back in sorted order
        y_flat = torch.index_copy(torch.zeros_like(y_sorted), 0, srt.order, y_sorted)  # slot order t*k+j
        y_TKD = y_flat.view(T, k, d)
        return (y_TKD * routing.weights.to(y_TKD.dtype).unsqueeze(-1)).sum(1), num_dropped
