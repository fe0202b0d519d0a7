"""Split sizes of the expert-parallel exchange, kept from a checkpointed block's forward for its recomputation.

Activation checkpointing reruns a block's forward in backward, MoE routing included. The rerun routes the same
tokens with the same weights, so each count exchange would return what it returned in the forward: a collective and
a host synchronisation (the row all-to-alls need their split sizes on the host) for nothing. A host synchronisation
in backward drains the GPU queue; under the pipeline overlap it also waits for the other lane's queued kernels.

``checkpoint_contexts`` is a ``context_fn`` for ``torch.utils.checkpoint.checkpoint``: each checkpointed call gets
its own ``SplitRecord``; its forward records the result of every count exchange, its recomputation replays them in
order instead of exchanging. The rows still travel (the recomputation needs the dispatched rows). A recomputation
whose counts differ from the forward's fails (on GPU asynchronously, without a host synchronisation) rather than
exchanging rows with stale split sizes.

The record in use is thread-local: the recomputation runs on the thread of the backward (under the pipeline
overlap, the backward lane), the forward on the caller's.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import torch

__all__ = ["SplitRecord", "checkpoint_contexts", "replay_or_exchange"]

SplitSizes = tuple[torch.Tensor, list[int], list[int]]  # recv_counts, send_splits, recv_splits

_local = threading.local()


class SplitRecord:
    """The count exchanges of one checkpointed call: appended by its forward, replayed by its recomputation."""

    def __init__(self) -> None:
        self.entries: list[tuple[torch.Tensor, SplitSizes]] = []
        self._next = 0

    def record(self, counts: torch.Tensor, sizes: SplitSizes) -> None:
        self.entries.append((counts.detach().clone(), sizes))

    def replay(self, counts: torch.Tensor) -> SplitSizes:
        if self._next >= len(self.entries):
            raise RuntimeError(f"the recomputation of a checkpointed block made more count exchanges than its "
                               f"forward ({len(self.entries)})")
        sent, sizes = self.entries[self._next]
        self._next += 1
        if counts.shape != sent.shape:
            raise RuntimeError(f"recomputed expert counts have shape {tuple(counts.shape)}, the forward's "
                               f"{tuple(sent.shape)}")
        message = "the recomputation of a checkpointed block routed tokens differently from its forward"
        if counts.device.type == "cpu":
            if not torch.equal(counts, sent):
                raise RuntimeError(message)
        else:
            torch._assert_async((counts == sent).all(), message)
        return sizes

    def active(self, replaying: bool) -> _Active:
        """A context in which this thread records into (forward) or replays from (recomputation) this record;
        reusable, since a recomputation can run more than once (a split backward recomputes for its input gradients
        and again for its weight gradients)."""
        return _Active(self, replaying)


class _Active(contextlib.AbstractContextManager):
    def __init__(self, record: SplitRecord, replaying: bool) -> None:
        self.state = (record, replaying)
        self._previous: list[tuple[SplitRecord, bool] | None] = []

    def __enter__(self) -> None:
        self._previous.append(getattr(_local, "state", None))
        _local.state = self.state
        record, replaying = self.state
        if replaying:
            record._next = 0

    def __exit__(self, *exc) -> None:
        _local.state = self._previous.pop()


def checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` of ``torch.utils.checkpoint.checkpoint``: (forward context, recomputation context) sharing a
    fresh ``SplitRecord``."""
    record = SplitRecord()
    return record.active(replaying=False), record.active(replaying=True)


def replay_or_exchange(counts: torch.Tensor, exchange: Callable[[], SplitSizes]) -> SplitSizes:
    """``exchange()``, recorded in the forward of a checkpointed call and replayed in its recomputation (the calls
    of this thread inside ``checkpoint_contexts``); outside them, plainly ``exchange()``."""
    state = getattr(_local, "state", None)
    if state is None:
        return exchange()
    record, replaying = state
    if replaying:
        return record.replay(counts)
    sizes = exchange()
    record.record(counts, sizes)
    return sizes
