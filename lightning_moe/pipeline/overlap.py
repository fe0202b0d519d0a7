"""Forward/backward overlap for DualPipe-style pipeline schedules: the MoE all-to-alls of one microbatch's forward
run while another microbatch's backward computes, and the other way round.

The runner (``run_overlapped``)
    The forward and the backward run as two *lanes*: the forward on the calling thread, the backward on a helper
    thread. Only one lane runs at a time; the right to run is a baton. A lane keeps the baton until it reaches a
    communication point: every EP collective in ``lightning_moe.parallel.comm`` is issued asynchronously, then
    ``comm_hook(name)`` is called, then the collective is waited on. At the hook the lane hands the baton to the other
    lane and sleeps until it comes back, so the other lane computes (on GPU: enqueues its kernels) while the
    collective is in flight. When one lane finishes, the other runs to the end alone.

    Every rank of an EP group must issue its collectives in the same order. The interleaving here depends only on
    the sequence of communication points in each lane (the model's structure), never on timing: the lanes strictly
    alternate, one segment between communication points at a time, starting with the forward. Both lanes may have
    any number of communication points; activation checkpointing adds the recomputed forward's collectives
    (dispatch, combine; the counts are the forward's, see ``parallel.recompute``) to the backward lane, and the
    alternation absorbs them. (A scheme that pairs fixed sync points of the forward with fixed sync points of the
    backward breaks there.)

    Which lane a hook call belongs to: the forward lane is the calling thread; a call from any other thread is the
    backward lane. On CPU the autograd engine runs the backward on the thread that called it (the helper); on CUDA
    it runs it on its own device thread, so no thread-local marker would work.

The pipeline action (``overlap_f_b``)
    ``ScheduleDualPipeV`` emits ``OVERLAP_F_B`` actions whose sub-actions are the FORWARD of one stage and the
    FULL_BACKWARD of the other stage on this rank, on different microbatches. ``overlap_f_b`` does what the runtime's
    own ``_perform_action`` does for the two, in three phases:

    1. prologue, on the calling thread: wait for the received activations / gradients, read the loss of the
       backward's microbatch, count the backward (``backward_counter``, which decides ``last_backward``);
    2. the two chunks, overlapped: ``forward_one_chunk`` + the loss (forward lane), ``backward_one_chunk`` (backward
       lane). They touch disjoint state: different stage objects and microbatches, the loss list is only appended
       to by the forward and was read before;
    3. epilogue, after both lanes: the V-schedule handoffs to the neighbouring stage on this rank, forward first,
       as the runtime orders them (they write into the neighbour stage, which one of the lanes may be using).

    ``enable_overlap(schedule)`` registers it on a ``_PipelineScheduleRuntime`` (``ScheduleDualPipeV``).

Errors
    An exception in one lane makes the other lane stop at its next communication point (``OverlapAborted``), after
    its collective in flight has completed (``comm`` waits for it on the way out), and the caller gets the first
    exception. An error that is the same on every rank (a shape bug) therefore stops all ranks at the same point,
    with no collective left half-issued. An error on one rank only leaves its peers waiting in a collective, as
    without overlap; the process group's timeout ends that.

Thread-local state
    The forward runs on the caller's thread and keeps all of its thread-local state (grad mode, autocast, saved-tensor
    hooks, torch function modes, the CUDA stream). The backward helper thread gets the caller's grad mode, intra-op
    thread count (OpenMP's is per thread), CUDA device and current CUDA stream; not autocast, which should not be
    active in backward anyway (a checkpointed block's recomputation restores its own autocast state), and not torch
    function / dispatch modes.

RNG
    The global RNG (CPU and the current CUDA device) is swapped at each handoff, so each lane draws from its own
    stream as if it ran alone. That keeps a checkpointed block's recomputation equal to its forward even with
    dropout: checkpointing restores the RNG state before recomputing, and without the swap the other lane would draw
    numbers in the middle of it. After the run the global RNG is the forward lane's. ``preserve_rng=False`` skips
    the swap (a few microseconds per handoff).

GPU notes
    Both lanes use the same (current) stream; NCCL runs the collectives on its own stream and ``work.wait()`` only
    makes the current stream wait, so the host does not block at a communication point and the other lane's kernels
    get enqueued between the issue of a collective and the stream wait on it: the collective overlaps them. Two
    things defeat this: (1) a host synchronisation, e.g. the ``.tolist()`` of the split sizes in ``ExpertParallel``
    right after the count exchange, stalls the host until the GPU has drained everything queued, including the other
    lane's kernels, so the host cannot run ahead and the next collective is exposed; (2) collectives of one process
    group run in issue order on one NCCL stream, so the tiny count exchange of one lane queues behind the token
    all-to-all of the other lane, and the host sync waits for both. See ``docs/pipeline_overlap.md``.

Shapes: none here; the lanes are opaque callables.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.pipelining.schedules import (
    FORWARD,
    FULL_BACKWARD,
    OVERLAP_F_B,
    _Action,
    _PipelineContext,
    _PipelineScheduleRuntime,
    _wait_batch_p2p,
)

from lightning_moe.parallel import comm

__all__ = [
    "BACKWARD_LANE",
    "FORWARD_LANE",
    "OverlapAborted",
    "disable_overlap",
    "enable_overlap",
    "overlap_f_b",
    "run_overlapped",
]

FORWARD_LANE = "F"
BACKWARD_LANE = "B"
_LANES = (FORWARD_LANE, BACKWARD_LANE)


class OverlapAborted(RuntimeError):
    """Raised in one lane at its next communication point after the other lane failed."""


class _Baton:
    """Which lane may run; lane 0 is the forward, lane 1 the backward. The forward starts."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._holder = 0
        self._done = [False, False]
        self._aborted = False
        self.first_failed: int | None = None

    def _wait_for(self, lane: int) -> None:
        while self._holder != lane and not self._aborted:
            self._cond.wait()
        if self._aborted:
            raise OverlapAborted(f"the {_LANES[1 - lane]} lane failed")

    def wait_turn(self, lane: int) -> None:
        """Block until ``lane`` holds the baton (a lane's start)."""
        with self._cond:
            self._wait_for(lane)

    def alone(self, lane: int) -> bool:
        """Whether the other lane has finished (``lane`` then runs on without handoffs)."""
        with self._cond:
            return self._done[1 - lane]

    def switch(self, lane: int) -> None:
        """Hand the baton to the other lane (unless it has finished) and block until it comes back."""
        with self._cond:
            if self._holder != lane:
                raise RuntimeError(
                    f"a communication point was reached in the {_LANES[lane]} lane while the {_LANES[self._holder]} "
                    "lane holds the baton; is the same collective code running on a third thread?"
                )
            if self._done[1 - lane]:
                return
            self._holder = 1 - lane
            self._cond.notify_all()
            self._wait_for(lane)

    def finish(self, lane: int, failed: bool) -> None:
        with self._cond:
            self._done[lane] = True
            if failed and not self._aborted:
                self._aborted = True
                self.first_failed = lane
            self._holder = 1 - lane
            self._cond.notify_all()


