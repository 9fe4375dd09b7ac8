"""The experts contract: rows grouped by expert in, their outputs in the same order out.

    experts(rows: ExpertRows) -> y [M, d]

`rows` describes M rows grouped by local expert (expert 0's rows first, then expert 1's, ...) without
copying them: grouped position p holds row `order[p] // top_k` of `rows.x`. The token dispatcher
(moe/dispatch.py) builds it from the local sort or from the rows an all-to-all received; kernels that read
rows by index (scatter) use it as it is, the others gather once (`ExpertRows.gathered`). The output row p is
the expert's MLP of row p, ungated: the dispatcher's combine applies the gates. Positions past the last group
(assignments the capacity step dropped, sorted to the end) are never read back, whatever they hold.

Every backend stores its experts the same way, so a checkpoint moves between backends unchanged:
    w1 [E, d, f]   first projection (the gate projection for SwiGLU)
    w3 [E, d, f]   SwiGLU only: the up projection
    w2 [E, f, d]   second projection
Under expert parallelism a rank holds experts [first, first + E_local) of the E: the full tensors are drawn
with the global seed and sliced, so every rank's experts equal the one-process initialisation.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moe.kernels.sort import Sorted

ACTIVATIONS = ("gelu", "swiglu")


class ExpertRows(NamedTuple):
    x: torch.Tensor  # [N, d] the rows: tokens, or the rows an all-to-all received
    sort: Sorted  # order [M] (slot at each grouped position), expert_of [M], counts / offsets [E_local]
    top_k: int  # slots per row of x: grouped position p holds row sort.order[p] // top_k
    capacity: int | None = None  # a static bound on every count (the padded backend pads to it); None: none

    @property
    def num_rows(self) -> int:
        return self.sort.order.numel()

    def tokens(self) -> torch.Tensor:
        """[M] int64 row of x at each grouped position."""
        return self.sort.order if self.top_k == 1 else self.sort.order // self.top_k

    def gathered(self) -> torch.Tensor:
        """[M, d] the rows in grouped order, copied."""
        return self.x[self.tokens()]


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
    """Subclasses implement `compute(rows) -> [M, d]` on rows they can assume non-empty."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, activation: str,
                 init_std: float, output_std: float, local: range | None = None):
        """`num_experts` is E, all experts of the layer; `local` the ones this module holds (default: all)."""
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r}: use one of {ACTIVATIONS}")
        self.local = local = local if local is not None else range(num_experts)
        self.num_experts = len(local)  # the experts held here, E_local
        self.hidden_size, self.ffn_hidden_size, self.activation = hidden_size, ffn_hidden_size, activation
        E, d, f = num_experts, hidden_size, ffn_hidden_size
        self.w1 = _sliced_normal((E, d, f), init_std, local)
        self.w3 = _sliced_normal((E, d, f), init_std, local) if activation == "swiglu" else None
        self.w2 = _sliced_normal((E, f, d), output_std, local)

    def expert_mlp(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """One local expert's MLP on its rows x [n, d] -> [n, d]."""
        h3 = x @ self.w3[e] if self.w3 is not None else None
        return activate(x @ self.w1[e], h3, self.activation) @ self.w2[e]

    def forward(self, rows: ExpertRows) -> torch.Tensor:
        x, name = rows.x, type(self).__name__
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"{name}: rows of shape {tuple(x.shape)}, but these experts take [N, {self.hidden_size}] "
                             "(hidden_size)")
        if not x.is_floating_point():
            raise TypeError(f"{name}: rows of dtype {x.dtype}; the experts compute in floating point")
        if rows.sort.counts.numel() != self.num_experts:
            raise ValueError(f"{name}: {rows.sort.counts.numel()} expert groups for the {self.num_experts} experts "
                             "held here")
        if rows.num_rows == 0:
            # no rows here (expert parallelism: this rank received none): an empty output that still depends on
            # x and on every weight, so this rank runs the same backward collectives as the others and its
            # weights get (zero) gradients
            return rows.x[:0] * sum((p.sum() for p in self.parameters()), rows.x.new_zeros(()))
        return self.compute(rows)

    def compute(self, rows: ExpertRows) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"experts={self.local.start}..{self.local.stop - 1}, d={self.hidden_size}, f={self.ffn_hidden_size}, "
                f"activation={self.activation}")


def _sliced_normal(full_shape: tuple[int, ...], std: float, local: range) -> nn.Parameter:
    """N(0, std) drawn for all E experts (the one-process RNG sequence), then the local ones kept."""
    full = torch.empty(full_shape).normal_(std=std)
    return nn.Parameter(full[local.start:local.stop].clone() if len(local) < full_shape[0] else full)
