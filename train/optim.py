"""AdamW with weight decay on matrices only, and warmup-then-cosine learning rate."""
from __future__ import annotations

import math

import torch

from train.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Decay matrices (ndim >= 2: linear, embedding, stacked expert weights); not norms or biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    # fused (CPU and CUDA): one kernel per group of tensors, and the grad_scale / found_inf inputs through which
    # the trainer clips and skips a non-finite step on the device
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_frac of the steps, then cosine from lr down to min_lr at the last step."""
    warmup = int(cfg.warmup_frac * cfg.steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(cfg.steps - warmup - 1, 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))
