"""Forward/backward overlap (``lightning_moe.pipeline.overlap``).

Single process: the two-lane runner with fake communication points (order, errors, hook, RNG, thread state).
Two gloo ranks with ep=2: the forward of one microbatch through MoE blocks overlapped with the backward of another
equals running them one after the other (outputs and gradients, bit for bit), with and without activation
checkpointing, and the collectives of the two lanes interleave; a real ``ScheduleDualPipeV`` with the overlap
registered equals the same schedule without it (pipeline group of size 1, both V stages on each rank, ep=2).
"""

from __future__ import annotations

import copy
import inspect
import random
import threading
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import ScheduleDualPipeV

from lightning_moe.models.config import ModelConfig
from lightning_moe.models.transformer import MoETransformer
from lightning_moe.moe.layer import MoE
from lightning_moe.parallel import comm
from lightning_moe.parallel.dims import ParallelDims
from lightning_moe.parallel.expert_parallel import apply_expert_parallel
from lightning_moe.parallel.parallelize import apply_activation_checkpointing, parallelize
from lightning_moe.pipeline import PipelinePlan, PipelineRunner, StageModule, keep_stages, overlap
from lightning_moe.pipeline.overlap import (
    BACKWARD_LANE,
    FORWARD_LANE,
    OverlapAborted,
    disable_overlap,
    enable_overlap,
    run_overlapped,
)
from lightning_moe.pipeline.runner import skip_handshakes_with_self
from tests.parallel._dist import run_workers

EXACT = dict(rtol=0, atol=0)


def _point(name: str) -> None:
    """A communication point without a collective, as ``comm`` makes one after issuing a collective."""
    comm._issue_and_wait(None, name)


