"""Expert-load bookkeeping across all MoE layers of a model: gather, all-reduce, update the balancing biases.

Shapes: L MoE layers held by this process, E routed experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lightning_moe.moe.layer import MoE


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """(qualified name, module) of every MoE layer, in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


@torch.no_grad()
def collect_expert_load(model: nn.Module, group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens routed per expert since the last reset, summed over ``group`` (default: every rank, when initialised).

    Returns (load [L, E], dropped [L]). Every rank of ``group`` must call this with the same layers.
    """
    layers = moe_layers(model)
    if not layers:
        return torch.zeros(0, 0), torch.zeros(0)
    load = torch.stack([m.router.tokens_per_expert for _, m in layers])
    dropped = torch.stack([m.router.dropped_tokens for _, m in layers])
    packed = torch.cat([load, dropped.unsqueeze(1)], dim=1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(packed, group=group)
    return packed[:, :-1], packed[:, -1]


@torch.no_grad()
def update_expert_biases(model: nn.Module, load: torch.Tensor) -> None:
    """Apply one auxiliary-loss-free bias step per layer from the global ``load`` [L, E], then reset the counters."""
    for (_, m), layer_load in zip(moe_layers(model), load):
        m.router.update_bias(layer_load.to(m.router.expert_bias.device))


def imbalance(load: torch.Tensor) -> torch.Tensor:
    """max / mean tokens per expert, per layer. load: [L, E] -> [L]."""
    return load.amax(-1) / load.mean(-1).clamp_min(1e-9)
