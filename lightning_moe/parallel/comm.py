"""The expert-parallel collectives, in one place: the count exchange and the row all-to-all (with autograd).

Each collective is issued asynchronously and then waited on. Between the two it calls ``comm_hook`` when one is
installed: the pipeline's forward/backward overlap (``lightning_moe.pipeline.overlap``) uses that moment to let
another microbatch compute while the tokens are in flight. Without a hook the collectives behave like blocking ones.

Shapes: N rows sent, M rows received, D hidden size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from lightning_moe.parallel.recompute import replay_or_exchange

__all__ = ["all_to_all_counts", "all_to_all_rows", "all_to_all_split_sizes", "exchange_split_sizes", "set_comm_hook"]

_comm_hook: Callable[[str], None] | None = None


def set_comm_hook(hook: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """Install ``hook(name)``, called after every EP collective is issued and before it is waited on; returns the
    previous hook. ``name`` is "counts", "dispatch"/"combine" (forward) or "dispatch_grad"/"combine_grad" (backward).
    """
    global _comm_hook
    previous, _comm_hook = _comm_hook, hook
    return previous


def _issue_and_wait(work: dist.Work | None, name: str) -> None:
    try:
        if _comm_hook is not None:
            _comm_hook(name)
    finally:
        # Also when the hook raises (the overlap aborting this lane): never leave an issued collective unwaited.
        if work is not None:
            work.wait()


def all_to_all_counts(counts: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """counts: [E] int64 rows this rank sends to each global expert -> [E]: rows each source rank sends to this
    rank's experts, laid out ``[ep, E / ep]`` (source rank, local expert)."""
    out = torch.empty_like(counts)
    work = dist.all_to_all_single(out, counts, group=group, async_op=True)
    _issue_and_wait(work, "counts")
    return out


def all_to_all_split_sizes(counts: torch.Tensor, group: dist.ProcessGroup) -> tuple[torch.Tensor, list[int],
                                                                                        list[int]]:
    """The count exchange and the host split sizes of the row all-to-alls (``exchange_split_sizes``); in the
    recomputation of a checkpointed block, the forward's result instead (``lightning_moe.parallel.recompute``)."""
    return replay_or_exchange(counts, lambda: exchange_split_sizes(counts, group))


def exchange_split_sizes(counts: torch.Tensor, group: dist.ProcessGroup) -> tuple[torch.Tensor, list[int],
                                                                                   list[int]]:
    """The count exchange and the host split sizes of the row all-to-alls, with a host synchronisation that waits
    only for this rank's own queued work (so that the pipeline overlap keeps the other lane's kernels queued).

    counts: [E] int64 rows this rank sends to each global expert -> ``(recv_counts, send_splits, recv_splits)``:
    ``recv_counts`` [E] as ``all_to_all_counts`` returns it (laid out ``[ep, E / ep]``), ``send_splits[r]`` rows for
    rank r, ``recv_splits[r]`` rows from rank r.

    Same result as ``all_to_all_counts`` followed by ``.tolist()`` of the per-rank sums. On CUDA it differs in when
    the hook runs: the current stream is made to wait for the exchange, the sums are copied to pinned host memory
    asynchronously, and only then is the hook called and the copy waited on. A plain ``.tolist()`` after the hook
    would wait for every kernel the other lane queued meanwhile, drain the GPU queue and expose the next collective.
    Pass a process group of its own (same ranks) to keep the tiny exchange from queueing behind the other lane's
    token all-to-all on the shared NCCL stream. (The CUDA path is tested on one GPU, an NCCL group of one rank, in
    tests/parallel/test_comm_gpu.py, where send and receive splits coincide; the split sums, shared with the CPU path,
    are tested with uneven splits on CPU; on two GPUs it runs in the ep=2 training test of tests/test_gpu_training.py
    and in benchmarks/pipeline_overlap.py.)
    """
    ep = dist.get_world_size(group)
    recv_counts = torch.empty_like(counts)
    work = dist.all_to_all_single(recv_counts, counts, group=group, async_op=True)
    # [2, ep]: rows sent to each rank, rows received from each rank (the same on every device type)
    def split_sums() -> torch.Tensor:
        return torch.stack([counts.view(ep, -1).sum(1), recv_counts.view(ep, -1).sum(1)])

    if counts.device.type != "cuda":
        _issue_and_wait(work, "counts")
        send_splits, recv_splits = split_sums().tolist()
        return recv_counts, send_splits, recv_splits
    work.wait()  # NCCL: the current stream waits; the host does not
    sums = split_sums()
    host = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
    host.copy_(sums, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    if _comm_hook is not None:
        _comm_hook("counts")
    copied.synchronize()
    send_splits, recv_splits = host.tolist()
    return recv_counts, send_splits, recv_splits


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup,
                name: str) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    work = dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group, async_op=True)
    _issue_and_wait(work, name)
    return out


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup,
                name: str) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.name = out_splits, in_splits, group, name
        return _all_to_all(x, out_splits, in_splits, group, name)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # The gradient travels back along the same routes: received rows' gradients return to their senders.
        return _all_to_all(grad, ctx.in_splits, ctx.out_splits, ctx.group, f"{ctx.name}_grad"), None, None, None, None


def all_to_all_rows(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup,
                    name: str = "dispatch") -> torch.Tensor:
    """Uneven all-to-all of rows with autograd. x: [N, D] with ``sum(in_splits) == N`` (rows for each rank, in rank
    order) -> [M, D] with ``M == sum(out_splits)`` (rows from each rank, in rank order)."""
    return _AllToAllRows.apply(x, out_splits, in_splits, group, name)
