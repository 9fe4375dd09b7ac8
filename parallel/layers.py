"""The layer factory the model builds through, so model/ never touches process groups.

The model constructs and initialises every full-size module exactly as a one-process run does (same seed, same
RNG order), then hands it to the factory, which returns the module this rank keeps:

    column(linear, chunks)  output features split over tp (`chunks` > 1: the output is `chunks` stacked blocks,
                            e.g. q|k|v, each split separately so a rank keeps whole heads of q, k and v)
    row(linear)             input features split over tp, output all-reduced
    vocab_embedding(emb)    vocabulary rows split over tp, lookups all-reduced
    head_input(x)           identity forward, all-reduce backward: before the logits of a vocab-split head
    cross_entropy(logits, targets)  mean token loss of [N, V / tp] logits
    ps                      the ParallelState it was built for (MoE layers take their groups from it)

`Layers` (tp = 1) returns the modules unchanged, so such runs need no megatron-core;
`parallel.tensor.TensorParallelLayers` (tp > 1) returns megatron-core's parallel layers holding slices, tagged
through parallel/shards.py. `build_layers` picks one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parallel.state import ParallelState


class Layers:
    def __init__(self, ps: ParallelState | None = None):
        self.ps = ps or ParallelState()

    @property
    def tp_size(self) -> int:
        return self.ps.tp_size

    def column(self, linear: nn.Linear, chunks: int = 1) -> nn.Module:
        return linear

    def row(self, linear: nn.Linear) -> nn.Module:
        return linear

    def vocab_embedding(self, embedding: nn.Embedding) -> nn.Module:
        return embedding

    def head_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)
