"""Shard facts: which parameters are slices of a full tensor, along which dimension, over which ranks.

The parallel layers tag the parameters they split when they build them; this module writes and is the only
reader of those tags. Checkpointing (save full tensors, load under any layout), gradient synchronisation
(which group sums a gradient, how many ranks hold the same one) and the dry run (what one rank holds) all ask
here, so there is one answer to "how is this parameter split".

Two kinds of split:
    tensor parallel  `partition_dim`, split over the tp ranks; with `partition_stride` (chunks) > 1 the full
                     tensor is that many blocks stacked along the dim, each split separately (the fused q|k|v,
                     whose rank keeps its heads of each). The attribute names are megatron-core's, so its own
                     layers carry the same tags.
    expert parallel  dim 0 of a stacked expert weight [E, ...], contiguous blocks of E / ep over the ep ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from parallel.state import ParallelState


def tag_tensor_parallel(param: torch.Tensor, dim: int, chunks: int = 1) -> None:
    """Mark `param` as this rank's tensor-parallel slice along `dim` (megatron-core's attribute names)."""
    param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, dim, chunks


def tag_expert_parallel(param: torch.Tensor) -> None:
    """Mark `param` [E_local, ...] as this rank's block of experts."""
    param.expert_parallel = True


def is_expert_parallel(param: torch.Tensor) -> bool:
    return getattr(param, "expert_parallel", False)


def is_tensor_parallel(param: torch.Tensor) -> bool:
    return getattr(param, "tensor_model_parallel", False)


@dataclass(frozen=True)
class ShardSpec:
    """This rank's tensor is slice `rank` of `size` even slices of the full tensor along `dim`."""
    dim: int
    size: int
    rank: int
    group: object = None  # the process group of those ranks (a DeviceMesh is built from it to save)
    chunks: int = 1  # stacked blocks along dim, each split separately (fused q|k|v)

    def full_shape(self, local_shape) -> tuple[int, ...]:
        shape = list(local_shape)
        shape[self.dim] *= self.size
        return tuple(shape)

    def local_slice(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the full tensor."""
        return shard(full, self.dim, self.rank, self.size, self.chunks)


def shard(full: torch.Tensor, dim: int, rank: int, size: int, chunks: int = 1) -> torch.Tensor:
    """Slice `rank` of `full` along `dim`: each of the `chunks` blocks split in `size`, block `rank` kept."""
    return torch.cat([block.chunk(size, dim)[rank] for block in full.chunk(chunks, dim)], dim)


def shard_spec(param: torch.Tensor, ps: ParallelState) -> ShardSpec | None:
    """How `param` is split over more than one rank, or None for a full copy."""
    if is_expert_parallel(param) and ps.ep_size > 1:
        return ShardSpec(0, ps.ep_size, ps.ep_rank, ps.ep_group)
    if is_tensor_parallel(param) and ps.tp_size > 1:
        return ShardSpec(param.partition_dim, ps.tp_size, ps.tp_rank, ps.tp_group, param.partition_stride)
    return None


def shard_specs(model: torch.nn.Module, ps: ParallelState) -> dict[str, ShardSpec]:
    """Parameter name -> ShardSpec for every parameter of `model` split over more than one rank."""
    return {name: spec for name, p in model.named_parameters() if (spec := shard_spec(p, ps)) is not None}


def copies(param: torch.Tensor, ps: ParallelState) -> int:
    """Ranks that hold the same gradient as this rank for `param` once gradients are synchronised: the world
    over the ranks that split it (tensor-split weights differ over tp, experts over ep)."""
    if is_expert_parallel(param):
        return ps.world_size // ps.ep_size
    if is_tensor_parallel(param):
        return ps.world_size // ps.tp_size
    return ps.world_size
