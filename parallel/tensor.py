"""Tensor parallelism (Megatron): megatron-core's column / row parallel linears, vocab-parallel embedding and
cross-entropy, each holding this rank's slice of a full module built with the global seed.

Slices on tp rank r of t (the same as megatron-core's own CPU initialisation, `partition_stride` = chunks):
    column  weight [out, in] -> rows of each of the `chunks` output blocks, block-wise [r/t, (r+1)/t)
    row     weight [out, in] -> columns [r * in / t, (r+1) * in / t)
    vocab   weight [V, d]    -> rows    [r * V / t, (r+1) * V / t)   (a vocab-split head uses `column`)
Megatron-core's layers are created without initialisation (`perform_initialization=False`, CPU) and without
touching the global RNG, then filled from the slice and tagged (parallel/shards.py); no CUDA RNG tracker, no
sequence parallelism. The other parameters (layer norms, positions, router, experts) are replicated over the
tensor group with identical gradients.
"""
from __future__ import annotations

import torch
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
)
from torch import nn

from parallel.cross_entropy import linear_cross_entropy
from parallel.layers import Layers
from parallel.shards import shard, tag_tensor_parallel
from parallel.state import ParallelState


def _no_init(weight: torch.Tensor) -> None:
    """Megatron-core wants an init method; the weights are copied from the full module instead."""


class _PlainState:
    """No `_extra_state` entry (megatron-core saves None there and inserts it on load), so the state-dict keys
    are the one-process model's."""
    get_extra_state, set_extra_state = nn.Module.get_extra_state, nn.Module.set_extra_state

    def _drop_extra_state_hook(self) -> None:
        self._load_state_dict_pre_hooks.clear()


class _Column(_PlainState, ColumnParallelLinear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._drop_extra_state_hook()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]  # output only (no bias)


class _Row(_PlainState, RowParallelLinear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._drop_extra_state_hook()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class TensorParallelLayers(Layers):
    def __init__(self, ps: ParallelState):
        super().__init__(ps)
        self.tp_rank, self.group = ps.tp_rank, ps.tp_group
        self.config = ModelParallelConfig(tensor_model_parallel_size=ps.tp_size, use_cpu_initialization=True,
                                          perform_initialization=False, params_dtype=torch.float32)

    def _fill(self, module: nn.Module, full: torch.Tensor, dim: int, chunks: int = 1) -> nn.Module:
        with torch.no_grad():
            module.weight.copy_(shard(full, dim, self.tp_rank, self.tp_size, chunks))
        tag_tensor_parallel(module.weight, dim, chunks)  # megatron-core sets these in its own init only
        return module

    def column(self, linear: nn.Linear, chunks: int = 1) -> nn.Module:
        out_features, in_features = linear.weight.shape
        if out_features % (chunks * self.tp_size):
            raise ValueError(f"{chunks} x parallel.tensor={self.tp_size} must divide the {out_features} outputs")
        with torch.random.fork_rng(devices=[]):
            m = _Column(in_features, out_features, config=self.config, init_method=_no_init, bias=False,
                        gather_output=False, skip_bias_add=True, stride=chunks, tp_group=self.group)
        return self._fill(m, linear.weight, 0, chunks)

    def row(self, linear: nn.Linear) -> nn.Module:
        out_features, in_features = linear.weight.shape
        with torch.random.fork_rng(devices=[]):
            m = _Row(in_features, out_features, config=self.config, init_method=_no_init, bias=False,
                     input_is_parallel=True, skip_bias_add=True, tp_group=self.group)
        return self._fill(m, linear.weight, 1)

    def vocab_embedding(self, embedding: nn.Embedding) -> nn.Module:
        V, d = embedding.weight.shape
        with torch.random.fork_rng(devices=[]):
            m = VocabParallelEmbedding(V, d, init_method=_no_init, config=self.config, tp_group=self.group)
        return self._fill(m, embedding.weight, 0)

    def lm_loss(self, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Vocabulary-parallel: weight holds this rank's V / tp rows; x enters through megatron-core's copy
        (identity forward, all-reduce backward), which sums the ranks' partial input gradients."""
        x = copy_to_tensor_model_parallel_region(x, group=self.group)
        return linear_cross_entropy(x, weight, targets, dtype, self.group, first=self.tp_rank * weight.shape[0])
