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

Shapes: N routed rows of this rank, D hidden size, H expert hidden size, E global experts, L = E / ep local experts.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from lightning_moe.moe.experts import RoutedExperts
from lightning_moe.moe.kernels import loop_experts
from lightning_moe.moe.layer import MoE
from lightning_moe.parallel.comm import all_to_all_counts, all_to_all_rows

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


class ExpertParallel(RoutedExperts):
    """``RoutedExperts`` whose experts are spread over a 1-D ``ep`` device mesh; same ``forward(x, counts)`` contract.

    Built from an unsharded ``RoutedExperts`` holding all E experts (the same weights on every rank, as after
    seeding every rank alike): each rank keeps its slice ``[r * E/ep, (r + 1) * E/ep)`` of ``w13``/``w2`` as the
    local shard of a ``Shard(0)`` DTensor. No communication happens here.

    Attributes: ``num_experts`` is the local expert count L, ``global_num_experts`` is E, ``ep_mesh`` the mesh.
    """

    def __init__(self, experts: RoutedExperts, ep_mesh: DeviceMesh) -> None:
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
        self.global_num_experts = num_experts
        self.num_experts = num_experts // ep
        self.dim, self.hidden_dim = experts.dim, experts.hidden_dim
        self.kernel_name, self.kernel, self.init_std = experts.kernel_name, experts.kernel, experts.init_std
        self.ep_mesh = ep_mesh
        self.ep_size, self.ep_rank = ep, rank
        # Multiplies the local expert weights' gradients. The strategy sets it to 1 / ep: each rank's expert
        # gradient sums the tokens of the whole ep group, and data-parallel averaging must not count them ep times.
        self.weight_grad_scale = 1.0
        first = rank * self.num_experts
        for name in ("w13", "w2"):
            full = getattr(experts, name)
            local = full.detach()[first:first + self.num_experts].clone()
            sharded = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False,
                                         shape=full.shape, stride=full.stride())
            setattr(self, name, nn.Parameter(sharded, requires_grad=full.requires_grad))

    @property
    def expert_range(self) -> tuple[int, int]:
        """[first, last) global expert ids held by this rank."""
        return self.ep_rank * self.num_experts, (self.ep_rank + 1) * self.num_experts

    def extra_repr(self) -> str:
        first, last = self.expert_range
        return (f"experts={first}..{last - 1} of {self.global_num_experts}, ep={self.ep_size}, dim={self.dim}, "
                f"hidden_dim={self.hidden_dim}, kernel={self.kernel_name}")

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: [N, D] rows sorted by global expert; counts: [E] int64 rows per global expert -> [N, D], same order."""
        w13, w2 = self.local_weights()
        if self.weight_grad_scale != 1.0 and torch.is_grad_enabled():
            w13, w2 = _ScaleGrad.apply(w13, self.weight_grad_scale), _ScaleGrad.apply(w2, self.weight_grad_scale)
        if self.ep_size == 1:
            return self.kernel(x, counts, w13, w2)
        ep, num_local = self.ep_size, self.num_experts
        if counts.shape != (self.global_num_experts,):
            raise ValueError(f"counts must have shape [{self.global_num_experts}], got {tuple(counts.shape)}")
        group = self.ep_mesh.get_group()
        counts = counts.to(device=x.device, dtype=torch.int64).contiguous()

        # 1. Exchange the counts: recv_counts[s, e] = rows source rank s sends to local expert e.
        recv_counts = all_to_all_counts(counts, group).view(ep, num_local)
        # One host sync for both split lists (the row all-to-all needs them on the host anyway).
        send_splits, recv_splits = torch.stack([counts.view(ep, num_local).sum(1), recv_counts.sum(1)]).tolist()
        if sum(send_splits) != x.shape[0]:
            raise ValueError(f"counts sum to {sum(send_splits)} but x has {x.shape[0]} rows")
        num_recv = sum(recv_splits)

        # 2. Dispatch: rows of the experts owned by rank r go to rank r.
        received = all_to_all_rows(x, recv_splits, send_splits, group, "dispatch")

        # 3. Expert-major re-sort, local experts, and back to the received layout.
        to_expert_major, to_source_major = expert_major_order(recv_counts, num_recv)
        local_x = received.index_select(0, to_expert_major)
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


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard the routed experts of every ``MoE`` in ``model`` over the 1-D ``ep_mesh``, in place.

    Each ``moe.experts`` becomes an ``ExpertParallel`` holding this rank's slice of the weights as ``Shard(0)``
    DTensors; state-dict keys and global shapes stay those of the unsharded model. Routers, shared experts and
    every other module are untouched (replicated). Every rank must hold the same full weights when this is called.
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
            moe.experts = ExpertParallel(moe.experts, ep_mesh)
