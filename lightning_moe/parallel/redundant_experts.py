"""Redundant experts under expert parallelism (EPLB): placements, replica routing, replica gradient sums, and moving
weights and optimizer state to a new placement.

Shapes: E logical experts, R physical expert slots (R = E + redundant, R % ep == 0), S = R / ep slots per EP rank,
N routed rows of this rank, U logical experts that have more than one replica.

A *placement* ``phy2log [R]`` names the logical expert held by every physical slot; EP rank ``r`` holds slots
``[r * S, (r + 1) * S)`` (the layout of ``lightning_moe.eplb.rebalance_experts``). Every logical expert has at least
one slot; the slots of one expert are its *replicas* and always hold identical weights and optimizer state:

- forward: the rows routed to a logical expert are split evenly among its replicas (``assign_replicas``);
- backward: the gradients of the replicas of each expert are summed over all of them (``ReplicaGradSum``), so every
  replica receives the gradient the expert would receive without replication, and the optimizer updates replicas
  identically;
- a new placement copies each slot's weights and optimizer state from a replica of its new logical expert
  (``gather_rows_``).

Checkpoints stay in the logical layout: ``logical_state_dict_hook`` / ``physical_load_state_dict_hook`` (model) and
``register_optimizer_layout_hooks`` (optimizer) convert ``[R, ...]`` slot tensors to ``[E, ...]`` expert tensors
(the first replica of each expert) on save and back on load, so a checkpoint loads with or without replicas, at any
ep. Those conversions gather whole tensors and are collectives over the tensor's mesh (see ``to_logical``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = [
    "ReplicaGradSum",
    "assign_replicas",
    "default_placement",
    "gather_rows_",
    "placement_tables",
    "register_optimizer_layout_hooks",
    "shard_like",
    "to_logical",
    "to_physical",
    "validate_placement",
]


# --- placement tables -----------------------------------------------------------------------------------------------
def default_placement(num_experts: int, num_slots: int) -> torch.Tensor:
    """Placement before any plan: slot ``s`` holds expert ``s % E`` (without redundant slots: the identity)."""
    return torch.arange(num_slots, device="cpu") % num_experts


def validate_placement(phy2log: Any, num_experts: int, num_slots: int) -> torch.Tensor:
    """``phy2log`` as a CPU int64 tensor [R]; raises ``ValueError`` unless every entry is an expert in [0, E) and
    every expert has at least one slot."""
    p = torch.as_tensor(phy2log, device="cpu").detach().to(torch.int64)
    if p.shape != (num_slots,):
        raise ValueError(f"a placement needs one logical expert per physical slot: shape ({num_slots},), got "
                         f"{tuple(p.shape)}")
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= num_experts):
        raise ValueError(f"placement entries must be logical experts in [0, {num_experts}), got {p.tolist()}")
    missing = (torch.bincount(p, minlength=num_experts) == 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"placement {p.tolist()} holds no replica of experts {missing}")
    return p


def placement_tables(phy2log: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """phy2log [R] -> (log2phy [E, max_replicas] slots of each expert in slot order, padded with -1; logcnt [E])."""
    logcnt = torch.bincount(phy2log, minlength=num_experts)
    order = torch.argsort(phy2log, stable=True)  # slots grouped by expert, in slot order
    rank = torch.arange(phy2log.numel(), device=phy2log.device) - (torch.cumsum(logcnt, 0) - logcnt)[phy2log[order]]
    log2phy = torch.full((num_experts, int(logcnt.max())), -1, dtype=torch.int64, device=phy2log.device)
    log2phy[phy2log[order], rank] = order
    return log2phy, logcnt


def assign_replicas(counts: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, rotation: int,
                    num_rows: int) -> torch.Tensor:
    """Physical slot of every routed row. counts: [E] rows per logical expert (rows sorted by expert) -> [N] int64.

    The ``counts[e]`` rows of expert ``e`` are cut into ``logcnt[e]`` contiguous blocks as even as possible (sizes
    differ by at most one), block ``j`` going to replica ``(j + rotation) % logcnt[e]``. Passing the EP rank as
    ``rotation`` makes the ranks give their larger blocks to different replicas.
    """
    num_experts = counts.numel()
    row_expert = torch.repeat_interleave(torch.arange(num_experts, device=counts.device), counts,
                                         output_size=num_rows)
    start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(num_rows, device=counts.device) - start[row_expert]
    replicas = logcnt[row_expert]
    block = torch.div(pos * replicas, counts[row_expert], rounding_mode="floor")
    return log2phy[row_expert, (block + rotation) % replicas]


# --- replica gradients ----------------------------------------------------------------------------------------------
class ReplicaGradSum(torch.autograd.Function):
    """Identity on ``(x, w13, w2)`` whose backward sums the weight gradients of the replicas of each expert.

    ``slot_to_shared [S]``: for each local slot, the index in [0, U) of its logical expert among the experts with
    several replicas, or -1. The sum is one all-reduce of a ``[U, D * 2H + H * D]`` fp32 buffer over the ep
    ``group`` (skipped when U == 0): a few expert-sized tensors, not the whole layer.

    Taking ``x`` too puts this node between the kernel's backward and the row all-to-all of ``x``'s gradient, so every
    rank issues the all-reduce at the same point of the layer's backward, whatever its kernel or its row counts.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, slot_to_shared: torch.Tensor,
                num_shared: int, group: dist.ProcessGroup | None):
        ctx.slot_to_shared, ctx.num_shared, ctx.group = slot_to_shared, num_shared, group
        return x.view_as(x), w13.view_as(w13), w2.view_as(w2)

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor, grad_w13: torch.Tensor, grad_w2: torch.Tensor):
        if ctx.num_shared:
            grad_w13, grad_w2 = _sum_replica_grads(grad_w13, grad_w2, ctx.slot_to_shared, ctx.num_shared, ctx.group)
        return grad_x, grad_w13, grad_w2, None, None, None


