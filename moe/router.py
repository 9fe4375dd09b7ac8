"""Routers: x [T, d] -> Routing. Computed in fp32 whatever the activation dtype, also under autocast (which would
otherwise run the router's matmul in bf16; Megatron-core's moe_router_dtype=fp32).

Options (moe.router.* keys, moe.top_k):
- `moe.top_k` any k <= E, `renormalize` (weights of the k choices rescaled to sum to 1), `straight_through`
  (those values with the plain probabilities' gradient; moe/routing.py's gate_weights says why);
- `jitter_eps`: multiplicative input jitter x * U[1-eps, 1+eps], training only (Switch). With
  `type=sparsemixer` the same key is SparseMixer's mask width instead (moe/sparsemixer.py);
- Switch load-balance loss, `aux_loss_scope`:
    micro_batch: f_e from this call's tokens (the classic per-call loss);
    global: f_e from the counts of every micro-batch of the current optimizer step seen so far, summed over
      the data-parallel group (kept by moe/stats.py, which all-reduces each call's [E] counts: one
      all-reduce per layer per micro-batch, no host sync). P_e stays the local mean probability, so the
      gradient has the same scale as the micro-batch loss. The counts are cleared after each optimizer step.
      Caveat: activation recomputation that re-runs the router forward counts that micro-batch twice.
- z-loss (ST-MoE);
- aux-loss-free expert bias (DeepSeek-V3, `expert_bias_rate` > 0): a non-trainable bias [E] added to the
  probabilities only to choose the experts; the weights stay the unbiased probabilities. After each optimizer
  step, bias += rate * sign(mean load - load), the load being the step's counts summed over the group.
- `sinkhorn_iters` > 0: in training, the k experts of each token are chosen on the Sinkhorn-balanced assignment
  of the micro-batch (S-BASE, Clark et al. 2022 "Unified Scaling Laws for Routed Language Models", §2.3;
  Megatron-core's moe_router_load_balancing_type=sinkhorn); the weights stay the softmax probabilities and the
  losses are unchanged; evaluation takes the plain top-k. Why: at initialisation the router's input is dominated
  by a direction shared by all tokens (uniform attention averages the values over the prefix, so the shared part
  grows with depth: rank collapse, Dong et al. 2021) and by frequent tokens; the shared part adds the same
  per-expert offset W_e . s to every token's logits, so plain top-k sends most tokens of a deep layer to one
  expert from step 1, whatever the router's init scale (top-k of W x does not depend on the scale of W). The
  column scaling of Sinkhorn is a per-expert offset: it cancels exactly that, and the frequent tokens' excess.
- `type=sparsemixer`: v1 (k=1) / v2 (k=2) selection and gradient estimators (moe/sparsemixer.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import RouterConfig
from moe.kernels import sinkhorn as sinkhorn_kernel
from moe.positions import count_per_expert
from moe.routing import Routing, gate_weights
from moe.sparsemixer import sparsemixer_route
from moe.stats import MoEStats


def load_balance_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch load-balance loss E * sum_e f_e * P_e (1 when perfectly balanced).

    f_e = counts[e] / counts.sum(): fraction of assignments to expert e (no gradient; counts may come from
    more tokens than `probs`, as with the global scope); P_e = mean over tokens of probs[:, e] (the gradient).
    """
    T, E = probs.shape
    f = counts.to(probs.dtype) / counts.sum().clamp(min=1).to(probs.dtype)
    return E * torch.sum(f * probs.mean(0)) if T else probs.sum()


