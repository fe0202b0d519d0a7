"""Expert-Parallelism Load Balancer (EPLB): redundant-expert placement for MoE layers.

Given the observed load of every logical expert, decide how many physical replicas each expert
gets and on which GPU every replica lives, so that per-GPU load is as even as possible.
Pure torch (CPU) functions; no distributed code.

Shape legend:
    L  layers (each row of ``weight`` is planned independently)
    E  logical experts per layer
    R  physical expert slots per layer (``num_replicas``), R >= E
    G  expert groups (``num_groups``), N nodes, P GPUs
    k  slots per GPU = R // P; GPU ``g`` owns physical slots ``[g * k, (g + 1) * k)``

Policy (``rebalance_experts``):
    * hierarchical, when ``G % N == 0``:
        1. pack whole expert groups onto nodes (G // N groups per node) balancing node load;
        2. inside each node, replicate its experts into R // N slots, repeatedly giving one more
           replica to the expert with the highest load per replica;
        3. pack the node's replicas onto its P // N GPUs, exactly k replicas per GPU;
        2+3 are then refined jointly by moving single replicas between experts and re-packing.
    * global otherwise: the same with a single node and a single group.
Every packing is greedy (heaviest item into the lightest pack with room) followed by
pairwise swaps between the heaviest pack and any other pack.
"""

from __future__ import annotations

import torch

__all__ = ["rebalance_experts", "balanced_packing", "replicate_experts", "gpu_loads"]

_MAX_SWAP_ROUNDS = 256
_MAX_MOVE_ROUNDS = 16
_TOP_K = 6  # replica moves are tried between the _TOP_K heaviest experts of a row
_TOLERANCE = 1e-3  # stop improving a row once its heaviest pack is within this of the mean


def balanced_packing(weight: torch.Tensor, num_packs: int) -> torch.Tensor:
    """Split ``n`` items of each row of ``weight`` [X, n] into ``num_packs`` packs of equal size.

    Returns ``contents`` [X, num_packs, n // num_packs]: item indices held by each pack.
    Greedy longest-processing-time packing with a per-pack capacity, then local swaps between
    the heaviest pack and any other pack while that lowers the heavier of the two.
    """
    num_rows, num_items = weight.shape
    if num_items % num_packs != 0:
        raise ValueError(f"{num_items} items cannot be split evenly into {num_packs} packs")
    cap = num_items // num_packs
    w = weight.to(torch.float64)
    if cap == 1:  # one item per pack: any assignment is equivalent
        return torch.argsort(w, dim=-1, descending=True).view(num_rows, num_packs, 1)
    rows = torch.arange(num_rows)
    contents = torch.empty(num_rows, num_packs, cap, dtype=torch.long)
    order = torch.argsort(w, dim=-1, descending=True, stable=True)
    loads = torch.zeros(num_rows, num_packs, dtype=torch.float64)
    counts = torch.zeros(num_rows, num_packs, dtype=torch.long)
    for j in range(num_items):
        item = order[:, j]
        masked = torch.where(counts < cap, loads, torch.full_like(loads, float("inf")))
        pack = masked.argmin(dim=-1)
        slot = counts[rows, pack]
        contents[rows, pack, slot] = item
        loads[rows, pack] += w[rows, item]
        counts[rows, pack] += 1
    _refine_by_swaps(w, contents)
    return contents


def _refine_by_swaps(w: torch.Tensor, contents: torch.Tensor) -> None:
    """In place: swap one item of the heaviest pack with one of another pack (the swap that
    minimises the heavier of the two) until no swap makes the heaviest pack lighter."""
    num_rows, num_packs, cap = contents.shape
    rows = torch.arange(num_rows)
    active = torch.ones(num_rows, dtype=torch.bool)
    for _ in range(_MAX_SWAP_ROUNDS):
        idx = rows[active]
        if idx.numel() == 0:
            break
        items_w = w[idx].gather(-1, contents[idx].view(len(idx), -1)).view(len(idx), num_packs, cap)
        loads = items_w.sum(-1)  # [X', P]
        heavy = loads.argmax(-1)  # [X']
        heavy_load = loads.gather(-1, heavy[:, None])  # [X', 1]
        heavy_w = items_w[torch.arange(len(idx)), heavy]  # [X', k]
        # delta[x, p, a, b]: weight moved out of the heavy pack when heavy item a <-> pack-p item b
        delta = heavy_w[:, None, :, None] - items_w[:, :, None, :]
        new_max = torch.maximum(heavy_load[:, :, None, None] - delta, loads[:, :, None, None] + delta)
        invalid = (delta <= 0) | (torch.arange(num_packs)[None, :] == heavy[:, None])[:, :, None, None]
        new_max = new_max.masked_fill(invalid, float("inf")).view(len(idx), -1)
        best, flat = new_max.min(-1)
        improved = best < heavy_load[:, 0] * (1 - 1e-12) - 1e-12
        active[idx[~improved]] = False
        if not improved.any():
            break
        r, flat, h = idx[improved], flat[improved], heavy[improved]
        p, a, b = flat // (cap * cap), (flat // cap) % cap, flat % cap
        contents[r, h, a], contents[r, p, b] = contents[r, p, b].clone(), contents[r, h, a].clone()


