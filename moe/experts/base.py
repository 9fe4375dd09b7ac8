"""What every expert backend shares: the stacked parameters, their initialisation, the activation.

Every backend stores its experts the same way, so a checkpoint moves between backends unchanged:
    w1 [E, d, f]   first projection (the gate projection for SwiGLU)
    w3 [E, d, f]   SwiGLU only: the up projection
    w2 [E, f, d]   second projection
`forward(x [T, d], routing) -> (y [T, d], num_dropped [])`, where routing.expert_ids index the experts
this module holds (local experts under expert parallelism) and num_dropped counts the assignments the
backend dropped by design (0 for dropless backends).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import MoEConfig
from moe.routing import Routing

ACTIVATIONS = ("gelu", "swiglu")


def activate(h1: torch.Tensor, h3: torch.Tensor | None, activation: str) -> torch.Tensor:
    """GELU(h1), or SiLU(h1) * h3 for SwiGLU."""
    if activation == "swiglu":
        return F.silu(h1) * h3
    return F.gelu(h1, approximate="tanh")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype expert matmuls run in: autocast's where it is on (a LayerNorm hands fp32 activations to the
    MoE layer under bf16 autocast), else the activations' own. Kernel backends cast x and the weights to it;
    weight gradients flow back through the cast."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class Experts(nn.Module):
    def __init__(self, cfg: MoEConfig, num_experts: int, hidden_size: int, ffn_hidden_size: int,
                 activation: str, init_std: float, output_std: float):
        super().__init__()
        self.cfg = cfg  # backend options (capacity, drop policy, block size, ...)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r}: use one of {ACTIVATIONS}")
        self.num_experts, self.hidden_size, self.ffn_hidden_size = num_experts, hidden_size, ffn_hidden_size
        self.activation = activation
        self.init_std, self.output_std = init_std, output_std
        E, d, f = num_experts, hidden_size, ffn_hidden_size
        self.w1 = nn.Parameter(torch.empty(E, d, f))
        self.w3 = nn.Parameter(torch.empty(E, d, f)) if activation == "swiglu" else None
        self.w2 = nn.Parameter(torch.empty(E, f, d))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w1, std=self.init_std)
        if self.w3 is not None:
            nn.init.normal_(self.w3, std=self.init_std)
        nn.init.normal_(self.w2, std=self.output_std)

    def expert_mlp(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """One expert's MLP on its rows x [n, d] -> [n, d]."""
        h3 = x @ self.w3[e] if self.w3 is not None else None
        return activate(x @ self.w1[e], h3, self.activation) @ self.w2[e]

    def forward(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, d={self.hidden_size}, f={self.ffn_hidden_size}, "
                f"activation={self.activation}")
