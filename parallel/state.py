"""Process topology: one `ParallelState`, built once by `init_parallel` and passed explicitly.

Sizes come from the config: tensor parallel `tp = parallel.tensor`, expert parallel `ep = parallel.expert`,
and the rest of the world is the expert-data-parallel replication `edp = world / (tp * ep)`. Ranks are laid
out tp fastest, then ep, then edp (Megatron-core's order "tp-cp-ep-dp-pp" with cp = pp = 1):

    rank = tp_rank + tp * (ep_rank + ep * edp_rank)

Dense (non-expert) parameters are replicated over every rank with the same tp_rank: that is the data-parallel
group, of size dp = world / tp = ep * edp, and dp_rank = rank // tp picks the rank's share of each global batch.
Expert parameters are split over the ep ranks and replicated over the edp ranks (and over tp: experts are not
tensor-split). Example, 16 ranks with tp=2, ep=2 (edp = 4, dp = 8):

    rank      0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15
    tp_rank   0  1  0  1  0  1  0  1  0  1  0  1  0  1  0  1
    ep_rank   0  0  1  1  0  0  1  1  0  0  1  1  0  0  1  1
    edp_rank  0  0  0  0  1  1  1  1  2  2  2  2  3  3  3  3
    dp_rank   0  0  1  1  2  2  3  3  4  4  5  5  6  6  7  7   (batch share; = rank // tp)

    tensor       {0,1} {2,3} ... {14,15}                        8 groups: TP linears, vocab-parallel CE
    expert       {0,2} {1,3} {4,6} {5,7} ... {13,15}            8 groups: the token all-to-all
    data         {0,2,4,...,14} {1,3,...,15}                    2 groups of 8: dense gradients
    expert-data  {0,4,8,12} {1,5,9,13} {2,6,10,14} {3,7,11,15}  4 groups of 4: expert gradients

Groups come from megatron-core's `parallel_state` (imported only when there is more than one process, so a
single-process run needs no megatron-core).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from errors import ConfigError
from parallel.config import ParallelConfig


@dataclass
class ParallelState:
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0  # position among the ranks that split each global batch (world / tensor)
    dp_size: int = 1
    device: torch.device = torch.device("cpu")
    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    edp_rank: int = 0
    edp_size: int = 1
    tp_group: object = None  # torch.distributed ProcessGroup handles; None in a single process
    ep_group: object = None
    dp_group: object = None
    edp_group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_layout(world_size: int, tensor: int, expert: int) -> None:
    """Raise ConfigError unless tensor x expert divides the world size."""
    if tensor < 1 or expert < 1 or world_size % (tensor * expert):
        raise ConfigError("parallel.tensor", f"x parallel.expert = {tensor} x {expert} must divide the world "
                          f"size {world_size}; change the sizes or the number of processes (torchrun "
                          f"--nproc_per_node, --nnodes)")


def coordinates(rank: int, world_size: int, tensor: int, expert: int) -> dict[str, int]:
    """The coordinates of `rank` in the layout above, computed without processes (for --dry-run)."""
    check_layout(world_size, tensor, expert)
    return {"rank": rank, "tp_rank": rank % tensor, "ep_rank": rank // tensor % expert,
            "edp_rank": rank // (tensor * expert), "dp_rank": rank // tensor}


def init_parallel(cfg: ParallelConfig, device: torch.device) -> ParallelState:
    """Start torch.distributed from the torchrun environment (if WORLD_SIZE > 1) and build the groups.

    On CUDA each process takes the GPU LOCAL_RANK; the returned state's `device` is the one to use.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_layout(world, cfg.tensor, cfg.expert)
    if world == 1:
        return ParallelState(device=device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("parallel.backend", "is nccl but the device is the CPU; use gloo or auto")
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return build_state(cfg.tensor, cfg.expert, device)


def build_state(tensor: int, expert: int, device: torch.device) -> ParallelState:
    """Groups for an initialised default process group, through megatron-core's parallel_state."""
    from megatron.core import parallel_state as mpu

    world, rank = dist.get_world_size(), dist.get_rank()
    check_layout(world, tensor, expert)
    mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(tensor_model_parallel_size=tensor, expert_model_parallel_size=expert,
                                  create_gloo_process_groups=False)
    ps = ParallelState(
        rank=rank, world_size=world, device=device,
        dp_rank=mpu.get_data_parallel_rank(), dp_size=mpu.get_data_parallel_world_size(),
        tp_rank=mpu.get_tensor_model_parallel_rank(), tp_size=tensor,
        ep_rank=mpu.get_expert_model_parallel_rank(), ep_size=expert,
        edp_rank=mpu.get_expert_data_parallel_rank(), edp_size=mpu.get_expert_data_parallel_world_size(),
        tp_group=mpu.get_tensor_model_parallel_group(), ep_group=mpu.get_expert_model_parallel_group(),
        dp_group=mpu.get_data_parallel_group(), edp_group=mpu.get_expert_data_parallel_group())
    expected = coordinates(rank, world, tensor, expert)
    got = {k: getattr(ps, k) for k in expected}
    if got != expected:  # the documented layout is what the data loader and checkpoints rely on
        raise RuntimeError(f"megatron-core placed rank {rank} at {got}, not the documented {expected}")
    return ps


def shutdown_parallel() -> None:
    """Release the process groups at the end of a run (NCCL warns when a process exits without it)."""
    if dist.is_initialized():
        dist.destroy_process_group()
