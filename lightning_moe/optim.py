"""Optimizer and learning-rate schedule: AdamW with linear warmup and cosine decay (the ``optimizer`` group)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from lightning_moe.errors import ConfigError


@dataclass
class OptimizerConfig:
    lr: float = 3e-3
    """Peak learning rate."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (not on norms, biases or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    decay_steps: Optional[int] = None
    """Steps of the cosine decay after warmup (None: until trainer.max_steps)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optimizer.lr={self.lr}: must be > 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps={self.warmup_steps}: must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optimizer.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"optimizer.beta1={self.beta1}, optimizer.beta2={self.beta2}: must be in [0, 1)")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and expert weight stacks; none on norms, biases and embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embeddings" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(cfg: OptimizerConfig, total_steps: int):
    """Multiplier of the peak LR at a step: linear warmup, then cosine down to ``min_lr_ratio``, then flat."""
    decay_steps = cfg.decay_steps if cfg.decay_steps is not None else max(1, total_steps - cfg.warmup_steps)

    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, decay_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, total_steps: int):
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
    return opt, sched
