"""Our implementations of schedule actions, registered on torch's runtime schedules (DualPipeV, zero-bubble V).

``full_backward_in_input_slot`` / ``skip_weight``: run the whole backward of a microbatch where the schedule splits it
into an input-gradient action (I) and a later weight-gradient action (W). torch computes W with ``autograd.grad`` on
``submod.parameters()``, which under FSDP2 are the sharded parameters, not the unsharded ones the graph used, so
the split gives wrong weight gradients with data-parallel sharding (``tests/pipeline`` shows it). The schedule's
order is kept; only the weight-gradient work moves from W to I.

``split_backward_supported``: whether this torch can run W at all for our model. W starts ``autograd.grad`` at the
nodes where a weight joins the activations, after the stage has dropped its outputs. Where such a node is a custom
``autograd.Function`` (the router's 16-bit GEMM, the Triton expert kernel), torch 2.11 keeps only the Python side of
the node alive and fails ("Attribute '_input_metadata' is invalid for this instance of _C._FunctionBase"); torch
2.13 keeps the node. Without it, the runner uses the unsplit backward above.
"""

from __future__ import annotations

import functools

import torch
from torch.autograd.graph import GradientEdge
from torch.distributed.pipelining.schedules import (
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    _Action,
    _PipelineContext,
    _wait_batch_p2p,
)

__all__ = ["full_backward_in_input_slot", "register_unsplit_backward", "skip_weight", "split_backward_supported"]


def full_backward_in_input_slot(action: _Action, ctx: _PipelineContext) -> None:
    """The runtime's I action with a full backward: receive the output gradient, run the whole backward, hand the
    input gradient to this rank's previous stage in a V placement. The last-backward count is left to W."""
    schedule, index, mb = ctx.schedule_ref, action.stage_index, action.microbatch_index
    stages = {stage.stage_index: stage for stage in schedule._stages}
    stage = stages[index]
    if not stage.is_last and index + 1 not in stages:
        _wait_batch_p2p(schedule.bwd_recv_ops.pop((index, mb)))
    stage.backward_one_chunk(mb, loss=schedule._maybe_get_loss(stage, mb), full_backward=True, last_backward=False)
    if index - 1 in stages:
        stages[index - 1].set_local_bwd_input(stage.get_local_bwd_output(mb), mb)


def skip_weight(action: _Action, ctx: _PipelineContext) -> None:
    ctx.schedule_ref.backward_counter[action.stage_index] += 1  # the gradients were computed in the I slot


def register_unsplit_backward(schedule) -> None:
    schedule.register_custom_function(BACKWARD_INPUT, full_backward_in_input_slot)
    schedule.register_custom_function(BACKWARD_WEIGHT, skip_weight)


class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * w

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad


@functools.cache
def split_backward_supported() -> bool:
    """Whether ``autograd.grad`` can start at a custom ``autograd.Function``'s node, as a split backward's W does."""
    x, w = torch.ones(1, requires_grad=True), torch.ones(1, requires_grad=True)
    node = _Scale.apply(x.view_as(x), w).grad_fn  # the output is dropped, as the stage drops its outputs before W
    try:
        torch.autograd.grad([GradientEdge(node, 0)], [w], grad_outputs=[torch.ones(1)])
    except RuntimeError:
        return False
    return True
