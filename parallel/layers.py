"""The layer factory the model builds through, so model/ never touches process groups.

The model constructs and initialises every full-size module exactly as a one-process run does (same seed, same
RNG order), then hands it to the factory, which returns the module this rank keeps:

    column(linear, chunks)  output features split over tp (`chunks` > 1: the output is `chunks` stacked blocks,
                            e.g. q|k|v, each split separately so a rank keeps whole heads of q, k and v)
    row(linear)             input features split over tp, output all-reduced
    vocab_embedding(emb)    vocabulary rows split over tp, lookups all-reduced
    head_input(x)           identity forward, all-reduce backward: before the logits of a vocab-split head
    cross_entropy(logits, targets)  mean token loss of [N, V / tp] logits
    dispatcher              parallel.expert.ExpertParallel under expert parallelism, else None
    checkpoint_shards(model)  which parameters are slices, for train/checkpoint.py

`Layers` (one process, or tp = 1) returns the modules unchanged, so such runs need no megatron-core;
`parallel.tensor.TensorParallelLayers` (tp > 1) returns megatron-core's parallel layers holding slices.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parallel.expert import ExpertParallel
from parallel.state import ParallelState


class Layers:
    tp_size = 1
    group = None  # the tensor-parallel group

    def __init__(self, dispatcher: ExpertParallel | None = None):
        self.dispatcher = dispatcher

    def column(self, linear: nn.Linear, chunks: int = 1) -> nn.Module:
        return _tag(linear, 0, chunks)

    def row(self, linear: nn.Linear) -> nn.Module:
        return _tag(linear, 1)

    def vocab_embedding(self, embedding: nn.Embedding) -> nn.Module:
        return _tag(embedding, 0)

    def head_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)

    def checkpoint_shards(self, model: nn.Module) -> dict:
        """Parameter name -> train.checkpoint.ShardSpec(dim, group, chunks) for every weight that tensor
        parallelism splits (group None when tp = 1: the same specs in every layout, so the fused q|k|v is saved
        as [3, d, d] everywhere), and the experts under expert parallelism (dim 0 over the expert group)."""
        from train.checkpoint import ShardSpec
        out = {}
        for name, p in model.named_parameters():
            if getattr(p, "expert_parallel", False):
                out[name] = ShardSpec(0, self.dispatcher.group)
            elif hasattr(p, "partition_dim"):
                out[name] = ShardSpec(p.partition_dim, self.group, p.partition_stride)
        return out


def _tag(module: nn.Module, dim: int, chunks: int = 1) -> nn.Module:
    """Record how tensor parallelism would split the weight (megatron-core's attribute names), for checkpoints."""
    module.weight.partition_dim, module.weight.partition_stride = dim, chunks
    return module


def shard(full: torch.Tensor, dim: int, rank: int, size: int, chunks: int = 1) -> torch.Tensor:
    """This rank's slice of `full` along `dim`: each of the `chunks` blocks split in `size`, block r kept."""
    return torch.cat([block.chunk(size, dim)[rank] for block in full.chunk(chunks, dim)], dim)


def build_layers(ps: ParallelState) -> Layers:
    """The factory for this rank: plain modules when tp = 1, megatron-core's parallel layers when tp > 1."""
    dispatcher = ExpertParallel(ps.ep_group, ps.ep_rank, ps.ep_size) if ps.ep_size > 1 else None
    if ps.tp_size == 1:
        return Layers(dispatcher)
    from parallel.tensor import TensorParallelLayers
    return TensorParallelLayers(ps, dispatcher)
