"""Expert parallelism against a single-process reference, on 2 and 4 gloo ranks on CPU.

Every rank builds the same full model from one seed, keeps an unsharded copy as the reference, applies EP to the
other, and feeds both its own random tokens (fresh per run: the parent test draws the base seed). The EP layer must
match the reference on each rank's tokens: outputs, input and router gradients per rank, and expert-weight gradients
equal to the slice of the reference gradients summed over the ranks of the ep group.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from lightning_moe.models.config import ModelConfig
from lightning_moe.models.transformer import MoETransformer
from lightning_moe.moe.layer import MoE
from lightning_moe.parallel.expert_parallel import ExpertParallel, apply_expert_parallel, expert_major_order
from tests.parallel._dist import run_workers

FP32 = dict(rtol=1e-5, atol=1e-6)
BF16 = dict(rtol=2e-2, atol=2e-2)
# Expert gradients sum rows from every rank in another order than one process does: fp32 rounding of a sum.
FP32_SUM = dict(rtol=1e-4, atol=1e-5)


def _cfg(num_experts: int, **kw) -> ModelConfig:
    base = dict(dim=16, moe_ffn_dim=8, num_experts=num_experts, top_k=2, num_shared_experts=1, init_std=0.2)
    base.update(kw)
    return ModelConfig(**base)


def _ep_mesh(world_size: int, ep: int):
    if ep == world_size:
        return init_device_mesh("cpu", (ep,), mesh_dim_names=("ep",))["ep"]
    return init_device_mesh("cpu", (world_size // ep, ep), mesh_dim_names=("dp", "ep"))["ep"]


def _force_zero_rows(ref: MoE, ep_moe: MoE, ep_rank: int, ep: int) -> None:
    """Route no token to the last ep rank's experts (it receives zero rows), and every token of ep rank 0 to its own
    experts (it sends zero rows to every other rank)."""
    e, local = ref.num_experts, ref.num_experts // ep
    bias = torch.zeros(e)
    bias[e - local:] = -1e3
    if ep_rank == 0:
        bias[:ref.top_k] = 1e3
    for moe in (ref, ep_moe):
        moe.router.expert_bias.copy_(bias)


def _check_layer(rank: int, base_seed: int, mesh, num_experts: int, kernel: str, dtype: torch.dtype,
                 zero_rows: bool, compiled: bool = False) -> None:
    ep_group, ep_rank, ep = mesh.get_group(), mesh.get_local_rank(), mesh.size()
    torch.manual_seed(base_seed)  # the same full model on every rank
    cfg = _cfg(num_experts, expert_kernel=kernel, bias_update_speed=1e-3 if zero_rows else 0.0,
               num_shared_experts=1 if dtype == torch.float32 else 0)  # the dense SwiGLU wants fp32 inputs
    ref = MoE(cfg)
    # ExpertParallel leaves the gate weights to the combine; the reference does the same, so that both round the
    # same products (test_layer checks the two forms against each other).
    ref.weights_in_experts = False
    model = copy.deepcopy(ref)
    apply_expert_parallel(model, mesh)
    assert isinstance(model.experts, ExpertParallel) and model.experts.num_experts == num_experts // ep
    if compiled:  # Dynamo traces the DTensor weights' unwrapping; AOTAutograd without Inductor's C++ build
        model.compile(backend="aot_eager")
    if zero_rows:
        _force_zero_rows(ref, model, ep_rank, ep)

    torch.manual_seed(base_seed + 1 + rank)  # different tokens on every rank
    x = torch.randn(3, 5, cfg.dim, dtype=dtype)
    grad_out = torch.randn(3, 5, cfg.dim, dtype=dtype)
    x_ref, x_ep = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_ep = ref(x_ref), model(x_ep)
    y_ref.backward(grad_out)
    y_ep.backward(grad_out)

    tol = FP32 if dtype == torch.float32 else BF16
    torch.testing.assert_close(y_ep, y_ref, **tol, msg=lambda m: f"output, rank {rank}: {m}")
    torch.testing.assert_close(x_ep.grad, x_ref.grad, **tol, msg=lambda m: f"input grad, rank {rank}: {m}")
    # Replicated modules (router, shared experts) see only this rank's tokens: per-rank equality. In bf16 their
    # gradients take the bf16 tolerance: the router's come from the expert outputs, and a bf16 GEMM may round a row
    # one ulp apart when it runs among other rows (the EP experts multiply every rank's rows at once; seen on CPU,
    # seed 2640310270 with ep4). Compiled, bf16 combines in another order too (permute._fusible).
    replicated_tol = FP32 if dtype == torch.float32 and not compiled else tol
    for name, p in model.named_parameters():
        if ".experts." in f".{name}":
            continue
        ref_grad = ref.get_parameter(name).grad
        torch.testing.assert_close(p.grad, ref_grad, **replicated_tol,
                                   msg=lambda m, name=name: f"{name} grad, rank {rank}: {m}")

    first, last = ep_rank * model.experts.num_experts, (ep_rank + 1) * model.experts.num_experts
    if zero_rows:
        routed = (ref.experts.w2.grad.abs().sum((1, 2)) > 0).float()  # experts that got rows from this rank
        dist.all_reduce(routed, group=ep_group)
        assert routed[num_experts - num_experts // ep:].sum() == 0, "the last ep rank should receive no rows"
    for name in ("w13", "w2"):
        p = getattr(model.experts, name)
        assert isinstance(p, DTensor) and p.placements == (Shard(0),) and p.shape == getattr(ref.experts, name).shape
        assert isinstance(p.grad, DTensor) and p.grad.placements == (Shard(0),)
        summed = getattr(ref.experts, name).grad.clone()
        dist.all_reduce(summed, group=ep_group)  # the EP gradients hold the tokens of every rank of the group
        torch.testing.assert_close(p.grad.to_local(), summed[first:last], **(FP32_SUM if tol is FP32 else tol),
                                   msg=lambda m, name=name: f"experts.{name} grad, rank {rank}: {m}")
        assert torch.isfinite(p.grad.to_local()).all()


def _check_transformer_state_dict(rank: int, base_seed: int, mesh) -> None:
    ep = mesh.size()
    cfg = _cfg(2 * ep, vocab_size=32, n_layers=2, n_dense_layers=1, n_heads=2, dense_ffn_dim=32, max_seq_len=8)
    torch.manual_seed(base_seed)
    ref = MoETransformer(cfg)
    model = copy.deepcopy(ref)
    apply_expert_parallel(model, mesh)
    ref_sd, ep_sd = ref.state_dict(), model.state_dict()
    assert list(ep_sd) == list(ref_sd)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    sharded = [k for k, v in ep_sd.items() if isinstance(v, DTensor)]
    assert sharded and all(k.endswith((".experts.w13", ".experts.w2")) for k in sharded)
    for key, value in ep_sd.items():
        assert value.shape == ref_sd[key].shape, key
        if isinstance(value, DTensor):
            torch.testing.assert_close(value.full_tensor(), ref_sd[key], rtol=0, atol=0)  # consolidated export
    torch.manual_seed(base_seed + 1 + rank)
    tokens = torch.randint(0, cfg.vocab_size, (2, 8))
    torch.testing.assert_close(model(tokens), ref(tokens), **FP32)

    with pytest.raises(ValueError, match="divisible"):
        apply_expert_parallel(MoE(_cfg(2 * ep + 1)), mesh)

    # Meta-device init (large models): shard first, then materialise and initialise the local shards only.
    with torch.device("meta"):
        lazy = MoETransformer(cfg)
    apply_expert_parallel(lazy, mesh)
    lazy.to_empty(device="cpu")
    for module in lazy.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    experts = lazy.layers["1"].feed_forward.experts
    assert isinstance(experts, ExpertParallel) and experts.w13.placements == (Shard(0),)
    assert experts.w13.to_local().shape == (2, cfg.dim, 2 * cfg.moe_ffn_dim)
    assert torch.isfinite(experts.w13.to_local()).all() and experts.w13.to_local().std() > 0


def _dcp_worker(rank: int, world_size: int, base_seed: int, path: str) -> None:
    """Save at ep=world_size; load at dp2 x ep2 and into an unsharded model on every rank."""
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415 - only this worker needs it

    cfg = _cfg(2 * world_size, vocab_size=32, n_layers=2, n_dense_layers=1, n_heads=2, dense_ffn_dim=32,
               max_seq_len=8)
    torch.manual_seed(base_seed)
    ref = MoETransformer(cfg)
    saved = copy.deepcopy(ref)
    apply_expert_parallel(saved, _ep_mesh(world_size, world_size))
    dcp.save(saved.state_dict(), checkpoint_id=path)

    torch.manual_seed(base_seed + 1)  # different weights, overwritten by the load
    resharded, plain = MoETransformer(cfg), MoETransformer(cfg)
    apply_expert_parallel(resharded, _ep_mesh(world_size, world_size // 2))
    for model in (resharded, plain):
        state = model.state_dict()
        dcp.load(state, checkpoint_id=path)
        model.load_state_dict(state)
        for key, value in model.state_dict().items():
            full = value.full_tensor() if isinstance(value, DTensor) else value
            torch.testing.assert_close(full, ref.state_dict()[key], rtol=0, atol=0, msg=key)


def _worker(rank: int, world_size: int, base_seed: int, ep: int, cases: tuple) -> None:
    mesh = _ep_mesh(world_size, ep)
    num_experts = 2 * ep
    for case in cases:
        if case == "fp32":
            for kernel in ("grouped_mm", "loop"):
                _check_layer(rank, base_seed, mesh, num_experts, kernel, torch.float32, zero_rows=False)
        elif case == "zero_rows":
            for dtype in (torch.float32, torch.bfloat16):
                _check_layer(rank, base_seed, mesh, num_experts, "grouped_mm", dtype, zero_rows=True)
        elif case == "bf16":
            _check_layer(rank, base_seed, mesh, num_experts, "grouped_mm", torch.bfloat16, zero_rows=False)
        elif case == "compiled":
            for dtype in (torch.float32, torch.bfloat16):
                _check_layer(rank, base_seed, mesh, num_experts, "grouped_mm", dtype, zero_rows=False, compiled=True)
        elif case == "state_dict":
            _check_transformer_state_dict(rank, base_seed, mesh)
        else:
            raise ValueError(case)


@pytest.mark.parametrize(
    ("world_size", "ep"),
    [pytest.param(2, 2, id="ep2"), pytest.param(4, 4, id="ep4"), pytest.param(4, 2, id="dp2xep2")],
)
def test_expert_parallel_matches_single_process(seed, world_size, ep):
    run_workers(_worker, world_size, seed, ep, ("fp32", "bf16", "state_dict"))


def test_compiled_expert_parallel_matches_single_process(seed):
    run_workers(_worker, 2, seed, 2, ("compiled",))


@pytest.mark.parametrize(("world_size", "ep"), [pytest.param(2, 2, id="ep2"), pytest.param(4, 4, id="ep4")])
def test_ranks_receiving_or_sending_zero_rows(seed, world_size, ep):
    run_workers(_worker, world_size, seed, ep, ("zero_rows",))


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_expert_major_order_matches_a_loop(seed, ep):
    local = 3
    counts = torch.randint(0, 4, (ep, local))
    counts[0, 1] = 0
    n = int(counts.sum())
    to_expert, to_source = expert_major_order(counts, n)
    # Reference: label each received row (source, expert, position) and sort by (expert, source, position).
    labels, start = [], 0
    for s in range(ep):
        for e in range(local):
            labels += [(e, s, i, start + i) for i in range(int(counts[s, e]))]
            start += int(counts[s, e])
    expected = torch.tensor([row[3] for row in sorted(labels)], dtype=torch.int64)
    assert torch.equal(to_expert, expected)
    assert torch.equal(to_expert[to_source], torch.arange(n))


def test_distributed_checkpoint_reshards_expert_weights(seed, tmp_path):
    run_workers(_dcp_worker, 4, seed, str(tmp_path / "ckpt"))
