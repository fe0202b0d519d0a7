"""The logged balance losses (train/aux_loss, train/seq_aux_loss, train/z_loss) of a training step: the sum over the
MoE layers of the mean over the step's microbatches of each layer's loss, whatever runs the forwards (one process,
a pipeline schedule, activation checkpointing)."""

import copy
import dataclasses
import functools
from types import SimpleNamespace

import pytest
import torch
from torch.utils import checkpoint

from lightning_moe.module import MoELanguageModel
from lightning_moe.moe.balance import moe_layers
from lightning_moe.parallel.dims import ParallelDims
from lightning_moe.parallel.parallelize import apply_activation_checkpointing, parallelize
from lightning_moe.pipeline import PipelinePlan, PipelineRunner, StageModule, keep_stages
from tests.parallel._dist import run_workers
from tests.pipeline.test_pipeline import MICROBATCHES, _cfg

# Checkpointing recomputes each block in backward, but by default stops as soon as it has the tensors it needs: before
# the MoE layer returns, so before its forward hooks. The tests turn that off, so that the recompute runs them.
FULL_RECOMPUTE = functools.partial(checkpoint.set_checkpoint_early_stop, False)

NAMES = ("aux_loss", "seq_aux_loss", "z_loss")


def _module(seed: int, **overrides) -> MoELanguageModel:
    """All three balance losses on; the classic aux loss is not linear in the batch, so microbatching changes it."""
    torch.manual_seed(seed)
    cfg = dataclasses.replace(_cfg(n_layers=4), aux_loss_coef=0.01, **overrides)
    module = MoELanguageModel(model=cfg)
    module.configure_model()
    # stand-ins for the Trainer: no optimizer, and self.log records into module.logged
    module._trainer = SimpleNamespace(optimizers=[], global_step=0, accumulate_grad_batches=1)
    module.logged = {}
    module.log = lambda name, value, **kwargs: module.logged.__setitem__(name, float(value.detach()))
    return module


def _reference(model: torch.nn.Module, batch: torch.Tensor, splits: int) -> dict[str, float]:
    """One process, no pipeline: each layer's losses on each of ``splits`` microbatches, averaged over them, summed
    over the layers."""
    model.train()
    per_mb = []
    for chunk in batch.chunk(splits):
        model(chunk[:, :-1])
        per_mb.append({n: sum(float(m.last_losses[n]) for _, m in moe_layers(model)) for n in NAMES})
    return {n: sum(v[n] for v in per_mb) / splits for n in NAMES}


def _pipeline_worker(rank: int, world_size: int, seed: int, schedule: str, sizes: dict) -> None:
    module = _module(seed)
    ref = copy.deepcopy(module.model)
    model = module.model
    dims = ParallelDims(**sizes, world_size=world_size)
    meshes = dims.build_meshes("cpu")
    plan = PipelinePlan(schedule, dims.pp, module.model_cfg.n_layers, microbatches=MICROBATCHES)
    local = plan.stages_of_rank(meshes.pp.get_local_rank())
    keep_stages(model, local, plan.layer_ranges)
    stages = [StageModule(model, s, plan.num_stages, plan.layer_ranges[s]) for s in local]
    # checkpointing: the schedule's backwards recompute every block, MoE layers included
    parallelize(model, dims, meshes, stages=stages, activation_checkpointing=True)
    module.pipeline = PipelineRunner(plan, stages, meshes.pp.get_group(), torch.device("cpu"), module.model_cfg)
    # with ep > 1 under DualPipeV, the backward chunks run on a helper thread (pipeline.overlap)
    assert module.pipeline._expert_parallel == (dims.ep > 1)

    per_rank = 2 * MICROBATCHES
    full = torch.randint(0, 64, (per_rank * dims.dp, 13), generator=torch.Generator().manual_seed(seed + 1))
    shares = full.split(per_rank)
    batch = shares[meshes.dp.get_local_rank()]
    # logged as the mean over the data-parallel replicas, each of which has its own share of the batch
    refs = [_reference(ref, share, MICROBATCHES) for share in shares]
    expected = {n: sum(r[n] for r in refs) / len(refs) for n in NAMES}
    wholes = [_reference(ref, share, 1) for share in shares]
    whole_batch = {n: sum(r[n] for r in wholes) / len(wholes) for n in NAMES}
    if dims.dp > 1:  # the shares' values differ by far more than the tolerance below, so the mean is no rank's value
        spread = max(abs(r[n] - refs[0][n]) / abs(refs[0][n]) for r in refs[1:] for n in NAMES)
        assert spread > 1e-4, spread
    for _ in range(2):  # a second step starts from zero
        with FULL_RECOMPUTE():
            module.training_step(batch, 0)
        for name in NAMES:  # (the workers' asserts are not rewritten by pytest: say what differs)
            got = module.logged[f"train/{name}"]
            assert got == pytest.approx(expected[name], rel=1e-5, abs=1e-8), (name, got, expected[name])
        # seq_aux_loss and z_loss are means over sequences / tokens: the microbatch mean is the whole batch's value
        for name in ("seq_aux_loss", "z_loss"):
            got = module.logged[f"train/{name}"]
            assert got == pytest.approx(whole_batch[name], rel=1e-5, abs=1e-8), (name, got, whole_batch[name])
        # every forward of the step counted once: the recomputes in backward are not forwards of their own
        counts = module.balance_losses.counts
        assert set(counts.values()) == {MICROBATCHES} and len(counts) == len(moe_layers(model)), counts.values()


