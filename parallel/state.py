"""Process topology. Single-process placeholder until the parallelism work lands: one rank, no groups."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from parallel.config import ParallelConfig


@dataclass
class ParallelState:
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0  # position among the ranks that split each global batch (world / tensor)
    dp_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_parallel(cfg: ParallelConfig, device: torch.device) -> ParallelState:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise NotImplementedError("more than one process is not supported yet")
    return ParallelState(device=device)
