"""MoE statistics: one object per model that the routers and the MoE layers record into, and the trainer reads.

During training each MoE layer records, on the device and without host syncs:
    the router   its call's assignments per expert (`record_routing`): summed over the optimizer step for the
                 expert-bias update, and, for the global load-balance loss, all-reduced over the data-parallel
                 group and summed over the step so far;
    the layer    per call: max and mean assignments per expert, fraction of idle experts, aux and z loss,
                 assignments dropped by the capacity step, and the assignments of every expert (`record_layer`).
The trainer reads it:
    reduce_and_reset()  once per log interval: sums the interval over the data-parallel group (a collective, so
                        every rank calls it at the same step) and clears it; returns the metrics by name, among
                        them each layer's assignments per expert over the interval (the data of a load heatmap);
    nonfinite(losses)   on a skipped step only: which layers' aux or z loss in a copy of that step's
                        `step_losses` is not finite (this rank's, no collective);
    step_loads() / end_step()  after every optimizer step, applied or skipped (GPT.end_step).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from parallel.comm import all_reduce_sum

FIELDS = ("tokens_max", "tokens_mean", "idle_frac", "aux_loss", "z_loss", "dropped", "assignments", "calls")


class MoEStats(nn.Module):
    def __init__(self, num_layers: int, num_experts: int, group=None):
        """`group`: the data-parallel process group (None: the default group; a no-op in one process)."""
        super().__init__()
        self.group = group
        self.register_buffer("interval", torch.zeros(num_layers, len(FIELDS)), persistent=False)
        self.register_buffer("interval_counts", torch.zeros(num_layers, num_experts, dtype=torch.int64),
                             persistent=False)  # this rank's assignments per expert, this log interval (exact)
        self.register_buffer("step_counts", torch.zeros(num_layers, num_experts, dtype=torch.int64),
                             persistent=False)  # this rank's, this optimizer step
        self.register_buffer("global_counts", torch.zeros(num_layers, num_experts, dtype=torch.int64),
                             persistent=False)  # over the data-parallel group, this optimizer step
        self.register_buffer("step_losses", torch.zeros(num_layers, 2), persistent=False)  # aux, z: this step

    @property
    def num_layers(self) -> int:
        return self.interval.shape[0]

    @torch.no_grad()
    def record_routing(self, layer: int, counts: torch.Tensor, global_scope: bool) -> torch.Tensor:
        """Add a call's [E] counts to the step's; return the counts its load-balance loss uses: this call's
        (micro-batch scope) or the step's so far over the data-parallel group (global scope)."""
        self.step_counts[layer] += counts
        if not global_scope:
            return counts
        self.global_counts[layer] += all_reduce_sum(counts.clone(), self.group)
        return self.global_counts[layer].clone()

    @torch.no_grad()
    def record_layer(self, layer: int, counts: torch.Tensor, aux_loss: torch.Tensor, z_loss: torch.Tensor,
                     num_dropped: torch.Tensor) -> None:
        self.interval_counts[layer] += counts
        counts = counts.float()
        self.step_losses[layer] += torch.stack([aux_loss.detach().float(), z_loss.detach().float()])
        self.interval[layer] += torch.stack([
            counts.max(), counts.mean(), (counts == 0).float().mean(), aux_loss.detach().float(),
            z_loss.detach().float(), num_dropped.float(), counts.sum(), torch.ones_like(counts[0])])

    def reduce_and_reset(self) -> dict[str, float | list[int]]:
        """The interval's metrics over every data-parallel rank, `moe/<layer>/<name>`, and
        `moe/<layer>/tokens_per_expert`: the layer's [E] assignments per expert summed over the interval (each
        token counts top_k times; before any capacity drop). Clears the interval. A collective: every rank calls
        it together."""
        if self.num_layers == 0:
            return {}
        s = all_reduce_sum(self.interval.clone(), self.group).double()
        counts = all_reduce_sum(self.interval_counts.clone(), self.group)  # int64: exact at any size
        self.interval.zero_()
        self.interval_counts.zero_()
        col = {name: s[:, i] for i, name in enumerate(FIELDS)}
        calls = col["calls"].clamp(min=1)
        out = {key: col[key] / calls for key in ("tokens_max", "tokens_mean", "idle_frac", "aux_loss", "z_loss")}
        out["max_over_mean"] = col["tokens_max"] / col["tokens_mean"].clamp(min=1e-9)
        out["dropped_frac"] = col["dropped"] / col["assignments"].clamp(min=1)
        values = torch.stack(list(out.values()), 1).tolist()  # host reads of the log step: [L, metrics]
        per_expert = counts.tolist()  # [L, E]
        return {f"moe/{i}/{key}": v for i, row in enumerate(values) for key, v in
                [*zip(out, row), ("tokens_per_expert", per_expert[i])]}

    @staticmethod
    def nonfinite(step_losses: torch.Tensor) -> list[str]:
        """'moe/<layer>/<loss>=<value>' for each aux and z loss in `step_losses` (a copy of a step's
        `step_losses`, [L, 2]) that is not finite (host reads)."""
        return [f"moe/{i}/{name}={v}" for i, row in enumerate(step_losses.tolist())
                for name, v in zip(("aux_loss", "z_loss"), row) if not math.isfinite(v)]

    def step_loads(self) -> torch.Tensor:
        """[L, E] assignments per expert of this optimizer step over the data-parallel group (a collective)."""
        return all_reduce_sum(self.step_counts.clone(), self.group)

    def end_step(self) -> None:
        self.step_counts.zero_()
        self.global_counts.zero_()
        self.step_losses.zero_()
