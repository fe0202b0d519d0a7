"""Split sizes kept from a checkpointed block's forward for its recomputation (``parallel.recompute``): on 2 gloo ranks
an expert-parallel model with activation checkpointing exchanges counts only in its forwards and gets the gradients
of the same model without checkpointing; alone, a recomputation that routes differently fails."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.utils.checkpoint import checkpoint

from lightning_moe.models.config import ModelConfig
from lightning_moe.models.transformer import MoETransformer
from lightning_moe.parallel import comm
from lightning_moe.parallel.expert_parallel import apply_expert_parallel
from lightning_moe.parallel.parallelize import apply_activation_checkpointing
from lightning_moe.parallel.recompute import SplitRecord, checkpoint_contexts, replay_or_exchange
from tests.parallel._dist import run_workers


def _ep_checkpoint_worker(rank: int, world_size: int, seed: int) -> None:
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))["ep"]
    torch.manual_seed(seed)  # the same model on every rank
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_dense_layers=1, n_heads=4, num_experts=4, top_k=2,
                      moe_ffn_dim=16, num_shared_experts=1, max_seq_len=16, init_std=0.2)
    plain = MoETransformer(cfg)
    checkpointed = copy.deepcopy(plain)
    for model in (plain, checkpointed):
        apply_expert_parallel(model, mesh)
    apply_activation_checkpointing(checkpointed)

    exchanges = []
    exchange = comm.exchange_split_sizes

    def counting_exchange(counts, group):
        exchanges.append(counts.clone())
        return exchange(counts, group)

    comm.exchange_split_sizes = counting_exchange
    tokens = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(seed + 1 + rank))
    for model in (plain, checkpointed):
        exchanges.clear()
        outs = [model(tokens[i:i + 1]) for i in range(3)]  # three microbatches' forwards, then their backwards
        forward_exchanges = len(exchanges)
        for out in reversed(outs):
            out.float().square().mean().backward()
        assert forward_exchanges == 3 * 2 and len(exchanges) == forward_exchanges  # 2 MoE layers, none in backward
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


def test_checkpointed_expert_parallel_model_exchanges_counts_once_and_matches(seed):
    run_workers(_ep_checkpoint_worker, 2, seed)


class _Exchanges:
    """A stand-in count exchange: counts each call; the split sizes are the counts themselves."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, counts: torch.Tensor):
        def exchange():
            self.calls += 1
            return counts.clone(), counts.tolist(), counts.tolist()

        return replay_or_exchange(counts, exchange)


def test_recomputation_replays_the_forwards_exchanges_each_time_it_runs(seed):
    torch.manual_seed(seed)
    w = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(6, 4, requires_grad=True)
    exchanges = _Exchanges()
    seen = []

    def block(x):
        h = x @ w
        for _ in range(2):  # two MoE layers
            counts = torch.bincount(h.argmax(-1), minlength=4)
            recv_counts, send, recv = exchanges(counts)
            seen.append((counts.tolist(), send, recv, recv_counts.tolist()))
            h = torch.tanh(h @ w)
        return h

    out = checkpoint(block, x, use_reentrant=False, context_fn=checkpoint_contexts)
    assert exchanges.calls == 2
    out.sum().backward(retain_graph=True)
    out.sum().backward()  # a second recomputation (as a split backward's W pass does)
    assert exchanges.calls == 2 and len(seen) == 6
    assert all(c == s == r == rc for c, s, r, rc in seen)
    assert seen[2:4] == seen[:2] and seen[4:] == seen[:2]


def test_a_recomputation_that_routes_differently_fails():
    record = SplitRecord()
    counts = torch.tensor([3, 1, 0, 2])
    sizes = (counts.clone(), [4], [4])
    with record.active(replaying=False):
        record.record(counts, sizes)
    with record.active(replaying=True):
        assert record.replay(counts.clone()) is sizes
        with pytest.raises(RuntimeError, match="more count exchanges"):
            record.replay(counts)
    with record.active(replaying=True), pytest.raises(RuntimeError, match="routed tokens differently"):
        record.replay(torch.tensor([3, 0, 1, 2]))
    with record.active(replaying=True), pytest.raises(RuntimeError, match="shape"):
        record.replay(torch.tensor([3, 1, 0, 2, 0]))


def test_without_a_checkpoint_every_call_exchanges():
    exchanges = _Exchanges()
    for _ in range(3):
        exchanges(torch.tensor([1, 2]))
    assert exchanges.calls == 3


def test_compiled_checkpointed_blocks_run_and_match(seed):
    # under torch.compile a checkpoint takes only dispatch modes as contexts: compiled blocks recompute plainly
    from lightning_moe.parallel.dims import ParallelDims
    from lightning_moe.parallel.parallelize import parallelize

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_dense_layers=1, n_heads=4, num_experts=4, top_k=2,
                      moe_ffn_dim=16, max_seq_len=16)
    ref = MoETransformer(cfg)
    model = copy.deepcopy(ref)
    parallelize(model, ParallelDims(dp_shard=1, world_size=1), None, activation_checkpointing=True, compile=True)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed + 1))
    for m in (ref, model):
        m(tokens).float().square().mean().backward()
    for (name, p), q in zip(ref.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