def sinkhorn(logits: torch.Tensor, iters: int, sharpness: float, kernel: bool | None = None) -> torch.Tensor:
    """Log-domain Sinkhorn-Knopp (Cuturi 2013) on exp(logits) [T, E], the logits scaled to a spread over tokens
    of `sharpness`: `iters` rounds of scaling the experts' columns to T/E tokens each and the tokens' rows to 1.
    Returns the balanced log-assignment [T, E] (fixed rounds: no host sync, unlike a tolerance loop). `kernel`:
    the rounds as moe/kernels/sinkhorn.py's launches (default: on CUDA, up to its MAX_EXPERTS) or the torch loop."""
    T, E = logits.shape
    log_k = logits.float()
    # Sinkhorn balances the soft assignment, not its argmax: where many tokens have nearly the same row (a
    # cluster of similar contexts), a soft, balanced assignment still sends the whole cluster to one expert.
    # The sharper the logits, the closer the balanced assignment is to a hard one and its argmax to balanced
    # (entropic optimal transport tends to the exact assignment as the scale grows), at the price of more rounds
    # to converge. Measured on moe_xs (benchmarks/results/2026-12-03-h200-router-balance.md): spread 3 stays
    # above 3x the mean load mid-training however many rounds; 12 with 30 rounds stays under 3. The scale is
    # the tokens' spread around each expert's mean (an offset shared by all tokens, which Sinkhorn removes, is
    # left out)
    scale = torch.ones((), device=log_k.device)
    if T > 1:
        scale = sharpness / (log_k - log_k.mean(0, keepdim=True)).std().clamp(min=1e-6)
    if kernel is None:
        kernel = log_k.is_cuda and E <= sinkhorn_kernel.MAX_EXPERTS
    if kernel and iters > 0:
        # one launch per round, the potentials form (moe/kernels/sinkhorn.py): the compiled loop below costs
        # several passes over [T, E] per round (measured: benchmarks/results/, README)
        return sinkhorn_kernel.sinkhorn_rounds(log_k, scale.reshape(1), iters)
    log_k = log_k * scale
    for _ in range(iters):
        log_k = log_k - torch.logsumexp(log_k, dim=0, keepdim=True) + math.log(max(T, 1) / E)  # columns: T/E
        log_k = log_k - torch.logsumexp(log_k, dim=1, keepdim=True)  # rows: 1
    return log_k


def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk over the last dim -> (values, indices) [T, k]; k = 1 as a max, one reduction that torch.compile
    fuses (torch.topk's k = 1 kernel on the [65536, 64] fp32 scores of MoE-XS took 140 us a call in the step's
    profile, benchmarks/results/, README)."""
    if k == 1:
        return x.max(dim=-1, keepdim=True)
    return torch.topk(x, k, dim=-1)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class TopKRouter(nn.Module):
    """Softmax over all experts, then the k largest (optionally biased for selection only)."""

    def __init__(self, num_experts: int, top_k: int, cfg: RouterConfig, hidden_size: int, init_std: float):
        super().__init__()
        self.cfg, self.num_experts, self.top_k = cfg, num_experts, top_k
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=init_std)
        # aux-loss-free balancing bias [E]: persistent (checkpointed), never trained by the optimizer
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        # SparseMixer v1's output scale omega [d] (initialised to 1), applied by MoELayer after the combine
        self.omega = nn.Parameter(torch.ones(hidden_size)) if cfg.type == "sparsemixer" and top_k == 1 else None

    def forward(self, x: torch.Tensor, stats: MoEStats | None = None, layer: int = 0) -> Routing:
        """x [T, d] -> Routing. In training, records the counts of MoE layer `layer` into `stats`."""
        cfg, E, k = self.cfg, self.num_experts, self.top_k
        x = x.float()
        if self.training and cfg.jitter_eps > 0 and cfg.type == "softmax":
            x = x * torch.empty_like(x).uniform_(1 - cfg.jitter_eps, 1 + cfg.jitter_eps)
        with torch.autocast(x.device.type, enabled=False):  # autocast would run this matmul in bf16
            logits = F.linear(x, self.weight.float())  # [T, E] fp32
        if cfg.type == "sparsemixer":
            expert_ids, weights, probs = sparsemixer_route(logits, k, cfg.jitter_eps, self.training)
        else:
            probs = logits.softmax(-1)  # [T, E]
            with torch.no_grad():  # what the experts are chosen by, when not the probabilities themselves
                if self.training and cfg.sinkhorn_iters > 0:
                    choose_by = sinkhorn(logits, cfg.sinkhorn_iters, cfg.sinkhorn_sharpness)
                else:
                    choose_by = probs + self.expert_bias if cfg.expert_bias_rate > 0 else None
            if choose_by is None:
                weights, expert_ids = top_k(probs, k)  # [T, k]
            else:  # the weights stay the unbiased probabilities of the chosen experts
                expert_ids = top_k(choose_by, k)[1]  # [T, k]
                weights = probs.gather(1, expert_ids)
            weights = gate_weights(weights, cfg.renormalize, cfg.straight_through)
        counts = count_per_expert(expert_ids, E)  # [E]
        aux_counts = counts
        if self.training and stats is not None:
            aux_counts = stats.record_routing(layer, counts, cfg.aux_loss_scope == "global")
        aux = load_balance_loss(probs, aux_counts)
        return Routing(expert_ids, weights, probs, logits, counts, aux, z_loss(logits))

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, applied: torch.Tensor | bool = True) -> None:
        """bias += rate * sign(mean load - load), `load` [E] the step's counts over the data-parallel group
        (DeepSeek-V3); no change where `applied` (a device flag, read without a host sync) is False."""
        self.expert_bias += self.cfg.expert_bias_rate * torch.sign(load.float().mean() - load.float()) * applied
