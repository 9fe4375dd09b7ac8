"""The `parallel:` section of the config. Data parallel is what remains of the world size."""
from __future__ import annotations

from dataclasses import dataclass

from errors import ConfigError


@dataclass
class ParallelConfig:
    tensor: int = 1  # tensor-parallel size
    expert: int = 1  # expert-parallel size
    backend: str = "auto"  # torch.distributed backend: auto (nccl on GPU, gloo on CPU) | nccl | gloo
    bucket_mb: float = 25.0  # gradient all-reduce bucket size (MiB), launched during the last backward

    def validate(self) -> None:
        for key in ("tensor", "expert"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key}", f"is {getattr(self, key)}; it must be >= 1")
        if self.bucket_mb <= 0:
            raise ConfigError("parallel.bucket_mb", f"is {self.bucket_mb}; it must be positive")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError("parallel.backend", f"is {self.backend!r}; use auto, nccl or gloo")