def _rng_state() -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


@dataclass(frozen=True)
class _ThreadState:
    """The caller's thread-local settings that the backward helper thread needs."""

    grad_enabled: bool
    num_threads: int
    cuda_stream: Any  # torch.cuda.Stream | None

    @classmethod
    def capture(cls) -> _ThreadState:
        stream = torch.cuda.current_stream() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(torch.is_grad_enabled(), torch.get_num_threads(), stream)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        # OpenMP's thread count is per thread: a new thread would use every core (measured: CPU ops 10-100x slower
        # on a loaded 2-core machine), whatever torch.get_num_threads() says.
        torch.set_num_threads(self.num_threads)
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.set_grad_enabled(self.grad_enabled))
            if self.cuda_stream is not None:
                stack.enter_context(torch.cuda.device(self.cuda_stream.device))
                stack.enter_context(torch.cuda.stream(self.cuda_stream))
            yield


_active = threading.Lock()  # one overlapped run at a time per process: the comm hook is process-global


def run_overlapped(forward_fn: Callable[[], Any], backward_fn: Callable[[], Any], *,
                   trace: list[tuple[str, str]] | None = None, preserve_rng: bool = True) -> tuple[Any, Any]:
    """Run ``forward_fn()`` and ``backward_fn()`` as two alternating lanes; return their results.

    The lanes hand over at every EP communication point (see the module docstring). ``trace``, if given, gets one
    ``(lane, name)`` per communication point in the order the collectives were issued, lane being ``"F"`` or ``"B"``.
    The comm hook installed before the call (if any) is called first at every point and reinstalled afterwards.
    Raises the first exception of either lane; the other lane is then stopped at its next communication point.
    """
    if not _active.acquire(blocking=False):
        raise RuntimeError("run_overlapped is not reentrant: another overlapped run is active in this process")
    try:
        return _run(forward_fn, backward_fn, trace, preserve_rng)
    finally:
        _active.release()


