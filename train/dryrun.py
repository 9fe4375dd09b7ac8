"""`pretrain.py --dry-run --world-size N`: the rank layout and each rank's shard, without processes or GPUs.

The model is built on the meta device through the same layer factory protocol as a real run (slices of the
same shapes, no groups), so the parameter counts are the ones a rank will hold. All ranks hold equal-sized
shards (the layout checks guarantee it), so one build serves every rank's line.

Memory per rank (GiB = 2^30 bytes):
    states       16 bytes per parameter: fp32 weights, fp32 gradients, fp32 Adam first and second moments.
    activations  ROUGH, bf16, one micro-batch (accumulation frees them between micro-batches), no recomputation,
                 no sequence parallelism, attention scores not stored (SDPA / flash), after Korthikanti et al.
                 2022 with s = sequence, b = micro-batch, h = hidden, t = tensor parallel, f = MLP width:
                   every layer   s*b*h*(10 + 8/t)           layer norms, residuals, q/k/v and attention output
                   dense MLP     4*s*b*f/t                  fc1 output and activation (f = 4h gives 16 s*b*h/t)
                   MoE MLP       k*s*b*(2*h + 4*f_expert)   permuted inputs, expert hidden and activation
                   logits        4*min(s*b, c)*V/t          one chunk's bf16 logits and gradient (c rows,
                                                            parallel/cross_entropy.py)
"""
from __future__ import annotations

import torch
from torch import nn

from model.gpt import GPT
from parallel.cross_entropy import CHUNK_SIZE
from parallel.layers import Layers
from parallel.shards import is_tensor_parallel, shard, tag_tensor_parallel
from parallel.state import ParallelState, check_layout, coordinates
from train.config import Config
from train.plan import RunPlan


class _ShardShapes(Layers):
    """Plain modules holding rank 0's slices, for counting: the stand-in of TensorParallelLayers."""

    def _cut(self, module: nn.Module, dim: int, chunks: int = 1) -> nn.Module:
        ps = self.ps
        if ps.tp_size > 1:
            module.weight = nn.Parameter(shard(module.weight.detach(), dim, ps.tp_rank, ps.tp_size, chunks))
            tag_tensor_parallel(module.weight, dim, chunks)
        return module

    def column(self, linear, chunks=1):
        return self._cut(linear, 0, chunks)

    def row(self, linear):
        return self._cut(linear, 1)

    def vocab_embedding(self, embedding):
        return self._cut(embedding, 0)


def groups(world: int, tensor: int, expert: int) -> dict[str, list[list[int]]]:
    """Rank lists of the four group kinds (see parallel/state.py)."""
    coords = [coordinates(r, world, tensor, expert) for r in range(world)]
    kinds = {"tensor": ("ep_rank", "edp_rank"), "expert": ("tp_rank", "edp_rank"), "data": ("tp_rank",),
             "expert-data": ("tp_rank", "ep_rank")}
    out = {}
    for kind, same in kinds.items():
        found: dict[tuple, list[int]] = {}
        for c in coords:
            found.setdefault(tuple(c[k] for k in same), []).append(c["rank"])
        out[kind] = list(found.values())
    return out


def report(cfg: Config, plan: RunPlan) -> str:
    """The text that --dry-run prints."""
    world, vocab_size, dp = plan.world_size, plan.vocab_size, plan.data_parallel
    tp, ep = cfg.parallel.tensor, cfg.parallel.expert
    check_layout(world, tp, ep)
    t, m, moe = cfg.train, cfg.model, cfg.moe
    layers = _ShardShapes(ParallelState(world_size=world, dp_size=dp, tp_size=tp, ep_size=ep,
                                        edp_size=world // (tp * ep)))
    with torch.device("meta"):
        model = GPT(m, moe, vocab_size, cfg.data.seq_length, layers)
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for layer in model.moe_layers() for p in layer.experts.parameters())
    split = sum(p.numel() for p in model.parameters() if is_tensor_parallel(p))
    states = 16 * total / 2**30

    s, b, h = cfg.data.seq_length, t.micro_batch_size, m.hidden_size
    num_moe = len(model.moe_layers())
    f_expert = moe.ffn_hidden_size or m.ffn
    act = (m.num_layers * s * b * h * (10 + 8 / tp) + (m.num_layers - num_moe) * 4 * s * b * m.ffn / tp
           + num_moe * moe.top_k * s * b * (2 * h + 4 * f_expert)
           + 4 * min(s * b, CHUNK_SIZE) * vocab_size / tp) / 2**30

    accumulation = plan.accumulation
    lines = [f"layout: world {world} = tensor {tp} x expert {ep} x expert-data {world // (tp * ep)}; "
             f"data parallel (batch split, dense gradients) {dp}; each rank runs {accumulation} micro-batches "
             f"of {t.micro_batch_size} x {s} tokens per step",
             "rank = tp_rank + tensor * (ep_rank + expert * edp_rank); dp_rank = rank // tensor"]
    if world <= 64:
        lines += [f"  {kind:<12} {' '.join('{' + ','.join(map(str, g)) + '}' for g in gs)}"
                  for kind, gs in groups(world, tp, ep).items()]
    lines += [f"vocab {vocab_size}; per rank: {total / 1e6:.2f}M parameters ({split / 1e6:.2f}M tensor-split, "
              f"{expert / 1e6:.2f}M in {moe.num_experts // ep} of {moe.num_experts} experts per MoE layer, "
              f"{(total - split - expert) / 1e6:.2f}M replicated)",
              "memory: states = fp32 weights + grads + Adam (16 B/param); activations = ROUGH bf16 estimate of one "
              "micro-batch (train/dryrun.py)",
              f"{'rank':>5} {'tp':>3} {'ep':>3} {'edp':>4} {'dp':>4} {'params (M)':>11} {'states GiB':>11} "
              f"{'activ. GiB':>11} {'total GiB':>10}"]
    for r in range(min(world, 64)):
        c = coordinates(r, world, tp, ep)
        lines.append(f"{r:>5} {c['tp_rank']:>3} {c['ep_rank']:>3} {c['edp_rank']:>4} {c['dp_rank']:>4} "
                     f"{total / 1e6:>11.2f} {states:>11.2f} {act:>11.2f} {states + act:>10.2f}")
    if world > 64:
        lines.append(f"  ... {world - 64} more ranks, the same sizes")
    return "\n".join(lines)
