"""Redundant experts under expert parallelism: the replicated layer against the unreplicated one and one process.

Every rank builds the same layer from one seed; the replicated EP layer (R = E + 2 slots, random placements) must
compute the same outputs and gradients as the single-process reference, keep its replicas identical through optimizer
steps and placement changes, train like the reference, and save/load checkpoints in the logical layout.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from lightning_moe.models.config import ModelConfig
from lightning_moe.models.transformer import MoETransformer
from lightning_moe.moe.layer import MoE
from lightning_moe.parallel.dims import ParallelDims
from lightning_moe.parallel.expert_parallel import ExpertParallel, apply_expert_parallel
from lightning_moe.parallel.parallelize import parallelize
from lightning_moe.parallel.redundant_experts import (
    assign_replicas,
    placement_tables,
    register_optimizer_layout_hooks,
    validate_placement,
)
from tests.parallel._dist import run_workers

FP32 = dict(rtol=1e-5, atol=1e-6)
E, REDUNDANT = 4, 2


def _cfg(kernel: str = "grouped_mm") -> ModelConfig:
    return ModelConfig(dim=32, moe_ffn_dim=16, num_experts=E, top_k=2, num_shared_experts=1, init_std=0.2,
                       expert_kernel=kernel)


def _random_placement(num_slots: int, g: torch.Generator) -> torch.Tensor:
    """Every expert once, the rest random experts, shuffled (so a rank may hold two replicas of one expert)."""
    p = torch.cat([torch.arange(E), torch.randint(0, E, (num_slots - E,), generator=g)])
    return p[torch.randperm(num_slots, generator=g)]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.detach().full_tensor() if isinstance(t, DTensor) else t.detach()


def _logical(layer: ExpertParallel, name: str) -> torch.Tensor:
    return _full(layer.logical_from_slots(getattr(layer, name).detach()))


def _assert_replicas_identical(layer: ExpertParallel, tensors: dict[str, torch.Tensor]) -> None:
    log2phy, logcnt = placement_tables(layer.placement, E)
    for what, t in tensors.items():
        full = _full(t)
        for e in range(E):
            slots = log2phy[e, :int(logcnt[e])]
            for s in slots[1:]:
                assert torch.equal(full[s], full[slots[0]]), f"{what}: replicas {slots.tolist()} of expert {e} differ"


# --- single process -------------------------------------------------------------------------------------------------
def test_assign_replicas_splits_each_expert_evenly(seed):
    phy2log = torch.tensor([0, 1, 2, 3, 3, 1, 3, 0])
    log2phy, logcnt = placement_tables(phy2log, E)
    assert logcnt.tolist() == [2, 2, 1, 3]
    assert log2phy.tolist() == [[0, 7, -1], [1, 5, -1], [2, -1, -1], [3, 4, 6]]
    counts = torch.randint(0, 9, (E,))
    counts[1] = 1  # fewer rows than replicas
    n = int(counts.sum())
    per_rotation = []
    for rotation in range(3):
        slot = assign_replicas(counts, log2phy, logcnt, rotation, n)
        expert = torch.repeat_interleave(torch.arange(E), counts)
        assert torch.equal(phy2log[slot], expert), "every row goes to a replica of its own expert"
        got = torch.bincount(slot, minlength=8)
        for e in range(E):
            rows = got[log2phy[e, :int(logcnt[e])]]
            assert int(rows.sum()) == int(counts[e]) and int(rows.max() - rows.min()) <= 1, (e, rows)
        per_rotation.append(got)
    if counts[1] == 1:
        assert not torch.equal(per_rotation[0], per_rotation[1]), "the rotation moves the odd row to another replica"


def test_validate_placement_rejects_bad_plans():
    assert validate_placement([1, 0, 1], 2, 3).tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="no replica of experts \\[2\\]"):
        validate_placement([0, 1, 1, 0], 3, 4)
    with pytest.raises(ValueError, match="in \\[0, 2\\)"):
        validate_placement([0, 2], 2, 2)
    with pytest.raises(ValueError, match="shape \\(3,\\)"):
        validate_placement([0, 1], 2, 3)


# --- two ranks ------------------------------------------------------------------------------------------------------
def _check_layer(rank: int, base_seed: int, mesh, kernel: str) -> None:
    """Outputs and gradients of a replicated layer equal those of one process, on fresh inputs per rank."""
    group = mesh.get_group()
    torch.manual_seed(base_seed)
    ref = MoE(_cfg(kernel))
    model = copy.deepcopy(ref)
    apply_expert_parallel(model, mesh, num_redundant=REDUNDANT)
    layer = model.experts
    assert isinstance(layer, ExpertParallel) and layer.w13.shape == (E + REDUNDANT, 32, 32)
    assert layer.num_experts == (E + REDUNDANT) // 2
    for n in ("w13", "w2"):
        torch.testing.assert_close(_logical(layer, n), getattr(ref.experts, n).detach(), rtol=0, atol=0)
    placement = _random_placement(E + REDUNDANT, torch.Generator().manual_seed(base_seed))
    layer.apply_placement(placement)
    assert torch.equal(layer.placement, placement)

    torch.manual_seed(base_seed + 1 + rank)
    x = torch.randn(3, 7, 32)
    grad_out = torch.randn(3, 7, 32)
    x_ref, x_rep = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_rep = ref(x_ref), model(x_rep)
    y_ref.backward(grad_out)
    y_rep.backward(grad_out)
    torch.testing.assert_close(y_rep, y_ref, **FP32, msg=lambda m: f"output, rank {rank}: {m}")
    torch.testing.assert_close(x_rep.grad, x_ref.grad, **FP32, msg=lambda m: f"input grad, rank {rank}: {m}")
    for name, p in model.named_parameters():
        if not name.startswith("experts."):
            torch.testing.assert_close(p.grad, ref.get_parameter(name).grad, **FP32, msg=name)
    for name in ("w13", "w2"):
        summed = getattr(ref.experts, name).grad.clone()
        dist.all_reduce(summed, group=group)  # the logical expert's gradient over the tokens of every rank
        grad = getattr(layer, name).grad
        assert isinstance(grad, DTensor)
        torch.testing.assert_close(_full(grad), summed[placement], **FP32,
                                   msg=lambda m, name=name: f"{name} grad (every replica), rank {rank}: {m}")
    _assert_replicas_identical(layer, {"w13 grad": layer.w13.grad, "w2 grad": layer.w2.grad})
    _check_norm_weights(layer, ref.experts, group)


def _check_norm_weights(layer: ExpertParallel, ref_experts, group=None) -> None:
    """With ``slot_norm_weights`` the squared gradient norm counts every logical expert once."""
    got = sum(_full((p.grad.float().square() * layer.slot_norm_weights(p.grad)).sum())
              for p in (layer.w13, layer.w2))
    expected = torch.zeros(())
    for p in (ref_experts.w13, ref_experts.w2):
        g = p.grad.clone()
        if group is not None:
            dist.all_reduce(g, group=group)
        expected = expected + g.square().sum()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    plain = sum(_full(p.grad.float().square().sum()) for p in (layer.w13, layer.w2))
    assert plain > expected * (1 + 1e-3), "without the weights, replicas count several times"


def _check_training(rank: int, base_seed: int, mesh) -> None:
    """AdamW steps with placement changes in between follow the single-process trajectory; a move keeps the
    function, carries the optimizer state, and keeps replicas identical."""
    world = mesh.size()
    torch.manual_seed(base_seed)
    ref = MoE(_cfg())
    model = copy.deepcopy(ref)
    apply_expert_parallel(model, mesh, num_redundant=REDUNDANT)
    layer = model.experts
    for m in (ref, model):  # only the experts train: the router sees every rank's tokens only in the reference
        for name, p in m.named_parameters():
            p.requires_grad_(name.startswith("experts."))
    opt_ref = torch.optim.AdamW(ref.experts.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(base_seed)
    plans = [_random_placement(E + REDUNDANT, g) for _ in range(3)]
    probe = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(base_seed + 100 + rank))
    for step, plan in enumerate(plans):
        before = model(probe).detach()
        moved_from = {n: _logical(layer, n) for n in ("w13", "w2")}
        layer.apply_placement(plan, [opt])
        assert torch.equal(layer.placement, plan)
        torch.testing.assert_close(model(probe).detach(), before, **FP32, msg=f"output changed by move {step}")
        for n in ("w13", "w2"):
            assert torch.equal(_logical(layer, n), moved_from[n])
        if step:  # the optimizer state went along: logical exp_avg equals the reference's
            for n in ("w13", "w2"):
                for key in ("exp_avg", "exp_avg_sq"):
                    state = opt.state[getattr(layer, n)][key]
                    torch.testing.assert_close(_full(layer.logical_from_slots(state)),
                                               opt_ref.state[getattr(ref.experts, n)][key], rtol=1e-4, atol=1e-7)
                    _assert_replicas_identical(layer, {f"{n} {key}": state})
        xs = torch.randn(world, 3, 6, 32, generator=torch.Generator().manual_seed(base_seed + 10 + step))
        gs = torch.randn(world, 3, 6, 32, generator=torch.Generator().manual_seed(base_seed + 20 + step))
        for r in range(world):  # the reference sees the tokens of every rank
            ref(xs[r]).backward(gs[r])
        model(xs[rank]).backward(gs[rank])
        opt_ref.step()
        opt.step()
        opt_ref.zero_grad()
        opt.zero_grad()
        _assert_replicas_identical(layer, {"w13": layer.w13, "w2": layer.w2})
        for n in ("w13", "w2"):
            torch.testing.assert_close(_logical(layer, n), getattr(ref.experts, n).detach(), rtol=1e-4, atol=1e-5,
                                       msg=lambda m, n=n, step=step: f"{n} after step {step}: {m}")


def _check_checkpoint(rank: int, base_seed: int, mesh, path: str) -> None:
    """A replicated layer saves weights and AdamW state in the logical layout; they load into an unreplicated EP
    layer, into a replicated one with another placement, and into a plain layer."""
    torch.manual_seed(base_seed)
    plain = MoE(_cfg())
    saved = copy.deepcopy(plain)
    apply_expert_parallel(saved, mesh, num_redundant=REDUNDANT)
    g = torch.Generator().manual_seed(base_seed)
    saved.experts.apply_placement(_random_placement(E + REDUNDANT, g))
    opt = torch.optim.AdamW(saved.parameters(), lr=1e-2)
    register_optimizer_layout_hooks(opt, saved)
    saved(torch.randn(2, 5, 32)).square().mean().backward()
    opt.step()
    with torch.no_grad():  # what data parallelism does: the dense weights (router, shared expert) stay equal on
        for p in saved.parameters():  # every rank. Without it AdamW's first step (lr * sign(grad)) can move an
            if not isinstance(p, DTensor):  # element with a near-zero gradient by +lr on one rank and -lr on the
                dist.broadcast(p, src=0)  # other, and the checkpoint holds one rank's copy of it.
    msd = get_model_state_dict(saved)
    assert msd["experts.w13"].shape == (E, 32, 32), "the checkpoint is in the logical layout"
    osd = get_optimizer_state_dict(saved, opt)
    assert osd["state"]["experts.w13"]["exp_avg"].shape == (E, 32, 32)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    expected = {n: _logical(saved.experts, n) for n in ("w13", "w2")}
    expected_avg = {n: _full(saved.experts.logical_from_slots(opt.state[getattr(saved.experts, n)]["exp_avg"]))
                    for n in ("w13", "w2")}

    for num_redundant in (0, REDUNDANT):
        torch.manual_seed(base_seed + 1)  # other weights: the load must overwrite them
        target = MoE(_cfg())
        apply_expert_parallel(target, mesh, num_redundant=num_redundant)
        if num_redundant:
            target.experts.apply_placement(_random_placement(E + REDUNDANT, g))
        target_opt = torch.optim.AdamW(target.parameters(), lr=1e-2)
        register_optimizer_layout_hooks(target_opt, target)
        state = {"model": get_model_state_dict(target), "optim": get_optimizer_state_dict(target, target_opt)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(target, state["model"])
        set_optimizer_state_dict(target, target_opt, state["optim"])
        for n in ("w13", "w2"):
            p = getattr(target.experts, n)
            assert p.shape[0] == E + num_redundant
            torch.testing.assert_close(_logical(target.experts, n), expected[n], rtol=0, atol=0)
            avg = opt_state = target_opt.state[p]["exp_avg"]
            torch.testing.assert_close(_full(target.experts.logical_from_slots(avg)), expected_avg[n], rtol=0, atol=0)
            _assert_replicas_identical(target.experts, {n: p, f"{n} exp_avg": opt_state})
        x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(base_seed + 7 + rank))
        torch.testing.assert_close(target(x), saved(x), **FP32)

    unsharded = MoE(_cfg())
    state = {"model": get_model_state_dict(unsharded)}
    dcp.load(state, checkpoint_id=path)
    unsharded.load_state_dict(state["model"])
    for n in ("w13", "w2"):
        torch.testing.assert_close(getattr(unsharded.experts, n).detach(), expected[n], rtol=0, atol=0)


def _check_meta_init(rank: int, base_seed: int, mesh) -> None:
    """Meta-device init then ``reset_parameters``: random experts, identical replicas."""
    torch.manual_seed(base_seed)
    with torch.device("meta"):
        lazy = MoE(_cfg())
    apply_expert_parallel(lazy, mesh, num_redundant=REDUNDANT)
    lazy.to_empty(device="cpu")
    lazy.experts.reset_parameters()
    layer = lazy.experts
    assert torch.isfinite(_full(layer.w13)).all() and _full(layer.w13).std() > 0
    _assert_replicas_identical(layer, {"w13": layer.w13, "w2": layer.w2})
    assert not torch.equal(_logical(layer, "w13")[0], _logical(layer, "w13")[1])


def _worker(rank: int, world_size: int, base_seed: int, path: str) -> None:
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))["ep"]
    for kernel in ("grouped_mm", "loop"):
        _check_layer(rank, base_seed, mesh, kernel)
    _check_training(rank, base_seed, mesh)
    _check_checkpoint(rank, base_seed, mesh, path)
    _check_meta_init(rank, base_seed, mesh)
    with pytest.raises(ValueError, match="num_redundant=1 .* divisible by the expert-parallel size 2"):
        apply_expert_parallel(MoE(_cfg()), mesh, num_redundant=1)


def test_replicated_experts_match_one_process(seed, tmp_path):
    run_workers(_worker, 2, seed, str(tmp_path / "ckpt"))


def _fsdp_worker(rank: int, world_size: int, base_seed: int) -> None:
    """dp_shard=4 x ep=2: the experts are FSDP-sharded over 2 ranks on top of EP, so a move re-gathers FSDP's
    strided shards. Training with two moves follows the single-process model."""
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_dense_layers=0, n_heads=4, dense_ffn_dim=64,
                      num_experts=E, top_k=2, moe_ffn_dim=16, num_shared_experts=1, max_seq_len=16)
    torch.manual_seed(base_seed)
    ref = MoETransformer(cfg)
    model = copy.deepcopy(ref)
    dims = ParallelDims(ep=2, world_size=world_size)
    meshes = dims.build_meshes("cpu")
    apply_expert_parallel(model, meshes.ep, num_redundant=REDUNDANT)  # before parallelize, which keeps these layers
    parallelize(model, dims, meshes)
    layers = [m.experts for _, m in model.moe_layers()]
    assert len(layers) == 2 and all(isinstance(x, ExpertParallel) and x.w13.shape[0] == E + REDUNDANT
                                    for x in layers)
    assert layers[0].w13.device_mesh.ndim == 2, "FSDP shards the slots over the expert data-parallel mesh"
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dp_rank, per_rank = meshes.dp.get_local_rank(), 2
    g = torch.Generator().manual_seed(base_seed)
    for step in range(3):
        if step:
            for layer in layers:
                layer.apply_placement(_random_placement(E + REDUNDANT, g), [opt])
        batch = torch.randint(0, 64, (per_rank * dims.dp, 17),
                              generator=torch.Generator().manual_seed(base_seed + step))
        local = batch[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        F.cross_entropy(ref(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).backward()
        F.cross_entropy(model(local[:, :-1]).flatten(0, 1), local[:, 1:].flatten()).backward()
        for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
            if ".experts." in name:
                layer = model.get_submodule(name.rsplit(".", 1)[0])
                torch.testing.assert_close(_full(layer.logical_from_slots(p.grad)), p_ref.grad, rtol=1e-4, atol=1e-6,
                                           msg=lambda m, name=name, step=step: f"{name} grad, step {step}: {m}")
        for layer, (_, ref_moe) in zip(layers, ref.moe_layers()):
            _check_norm_weights(layer, ref_moe.experts)
        opt_ref.step()
        opt.step()
        opt_ref.zero_grad()
        opt.zero_grad()
        for layer in layers:
            _assert_replicas_identical(layer, {"w13": layer.w13, "w2": layer.w2,
                                               "w13 exp_avg_sq": opt.state[layer.w13]["exp_avg_sq"]})
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        if ".experts." in name:
            p = model.get_submodule(name.rsplit(".", 1)[0]).logical_from_slots(p)
        torch.testing.assert_close(_full(p), p_ref.detach(), rtol=1e-3, atol=1e-4, msg=name)

    # meta-device init under FSDP (strategy.meta_init): materialise, reset, replicas start identical
    with torch.device("meta"):
        lazy = MoETransformer(cfg)
    apply_expert_parallel(lazy, meshes.ep, num_redundant=REDUNDANT)
    parallelize(lazy, dims, meshes)
    lazy.to_empty(device="cpu")
    for module in lazy.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    for _, moe in lazy.moe_layers():
        _assert_replicas_identical(moe.experts, {"w13": moe.experts.w13, "w2": moe.experts.w2})
        assert _full(moe.experts.w13).std() > 0


def test_replicated_experts_under_fsdp_match_one_process(seed):
    run_workers(_fsdp_worker, 4, seed)
