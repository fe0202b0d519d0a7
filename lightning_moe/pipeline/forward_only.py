"""A forward-only schedule for any stage placement (validation under every training schedule).

torch's runtime schedules (DualPipeV, zero-bubble V, interleaved 1F1B) keep their backward actions in ``eval()``, so
validation runs its own schedule: every rank runs all microbatches of its stages in stage order. Sends are
asynchronous, so no rank waits on one that waits on it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.distributed.pipelining.schedules import (
    _Action,
    _add_send_recv,
    _add_unshard_reshard,
    _ComputationType,
    _PipelineScheduleRuntime,
)
from torch.distributed.pipelining.stage import PipelineStage

__all__ = ["ForwardOnlySchedule"]


class ForwardOnlySchedule(_PipelineScheduleRuntime):
    """``stages_of_rank(r)`` gives the stage indices of pipeline rank r (the training placement)."""

    def __init__(self, stages: list[PipelineStage], n_microbatches: int, loss_fn: Callable,
                 stages_of_rank: Callable[[int], list[int]]) -> None:
        super().__init__(stages=stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
        ranks = range(self.pp_group_size)
        self.pipeline_order = {r: [_Action(s, _ComputationType.FORWARD, mb) for s in stages_of_rank(r)
                                   for mb in range(n_microbatches)] for r in ranks}
        # The lowering of _prepare_schedule_with_comms without its validation, which expects a backward per forward.
        self.stage_index_to_group_rank = {s: r for r in ranks for s in stages_of_rank(r)}
        for stage in self._stages:
            stage.stage_index_to_group_rank = self.stage_index_to_group_rank
        order = {r: _add_unshard_reshard(self.pipeline_order[r]) for r in ranks}
        self.pipeline_order_with_comms = _add_send_recv(order, stage_to_rank=self.stage_index_to_group_rank.__getitem__,
                                                        num_stages=self._num_stages)
