"""The MoE layer: router -> capacity step (padded backend) -> dispatcher -> experts -> dispatcher combine.

x [B, S, d] -> y [B, S, d], plus the unweighted aux and z losses of this call.

The layer receives its process groups when it is built (`ps`): the expert group picks the dispatcher
(moe/dispatch.py) and which experts this rank holds; the data-parallel group is the one the statistics
(moe/stats.py: global load-balance loss, expert-bias loads, metrics) are summed over. In a GPT, every MoE layer
records into the model's one MoEStats, at its own index.
"""
from __future__ import annotations

import torch
from torch import nn

from moe.capacity import apply_capacity
from moe.config import CapacityConfig, MoEConfig
from moe.dispatch import build_dispatcher, check_routing
from moe.experts import build_experts
from moe.router import TopKRouter
from moe.routing import Routing
from moe.stats import MoEStats
from parallel.shards import tag_expert_parallel
from parallel.state import ParallelState


class MoELayer(nn.Module):
    def __init__(self, cfg: MoEConfig, hidden_size: int, ffn_hidden_size: int, activation: str,
                 init_std: float, output_std: float, ps: ParallelState | None = None,
                 stats: MoEStats | None = None, index: int = 0):
        """`stats`/`index`: the model's statistics and this layer's row in them (default: a one-layer MoEStats
        of its own)."""
        super().__init__()
        ps = ps or ParallelState()
        E = cfg.num_experts
        self.router = TopKRouter(E, cfg.top_k, cfg.router, hidden_size, init_std)
        self.capacity = cfg.capacity if cfg.backend == "padded" else None
        self.dispatcher = build_dispatcher(ps)
        self.experts = build_experts(cfg, hidden_size, ffn_hidden_size, activation, init_std, output_std,
                                     self.dispatcher.local_experts(E))
        if ps.ep_size > 1:
            for p in self.experts.parameters():
                tag_expert_parallel(p)
        self.stats = stats if stats is not None else MoEStats(1, E, ps.dp_group)
        self.index = index

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_TD = x.reshape(-1, x.shape[-1])  # [T, d]
        routing = self.router(x_TD, self.stats, self.index)
        y_TD, num_dropped = run_experts(self.dispatcher, self.experts, x_TD, routing, self.capacity,
                                        self.router.cfg.renormalize, self.router.cfg.straight_through)
        if self.router.omega is not None:  # SparseMixer v1 channel scale
            y_TD = y_TD * self.router.omega.to(y_TD.dtype)
        if self.training:
            self.stats.record_layer(self.index, routing.counts, routing.aux_loss, routing.z_loss, num_dropped)
        return y_TD.view_as(x), routing.aux_loss, routing.z_loss


def run_experts(dispatcher, experts: nn.Module, x_TD: torch.Tensor, routing: Routing,
                capacity: CapacityConfig | None = None, renormalize: bool = False,
                straight_through: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """What follows the router: the capacity step (when given its section: the padded backend), dispatch, the
    experts, combine. -> (y [T, d] gated, assignments dropped [])."""
    check_routing(x_TD, routing)
    C, num_dropped = None, routing.counts.new_zeros(())
    if capacity is not None:
        routing, C, num_dropped = apply_capacity(routing, capacity, renormalize, dispatcher.peers,
                                                 dispatcher.local_experts(routing.num_experts), straight_through)
    rows, handle = dispatcher.dispatch(x_TD, routing, C)
    return dispatcher.combine(experts(rows), handle), num_dropped
