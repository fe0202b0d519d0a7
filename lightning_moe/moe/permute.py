"""Token permutation (group the routed copies of tokens by expert) and the weighted combine back.

Shapes:
    T: tokens, K: experts per token, E: experts, N: routed rows kept (T * K when dropless), D: hidden size.
A "slot" is one (token, k) pair, numbered t * K + k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Permutation:
    slot_order: torch.Tensor
    """[N] slots sorted by expert (stable, so tokens keep their order within an expert)."""
    token_index: torch.Tensor
    """[N] the token of each routed row (slot_order // K)."""
    counts: torch.Tensor
    """[E] routed rows per expert (int64)."""
    num_slots: int
    """T * K."""
    dropped: int | torch.Tensor = 0
    """Slots dropped by the capacity limit."""

    @property
    def dropless(self) -> bool:
        return self.token_index.numel() == self.num_slots


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Rows one expert may take: ceil(capacity_factor * T * K / E)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def permute(expert_indices: torch.Tensor, num_experts: int, capacity: int | None = None) -> Permutation:
    """Sort the T*K slots by expert. With ``capacity``, each expert keeps its first ``capacity`` slots."""
    t, k = expert_indices.shape
    flat = expert_indices.reshape(-1)
    slot_order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    dropped: int | torch.Tensor = 0
    if capacity is not None:
        starts = torch.cumsum(counts, 0) - counts
        pos_in_expert = torch.arange(flat.numel(), device=flat.device) - starts[flat[slot_order]]
        keep = pos_in_expert < capacity
        slot_order = slot_order[keep]
        kept = counts.clamp(max=capacity)
        dropped = (counts - kept).sum()
        counts = kept
    return Permutation(slot_order, slot_order // k, counts, t * k, dropped)


def combine(routed_out: torch.Tensor, perm: Permutation, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's expert outputs. routed_out: [N, D]; weights: [T, K] -> [T, D].

    Dropped slots contribute zero. The dropless path uses a gather (deterministic, no atomics).
    """
    t, k = weights.shape
    d = routed_out.shape[-1]
    if perm.dropless:
        inverse = torch.empty_like(perm.slot_order)
        inverse[perm.slot_order] = torch.arange(perm.num_slots, device=inverse.device)
        per_slot = routed_out.index_select(0, inverse)
    else:
        per_slot = routed_out.new_zeros(perm.num_slots, d).index_copy(0, perm.slot_order, routed_out)
    return torch.bmm(weights.to(routed_out.dtype).unsqueeze(1), per_slot.view(t, k, d)).squeeze(1)