def _run_with_deadline(fn, seconds: float = 20.0):
    """Run ``fn`` on a thread; fail (instead of hanging the test session) if it does not return in time."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the test thread
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "run_overlapped hung"
    if "error" in box:
        raise box["error"]
    return box["result"]


def _interleave(first: list, second: list) -> list:
    """Strict alternation starting with ``first``, then the rest of the longer list."""
    out = []
    for a, b in zip(first, second, strict=False):
        out += [a, b]
    n = min(len(first), len(second))
    return out + first[n:] + second[n:]


# --------------------------------------------------------------------------------------------------------------------
# The runner, single process


def _lane(tag: str, points: int, log: list, jitter: bool):
    def fn():
        for i in range(points):
            if jitter:
                time.sleep(random.random() * 2e-3)  # timing must not change the order
            log.append(f"{tag} compute {i}")
            _point(f"{tag}{i}")
        log.append(f"{tag} end")
        return tag

    return fn


@pytest.mark.parametrize(("nf", "nb"), [(3, 2), (2, 5), (0, 3), (3, 0), (4, 4)])
def test_lanes_alternate_deterministically(nf, nb):
    expected_trace = _interleave([(FORWARD_LANE, f"F{i}") for i in range(nf)],
                                 [(BACKWARD_LANE, f"B{i}") for i in range(nb)])
    for attempt in range(5):
        log, trace = [], []
        result = _run_with_deadline(lambda log=log, trace=trace, attempt=attempt: run_overlapped(
            _lane("F", nf, log, jitter=attempt > 0), _lane("B", nb, log, jitter=attempt > 0), trace=trace))
        assert result == ("F", "B")
        assert trace == expected_trace
        # Each lane computes up to its next point, then the other lane runs: compute segments alternate too.
        computes = [entry for entry in log if "compute" in entry]
        assert computes == _interleave([f"F compute {i}" for i in range(nf)], [f"B compute {i}" for i in range(nb)])
    assert comm.set_comm_hook(None) is None  # nothing left installed


def test_hook_chained_and_restored():
    seen = []

    def recorder(name):
        seen.append((name, threading.current_thread() is threading.main_thread()))

    previous = comm.set_comm_hook(recorder)
    try:
        run_overlapped(_lane("F", 2, [], False), _lane("B", 2, [], False))
        assert seen == [("F0", True), ("B0", False), ("F1", True), ("B1", False)]  # the backward lane is a thread
        with pytest.raises(ValueError):
            run_overlapped(_raise_after("F", 1, ValueError), _lane("B", 2, [], False))
        assert comm.set_comm_hook(recorder) is recorder
    finally:
        comm.set_comm_hook(previous)


def _raise_after(tag: str, points: int, exc_type: type, log: list | None = None):
    def fn():
        for i in range(points):
            _point(f"{tag}{i}")
            if log is not None:
                log.append(f"{tag} after {i}")
        raise exc_type(f"{tag} failed")

    return fn


@pytest.mark.parametrize("failing", [FORWARD_LANE, BACKWARD_LANE])
@pytest.mark.parametrize("points_before_error", [0, 1, 3])
def test_exception_propagates_and_stops_other_lane(failing, points_before_error):
    log = []
    other = "B" if failing == FORWARD_LANE else "F"
    failing_fn = _raise_after(failing, points_before_error, KeyError)
    healthy = _raise_after(other, 10, AssertionError, log)  # would raise AssertionError if it ran to the end
    fns = (failing_fn, healthy) if failing == FORWARD_LANE else (healthy, failing_fn)
    with pytest.raises(KeyError, match=f"{failing} failed"):
        _run_with_deadline(lambda: run_overlapped(*fns))
    # The healthy lane stopped at its next point (OverlapAborted, not shown to the caller): it never ran to the end.
    assert len(log) <= points_before_error + 1
    assert comm.set_comm_hook(None) is None


def test_both_lanes_fail():
    def fwd():
        _point("F0")
        raise ValueError("forward")

    def bwd():
        raise TypeError("backward")  # before any point: fails first, while the forward waits at F0

    with pytest.raises(TypeError, match="backward"):
        _run_with_deadline(lambda: run_overlapped(fwd, bwd))


def test_abort_is_an_error_type():
    assert issubclass(OverlapAborted, RuntimeError)


def test_not_reentrant():
    with pytest.raises(RuntimeError, match="reentrant"):
        run_overlapped(lambda: run_overlapped(lambda: None, lambda: None), lambda: None)
    assert comm.set_comm_hook(None) is None


def test_each_lane_keeps_its_rng_stream(seed):
    def fwd():
        a = torch.rand(4)
        _point("F0")
        return a, torch.rand(4)

    def bwd():
        c = torch.rand(4)
        _point("B0")
        return c, torch.rand(4)

    torch.manual_seed(seed)
    alone = fwd()
    after_alone = torch.get_rng_state()
    torch.manual_seed(seed)
    overlapped, _ = run_overlapped(fwd, bwd)
    torch.testing.assert_close(overlapped, alone, **EXACT)
    torch.testing.assert_close(torch.get_rng_state(), after_alone, **EXACT)


def test_backward_lane_gets_thread_state(monkeypatch):
    modes, calls = {}, []
    original = torch.set_num_threads

    def set_num_threads(n):  # OpenMP's thread count is per thread: the helper thread must set it (else: all cores)
        calls.append((n, threading.current_thread() is threading.main_thread()))
        original(n)

    monkeypatch.setattr(torch, "set_num_threads", set_num_threads)

    def bwd():
        modes["backward"] = torch.is_grad_enabled()

    with torch.no_grad():
        run_overlapped(lambda: None, bwd)
    run_overlapped(lambda: None, lambda: modes.setdefault("enabled", torch.is_grad_enabled()))
    assert modes == {"backward": False, "enabled": True}
    assert calls == [(torch.get_num_threads(), False)] * 2


# --------------------------------------------------------------------------------------------------------------------
# MoE blocks with expert parallelism on 2 gloo ranks


def _cfg() -> ModelConfig:
    return ModelConfig(dim=16, moe_ffn_dim=8, num_experts=4, top_k=2, num_shared_experts=1, init_std=0.2)


class _Block(nn.Module):
    """A residual dense part with dropout (RNG inside a checkpointed block), then a residual MoE."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.lin = nn.Linear(cfg.dim, cfg.dim)
        self.drop = nn.Dropout(0.2)
        self.norm = nn.RMSNorm(cfg.dim)
        self.moe = MoE(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(torch.tanh(self.lin(x)))
        return x + self.moe(self.norm(x))


class _Stack(nn.Module):
    def __init__(self, cfg: ModelConfig, n_blocks: int) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({str(i): _Block(cfg) for i in range(n_blocks)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers.values():
            x = block(x)
        return x


def _ep_copies(base: nn.Module, mesh, checkpointing: bool, n: int = 2) -> list[nn.Module]:
    copies = []
    for _ in range(n):
        model = copy.deepcopy(base)
        apply_expert_parallel(model, mesh)
        if checkpointing:
            apply_activation_checkpointing(model)
        copies.append(model)
    return copies


class _Recorder:
    """A comm hook that records (name, on the main thread) in issue order; the runner calls it first."""

    def __init__(self) -> None:
        self.events: list[tuple[str, bool]] = []

    def __call__(self, name: str) -> None:
        self.events.append((name, threading.current_thread() is threading.main_thread()))

    def take(self) -> list[tuple[str, bool]]:
        events, self.events = self.events, []
        return events


def _assert_same_grads(a: nn.Module, b: nn.Module, rank: int) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        ga, gb = p.grad, q.grad
        if hasattr(ga, "to_local"):
            ga, gb = ga.to_local(), gb.to_local()
        torch.testing.assert_close(gb, ga, **EXACT, msg=lambda m, name=name: f"{name} grad, rank {rank}: {m}")


def _check_pair(rank: int, world_size: int, base_seed: int, mesh, recorder: _Recorder, checkpointing: bool) -> None:
    cfg = _cfg()
    torch.manual_seed(base_seed)  # the same model on every rank
    ref, ovl = _ep_copies(_Stack(cfg, 2), mesh, checkpointing)
    torch.manual_seed(base_seed + 1 + rank)  # different tokens on every rank
    x_a, x_b = torch.randn(2, 5, cfg.dim), torch.randn(2, 5, cfg.dim)
    grad_a, grad_b = torch.randn(2, 5, cfg.dim), torch.randn(2, 5, cfg.dim)
    inputs = {}
    for name, model in (("ref", ref), ("ovl", ovl)):
        a, b = x_a.clone().requires_grad_(), x_b.clone().requires_grad_()
        torch.manual_seed(base_seed + 100)
        inputs[name] = (a, b, model(b))  # microbatch B's forward; its backward is what gets overlapped
    recorder.take()
    (a_ref, b_ref, y_b_ref), (a_ovl, b_ovl, y_b_ovl) = inputs["ref"], inputs["ovl"]

    # Reference: forward A, then backward B (recording each lane's communication points).
    torch.manual_seed(base_seed + 200)
    y_ref = ref(a_ref)
    fwd_points = [(FORWARD_LANE, n) for n, _ in recorder.take()]
    y_b_ref.backward(grad_b)
    bwd_points = [(BACKWARD_LANE, n) for n, _ in recorder.take()]
    rng_ref = torch.get_rng_state()

    # Overlapped.
    torch.manual_seed(base_seed + 200)
    trace = []
    y_ovl, _ = run_overlapped(lambda: ovl(a_ovl), lambda: y_b_ovl.backward(grad_b), trace=trace)
    events = recorder.take()
    torch.testing.assert_close(torch.get_rng_state(), rng_ref, **EXACT)

    # Results: the same bits as one after the other.
    torch.testing.assert_close(y_ovl, y_ref, **EXACT, msg=lambda m: f"forward output, rank {rank}: {m}")
    torch.testing.assert_close(b_ovl.grad, b_ref.grad, **EXACT)
    _assert_same_grads(ref, ovl, rank)
    # The overlapped forward built a valid graph: its own backward matches too.
    y_ref.backward(grad_a)
    y_ovl.backward(grad_a)
    torch.testing.assert_close(a_ovl.grad, a_ref.grad, **EXACT)
    _assert_same_grads(ref, ovl, rank)

    # Order: the lanes alternate at every collective, so each collective is in flight while the other lane
    # computes. Run one after the other, the trace would be fwd_points + bwd_points and fail here.
    n_layers = 2
    assert [n for _, n in fwd_points] == ["counts", "dispatch", "combine"] * n_layers
    recompute = ["dispatch", "combine"] if checkpointing else []  # the recomputation reuses the forward's counts
    assert [n for _, n in bwd_points] == (recompute + ["combine_grad", "dispatch_grad"]) * n_layers
    assert trace == _interleave(fwd_points, bwd_points) != fwd_points + bwd_points
    # The recorder installed outside saw the same issue order, the forward on this thread, the backward not.
    assert [(FORWARD_LANE if main else BACKWARD_LANE, n) for n, main in events] == trace
    # Every rank of the ep group issued the collectives in the same order.
    traces = [None] * world_size
    dist.all_gather_object(traces, trace)
    assert all(t == trace for t in traces)


def _check_error(rank: int, world_size: int, mesh) -> None:
    """An error in the backward lane, the same on every rank, halfway through: the caller gets it, the forward lane
    stops at its next collective, no rank hangs, and the process group stays usable."""
    cfg = _cfg()
    fwd_model = _ep_copies(_Stack(cfg, 3), mesh, checkpointing=False, n=1)[0]  # 9 communication points
    bwd_model = _ep_copies(_Stack(cfg, 2), mesh, checkpointing=True, n=1)[0]
    y_b = bwd_model(torch.randn(2, 5, cfg.dim, requires_grad=True))

    def fail(grad):
        raise ValueError("boom in backward")

    bwd_model.layers["1"].moe.router.gate.weight.register_hook(fail)  # reached after layer 1's collectives
    trace = []
    with pytest.raises(ValueError, match="boom"):
        run_overlapped(lambda: fwd_model(torch.randn(2, 5, cfg.dim)), lambda: y_b.sum().backward(), trace=trace)
    lanes = [lane for lane, _ in trace]
    # layer 1's recomputation (dispatch, combine: its counts are the forward's) and backward (combine_grad,
    # dispatch_grad), then the error; the lanes alternate, so the forward stopped at its 5th of 9
    assert lanes.count(BACKWARD_LANE) == 4 and lanes.count(FORWARD_LANE) == 5
    comm.set_comm_hook(None)
    probe = torch.full((world_size,), float(rank))
    out = torch.empty_like(probe)
    dist.all_to_all_single(out, probe)
    torch.testing.assert_close(out, torch.arange(world_size, dtype=torch.float32))


def _overlap_worker(rank: int, world_size: int, base_seed: int) -> None:
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))["ep"]
    recorder = _Recorder()
    comm.set_comm_hook(recorder)

    # The split-size exchange (for ExpertParallel, see comm.all_to_all_split_sizes) equals counts + .tolist().
    counts = torch.randint(0, 5, (2 * world_size,), generator=torch.Generator().manual_seed(base_seed + rank))
    recv_counts, send_splits, recv_splits = comm.all_to_all_split_sizes(counts, mesh.get_group())
    torch.testing.assert_close(recv_counts, comm.all_to_all_counts(counts, mesh.get_group()), **EXACT)
    assert send_splits == counts.view(world_size, -1).sum(1).tolist()
    assert recv_splits == recv_counts.view(world_size, -1).sum(1).tolist()
    assert recorder.take() == [("counts", True)] * 2

    for checkpointing in (False, True):
        _check_pair(rank, world_size, base_seed, mesh, recorder, checkpointing)
    _check_error(rank, world_size, mesh)


def test_overlap_matches_sequential_ep2(seed):
    run_workers(_overlap_worker, 2, seed)


# --------------------------------------------------------------------------------------------------------------------
# ScheduleDualPipeV with the overlap registered


def _mse(output: torch.Tensor, target: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return ((output - target) ** 2).mean() * scale


def _check_dualpipev(rank: int, base_seed: int, mesh, recorder: _Recorder, checkpointing: bool) -> None:
    cfg, n_microbatches = _cfg(), 4
    torch.manual_seed(base_seed)
    bases = [_Stack(cfg, 1), _Stack(cfg, 2)]
    copies = [_ep_copies(base, mesh["ep"], checkpointing) for base in bases]  # per stage: [ref, ovl]
    ref_mods, ovl_mods = [c[0] for c in copies], [c[1] for c in copies]

    def schedule(mods):
        stages = [PipelineStage(m, i, 2, torch.device("cpu"), group=mesh["pp"].get_group())
                  for i, m in enumerate(mods)]
        for stage in stages:
            skip_handshakes_with_self(stage)  # both stages on one rank: torch 2.11 on gloo would send to itself
        return ScheduleDualPipeV(stages, n_microbatches, loss_fn=_mse)

    ref, ovl = schedule(ref_mods), enable_overlap(schedule(ovl_mods))
    assert enable_overlap(ovl) is ovl  # idempotent
    torch.manual_seed(base_seed + 1 + rank)
    x, target = torch.randn(2 * n_microbatches, 3, cfg.dim), torch.randn(2 * n_microbatches, 3, cfg.dim)

    def step(sched, mods, **kwargs):
        for mod in mods:
            mod.zero_grad(set_to_none=True)
        torch.manual_seed(base_seed + 300)
        losses = []
        out = sched.step(x, target=target, losses=losses, **kwargs)
        return out, torch.stack(losses), recorder.take()

    def check(kwargs, overlapped):
        out_ref, losses_ref, events_ref = step(ref, ref_mods, **kwargs)
        out_ovl, losses_ovl, events_ovl = step(ovl, ovl_mods, **kwargs)
        torch.testing.assert_close(out_ovl, out_ref, **EXACT)
        torch.testing.assert_close(losses_ovl, losses_ref, **EXACT)
        for a, b in zip(ref_mods, ovl_mods, strict=True):
            _assert_same_grads(a, b, rank)
        # The reference never leaves the main thread. With the overlap, some collectives were issued by the
        # backward lane's thread: the same collectives in total, in a different order.
        assert all(main for _, main in events_ref)
        assert sorted(n for n, _ in events_ovl) == sorted(n for n, _ in events_ref)
        if overlapped:
            assert not all(main for _, main in events_ovl)
            assert [n for n, _ in events_ovl] != [n for n, _ in events_ref]
        else:
            assert events_ovl == events_ref

    check({}, overlapped=True)
    if not checkpointing and "loss_kwargs" in inspect.signature(ScheduleDualPipeV.step).parameters:  # torch 2.13
        # step()'s return_outputs / loss_kwargs reach the overlapped forward of the last stage.
        check({"return_outputs": False, "loss_kwargs": {"scale": 3.0}}, overlapped=True)
        assert all(not stage.output_chunks for stage in ovl._stages)
    # Undo: the same schedule runs the sub-actions one after the other again.
    disable_overlap(ovl)
    check({}, overlapped=False)


def _dualpipev_worker(rank: int, world_size: int, base_seed: int) -> None:
    # pp=1: both V stages live on each rank (local handoffs, no p2p); ep=2 across the two ranks.
    mesh = init_device_mesh("cpu", (1, world_size), mesh_dim_names=("pp", "ep"))
    recorder = _Recorder()
    comm.set_comm_hook(recorder)
    for checkpointing in (False, True):
        _check_dualpipev(rank, base_seed, mesh, recorder, checkpointing)


def test_dualpipev_with_overlap_matches_runtime(seed):
    run_workers(_dualpipev_worker, 2, seed)


# --------------------------------------------------------------------------------------------------------------------
# The pipeline runner (MoETransformer stages, FSDP, balance losses) with the overlap enabled


def _runner_worker(rank: int, world_size: int, base_seed: int, sizes: dict) -> None:
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, dense_ffn_dim=64, num_experts=4, top_k=2,
                      moe_ffn_dim=16, num_shared_experts=1, max_seq_len=16, score_func="sigmoid",
                      seq_aux_loss_coef=0.01, z_loss_coef=0.001)
    dims = ParallelDims(**sizes, world_size=world_size)
    meshes = dims.build_meshes("cpu")
    plan = PipelinePlan("dualpipe", dims.pp, cfg.n_layers, microbatches=4)
    local = plan.stages_of_rank(meshes.pp.get_local_rank())
    calls = []
    original = overlap.run_overlapped
    overlap.run_overlapped = lambda *a, **k: calls.append(1) or original(*a, **k)
    recorder = _Recorder()
    comm.set_comm_hook(recorder)
    for checkpointing in (False, True):
        torch.manual_seed(base_seed)
        base = MoETransformer(cfg)
        runners, models = [], []
        for overlapped in (False, True):  # the runner turns overlap on for DualPipeV with ep > 1 by itself
            model = copy.deepcopy(base)
            keep_stages(model, local, plan.layer_ranges)
            stages = [StageModule(model, s, plan.num_stages, plan.layer_ranges[s]) for s in local]
            parallelize(model, dims, meshes, stages=stages, activation_checkpointing=checkpointing)
            runners.append(PipelineRunner(plan, stages, meshes.pp.get_group(), torch.device("cpu"), cfg,
                                          overlap=overlapped))
            models.append(model)
        batch = torch.randint(0, cfg.vocab_size, (8, 13), generator=torch.Generator().manual_seed(base_seed + rank))
        if dims.ep == 1:
            enable_overlap(runners[1].schedule(8, 12))
        losses_ref = runners[0].step(batch[:, :-1], batch[:, 1:])
        assert not calls and all(main for _, main in recorder.take())
        losses_ovl = runners[1].step(batch[:, :-1], batch[:, 1:])
        assert calls, "no OVERLAP_F_B action ran overlapped"
        if dims.ep > 1:
            assert not all(main for _, main in recorder.take())
        calls.clear()
        torch.testing.assert_close(losses_ovl, losses_ref, **EXACT)
        _assert_same_grads(models[0], models[1], rank)


def test_runner_overlap_pp1_ep2_fsdp(seed):
    # pp=1 (both V stages on each rank), dense weights FSDP-sharded over both ranks, experts split over them
    run_workers(_runner_worker, 2, seed, {"pp": 1, "dp_shard": 2, "ep": 2})


def test_runner_overlap_pp2(seed):
    # pp=2: the received activations / gradients (p2p) of overlapped actions; no EP, so the lanes run back to back
    run_workers(_runner_worker, 2, seed, {"pp": 2, "dp_shard": 1})


@pytest.mark.slow
def test_runner_overlap_pp2_ep2_fsdp(seed):
    run_workers(_runner_worker, 4, seed, {"pp": 2, "dp_shard": 2, "ep": 2}, timeout_s=120)
