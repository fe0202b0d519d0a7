"""The CUDA path of the expert-parallel exchange (``comm.all_to_all_split_sizes``: pinned asynchronous copy of the
split sizes, hook before the host waits) on one GPU: an NCCL group of one rank and a layer with redundant experts,
which sends every row through the dispatch/combine path, against the plain layer."""

from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from lightning_moe.models.config import ModelConfig
from lightning_moe.moe.layer import MoE
from lightning_moe.parallel import comm
from lightning_moe.parallel.expert_parallel import ExpertParallel, apply_expert_parallel

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()), reason="needs a GPU")


@pytest.fixture
def nccl_world():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cuda", (1,), mesh_dim_names=("ep",))["ep"]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kernel", ["loop", "grouped_mm"])
def test_exchange_on_cuda_matches_the_plain_layer(seed, nccl_world, kernel):
    dtype = torch.float32 if kernel == "loop" else torch.bfloat16
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    cfg = ModelConfig(dim=64, num_experts=8, top_k=2, moe_ffn_dim=32, num_shared_experts=0, expert_kernel=kernel)
    ref = MoE(cfg).cuda().to(dtype)
    model = copy.deepcopy(ref)
    apply_expert_parallel(model, nccl_world, num_redundant=4)
    assert isinstance(model.experts, ExpertParallel) and model.experts.replicated
    calls: list[str] = []
    previous = comm.set_comm_hook(calls.append)
    try:
        x = torch.randn(2, 48, 64, device="cuda", dtype=dtype)
        g = torch.randn_like(x)
        x_ref, x_ep = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref, y_ep = ref(x_ref), model(x_ep)
        y_ref.backward(g)
        y_ep.backward(g)
    finally:
        comm.set_comm_hook(previous)
    assert calls[:3] == ["counts", "dispatch", "combine"], calls
    torch.testing.assert_close(y_ep, y_ref, **tol)
    torch.testing.assert_close(x_ep.grad, x_ref.grad, **tol)
    torch.testing.assert_close(model.router.gate.weight.grad, ref.router.gate.weight.grad, **tol)