def _run(forward_fn, backward_fn, trace, preserve_rng):
    baton = _Baton()
    results: list[Any] = [None, None]
    errors: list[BaseException | None] = [None, None]
    forward_thread = threading.get_ident()
    state = _ThreadState.capture()

    def hook(name: str) -> None:
        if previous is not None:
            previous(name)
        lane = 0 if threading.get_ident() == forward_thread else 1
        if trace is not None:
            trace.append((_LANES[lane], name))
        rng = _rng_state() if preserve_rng and not baton.alone(lane) else None
        baton.switch(lane)
        if rng is not None:
            _set_rng_state(rng)

    def backward_main() -> None:
        try:
            with state.applied():
                baton.wait_turn(1)
                results[1] = backward_fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            errors[1] = e
            baton.finish(1, failed=True)
        else:
            baton.finish(1, failed=False)

    previous = comm.set_comm_hook(hook)
    try:
        helper = threading.Thread(target=backward_main, name="lightning_moe-overlap-backward", daemon=True)
        helper.start()
        try:
            results[0] = forward_fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the backward lane has stopped
            errors[0] = e
            baton.finish(0, failed=True)
        else:
            baton.finish(0, failed=False)
        forward_rng = _rng_state() if preserve_rng else None
        helper.join()
        if forward_rng is not None:
            _set_rng_state(forward_rng)
    finally:
        comm.set_comm_hook(previous)

    if baton.first_failed is not None:
        first = errors[baton.first_failed]
        other = errors[1 - baton.first_failed]
        if other is not None and not isinstance(other, OverlapAborted) and hasattr(first, "add_note"):
            first.add_note(f"the {_LANES[1 - baton.first_failed]} lane failed too: {other!r}")
        raise first
    return results[0], results[1]


# --------------------------------------------------------------------------------------------------------------------
# torch.distributed.pipelining integration


def _sub_actions(action: _Action) -> tuple[_Action, _Action]:
    subs = action.sub_actions or ()
    fwd = [a for a in subs if a.computation_type == FORWARD]
    bwd = [a for a in subs if a.computation_type == FULL_BACKWARD]
    if len(subs) != 2 or len(fwd) != 1 or len(bwd) != 1:
        raise NotImplementedError(f"overlap_f_b runs one FORWARD with one FULL_BACKWARD, got {action}")
    return fwd[0], bwd[0]


