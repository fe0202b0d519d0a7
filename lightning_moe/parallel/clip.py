"""Gradient-norm clipping for parameters that live on different device meshes.

``torch.nn.utils.clip_grad_norm_`` needs every gradient on one mesh; with expert parallelism the dense weights are
DTensors on the data-parallel mesh and the experts on the (data-parallel x ep) mesh. Here the squared norm of each
mesh group is computed with DTensor ops (which reduce over the shards), the groups are summed, optionally over extra
process groups (pipeline stages hold disjoint parameters), and every gradient is scaled by one common factor.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.nn.Parameter], max_norm: float,
                    extra_groups: Iterable[dist.ProcessGroup] = (),
                    weights: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Clip the global 2-norm of all gradients to ``max_norm``; returns the norm before clipping (a plain tensor).

    extra_groups: process groups over which the (already mesh-complete) squared norms are summed, e.g. the pipeline
    group, whose ranks hold different parameters.
    weights: ``id(param) -> w`` (broadcastable to, and sharded like, its gradient): that gradient's squared entries
    count with weight ``w`` (redundant expert replicas count 1 / replicas each, so each expert counts once).
    """
    weights = weights or {}
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    total_sq = None
    for p in params:
        g = p.grad
        if id(p) in weights:
            sq = (g.float().square() * weights[id(p)]).sum()
            sq = sq.full_tensor() if isinstance(sq, DTensor) else sq
            total_sq = sq if total_sq is None else total_sq + sq.to(total_sq.device)
            continue
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
        groups[key].append(g)
    for members in groups.values():
        norms = torch._foreach_norm(members, 2.0)
        sq = torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms]).float().square().sum()
        total_sq = sq if total_sq is None else total_sq + sq.to(total_sq.device)
    for group in extra_groups:
        dist.all_reduce(total_sq, group=group)
    total = total_sq.sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for members in groups.values():
        torch._foreach_mul_(members, scale.to(members[0].device))
    for p in params:
        if id(p) in weights:
            p.grad.mul_(scale.to(p.grad.device))
    return total
