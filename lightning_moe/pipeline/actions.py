"""Our implementations of schedule actions, registered on torch's runtime schedules (DualPipeV, zero-bubble V).

``full_backward_in_input_slot`` / ``skip_weight``: run the whole backward of a microbatch where the schedule splits it
into an input-gradient action (I) and a later weight-gradient action (W). torch computes W with ``autograd.grad`` on
``submod.parameters()``, which under FSDP2 are the sharded parameters, not the unsharded ones the graph used, so
the split gives wrong weight gradients with data-parallel sharding (``tests/pipeline`` shows it). The schedule's
order is kept; only the weight-gradient work moves from W to I.

``backward_chunk`` is the runtime's FULL_BACKWARD (receive the output gradient, run backward, hand the input gradient
to this rank's previous stage in a V placement), so overlap code can run it too.
"""

from __future__ import annotations

from torch.distributed.pipelining.schedules import (
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    _Action,
    _PipelineContext,
    _wait_batch_p2p,
)

__all__ = ["backward_chunk", "full_backward_in_input_slot", "register_unsplit_backward", "skip_weight"]


def _stages(schedule) -> dict:
    return {stage.stage_index: stage for stage in schedule._stages}


def backward_chunk(schedule, stage_index: int, mb: int, *, count: bool = True) -> None:
    """The whole backward of microbatch ``mb`` on stage ``stage_index``; ``count``: it is the backward that counts
    toward the stage's last-backward bookkeeping (FULL_BACKWARD and W count, I does not)."""
    stages = _stages(schedule)
    stage = stages[stage_index]
    next_local, prev_local = stage_index + 1 in stages, stage_index - 1 in stages
    if not stage.is_last and not next_local:
        _wait_batch_p2p(schedule.bwd_recv_ops.pop((stage_index, mb)))
    loss = schedule._maybe_get_loss(stage, mb)
    last = False
    if count:
        schedule.backward_counter[stage_index] += 1
        last = schedule.backward_counter[stage_index] == schedule._n_microbatches
    stage.backward_one_chunk(mb, loss=loss, full_backward=True, last_backward=last)
    if prev_local:
        stages[stage_index - 1].set_local_bwd_input(stage.get_local_bwd_output(mb), mb)


def full_backward_in_input_slot(action: _Action, ctx: _PipelineContext) -> None:
    backward_chunk(ctx.schedule_ref, action.stage_index, action.microbatch_index, count=False)


def skip_weight(action: _Action, ctx: _PipelineContext) -> None:
    ctx.schedule_ref.backward_counter[action.stage_index] += 1  # the gradients were computed in the I slot


def register_unsplit_backward(schedule) -> None:
    schedule.register_custom_function(BACKWARD_INPUT, full_backward_in_input_slot)
    schedule.register_custom_function(BACKWARD_WEIGHT, skip_weight)
