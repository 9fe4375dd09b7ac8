"""The layer factory the model builds through, so model/ never touches process groups.

The model constructs and initialises every full-size module exactly as a one-process run does (same seed, same
RNG order), then hands it to the factory, which returns the module this rank keeps:

    column(linear, chunks)  output features split over tp (`chunks` > 1: the output is `chunks` stacked blocks,
                            e.g. q|k|v, each split separately so a rank keeps whole heads of q, k and v)
    row(linear)             input features split over tp, output all-reduced
    vocab_embedding(emb)    vocabulary rows split over tp, lookups all-reduced
    lm_loss(x, weight, targets, dtype)  the LM head and the mean token loss, fused and chunked
                            (parallel/cross_entropy.py), vocabulary-parallel over a vocab-split head
    ps                      the ParallelState it was built for (MoE layers take their groups from it)

`Layers` (tp = 1) returns the modules unchanged, so such runs need no megatron-core;
`parallel.tensor.TensorParallelLayers` (tp > 1) returns megatron-core's parallel layers holding slices, tagged
through parallel/shards.py. `build_layers` picks one.
"""
from __future__ import annotations

import torch
from torch import nn

from parallel.cross_entropy import linear_cross_entropy
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

    def lm_loss(self, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x [N, d], weight [V, d], targets [N] -> mean cross-entropy of x @ weight^T, computed in `dtype`."""
        return linear_cross_entropy(x, weight, targets, dtype)