@pytest.mark.parametrize("schedule", ["dualpipe", "1f1b"])
def test_pp2_logs_the_mean_over_microbatches_of_each_balance_loss(schedule, seed):
    run_workers(_pipeline_worker, 2, seed, schedule, {"pp": 2, "dp_shard": 1})


def test_pp2_ep2_with_overlap_logs_the_mean_over_microbatches_of_each_balance_loss(seed):
    # 4 ranks: DualPipeV overlapping each forward chunk with a backward chunk (recomputes included) on another thread
    run_workers(_pipeline_worker, 4, seed, "dualpipe", {"pp": 2, "dp_shard": 2, "ep": 2}, timeout_s=120)


def _checkpoint_blocks(model: torch.nn.Module, kind: str) -> None:
    if kind == "reentrant":  # recomputes inside the checkpoint's own backward
        for block in model.layers.values():
            block.forward = functools.partial(checkpoint.checkpoint, block.forward, use_reentrant=True)
    else:
        apply_activation_checkpointing(model)  # non-reentrant: recomputes from the saved-tensor unpack hooks


@pytest.mark.parametrize("kind", ["non_reentrant", "reentrant"])
def test_activation_checkpointing_counts_each_forward_once(kind, seed):
    module = _module(seed)
    model = module.model
    ref = copy.deepcopy(model)
    _checkpoint_blocks(model, kind)
    meter = module.balance_losses
    meter.attach(model)
    meter.attach(model)  # attaching twice adds no second hook
    batch = torch.randint(0, 64, (2 * MICROBATCHES, 13), generator=torch.Generator().manual_seed(seed + 1))
    expected = _reference(ref, batch, MICROBATCHES)

    meter.reset()
    model.train()
    with FULL_RECOMPUTE():  # all forwards first, then the backwards, like a pipeline schedule
        outs = [model(chunk[:, :-1]) for chunk in batch.chunk(MICROBATCHES)]
    model.eval()
    model(batch[:, :-1])  # an eval forward (validation): no balance losses
    model.train()
    for out in outs:
        out.float().pow(2).mean().backward()  # recomputes every block, MoE forwards included
    assert set(meter.counts.values()) == {MICROBATCHES} and len(meter.counts) == len(moe_layers(model))
    totals = meter.totals()
    for name in NAMES:
        assert float(totals[name]) == pytest.approx(expected[name], rel=1e-5, abs=1e-8), name


def test_training_step_logs_its_own_batch(seed):
    """Without a pipeline: the whole batch's losses (one forward), and nothing carried over from an earlier step
    (the case of gradient accumulation) or from a validation forward."""
    module = _module(seed)
    module._trainer.accumulate_grad_batches = 2
    ref = copy.deepcopy(module.model)
    apply_activation_checkpointing(module.model)
    g = torch.Generator().manual_seed(seed + 1)
    batches = [torch.randint(0, 64, (2 * MICROBATCHES, 13), generator=g) for _ in range(2)]
    for batch in batches:
        expected = _reference(ref, batch, 1)
        module.train()
        module.training_step(batch, 0).backward()
        for name in NAMES:
            assert module.logged[f"train/{name}"] == pytest.approx(expected[name], rel=1e-6, abs=1e-9), name
        module.eval()
        module.validation_step(batch, 0)