def overlap_f_b(action: _Action, ctx: _PipelineContext) -> None:
    """Custom function for ``OVERLAP_F_B`` actions of a ``_PipelineScheduleRuntime``: the forward sub-action and the
    full-backward sub-action run as overlapped lanes (``run_overlapped``), with the runtime's semantics."""
    schedule: _PipelineScheduleRuntime = ctx.schedule_ref
    fwd, bwd = _sub_actions(action)
    stages = {stage.stage_index: stage for stage in schedule._stages}
    f_stage, b_stage = stages[fwd.stage_index], stages[bwd.stage_index]
    f_mb, b_mb = fwd.microbatch_index, bwd.microbatch_index
    # The runtime does not pass step()'s return_outputs / loss_kwargs to custom functions; enable_overlap records them.
    return_outputs, loss_kwargs = getattr(schedule, "_overlap_step_args", (True, None))
    loss_kwargs = getattr(ctx, "loss_kwargs", None) or loss_kwargs

    # 1. Prologue: what reads or changes the schedule's shared state, in the runtime's order (forward first).
    schedule._assert_unsharded(f_stage)
    if not f_stage.is_first and fwd.stage_index - 1 not in stages:  # else: V-schedule local input, no recv
        if (fwd.stage_index, f_mb) not in schedule.fwd_recv_ops:
            raise AssertionError(f"Computing {fwd} before receiving input")
        _wait_batch_p2p(schedule.fwd_recv_ops.pop((fwd.stage_index, f_mb)))
    schedule._assert_unsharded(b_stage)
    if not b_stage.is_last and bwd.stage_index + 1 not in stages:
        if (bwd.stage_index, b_mb) not in schedule.bwd_recv_ops:
            raise AssertionError(f"Attempted to run compute {bwd} before receiving input")
        _wait_batch_p2p(schedule.bwd_recv_ops.pop((bwd.stage_index, b_mb)))
    # The backward's loss was appended when the last stage ran the forward of b_mb, before this action.
    loss = schedule._maybe_get_loss(b_stage, b_mb)
    schedule.backward_counter[bwd.stage_index] += 1
    last_backward = schedule.backward_counter[bwd.stage_index] == schedule._n_microbatches

    # 2. The two chunks, overlapped.
    def forward() -> Any:
        output = f_stage.forward_one_chunk(f_mb, ctx.arg_mbs[f_mb], ctx.kwarg_mbs[f_mb],
                                           save_forward_output=return_outputs)
        if loss_kwargs:
            schedule._maybe_compute_loss(f_stage, output, ctx.target_mbs, f_mb, loss_kwargs)
        else:  # also the signature of torch versions without loss_kwargs
            schedule._maybe_compute_loss(f_stage, output, ctx.target_mbs, f_mb)
        return output

    def backward() -> None:
        b_stage.backward_one_chunk(b_mb, loss=loss, full_backward=True, last_backward=last_backward)

    output, _ = run_overlapped(forward, backward)

    # 3. Epilogue: the V-schedule handoffs between the two stages of this rank, forward first like the runtime.
    if fwd.stage_index + 1 in stages:
        stages[fwd.stage_index + 1].set_local_fwd_input(output, f_mb)
    if bwd.stage_index - 1 in stages:
        stages[bwd.stage_index - 1].set_local_bwd_input(b_stage.get_local_bwd_output(b_mb), b_mb)


def enable_overlap(schedule: _PipelineScheduleRuntime) -> _PipelineScheduleRuntime:
    """Run the ``OVERLAP_F_B`` actions of ``schedule`` (e.g. ``ScheduleDualPipeV``) with forward/backward overlap.

    Registers ``overlap_f_b`` and lets it see ``step()``'s ``return_outputs`` and ``loss_kwargs`` (the runtime does
    not pass them to custom functions). Idempotent; returns ``schedule``.
    """
    if not isinstance(schedule, _PipelineScheduleRuntime):
        raise TypeError(f"enable_overlap needs a _PipelineScheduleRuntime schedule such as ScheduleDualPipeV, "
                        f"got {type(schedule).__name__}")
    if schedule._comp_type_to_function_map.get(OVERLAP_F_B) is not overlap_f_b:
        schedule.register_custom_function(OVERLAP_F_B, overlap_f_b)
    if "_step_microbatches" not in vars(schedule):
        original = schedule._step_microbatches
        signature = inspect.signature(original)

        @functools.wraps(original)
        def step_microbatches(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            schedule._overlap_step_args = (bound.arguments.get("return_outputs", True),
                                           bound.arguments.get("loss_kwargs"))
            try:
                return original(*args, **kwargs)
            finally:
                del schedule._overlap_step_args

        schedule._step_microbatches = step_microbatches
    return schedule


def disable_overlap(schedule: _PipelineScheduleRuntime) -> _PipelineScheduleRuntime:
    """Undo ``enable_overlap``: ``OVERLAP_F_B`` actions run their sub-actions one after the other again."""
    if schedule._comp_type_to_function_map.get(OVERLAP_F_B) is overlap_f_b:
        del schedule._comp_type_to_function_map[OVERLAP_F_B]
    vars(schedule).pop("_step_microbatches", None)
    return schedule
