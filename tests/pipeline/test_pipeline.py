"""Pipeline parallelism: the stage cut, the plan's checks, and schedules that match one process exactly."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from lightning_moe.errors import ConfigError
from lightning_moe.models.config import ModelConfig
from lightning_moe.models.mtp import mtp_losses
from lightning_moe.models.transformer import MoETransformer
from lightning_moe.parallel.dims import ParallelDims
from lightning_moe.parallel.parallelize import parallelize
from lightning_moe.pipeline import PipelinePlan, PipelineRunner, StageModule, keep_stages, split_layers
from tests.parallel._dist import run_workers

MICROBATCHES = 4


def _cfg(n_layers: int = 4, mtp_depth: int = 0) -> ModelConfig:
    # sequence-wise balance loss and z-loss: per-sequence / per-token means, so microbatching does not change them
    return ModelConfig(vocab_size=64, dim=32, n_layers=n_layers, n_heads=4, dense_ffn_dim=64, num_experts=4, top_k=2,
                       moe_ffn_dim=16, num_shared_experts=1, max_seq_len=16, score_func="sigmoid",
                       seq_aux_loss_coef=0.01, z_loss_coef=0.001, aux_loss_coef=0.0, mtp_depth=mtp_depth,
                       mtp_lambda=0.5)


# --- the cut and the plan (no processes) ---

def test_split_layers_is_contiguous_and_favours_middle_stages():
    for n_layers in range(4, 13):
        for stages in (2, 3, 4):
            ranges = split_layers(n_layers, stages)
            assert [i for r in ranges for i in r] == list(range(n_layers))
            sizes = [len(r) for r in ranges]
            assert max(sizes) - min(sizes) <= 1
            if 0 < n_layers % stages <= stages - 2:  # enough middle stages for the remainder
                assert sizes[0] == sizes[-1] == min(sizes) < max(sizes)
    assert [len(r) for r in split_layers(6, 4)] == [1, 2, 2, 1]
    assert [len(r) for r in split_layers(5, 2, [1, 4])] == [1, 4]


@pytest.mark.parametrize("kwargs, message", [
    (dict(schedule="dualpipe", pp=2, n_layers=3, microbatches=4), "fewer than the 4 pipeline stages"),
    (dict(schedule="1f1b", pp=4, n_layers=3, microbatches=4), "fewer than the 4 pipeline stages"),
    (dict(schedule="dualpipe", pp=2, n_layers=8, microbatches=3), "needs at least 4 microbatches"),
    (dict(schedule="1f1b", pp=2, n_layers=8, microbatches=1), "needs at least 2 microbatches"),
    (dict(schedule="interleaved_1f1b", pp=2, n_layers=8, microbatches=5), "multiple of strategy.pp=2"),
    (dict(schedule="interleaved_1f1b", pp=2, n_layers=8, microbatches=4, stages_per_rank=1), ">= 2 stages per rank"),
    (dict(schedule="dualpipe", pp=2, n_layers=8, microbatches=4, layers_per_stage=(2, 2, 2, 1)), "summing to"),
    (dict(schedule="dualpipe", pp=2, n_layers=4, microbatches=4, layers_per_stage=[1, 1, 1]),
     "strategy.pipeline_layers=\\[1, 1, 1\\]: needs 4 entries"),
    (dict(schedule="chimera", pp=2, n_layers=8, microbatches=4), "must be one of"),
])
def test_bad_plans_fail_with_a_clear_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PipelinePlan(**kwargs)


def test_batch_must_split_into_microbatches():
    plan = PipelinePlan("1f1b", 2, 4, microbatches=4)
    plan.check_batch(8)
    with pytest.raises(ConfigError, match="data.batch_size=6 .* divisible by strategy.pipeline_microbatches=4"):
        plan.check_batch(6)


@pytest.mark.parametrize("schedule, pp, expected", [
    ("dualpipe", 2, {0: [0, 3], 1: [1, 2]}),
    ("zbv", 3, {0: [0, 5], 1: [1, 4], 2: [2, 3]}),
    ("1f1b", 2, {0: [0], 1: [1]}),
    ("interleaved_1f1b", 2, {0: [0, 2], 1: [1, 3]}),
])
def test_stage_placement(schedule, pp, expected):
    plan = PipelinePlan(schedule, pp, 8, microbatches=2 * pp * 2)
    assert {r: plan.stages_of_rank(r) for r in range(pp)} == expected


def test_stage_modules_chain_to_the_whole_model(seed):
    torch.manual_seed(seed)
    cfg = _cfg(n_layers=5, mtp_depth=1)
    model = MoETransformer(cfg)
    tokens = torch.randint(0, 64, (2, 12))
    labels = torch.randint(0, 64, (2, 12))
    ref_logits, ref_mtp = model(tokens, labels=labels)
    ranges = split_layers(5, 4)
    stages = [StageModule(model, s, 4, ranges[s]) for s in range(4)]
    h = tokens
    for stage in stages[:-1]:
        h = stage(h)
    logits, *mtp = stages[-1](h, labels=labels)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    torch.testing.assert_close(mtp[0], ref_mtp[0], rtol=0, atol=0)
    # pruning: a rank keeps its stages' layers under their global keys, and the state-dict keys stay the model's
    keep_stages(model, [1, 2], ranges)
    assert list(model.layers) == [str(i) for i in [*ranges[1], *ranges[2]]]
    assert model.tok_embeddings is None and model.output is None and model.mtp is None
    assert all(k.startswith("layers.") or k.startswith("rope") for k in model.state_dict())


# --- schedules on gloo ranks against one process ---

def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _pipeline_worker(rank: int, world_size: int, seed: int, schedule: str, sizes: dict, mtp_depth: int,
                     n_layers: int) -> None:
    sizes = dict(sizes)
    param_dtype = sizes.pop("param_dtype", None)  # fp32: FSDP2 on a mesh of one, as param_dtype makes it
    torch.manual_seed(seed)
    cfg = _cfg(n_layers, mtp_depth)
    ref = MoETransformer(cfg)
    model = copy.deepcopy(ref)
    dims = ParallelDims(**sizes, world_size=world_size)
    meshes = dims.build_meshes("cpu")
    plan = PipelinePlan(schedule, dims.pp, cfg.n_layers, microbatches=MICROBATCHES)
    local = plan.stages_of_rank(meshes.pp.get_local_rank())
    keep_stages(model, local, plan.layer_ranges)
    stages = [StageModule(model, s, plan.num_stages, plan.layer_ranges[s]) for s in local]
    parallelize(model, dims, meshes, stages=stages, param_dtype=param_dtype)
    tie = meshes.pp.get_group() if mtp_depth and plan.spec.style == "loop" else None
    runner = PipelineRunner(plan, stages, meshes.pp.get_group(), torch.device("cpu"), cfg,
                            tie_group=tie)
    runner.mtp_weight = cfg.mtp_lambda
    dp_rank, per_rank = meshes.dp.get_local_rank(), 2 * MICROBATCHES

    g = torch.Generator().manual_seed(seed + 1)
    batch = torch.randint(0, 64, (per_rank * dims.dp, 13), generator=g)
    local_batch = batch[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    schedule = runner.schedule(per_rank, 12)
    step = schedule.step

    def contiguous_step(*args, **kwargs):  # torch 2.11 refuses microbatches whose strides differ from its example
        assert all(t.is_contiguous() for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
        return step(*args, **kwargs)

    schedule.step = contiguous_step
    parts = runner.step(local_batch[:, :-1], local_batch[:, 1:])
    torch.distributed.all_reduce(parts, group=meshes.dp.get_group())
    parts /= dims.dp

    logits, mtp_logits = ref(batch[:, :-1], labels=batch[:, 1:])
    loss_ref = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    total = loss_ref
    if mtp_depth:
        per_depth = mtp_losses(mtp_logits, batch[:, 1:])
        total = total + cfg.mtp_lambda * torch.stack(per_depth).mean()
        torch.testing.assert_close(parts[1:], torch.stack(per_depth).detach(), rtol=1e-5, atol=1e-6)
    total.backward()
    torch.testing.assert_close(parts[0], loss_ref.detach(), rtol=1e-5, atol=1e-6)

    ref_params = dict(ref.named_parameters())
    names = [name for name, _ in model.named_parameters()]
    assert names, "every rank holds some parameters"
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(_full(p.grad), ref_params[name].grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")
    # validation: forward only, same loss, and no gradient changes (torch clears FSDP gradients when a schedule first
    # runs; Lightning validates after the optimizer step, so that is harmless)
    val = runner.step(local_batch[:, :-1], local_batch[:, 1:], train=False)
    torch.distributed.all_reduce(val, group=meshes.dp.get_group())
    torch.testing.assert_close(val[0] / dims.dp, loss_ref.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(_full(p.grad), ref_params[name].grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("schedule", ["dualpipe", "1f1b", "zbv", "interleaved_1f1b"])
def test_pp2_matches_one_process(schedule, seed):
    run_workers(_pipeline_worker, 2, seed, schedule, {"pp": 2, "dp_shard": 1}, 0, 4)


def _unsplit_backward_worker(rank: int, world_size: int, seed: int, schedule: str) -> None:
    """A torch that cannot split the backward at custom autograd Functions (torch 2.11): the zero-bubble schedules
    run each backward whole in its I slot (W actions skipped) and still match one process."""
    from lightning_moe.pipeline import actions, runner

    skipped = []
    skip_weight = actions.skip_weight

    def counting_skip(action, ctx):
        skipped.append(action)
        skip_weight(action, ctx)

    runner.split_backward_supported = lambda: False
    actions.skip_weight = counting_skip
    with pytest.warns(UserWarning, match="cannot split the backward"):
        _pipeline_worker(rank, world_size, seed, schedule, {"pp": 2, "dp_shard": 1}, 0, 4)
    assert skipped, "the schedule's W actions ran our skip"


@pytest.mark.parametrize("schedule", ["dualpipe", "zbv"])
def test_pp2_without_a_split_backward_matches_one_process(schedule, seed):
    run_workers(_unsplit_backward_worker, 2, seed, schedule)


def test_this_torch_splits_the_backward_at_custom_functions():
    from lightning_moe.pipeline.actions import split_backward_supported

    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    if (major, minor) != (2, 12):  # not checked on 2.12
        assert split_backward_supported() == ((major, minor) >= (2, 13))


@pytest.mark.parametrize("schedule", ["dualpipe", "1f1b"])
def test_pp2_with_mtp_matches_one_process(schedule, seed):
    run_workers(_pipeline_worker, 2, seed, schedule, {"pp": 2, "dp_shard": 1}, 1, 4)


def test_dualpipe_with_mtp_under_fsdp_matches_one_process(seed):
    # rank 0 runs the first and the last stage, which share the embedding, each stage an FSDP root
    run_workers(_pipeline_worker, 2, seed, "dualpipe", {"pp": 2, "dp_shard": 1, "param_dtype": torch.float32}, 1, 4)


@pytest.mark.slow
def test_pp2_ep2_fsdp_matches_one_process(seed):
    # 4 ranks: 2 pipeline ranks x 2 data-parallel ranks that also form the expert-parallel group
    run_workers(_pipeline_worker, 4, seed, "dualpipe", {"pp": 2, "dp_shard": 2, "ep": 2}, 0, 4, timeout_s=120)


def _handshake_worker(rank: int, world_size: int) -> None:
    from types import SimpleNamespace

    import torch.distributed as dist

    from lightning_moe.pipeline.runner import skip_handshakes_with_self

    group = dist.group.WORLD
    ops = [dist.P2POp(dist.isend, torch.zeros(1), group_peer=peer, group=group) for peer in range(world_size)]
    stage = SimpleNamespace(group=group, _get_init_p2p_neighbors_ops=lambda: ops)
    skip_handshakes_with_self(stage)
    assert [op.group_peer for op in stage._get_init_p2p_neighbors_ops()] == [p for p in range(world_size) if p != rank]


def test_stage_handshakes_skip_this_rank():
    # torch 2.11 sends a dummy tensor between neighbouring stages on one rank too, which gloo refuses
    run_workers(_handshake_worker, 2)