def _sum_replica_grads(g13: torch.Tensor, g2: torch.Tensor, slot_to_shared: torch.Tensor, num_shared: int,
                       group: dist.ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
    slots = g13.shape[0]
    flat = torch.cat([g13.reshape(slots, -1), g2.reshape(slots, -1)], dim=1)
    slot_to_shared = slot_to_shared.to(flat.device)
    mine = (slot_to_shared >= 0).nonzero().flatten()
    shared = slot_to_shared.index_select(0, mine)
    buf = torch.zeros(num_shared, flat.shape[1], dtype=torch.float32, device=flat.device)
    buf.index_add_(0, shared, flat.index_select(0, mine).float())
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(buf, group=group)
    flat = flat.index_copy(0, mine, buf.index_select(0, shared).to(flat.dtype))
    n13 = g13[0].numel()
    return flat[:, :n13].reshape(g13.shape), flat[:, n13:].reshape(g2.shape)


# --- moving and converting slot tensors -----------------------------------------------------------------------------
def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (the same on every rank) sharded like ``like``: this rank's piece, no communication."""
    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    return full


@torch.no_grad()
def gather_rows_(t: torch.Tensor, src: torch.Tensor) -> None:
    """In place along dim 0 of the global tensor: ``t[s] = old_t[src[s]]``. src: [R] int64.

    ``t`` may be a plain tensor or a DTensor with any placements (``Shard(0)`` on the ep mesh; FSDP2's
    ``(_StridedShard(0), Shard(0))`` on (expert data-parallel, ep)). A DTensor is gathered whole on every rank
    (an all-gather over its mesh; memory: the full global tensor), permuted, and each rank keeps its piece.
    """
    full = _full(t.detach())
    moved = full.index_select(0, src.to(full.device))
    if isinstance(t, DTensor):
        t.to_local().copy_(shard_like(moved, t).to_local())
    else:
        t.copy_(moved)


@torch.no_grad()
def to_logical(t: torch.Tensor, first_replica: torch.Tensor) -> torch.Tensor:
    """Slot tensor [R, ...] -> expert tensor [E, ...] (each expert's first replica), sharded like ``t``.

    A collective over ``t``'s mesh when ``t`` is a DTensor (the full tensor is gathered on every rank).
    """
    full = _full(t.detach())
    return shard_like(full.index_select(0, first_replica.to(full.device)), t)


@torch.no_grad()
def to_physical(t: torch.Tensor, phy2log: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Expert tensor [E, ...] -> slot tensor [R, ...] sharded like ``like`` (a collective when ``t`` is a DTensor)."""
    full = _full(t.detach())
    if full.device != like.device:
        full = full.to(like.device)
    return shard_like(full.index_select(0, phy2log.to(full.device)).to(like.dtype), like)


# --- optimizer state in the logical layout --------------------------------------------------------------------------
def _slot_tensors(model: nn.Module) -> dict[torch.Tensor, Any]:
    """Every expert-slot parameter of ``model`` whose layer has a non-identity placement -> its layer."""
    from lightning_moe.parallel.expert_parallel import ExpertParallel  # noqa: PLC0415 - it imports this module

    return {getattr(m, name): m for m in model.modules() if isinstance(m, ExpertParallel) and m.replicated
            for name in ("w13", "w2")}


def _keyed_params(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[Any, torch.Tensor]:
    """State-dict key of each parameter (an int, or an FQN in ``torch.distributed.checkpoint`` state dicts)."""
    return {key: p for group, saved in zip(optimizer.param_groups, state_dict["param_groups"])
            for p, key in zip(group["params"], saved["params"])}


def _convert_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any], model: nn.Module,
                             to_slots: bool) -> dict[str, Any]:
    layers = _slot_tensors(model)
    if not layers:
        return state_dict
    state = dict(state_dict["state"])  # the per-parameter dicts may be the optimizer's own: copy, never mutate
    for key, p in _keyed_params(optimizer, state_dict).items():
        layer = layers.get(p)
        if layer is None or key not in state:
            continue
        entry = dict(state[key])
        for name, value in entry.items():
            # per-element state (exp_avg, exp_avg_sq): one row per slot or per expert; scalars (step) stay
            if isinstance(value, torch.Tensor) and value.dim() == p.dim() and value.shape[1:] == p.shape[1:]:
                entry[name] = layer.slots_from_logical(value, like=p) if to_slots else layer.logical_from_slots(value)
        state[key] = entry
    return {**state_dict, "state": state}


def register_optimizer_layout_hooks(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[Any]:
    """Make ``optimizer.state_dict()`` / ``load_state_dict()`` use the logical expert layout for the expert slots of
    ``model`` (per-element state such as AdamW's ``exp_avg``; scalars such as ``step`` are left alone). Both become
    collectives while a layer of ``model`` has a non-identity placement. Returns the hook handles."""
    return [
        optimizer.register_state_dict_post_hook(
            lambda opt, sd: _convert_optimizer_state(opt, sd, model, to_slots=False)),
        optimizer.register_load_state_dict_pre_hook(
            lambda opt, sd: _convert_optimizer_state(opt, sd, model, to_slots=True)),
    ]


def optimizer_states(optimizers: Iterable[torch.optim.Optimizer], param: torch.Tensor) -> list[torch.Tensor]:
    """The per-element state tensors (same shape as ``param``) of ``param`` in ``optimizers``."""
    out = []
    for opt in optimizers:
        for value in opt.state.get(param, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim() > 0:
                out.append(value)
    return out
