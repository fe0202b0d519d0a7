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
    top_k: int = 1
    """K, the experts per token (num_slots // top_k tokens)."""

    @property
    def dropless(self) -> bool:
        return self.token_index.numel() == self.num_slots


def count_per_expert(flat_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64 occurrences of each expert id. Unlike ``torch.bincount`` this never syncs with the GPU.

    Under ``torch.compile`` the count is a comparison with every expert id summed over the slots, which Inductor
    turns into one reduction: ``scatter_add_`` into E counters serialises on its atomic adds (22 us for 98k slots
    over 64 experts on an H200, against 9 for the reduction). Eager mode keeps ``scatter_add_``, which does not
    materialise the [E, N] comparison."""
    if torch.compiler.is_compiling():
        experts = torch.arange(num_experts, device=flat_indices.device)
        return (flat_indices.unsqueeze(0) == experts.unsqueeze(1)).sum(1)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat_indices.device)
    return counts.scatter_add_(0, flat_indices, torch.ones_like(flat_indices))


def _sort_key_dtype(num_experts: int) -> torch.dtype:
    """The narrowest integer type that holds every expert id: a radix sort makes one pass per 8 key bits (eight for
    int64 ids, one for uint8). On an H200, 98k int64 ids took 85 us to sort; as uint8, sort and counts take 22."""
    if num_experts <= 256:
        return torch.uint8
    return torch.int16 if num_experts <= 2**15 else torch.int32


def sort_by_expert(flat: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot order, counts): the slots sorted by expert (stable) and [E] int64 slots per expert.

    The counts come from the sorted ids (each expert's end is a binary search), so no separate counting pass runs.
    """
    keys, order = torch.sort(flat.to(_sort_key_dtype(num_experts)), stable=True)
    experts = torch.arange(num_experts, device=flat.device, dtype=keys.dtype)
    ends = torch.searchsorted(keys, experts, right=True)
    return order, torch.diff(ends, prepend=ends.new_zeros(1))


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Rows one expert may take: ceil(capacity_factor * T * K / E)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def permute(expert_indices: torch.Tensor, num_experts: int, capacity: int | None = None) -> Permutation:
    """Sort the T*K slots by expert. With ``capacity``, each expert keeps its first ``capacity`` slots."""
    t, k = expert_indices.shape
    flat = expert_indices.reshape(-1)
    slot_order, counts = sort_by_expert(flat, num_experts)
    dropped: int | torch.Tensor = 0
    if capacity is not None:
        starts = torch.cumsum(counts, 0) - counts
        pos_in_expert = torch.arange(flat.numel(), device=flat.device) - starts[flat[slot_order]]
        keep = pos_in_expert < capacity
        slot_order = slot_order[keep]
        kept = counts.clamp(max=capacity)
        dropped = (counts - kept).sum()
        counts = kept
    return Permutation(slot_order, slot_order // k, counts, t * k, dropped, k)


def inverse_order(perm: Permutation) -> torch.Tensor:
    """[T * K] the routed row of each slot (dropless only)."""
    inverse = torch.empty_like(perm.slot_order)
    inverse[perm.slot_order] = torch.arange(perm.num_slots, device=inverse.device)
    return inverse


def _fusible(dtype: torch.dtype) -> bool:
    """Under ``torch.compile`` the combine is written as elementwise products and sums, which Inductor fuses into one
    kernel each way (indirect loads, fp32 accumulation, no ``[T, K, D]`` intermediate). Eager mode keeps
    ``index_select`` + ``bmm``, which beat materialising those products.

    Only for 16-bit rows: with torch 2.11 (the GPU stack measured in docs/moe_layer_benchmark.md) the compiled fp32
    form returned zero gradients for every input, on CPU and CUDA, while bf16 matched eager (torch 2.13 gets both
    right). fp32 runs are tests and references, where the fusion saves nothing worth that risk."""
    return dtype in (torch.bfloat16, torch.float16) and torch.compiler.is_compiling()


def _sum_slots(rows: torch.Tensor, inverse: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """out[t] = sum_k rows[inverse[t * K + k]]: [N, D] -> [T, D]."""
    return rows.index_select(0, inverse).view(num_tokens, -1, rows.shape[-1]).sum(1)


def _rows_from_tokens(x: torch.Tensor, inverse: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """rows[inverse[t * K + k]] = x[t], i.e. x[token_index]: [T, D] -> [N = T * K, D] (dropless).

    Under ``torch.compile`` this is a scatter from the tokens rather than a gather by ``token_index``, so each token
    row is read once and written to its K routed rows: a gather reads every token row K times in expert order, from
    device memory whenever x does not fit in the L2 cache, so it moves about twice the bytes (Inductor's kernel for
    it took 0.26 ms against 0.17 on the benchmark layer). Eager mode keeps ``index_select``, whose kernel beats
    eager advanced-index assignment."""
    if not torch.compiler.is_compiling():
        return x.index_select(0, token_index)
    t, d = x.shape
    rows = x.new_empty(inverse.numel(), d)
    rows[inverse.view(t, -1)] = x.unsqueeze(1)
    return rows


class _GatherTokens(torch.autograd.Function):
    """rows = x[token_index]; the backward sums each token's K row gradients with a gather (no atomic adds)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, token_index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.num_tokens = x.shape[0]
        return _rows_from_tokens(x, inverse, token_index)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return _sum_slots(grad_rows, inverse, ctx.num_tokens), None, None


class _SumSlots(torch.autograd.Function):
    """out[t] = sum_k rows[inverse[t * K + k]]; the backward copies each token's gradient to its K rows."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, inverse: torch.Tensor, token_index: torch.Tensor, num_tokens: int,
                ) -> torch.Tensor:
        ctx.save_for_backward(inverse, token_index)
        return _sum_slots(rows, inverse, num_tokens)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        inverse, token_index = ctx.saved_tensors
        return _rows_from_tokens(grad_out, inverse, token_index), None, None, None


class _Combine(torch.autograd.Function):
    """out[t] = sum_k w[t, k] * rows[inverse[t * K + k]], with gather-only forward and backward."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weights: torch.Tensor, inverse: torch.Tensor,
                token_index: torch.Tensor, slot_order: torch.Tensor) -> torch.Tensor:
        t, k = weights.shape
        w = weights.to(rows.dtype)
        ctx.save_for_backward(rows, w, inverse, token_index, slot_order)
        per_slot = rows.index_select(0, inverse).view(t, k, -1)
        if _fusible(rows.dtype):  # one fused gather-multiply-sum kernel, accumulating in fp32
            return (per_slot.float() * weights.unsqueeze(-1)).sum(1).to(rows.dtype)
        return torch.bmm(w.unsqueeze(1), per_slot).squeeze(1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        rows, w, inverse, token_index, slot_order = ctx.saved_tensors
        t, k = w.shape
        grad_rows = grad_w = None
        if _fusible(rows.dtype):
            # Both gradients in slot order from each token's gradient, read once for its K slots: the row gradients
            # are scattered to their rows and the dot products gather the rows (a gather of grad_out in row order
            # would read each token's gradient K times).
            grad_tok = grad_out.float().unsqueeze(1)  # [T, 1, D]
            if ctx.needs_input_grad[0]:
                grad_rows = rows.new_empty(rows.shape)
                grad_rows[inverse.view(t, k)] = (grad_tok * w.unsqueeze(-1)).to(rows.dtype)
            if ctx.needs_input_grad[1]:
                grad_w = (rows.index_select(0, inverse).view(t, k, -1).float() * grad_tok).sum(-1)
            return grad_rows, grad_w, None, None, None
        if ctx.needs_input_grad[0]:
            w_rows = w.reshape(-1).index_select(0, slot_order).unsqueeze(-1)
            grad_rows = grad_out.index_select(0, token_index) * w_rows
        if ctx.needs_input_grad[1]:
            per_slot = rows.index_select(0, inverse).view(t, k, -1)
            grad_w = torch.bmm(per_slot, grad_out.unsqueeze(-1)).squeeze(-1).float()
        return grad_rows, grad_w, None, None, None


def gather_tokens(x: torch.Tensor, perm: Permutation, inverse: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, D] -> routed rows [N, D] in expert order."""
    if not perm.dropless:
        return x.index_select(0, perm.token_index)
    inverse = inverse_order(perm) if inverse is None else inverse
    return _GatherTokens.apply(x, perm.token_index, inverse)


def slot_weights_by_row(weights: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """weights: [T, K] gate weights -> [N] the weight of each routed row (expert order)."""
    return weights.reshape(-1).index_select(0, perm.slot_order)


def combine(routed_out: torch.Tensor, perm: Permutation, weights: torch.Tensor | None,
            inverse: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted sum of each token's expert outputs. routed_out: [N, D]; weights: [T, K] -> [T, D].

    ``weights=None`` sums the rows unweighted (dropless only): for rows that the experts already scaled by their
    gate weights (``kernels.py``). Dropped slots contribute zero. The dropless path gathers in both directions
    (deterministic, no atomic adds).
    """
    if weights is None:
        if not perm.dropless:
            raise ValueError("combine without weights needs a dropless permutation")
        inverse = inverse_order(perm) if inverse is None else inverse
        return _SumSlots.apply(routed_out, inverse, perm.token_index, perm.num_slots // perm.top_k)
    t, k = weights.shape
    if perm.dropless:
        inverse = inverse_order(perm) if inverse is None else inverse
        return _Combine.apply(routed_out, weights, inverse, perm.token_index, perm.slot_order)
    d = routed_out.shape[-1]
    per_slot = routed_out.new_zeros(perm.num_slots, d).index_copy(0, perm.slot_order, routed_out)
    return torch.bmm(weights.to(routed_out.dtype).unsqueeze(1), per_slot.view(t, k, d)).squeeze(1)
