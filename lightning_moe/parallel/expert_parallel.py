"""Expert parallelism (EP): each rank of a 1-D ``ep`` device mesh holds ``E / ep`` routed experts.

The model code does no communication: ``MoE.forward`` routes its own tokens over all E experts (the router stays
replicated), sorts the routed rows by global expert id and calls ``experts(x, counts)``. ``ExpertParallel`` is a
drop-in ``RoutedExperts`` that keeps that contract and does the token dispatch/combine around the local kernel:

    1. all-to-all of the per-expert counts: ``counts[E]`` -> ``recv_counts[ep, E/ep]`` (rows each source rank sends
       to each local expert). Every split size below is derived from these exchanged counts.
    2. all-to-all (uneven splits, autograd) of the rows: rank r receives the rows of the experts it owns, which are
       contiguous in ``x`` because ``x`` is sorted by expert. They arrive grouped by (source rank, local expert).
    3. re-sort into expert-major order (local expert, source rank) with one gather, run the kernel on the local
       weights with the local counts, gather back to (source rank, local expert) order.
    4. all-to-all back (uneven splits, autograd): the output has the rows and order of the input.

Parameters: ``ExpertParallel`` subclasses ``RoutedExperts``, so the parameter names are those of the single-process
model (``layers.1.feed_forward.experts.w13``). ``w13 [E, D, 2H]`` and ``w2 [E, H, D]`` are DTensors with placement
``Shard(0)`` on the ep mesh: their global shape is the unsharded one and each rank stores the slice
``[rank * E/ep, (rank + 1) * E/ep)``, so ``torch.distributed.checkpoint`` can reshard them to any ep (or to one
process) and ``DTensor.full_tensor()`` gives the consolidated weights. Their gradients are DTensors with the same
placement and already sum the contributions of the tokens of every rank of the ep group; reducing them over the
remaining data-parallel dimensions (and clipping them, see ECOSYSTEM B.5) is the strategy's job.

Redundant experts (EPLB, ``lightning_moe.parallel.redundant_experts``): with ``num_redundant > 0`` the weights hold
R = E + num_redundant physical expert *slots* (``w13 [R, D, 2H]``, R / ep per rank) and a placement ``phy2log [R]``
says which logical expert each slot holds. The router still routes over the E logical experts; the dispatcher splits
each expert's rows among its replicas and dispatches by slot, and the replicas' weight gradients are summed, so the
layer computes the same function with the same gradients as without replicas. ``apply_placement`` moves weights and
optimizer state to a new placement; state dicts stay in the logical ``[E, ...]`` layout. With ``num_redundant == 0``
and no placement applied, nothing of this runs: the parameters and the forward are those described above.

Shapes: N routed rows of this rank, D hidden size, H expert hidden size, E global (logical) experts, R physical
slots (R = E without redundant experts), L = R / ep local experts (slots).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from lightning_moe.moe.experts import RoutedExperts
from lightning_moe.moe.kernels import loop_experts
from lightning_moe.moe.layer import MoE
from lightning_moe.parallel import redundant_experts as rx
from lightning_moe.parallel.comm import all_to_all_rows, all_to_all_split_sizes

__all__ = ["ExpertParallel", "apply_expert_parallel", "expert_major_order"]


def expert_major_order(recv_counts: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices between the all-to-all layout and the kernel layout of the received rows.

    recv_counts: [ep, L] rows from each source rank for each local expert; the received rows are laid out
    source-major (all rows of source 0, by expert, then source 1, ...). ``num_rows == recv_counts.sum()`` (passed in
    so that nothing here syncs with the device).

    Returns ``(to_expert_major, to_source_major)``, both [num_rows] int64: ``received[to_expert_major]`` is grouped
    by local expert (then source rank, keeping the order of rows within each chunk), and
    ``expert_major[to_source_major]`` restores the received layout. Each is the inverse permutation of the other.
    """
    ep, num_local = recv_counts.shape
    device = recv_counts.device
    by_source = recv_counts.reshape(-1)  # chunk (s, e) at s * L + e
    by_expert = recv_counts.t().reshape(-1)  # chunk (e, s) at e * ep + s
    start_by_source = torch.cumsum(by_source, 0) - by_source
    start_by_expert = torch.cumsum(by_expert, 0) - by_expert
    # The expert-major start of chunk (s, e), indexed like by_source.
    start_by_expert_of_source_chunk = start_by_expert.view(num_local, ep).t().reshape(-1)
    chunks = torch.arange(ep * num_local, device=device)
    rows = torch.arange(num_rows, device=device)
    chunk_of_row = torch.repeat_interleave(chunks, by_source, output_size=num_rows)
    to_expert_major_pos = rows - start_by_source[chunk_of_row] + start_by_expert_of_source_chunk[chunk_of_row]
    # to_expert_major_pos[i] is where received row i goes; invert it to get a gather index.
    to_expert_major = torch.empty_like(to_expert_major_pos)
    to_expert_major[to_expert_major_pos] = rows
    return to_expert_major, to_expert_major_pos


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= size
    return tuple(reversed(stride))


