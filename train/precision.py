"""bf16 working weights over fp32 master weights: Megatron's mixed precision (Micikevicius et al. 2018, "Mixed
Precision Training"; megatron-core's Float16OptimizerWithFloat16Params), instead of autocast's fp32 weights.

Under autocast every matmul casts its fp32 weight to bf16, at every micro-batch, and backward casts the bf16
weight gradient back to fp32. Here each parameter owns two storages of its shape:

    working  bf16   what `param.data` is outside the optimizer: forward and backward read it, grads come in bf16
    master   fp32   what the optimizer updates and checkpoints hold, with the fp32 gradient `main`

After each micro-batch's backward, a post-accumulate-grad hook adds the bf16 gradient into the fp32 `main` and
drops it (`fold`): accumulation over micro-batches and the data-parallel reduction are in fp32. For the optimizer
step and for checkpoints, `masters()` points every parameter at its master and `main` gradient, so AdamW's
states, the checkpoint format and its resharding are exactly those of an fp32 run (a checkpoint moves between
the two modes); on exit the parameters point back at their working copies, refreshed from the masters with one
cast per optimizer step.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class MasterWeights:
    def __init__(self, params: list[nn.Parameter], dtype: torch.dtype = torch.bfloat16):
        """`params`: fp32 parameters (as built); from here on they hold `dtype` working copies."""
        self.params = params
        self.master_data = [p.data for p in params]
        self.working = [m.to(dtype) for m in self.master_data]
        self.main: dict[nn.Parameter, torch.Tensor] = {}
        for p, w in zip(params, self.working):
            p.data = w
            p.register_post_accumulate_grad_hook(self._fold_hook)

    def _fold_hook(self, p: nn.Parameter) -> None:
        self.fold(p)

    def fold(self, p: nn.Parameter) -> torch.Tensor | None:
        """Add p's working gradient into its fp32 main gradient and drop it; return the main gradient (None:
        no gradient yet). Idempotent, so the gradient sync may call it from its own hook as well."""
        if p.grad is not None:
            if p in self.main:
                self.main[p].add_(p.grad)
            else:
                self.main[p] = p.grad.float()
            p.grad = None
        return self.main.get(p)

    @contextlib.contextmanager
    def masters(self):
        """Parameters as fp32 masters with their fp32 main gradients, for the optimizer and checkpoints; on exit
        back to the working copies, refreshed from the (updated or loaded) masters."""
        for p, m in zip(self.params, self.master_data):
            p.data = m
            p.grad = self.main.pop(p, None)
        try:
            yield
        finally:
            for p, w in zip(self.params, self.working):
                if p.grad is not None:
                    self.main[p] = p.grad
                p.grad = None
                p.data = w
            torch._foreach_copy_(self.working, self.master_data)