def replicate_experts(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replicate the ``m`` experts of each row of ``weight`` [X, m] into ``num_phy`` slots.

    Every expert gets one slot; each extra slot goes to the expert whose load per replica is
    currently highest (minimises the maximum per-replica load).
    Returns ``phy2log`` [X, num_phy] and ``logcnt`` [X, m].
    """
    num_rows, num_log = weight.shape
    w = weight.to(torch.float64)
    rows, logcnt = torch.arange(num_rows), torch.ones(num_rows, num_log, dtype=torch.long)
    phy2log = torch.arange(num_phy).remainder(num_log).repeat(num_rows, 1)
    for i in range(num_log, num_phy):
        phy2log[:, i] = expert = (w / logcnt).argmax(dim=-1)
        logcnt[rows, expert] += 1
    return phy2log, logcnt


def _place(w: torch.Tensor, num_phy: int, num_packs: int) -> torch.Tensor:
    """Replicate the experts of each row of ``w`` [X, m] and pack the replicas onto ``num_packs``
    packs; returns the logical expert of every slot [X, num_phy], pack by pack.

    Starts from ``replicate_experts``, then hill-climbs on the replica counts: each round tries
    moving one replica between any two of the ``_TOP_K`` heaviest experts, and from the expert
    that spares one most cheaply to the largest replica on the heaviest pack; the move whose
    re-packing gives the lightest heaviest pack is kept if it beats the current plan.
    """
    num_rows, num_log = w.shape
    k, top_k = num_phy // num_packs, min(_TOP_K, num_log)

    def plan(wr: torch.Tensor, cnt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ends = cnt.cumsum(-1)
        p2l = torch.searchsorted(ends, torch.arange(num_phy).expand(len(cnt), -1).contiguous(), right=True)
        rep = wr.gather(-1, p2l) / cnt.gather(-1, p2l)
        flat = balanced_packing(rep, num_packs).view(len(cnt), -1)
        return p2l.gather(-1, flat), rep.gather(-1, flat).view(len(cnt), num_packs, k).sum(-1).max(-1).values

    _, logcnt = replicate_experts(w, num_phy)
    slot2log, peak = plan(w, logcnt)
    target = w.sum(-1) / num_packs * (1 + _TOLERANCE)  # close enough to perfect: stop searching
    active = (peak > target) & (num_phy > num_log and num_packs > 1)
    pairs = torch.tensor([(a, b) for a in range(top_k) for b in range(top_k) if a != b], dtype=torch.long)
    for _ in range(_MAX_MOVE_ROUNDS):
        idx = torch.arange(num_rows)[active]
        if idx.numel() == 0:
            break
        wi, cnt, ar = w[idx], logcnt[idx], torch.arange(len(idx))
        top = wi.argsort(-1, descending=True)[:, :top_k]
        # extra move: the biggest replica on the heaviest pack gets one from the cheapest spare
        s2l = slot2log[idx].view(len(idx), num_packs, k)
        loads = wi.gather(-1, s2l.flatten(1)).view_as(s2l) / cnt.gather(-1, s2l.flatten(1)).view_as(s2l)
        heavy = loads.sum(-1).argmax(-1)
        big = s2l[ar, heavy].gather(-1, loads[ar, heavy].argmax(-1, keepdim=True))
        spare = (wi / (cnt - 1).clamp(min=1)).masked_fill(cnt <= 1, float("inf")).scatter(-1, big, float("inf"))
        givers = torch.cat([top[:, pairs[:, 0]], spare.argmin(-1, keepdim=True)], -1)  # [X', C]
        takers = torch.cat([top[:, pairs[:, 1]], big], -1)
        num_cand, one_hot = givers.shape[1], torch.nn.functional.one_hot
        cand = cnt[:, None, :] + one_hot(takers, num_log) - one_hot(givers, num_log)  # [X', C, m]
        ok = (cand.min(-1).values >= 1) & (givers != takers)
        cand = torch.where(ok[..., None], cand, cnt[:, None, :]).view(-1, num_log)
        cand_slots, cand_peak = plan(wi.repeat_interleave(num_cand, 0), cand)
        cand_peak = cand_peak.view(len(idx), num_cand).masked_fill(~ok, float("inf"))
        best_peak, best = cand_peak.min(-1)
        better = best_peak < peak[idx] * (1 - 1e-9)
        pick = (ar * num_cand + best)[better]
        rows = idx[better]
        logcnt[rows], slot2log[rows], peak[rows] = cand[pick], cand_slots[pick], best_peak[better]
        active[idx] = better & (peak[idx] > target[idx])
    return slot2log


def _validate(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a 2-D tensor [layers, experts]")
    if weight.numel() == 0 or weight.is_complex() or weight.dtype == torch.bool:
        raise ValueError(f"weight must be non-empty and real-valued, got {tuple(weight.shape)} {weight.dtype}")
    if not torch.isfinite(weight.double()).all() or (weight < 0).any():
        raise ValueError("weight must be finite and non-negative")
    named = {"num_replicas": num_replicas, "num_groups": num_groups, "num_nodes": num_nodes, "num_gpus": num_gpus}
    for name, value in named.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    num_experts = weight.shape[1]
    if num_replicas < num_experts:
        raise ValueError(f"num_replicas ({num_replicas}) must be >= number of experts ({num_experts})")
    for num, num_name, den, den_name in (
        (num_replicas, "num_replicas", num_gpus, "num_gpus"),
        (num_gpus, "num_gpus", num_nodes, "num_nodes"),
        (num_experts, "number of experts", num_groups, "num_groups"),
    ):
        if num % den != 0:
            raise ValueError(f"{num_name} ({num}) must be divisible by {den_name} ({den})")


def _hierarchical(weight: torch.Tensor, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int) -> torch.Tensor:
    """Three-level plan; returns ``phy2log`` [L, R]."""
    (num_layers, num_log), group_size = weight.shape, weight.shape[1] // num_groups
    log_per_node, phy_per_node, gpus_per_node = num_log // num_nodes, num_phy // num_nodes, num_gpus // num_nodes

    # 1. groups -> nodes. "mlog" (node-major logical) order: node n's experts are contiguous.
    group_load = weight.view(num_layers, num_groups, group_size).sum(-1)
    node_groups = balanced_packing(group_load, num_nodes)  # [L, N, G // N]
    mlog2log = node_groups.reshape(num_layers, num_groups, 1) * group_size + torch.arange(group_size)
    mlog2log = mlog2log.view(num_layers, num_log)

    # 2 + 3. replicate inside each node and pack onto its GPUs: rows are (layer, node) pairs.
    mlog_load = weight.gather(-1, mlog2log).view(num_layers * num_nodes, log_per_node)
    pphy2mlog = _place(mlog_load, phy_per_node, gpus_per_node)
    node_offset = (torch.arange(num_nodes) * log_per_node).repeat(num_layers)[:, None]
    pphy2mlog = (pphy2mlog + node_offset).view(num_layers, num_phy)
    return mlog2log.gather(-1, pphy2mlog)


def rebalance_experts(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan redundant expert placement.

    Args:
        weight: [L, E] load of every logical expert (float or int, non-negative).
        num_replicas: R physical slots per layer (multiple of ``num_gpus``, >= E).
        num_groups: G expert groups (E % G == 0); a group is kept on one node when G % N == 0.
        num_nodes: N nodes (``num_gpus % num_nodes == 0``).
        num_gpus: P GPUs; GPU ``g`` owns slots ``[g * R // P, (g + 1) * R // P)``.

    Returns:
        phy2log [L, R]: logical expert of each physical slot.
        log2phy [L, E, max_replicas]: physical slots of each logical expert, padded with -1.
        logcnt [L, E]: number of replicas of each logical expert.
    """
    _validate(weight, num_replicas, num_groups, num_nodes, num_gpus)
    w = weight.detach().to("cpu", torch.float64)
    num_layers, num_log = w.shape
    groups, nodes = (num_groups, num_nodes) if num_groups % num_nodes == 0 else (1, 1)  # else global
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny ops: intra-op threads only add sync cost (huge on busy hosts)
    try:
        phy2log = _hierarchical(w, num_replicas, groups, nodes, num_gpus)
    finally:
        torch.set_num_threads(threads)

    logcnt = torch.zeros(num_layers, num_log, dtype=torch.long)
    logcnt.scatter_add_(-1, phy2log, torch.ones_like(phy2log))
    max_rep = int(logcnt.max())
    # Stable grouping of slots by logical expert; rank = position within the expert's run.
    order = torch.argsort(phy2log * num_replicas + torch.arange(num_replicas), dim=-1)
    sorted_log = phy2log.gather(-1, order)
    starts = torch.cumsum(logcnt, dim=-1) - logcnt
    rank = torch.arange(num_replicas) - starts.gather(-1, sorted_log)
    log2phy = torch.full((num_layers, num_log * max_rep), -1, dtype=torch.long)
    log2phy.scatter_(-1, sorted_log * max_rep + rank, order)
    return phy2log, log2phy.view(num_layers, num_log, max_rep), logcnt


def gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Per-GPU load [L, P], assuming each expert's load splits evenly among its replicas."""
    w, phy2log, logcnt = weight.detach().to("cpu", torch.float64), phy2log.cpu(), logcnt.cpu()
    if phy2log.shape[1] % num_gpus != 0:
        raise ValueError(f"{phy2log.shape[1]} slots cannot be split evenly over {num_gpus} GPUs")
    per_slot = w.gather(-1, phy2log) / logcnt.gather(-1, phy2log).to(torch.float64)
    return per_slot.view(phy2log.shape[0], num_gpus, -1).sum(-1)