class ExpertParallel(RoutedExperts):
    """``RoutedExperts`` whose experts are spread over a 1-D ``ep`` device mesh; same ``forward(x, counts)`` contract.

    Built from an unsharded ``RoutedExperts`` holding all E experts (the same weights on every rank, as after
    seeding every rank alike): each rank keeps its slice ``[r * E/ep, (r + 1) * E/ep)`` of ``w13``/``w2`` as the
    local shard of a ``Shard(0)`` DTensor. No communication happens here.

    ``num_redundant`` adds that many physical slots (R = E + num_redundant, divisible by ep) holding replicas;
    the initial placement is ``default_placement`` (slot ``s`` holds expert ``s % E``).

    Attributes: ``num_experts`` is the local expert (slot) count L, ``global_num_experts`` is E, ``num_slots`` R,
    ``ep_mesh`` the mesh, ``placement`` the current ``phy2log [R]`` (CPU).
    """

    def __init__(self, experts: RoutedExperts, ep_mesh: DeviceMesh, num_redundant: int = 0) -> None:
        nn.Module.__init__(self)
        if not isinstance(ep_mesh, DeviceMesh) or ep_mesh.ndim != 1:
            raise TypeError(
                f"ExpertParallel needs a 1-D DeviceMesh over the expert-parallel ranks, got {ep_mesh!r} "
                "(wrap a process group with DeviceMesh.from_group(group, device_type))"
            )
        if isinstance(experts.w13, DTensor) or isinstance(experts, ExpertParallel):
            raise ValueError("ExpertParallel expects unsharded RoutedExperts weights (all experts on every rank)")
        num_experts = experts.w13.shape[0]
        ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
        if num_experts % ep:
            raise ValueError(f"model.num_experts={num_experts} must be divisible by the expert-parallel size {ep}")
        if num_redundant < 0 or num_redundant % ep:
            raise ValueError(f"num_redundant={num_redundant} redundant experts must be >= 0 and divisible by the "
                             f"expert-parallel size {ep} (every rank holds the same number of slots)")
        num_slots = num_experts + num_redundant
        self.global_num_experts = num_experts
        self.num_slots = num_slots
        self.num_experts = num_slots // ep
        self.dim, self.hidden_dim = experts.dim, experts.hidden_dim
        self.kernel_name, self.kernel, self.init_std = experts.kernel_name, experts.kernel, experts.init_std
        self.ep_mesh = ep_mesh
        self.ep_size, self.ep_rank = ep, rank
        # Multiplies the local expert weights' gradients. The strategy sets it to 1 / ep: each rank's expert
        # gradient sums the tokens of the whole ep group, and data-parallel averaging must not count them ep times.
        self.weight_grad_scale = 1.0
        first = rank * self.num_experts
        self._set_placement(rx.default_placement(num_experts, num_slots))
        for name in ("w13", "w2"):
            full = getattr(experts, name)
            if num_redundant:
                local = full.detach()[self._phy2log[first:first + self.num_experts].to(full.device)].clone()
                shape = (num_slots, *full.shape[1:])
                stride = _contiguous_stride(shape)
            else:
                local = full.detach()[first:first + self.num_experts].clone()
                shape, stride = full.shape, full.stride()
            sharded = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)
            setattr(self, name, nn.Parameter(sharded, requires_grad=full.requires_grad))
        self.register_state_dict_post_hook(ExpertParallel._logical_state_dict)
        self.register_load_state_dict_pre_hook(ExpertParallel._physical_load_state_dict)

    @property
    def expert_range(self) -> tuple[int, int]:
        """[first, last) global expert ids (physical slots) held by this rank."""
        return self.ep_rank * self.num_experts, (self.ep_rank + 1) * self.num_experts

    def extra_repr(self) -> str:
        first, last = self.expert_range
        slots = f", slots={self.num_slots}" if self.num_slots != self.global_num_experts else ""
        return (f"experts={first}..{last - 1} of {self.global_num_experts}{slots}, ep={self.ep_size}, "
                f"dim={self.dim}, hidden_dim={self.hidden_dim}, kernel={self.kernel_name}")

    # --- placement -----------------------------------------------------------------------------------------------
    @property
    def placement(self) -> torch.Tensor:
        """phy2log [R] (CPU int64): the logical expert held by every physical slot."""
        return self._phy2log.clone()

    @property
    def replica_counts(self) -> torch.Tensor:
        """logcnt [E] (CPU int64): replicas of every logical expert."""
        return self._logcnt.clone()

    @property
    def replicated(self) -> bool:
        """Whether slots differ from logical experts (redundant slots, or a placement other than the identity)."""
        return self._replicated

    def _set_placement(self, phy2log: torch.Tensor) -> None:
        """Only the tables: the weights must already match ``phy2log``. Plain CPU attributes, not buffers, so that
        ``to_empty`` (meta-device init) leaves them intact (built on the CPU even inside a ``torch.device("meta")``
        context); device copies are made on first use."""
        e, r = self.global_num_experts, self.num_slots
        self._phy2log = rx.validate_placement(phy2log, e, r)
        self._log2phy, self._logcnt = rx.placement_tables(self._phy2log, e)
        self._replicated = r != e or not torch.equal(self._phy2log, torch.arange(r, device="cpu"))
        first, last = self.expert_range
        shared = (self._logcnt > 1).nonzero().flatten()
        to_shared = torch.full((e,), -1, dtype=torch.int64, device="cpu")
        to_shared[shared] = torch.arange(shared.numel(), device="cpu")
        self._slot_to_shared = to_shared[self._phy2log[first:last]]  # [L]
        self._num_shared = int(shared.numel())
        self._device_tables: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._device_tables:
            self._device_tables[device] = tuple(t.to(device) for t in (self._log2phy, self._logcnt))
        return self._device_tables[device]

    @torch.no_grad()
    def apply_placement(self, phy2log: Any, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        """Switch to placement ``phy2log [R]``: every slot gets the weights and the optimizer state (per-element
        tensors of ``optimizers``, e.g. AdamW ``exp_avg``/``exp_avg_sq``; ``step`` is per tensor and unchanged) of a
        replica of its new logical expert. The layer computes the same function before and after.

        A collective over the weights' mesh (every rank of the ep group and of FSDP's expert data-parallel mesh must
        call it). Simple rather than lean: each of ``w13``, ``w2`` and their state tensors is all-gathered whole on
        every rank, one at a time, so the peak extra memory is about two copies of one full ``[R, ...]`` tensor of
        this layer (plus the all-gather traffic of 3x the layer's expert weights with AdamW). Call it between
        optimizer steps (gradients are not moved).
        """
        new = rx.validate_placement(phy2log, self.global_num_experts, self.num_slots)
        src = self._log2phy[:, 0][new]  # for each new slot: an old slot that holds its logical expert
        if not torch.equal(src, torch.arange(self.num_slots)):
            optimizers = list(optimizers)
            for name in ("w13", "w2"):
                param = getattr(self, name)
                for t in (param, *rx.optimizer_states(optimizers, param)):
                    rx.gather_rows_(t, src)
        self._set_placement(new)

    def logical_from_slots(self, t: torch.Tensor) -> torch.Tensor:
        """A ``[R, ...]`` slot tensor (a weight, or optimizer state like it) -> ``[E, ...]`` in expert order, sharded
        the same way. A collective (see ``redundant_experts.to_logical``)."""
        if t.shape[0] != self.num_slots:
            raise ValueError(f"expected a tensor with one row per physical slot ({self.num_slots}), got "
                             f"{tuple(t.shape)}")
        return rx.to_logical(t, self._log2phy[:, 0])

    def slots_from_logical(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """An ``[E, ...]`` tensor in expert order -> ``[R, ...]`` slots of the current placement, sharded like
        ``like``. A collective."""
        if t.shape[0] != self.global_num_experts:
            raise ValueError(
                f"expected expert weights in the logical layout, one row per expert ({self.global_num_experts}), got "
                f"{tuple(t.shape)}: checkpoints of layers with redundant experts are saved in the logical layout")
        return rx.to_physical(t, self._phy2log, like)

    def slot_norm_weights(self, like: torch.Tensor) -> torch.Tensor:
        """[R, 1, ...] fp32: 1 / (replicas of each slot's expert), sharded like ``like`` (``w13``, ``w2`` or their
        gradients). ``(grad.float().square() * weights).sum()`` is the squared norm of the logical experts'
        gradient, each expert counted once however many replicas it has: what gradient-norm clipping should use."""
        w = 1.0 / self._logcnt[self._phy2log].to(torch.float32)
        return rx.shard_like(w.view(-1, *([1] * (like.dim() - 1))).to(like.device), like)

    def _logical_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        if self._replicated:
            for name in ("w13", "w2"):
                if prefix + name in state_dict:
                    state_dict[prefix + name] = self.logical_from_slots(state_dict[prefix + name])

    def _physical_load_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        if self._replicated:
            for name in ("w13", "w2"):
                if prefix + name in state_dict:
                    state_dict[prefix + name] = self.slots_from_logical(state_dict[prefix + name],
                                                                        like=getattr(self, name))

    def reset_parameters(self) -> None:
        """Random init (meta-device materialisation); with replicas, each slot then copies its expert's first
        replica (a collective, see ``apply_placement``) so that replicas start identical."""
        super().reset_parameters()
        if self.num_slots != self.global_num_experts:
            with torch.no_grad():
                src = self._log2phy[:, 0][self._phy2log]
                for name in ("w13", "w2"):
                    rx.gather_rows_(getattr(self, name), src)

    # The gate weights stay with the MoE layer's combine: they would have to travel with the dispatched rows.
    takes_row_weights = False

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: [N, D] rows sorted by global expert; counts: [E] int64 rows per global expert -> [N, D], same order."""
        w13, w2 = self.local_weights()
        if self.weight_grad_scale != 1.0 and torch.is_grad_enabled():
            w13, w2 = _ScaleGrad.apply(w13, self.weight_grad_scale), _ScaleGrad.apply(w2, self.weight_grad_scale)
        if self.ep_size == 1 and not self._replicated:
            return self.kernel(x, counts, w13, w2)
        if counts.shape != (self.global_num_experts,):
            raise ValueError(f"counts must have shape [{self.global_num_experts}], got {tuple(counts.shape)}")
        counts = counts.to(device=x.device, dtype=torch.int64).contiguous()
        if not self._replicated:
            return self._dispatch_compute_combine(x, counts, w13, w2)

        # Redundant experts: give every row one replica of its expert, sort the rows by physical slot, and run the
        # same exchange over slots instead of experts; then restore the input order.
        log2phy, logcnt = self._tables(x.device)
        slot = rx.assign_replicas(counts, log2phy, logcnt, self.ep_rank, x.shape[0])
        order = torch.sort(slot, stable=True).indices
        slot_counts = torch.bincount(slot, minlength=self.num_slots)
        y = self._dispatch_compute_combine(x.index_select(0, order), slot_counts, w13, w2, replicated=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return y.index_select(0, inverse)

    def _dispatch_compute_combine(self, x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                                  replicated: bool = False) -> torch.Tensor:
        """x: [N, D] rows sorted by global slot; counts: [R] int64 rows per slot -> [N, D], same order."""
        ep, num_local = self.ep_size, self.num_experts
        group = self.ep_mesh.get_group()

        # 1. Exchange the counts: recv_counts[s, e] = rows source rank s sends to local expert e. The row all-to-all
        # needs both split lists on the host: one copy, which on CUDA waits only for the exchange (not for the other
        # pipeline-overlap lane's queued kernels).
        recv_counts, send_splits, recv_splits = all_to_all_split_sizes(counts, group)
        recv_counts = recv_counts.view(ep, num_local)
        if sum(send_splits) != x.shape[0]:
            raise ValueError(f"counts sum to {sum(send_splits)} but x has {x.shape[0]} rows")
        num_recv = sum(recv_splits)

        # 2. Dispatch: rows of the experts owned by rank r go to rank r.
        received = all_to_all_rows(x, recv_splits, send_splits, group, "dispatch")

        # 3. Expert-major re-sort, local experts, and back to the received layout.
        to_expert_major, to_source_major = expert_major_order(recv_counts, num_recv)
        local_x = received.index_select(0, to_expert_major)
        if replicated:
            # Replicas' weight gradients are summed here in backward (before the gradient rows travel back).
            local_x, w13, w2 = rx.ReplicaGradSum.apply(local_x, w13, w2, self._slot_to_shared, self._num_shared,
                                                       group)
        local_counts = recv_counts.sum(0)
        if num_recv == 0:
            # Nothing to compute, but the local experts must still run (on zero rows): that keeps the row
            # all-to-alls and the weights in the autograd graph, so this rank's backward joins the collectives
            # (ECOSYSTEM B.5) and the weights get (zero) gradients like on every other rank. The loop reference
            # kernel is used because it is safe on empty inputs whatever the configured kernel.
            local_y = loop_experts(local_x, local_counts, w13, w2)
        else:
            local_y = self.kernel(local_x, local_counts, w13, w2)
        back = local_y.index_select(0, to_source_major)

        # 4. Combine: return every row to its source rank, in the original order.
        return all_to_all_rows(back, send_splits, recv_splits, group, "combine")


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh, num_redundant: int = 0) -> None:
    """Shard the routed experts of every ``MoE`` in ``model`` over the 1-D ``ep_mesh``, in place.

    Each ``moe.experts`` becomes an ``ExpertParallel`` holding this rank's slice of the weights as ``Shard(0)``
    DTensors; state-dict keys and global shapes stay those of the unsharded model. Routers, shared experts and
    every other module are untouched (replicated). Every rank must hold the same full weights when this is called.
    ``num_redundant``: extra physical slots per layer for redundant experts (a multiple of the ep size); layers that
    are already ``ExpertParallel`` are left as they are.
    """
    if not isinstance(ep_mesh, DeviceMesh) or ep_mesh.ndim != 1:
        raise TypeError(f"apply_expert_parallel needs a 1-D DeviceMesh (the ep dimension), got {ep_mesh!r}")
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    for moe in moes:
        if moe.num_experts % ep_mesh.size():
            raise ValueError(
                f"model.num_experts={moe.num_experts} must be divisible by the expert-parallel size {ep_mesh.size()}"
            )
    for moe in moes:
        if not isinstance(moe.experts, ExpertParallel):
            moe.experts = ExpertParallel(moe.experts, ep_mesh, num_redundant)
