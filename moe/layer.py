"""The MoE layer: router -> (expert-parallel dispatch) -> expert backend -> combine.

x [B, S, d] -> y [B, S, d], plus the unweighted aux and z losses of this call.

`group`: the data-parallel process group over which the global load-balance loss and the expert-bias loads
are summed (None: the default group; a no-op in one process). The parallelism setup assigns it.

Metrics: accumulated on the device during training (no host sync) and read by the trainer once per log
interval with `read_metrics()` (summed over the data-parallel `group`), which resets them. Per call: max and mean assignments per expert, fraction of
idle experts; over the interval: dropped fraction of assignments, mean aux and z losses.
`after_step(applied)` (after each optimizer step): expert-bias update, per-step accumulators reset.
"""
from __future__ import annotations

import torch
from torch import nn

from moe.config import MoEConfig
from moe.experts import backend_class
from moe.router import TopKRouter
from parallel.comm import all_reduce_sum

METRICS = ("tokens_max", "tokens_mean", "idle_frac", "aux_loss", "z_loss", "dropped", "assignments", "calls")


class MoELayer(nn.Module):
    def __init__(self, cfg: MoEConfig, hidden_size: int, ffn_hidden_size: int, activation: str,
                 init_std: float, output_std: float, dispatcher=None):
        super().__init__()
        self.cfg = cfg
        self.group = None
        E = cfg.num_experts
        self.router = TopKRouter(cfg, hidden_size, init_std)
        self.experts = backend_class(cfg.backend)(cfg, E, hidden_size, cfg.ffn_hidden_size or ffn_hidden_size,
                                                  activation, init_std, output_std)
        # expert parallelism (parallel/expert.py): keep this rank's experts, send tokens to them
        self.dispatcher = dispatcher
        if dispatcher is not None:
            self.experts = dispatcher.shard(self.experts)
        self.register_buffer("sums", torch.zeros(len(METRICS)), persistent=False)  # running sums of METRICS

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_TD = x.reshape(-1, x.shape[-1])  # [T, d]
        routing = self.router(x_TD, self.group)
        y_TD, num_dropped = (self.experts(x_TD, routing) if self.dispatcher is None
                             else self.dispatcher(self.experts, x_TD, routing))
        if self.router.omega is not None:  # SparseMixer v1 channel scale
            y_TD = y_TD * self.router.omega.to(y_TD.dtype)
        if self.training:
            with torch.no_grad():
                counts = routing.stats["counts"].float()
                self.sums += torch.stack([counts.max(), counts.mean(), (counts == 0).float().mean(),
                                          routing.aux_loss.detach().float(), routing.z_loss.detach().float(),
                                          num_dropped.float(), counts.sum(), torch.ones_like(counts[0])])
        return y_TD.view_as(x), routing.aux_loss, routing.z_loss

    def read_metrics(self) -> dict[str, torch.Tensor]:
        """Metrics since the last read over every data-parallel rank (summed over `group`: a collective, so every
        rank calls it together), as 0-d device tensors; resets the accumulators."""
        s = dict(zip(METRICS, all_reduce_sum(self.sums.clone(), self.group)))
        calls = s["calls"].clamp(min=1)
        out = {key: s[key] / calls for key in ("tokens_max", "tokens_mean", "idle_frac", "aux_loss", "z_loss")}
        out["max_over_mean"] = s["tokens_max"] / s["tokens_mean"].clamp(min=1e-9)
        out["dropped_frac"] = s["dropped"] / s["assignments"].clamp(min=1)
        self.sums.zero_()
        return out

    def after_step(self, applied: bool = True) -> None:
        """After each optimizer step (applied=False: a skipped, non-finite step): expert-bias update from the
        step's loads when the step was applied; the per-step counts are cleared either way."""
        if applied:
            self.router.update_bias(self.group)
        self.router.reset_step()
