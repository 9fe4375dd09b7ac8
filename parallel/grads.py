"""Gradient synchronisation and the global clipping norm.

Every rank's loss is the mean over its own tokens, and the global loss is the mean over the dp = world / tp
ranks that split the batch. So every gradient is pre-scaled by 1 / dp and summed over the ranks that hold
the same parameter with different data:
    dense parameters    over the data-parallel group (dp ranks, same tp_rank);
    expert parameters   over the expert-data-parallel group (edp = dp / ep ranks, same tp and ep rank). The
                        all-to-all already summed the contributions of the ep ranks' tokens into the expert's
                        gradient, so 1 / dp (not 1 / edp) is the right scale; with edp = 1 only the scale is applied.
Tensor-parallel replicas need nothing: split weights hold different slices, and the replicated ones (layer
norms, positions, router, experts) get identical gradients on every tp rank (megatron-core's column layers
all-reduce the input gradient over tp), so they are never reduced over tp.

Overlap: parameters are packed into buckets of about `bucket_mb`, in reverse registration order (about the
order backward produces them), one group per bucket. On the last micro-batch only (`begin_backward(last=True)`),
a `register_post_accumulate_grad_hook` counts each gradient as final; when a bucket is complete it is flattened,
scaled and all-reduced asynchronously while backward goes on. Buckets are launched strictly in index order, so
every rank issues the same collectives in the same order even when readiness differs; `finish` launches the rest
(a parameter without a gradient gets zeros), waits, and copies the results back.

Where a gradient lives: `p.grad` by default; with bf16 working weights over fp32 masters (train/precision.py),
`read_grads_with` points the sync at the fp32 main gradient, which it reduces and clips in place.

Clipping norm: ||g||^2 = sum over parameters of ||g_p||^2 / copies_p, all-reduced once over the world, where
copies_p is the number of ranks holding that same gradient after the sync (parallel/shards.py `copies`):
world / tp for tensor-split weights, world / ep for expert weights under expert parallelism, world for
everything else. Each distinct gradient element thus counts exactly once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from parallel.shards import copies, is_expert_parallel
from parallel.state import ParallelState


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    group: object  # None: nothing to sum over (expert-data-parallel size 1), scale only
    ready: int = 0
    buffer: torch.Tensor | None = None
    work: object = None


class GradSync:
    def __init__(self, model: nn.Module, ps: ParallelState, bucket_mb: float = 25.0):
        self.ps = ps
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.scale = 1.0 / ps.dp_size
        self.armed = False
        self.next = 0  # index of the next bucket to launch
        self.buckets: list[_Bucket] = []
        self.bucket_of: dict[nn.Parameter, _Bucket] = {}
        self.grad_of = lambda p: p.grad
        if ps.dp_size > 1:
            self._build_buckets(bucket_mb * 2**20)

    def _build_buckets(self, bucket_bytes: float) -> None:
        current: dict[bool, _Bucket] = {}
        sizes: dict[bool, int] = {}
        for p in reversed(self.params):
            expert = is_expert_parallel(p)
            if expert not in current:
                group = (self.ps.edp_group if self.ps.edp_size > 1 else None) if expert else self.ps.dp_group
                current[expert], sizes[expert] = _Bucket([], group), 0
                self.buckets.append(current[expert])
            b = current[expert]
            b.params.append(p)
            self.bucket_of[p] = b
            sizes[expert] += p.numel() * p.element_size()
            if sizes[expert] >= bucket_bytes:
                del current[expert]
            p.register_post_accumulate_grad_hook(self._on_grad)

    def read_grads_with(self, grad_of) -> None:
        """`grad_of(p)`: the tensor holding p's gradient (None: none yet), reduced and clipped in place."""
        self.grad_of = grad_of

    def begin_backward(self, last: bool) -> None:
        """Call before each micro-batch's backward; only the last one's gradients are final and reduced."""
        self.armed = last

    def _on_grad(self, p: nn.Parameter) -> None:
        if not self.armed:
            return
        b = self.bucket_of[p]
        b.ready += 1
        while self.next < len(self.buckets) and self.buckets[self.next].ready == len(self.buckets[self.next].params):
            self._launch(self.buckets[self.next])
            self.next += 1

    def _launch(self, b: _Bucket) -> None:
        for p in b.params:
            if self.grad_of(p) is None:
                p.grad = torch.zeros_like(p)
        b.buffer = torch.cat([self.grad_of(p).reshape(-1) for p in b.params]).mul_(self.scale)
        if b.group is not None:
            b.work = dist.all_reduce(b.buffer, group=b.group, async_op=True)

    def finish(self, max_norm: float, scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Complete the reduction and compute the clipping factor min(1, max_norm / norm) (1 when max_norm is 0).
        `scale`: multiply the gradients by it here; False leaves that to a fused optimizer (the trainer passes
        it as AdamW's grad_scale, saving a pass over every gradient). Returns (global gradient norm, factor),
        device tensors (no host sync)."""
        for b in self.buckets[self.next:]:
            self._launch(b)
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
            offset = 0
            for p in b.params:
                grad = self.grad_of(p)
                grad.copy_(b.buffer[offset:offset + p.numel()].view_as(grad))
                offset += p.numel()
            b.ready, b.buffer, b.work = 0, None, None
        self.next, self.armed = 0, False
        return self.clip(max_norm, scale)

    def clip(self, max_norm: float, scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(global norm, clipping factor) of the gradients as they are; `scale`: multiply them by the factor."""
        norm = self.norm()
        factor = (max_norm / (norm + 1e-6)).clamp(max=1.0) if max_norm > 0 else torch.ones_like(norm)
        if scale and max_norm > 0:
            grads = [g for g in map(self.grad_of, self.params) if g is not None]
            if grads:
                torch._foreach_mul_(grads, factor.to(grads[0].dtype))
        return norm, factor

    def norm(self) -> torch.Tensor:
        """The global gradient norm, each distinct gradient element counted once (see the module docstring)."""
        by_copies: dict[int, list[torch.Tensor]] = {}
        for p in self.params:
            grad = self.grad_of(p)
            if grad is not None:
                by_copies.setdefault(copies(p, self.ps), []).append(grad)
        if not by_copies:
            return torch.zeros((), device=self.ps.device)
        sq = sum(torch.stack(torch._foreach_norm(gs)).float().square().sum() / c for c, gs in by_copies.items())
        if self.ps.world_size > 1:
            dist.all_reduce(sq)
        return sq.sqrt()

    def average(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Means over the data-parallel ranks of per-rank scalars (losses for logging; one all-reduce)."""
        if self.ps.dp_size == 1 or not values:
            return values
        stacked = torch.stack([torch.as_tensor(v, device=self.ps.device).float() for v in values.values()])
        dist.all_reduce(stacked, group=self.ps.dp_group)
        return dict(zip(values, stacked / self.ps.dp_size))
