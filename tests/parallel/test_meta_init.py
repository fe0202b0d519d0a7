"""``MoEStrategy(meta_init=True)``: after Lightning materialises the meta-device model, every module's own
``reset_parameters`` has run (parents after their children), so the weights start from the distributions of a model
built eagerly, not from PyTorch's default ``nn.Linear`` init (kaiming-uniform, std 1 / sqrt(3 fan_in)).

Sizes: ``init_std`` 0.01 against kaiming stds of 0.025 to 0.036 (fan_in 256 to 512), and the output head's
dim ** -0.5 = 0.0625 against 0.036; every weight has >= 1024 elements and the tolerance is 6 standard errors of the
std estimate, so the two inits are far apart and a fresh seed does not make the test flaky.

Each fit stops right after set-up (``max_steps=0``): the weights are the initial ones. On 2 gloo ranks the sharded
weights (FSDP x EP) must also be different draws on the two ranks (not the same experts twice), redundant expert slots
copies of their expert, HSDP replicas identical, and the embedding copies of two pipeline stages identical.
``materialize_meta_module`` itself: each ``reset_parameters`` once, children first, draws that depend on (seed,
module name) only, the caller's RNG state restored.
"""

from __future__ import annotations

import math
import os

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.utils.data import DataLoader

from lightning_moe.callbacks import ExpertRebalancer
from lightning_moe.models.config import ModelConfig
from lightning_moe.models.transformer import MoETransformer
from lightning_moe.module import MoELanguageModel
from lightning_moe.moe.balance import moe_layers
from lightning_moe.parallel.meta_init import materialize_meta_module
from lightning_moe.parallel.strategy import MoEStrategy
from tests.parallel._dist import run_workers

E, REDUNDANT = 4, 2
# A dense block, an MoE block and an MoE MTP depth: attention, dense MLP, router, routed and shared experts, MTP
# projection, embedding and output head.
CFG = ModelConfig(vocab_size=512, dim=256, n_layers=2, n_dense_layers=1, n_heads=4, dense_ffn_dim=512,
                  num_experts=E, top_k=2, moe_ffn_dim=256, num_shared_experts=1, max_seq_len=16, mtp_depth=1,
                  init_std=0.01)


def _expected_std(name: str, cfg: ModelConfig) -> float | None:
    """The std of the model's own init of each weight (None: RMSNorm weights, all ones)."""
    if name.endswith("norm.weight"):
        return None
    if name == "tok_embeddings.weight":
        return 1.0  # MoETransformer.reset_parameters
    if name == "output.weight":
        return cfg.dim ** -0.5  # MoETransformer.reset_parameters
    return cfg.init_std  # attention, FeedForward, router gate, routed experts, MTP projection


def _check_init(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], cfg: ModelConfig,
                what: str) -> None:
    ref = MoETransformer(cfg)  # built eagerly: its buffers are the reference, its weights check the expectations
    assert sorted(params) == sorted(n for n, _ in ref.named_parameters()), what
    for source, named in ((what, params), ("eager model", dict(ref.named_parameters()))):
        for name, p in named.items():
            p = p.detach().float()
            std = _expected_std(name, cfg)
            if std is None:
                assert torch.equal(p, torch.ones_like(p)), f"{source} {name}: RMSNorm weights start at one"
                continue
            n, got = p.numel(), p.std().item()
            tol = 6 / math.sqrt(2 * n)  # relative standard error of a normal sample's std: 1 / sqrt(2n)
            kaiming = f"; kaiming-uniform gives {(3 * p.shape[-1]) ** -0.5:.4g}" if p.dim() == 2 else ""
            assert abs(got / std - 1) < tol, (f"{source} {name} {tuple(p.shape)}: std {got:.4g}, expected {std:.4g} "
                                              f"(+-{tol:.1%}){kaiming}")
            assert abs(p.mean().item()) < 6 * std / math.sqrt(n), f"{source} {name}: mean {p.mean().item():.3g}"
    ref_buffers = dict(ref.named_buffers())
    assert sorted(buffers) == sorted(ref_buffers), what
    for name, b in buffers.items():  # RoPE tables, router bias and statistics
        torch.testing.assert_close(b, ref_buffers[name], msg=lambda m, name=name: f"{what} buffer {name}: {m}")


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.detach().full_tensor() if isinstance(t, DTensor) else t.detach()


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full weights (a collective with sharded ones), routed experts in the logical layout (one row per expert)."""
    out = {}
    for name, p in model.named_parameters():
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        if getattr(owner, "replicated", False):
            p = owner.logical_from_slots(p)
        out[name] = _full(p)
    return out


def _fit(world_size: int, seed: int, callbacks: tuple = (), accelerator: str = "cpu", **sizes) -> MoELanguageModel:
    pl.seed_everything(seed, verbose=False)
    module = MoELanguageModel(CFG, {"lr": 1e-3, "warmup_steps": 0})
    trainer = pl.Trainer(accelerator=accelerator, devices=world_size, strategy=MoEStrategy(meta_init=True, **sizes),
                         max_steps=0, logger=False, callbacks=list(callbacks), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0)
    data = torch.randint(0, CFG.vocab_size, (4 * world_size, 9), generator=torch.Generator().manual_seed(0))
    trainer.fit(module, DataLoader(data, batch_size=2))
    return module


def _use_harness_group(rank: int, world_size: int) -> None:
    # The harness already created the process group; with these set, Lightning uses this process as rank `rank`.
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")


def _single_worker(rank: int, world_size: int, seed: int) -> None:
    _use_harness_group(rank, world_size)
    model = _fit(1, seed).model
    _check_init(_params(model), dict(model.named_buffers()), CFG, "meta init, 1 process")


def test_meta_init_runs_the_models_own_init(seed):
    run_workers(_single_worker, 1, seed)


def _all_local(t: torch.Tensor) -> list[torch.Tensor]:
    """This rank's local tensor, gathered from every rank."""
    local = (t.to_local() if isinstance(t, DTensor) else t).detach().contiguous()
    out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return out


def _two_rank_worker(rank: int, world_size: int, seed: int) -> None:
    _use_harness_group(rank, world_size)

    # FSDP (dp_shard=2) x EP (ep=2), with 2 redundant expert slots per MoE layer (replicas of experts 0 and 1)
    rebalancer = ExpertRebalancer(every_n_steps=100, num_redundant=REDUNDANT)
    model = _fit(world_size, seed, callbacks=(rebalancer,), ep=2).model
    params = _params(model)
    _check_init(params, dict(model.named_buffers()), CFG, "meta init, dp_shard=2 x ep=2")
    sharded = 0
    for name, p in model.named_parameters():
        if isinstance(p, DTensor) and any(isinstance(x, Shard) for x in p.placements) and _expected_std(name, CFG):
            # the ranks' shards are different draws (e.g. not the same experts twice), as in an eager model
            half = params[name].shape[0] // 2
            assert not torch.equal(params[name][:half], params[name][half:2 * half]), f"{name}: same shard twice"
            sharded += 1
    assert sharded == sum(1 for n in params if _expected_std(n, CFG)), "FSDP / EP shard every weight"
    for name, moe in moe_layers(model):
        experts = moe.experts
        assert experts.w13.shape[0] == E + REDUNDANT
        for w in ("w13", "w2"):
            slots = _full(getattr(experts, w))
            for s in range(E, E + REDUNDANT):  # default placement: slot s holds expert s % E
                assert torch.equal(slots[s], slots[s % E]), f"{name}.{w}: slot {s} is not a replica of expert {s % E}"
    for name, b in model.named_buffers():
        copies = _all_local(b)
        assert all(torch.equal(c, copies[0]) for c in copies), f"buffer {name} differs between ranks"

    # HSDP with dp_replicate=2: every rank holds a full replica; the replicas must be identical
    model = _fit(world_size, seed, dp_replicate=2, dp_shard=1).model
    _check_init(_params(model), dict(model.named_buffers()), CFG, "meta init, dp_replicate=2")
    for name, p in model.named_parameters():
        copies = _all_local(p)
        assert all(torch.equal(c, copies[0]) for c in copies), f"{name}: the replicas differ between ranks"

    # pp=2 with MTP and a loop schedule: the first and the last stage each hold a copy of the embedding (their
    # gradients are summed), so the two copies must start identical although the ranks hold different layers
    model = _fit(world_size, seed, pp=2, pipeline_schedule="1f1b", pipeline_microbatches=2).model
    assert model.tok_embeddings is not None and (model.output is not None) == (rank == 1)
    copies = _all_local(model.tok_embeddings.weight)
    assert torch.equal(copies[0], copies[1]), "the embedding copies of the first and last stage differ"
    for name, p in model.named_parameters():
        std = _expected_std(name, CFG)
        if std is not None:
            assert abs(p.detach().std().item() / std - 1) < 6 / math.sqrt(2 * p.numel()), f"pp=2 {name}"


def test_meta_init_sharded_and_replicated_two_ranks(seed):
    run_workers(_two_rank_worker, 2, seed)


_GPU_SCRIPT = """
import torch
from tests.parallel.test_meta_init import CFG, _check_init, _fit, _params
model = _fit(1, {seed}, accelerator="gpu").model
assert next(model.parameters()).is_cuda
_check_init(_params(model), {{n: b.cpu() for n, b in model.named_buffers()}}, CFG, "meta init, 1 GPU")
print("meta init on the GPU: OK")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_meta_init_runs_the_models_own_init(seed):
    """On CUDA the sharded weights draw through torch's ``OffsetBasedRNGTracker`` (NCCL group of one rank; in a
    subprocess, so its process group does not outlive the test)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", _GPU_SCRIPT.format(seed=seed)], cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


class _Node(nn.Module):
    """Records its ``reset_parameters`` calls; a leaf owns a parameter."""

    def __init__(self, tag: str, calls: list[str], *children: nn.Module) -> None:
        super().__init__()
        self.tag, self.calls = tag, calls
        self.kids = nn.ModuleList(children)
        self.w = nn.Parameter(torch.empty(3)) if not children else None

    def reset_parameters(self) -> None:
        self.calls.append(self.tag)
        for kid in self.kids:  # a parent's init of its children, like FeedForward's
            if kid.w is not None:
                nn.init.constant_(kid.w, len(self.tag))


def test_materialize_runs_every_reset_once_children_first():
    calls: list[str] = []
    with torch.device("meta"):
        leaf = _Node("leaf", calls)
        tree = _Node("root", calls, _Node("a", calls, leaf, _Node("b", calls)), _Node("c", calls))
        tree.kids[1].shared = leaf  # a module registered twice is still reset once
        tree.plain = nn.Sequential(nn.Linear(2, 2))  # no reset_parameters on Sequential: its Linear has one
    rng = torch.get_rng_state()
    assert materialize_meta_module(tree, torch.device("cpu"), seed=7)
    assert calls == ["leaf", "b", "a", "c", "root"]
    for node, value in ((leaf, 1.0), (tree.kids[0].kids[1], 1.0), (tree.kids[1], 4.0)):  # len(parent's tag)
        assert torch.equal(node.w, torch.full((3,), value)), f"{node.tag}: the parent's init wins"
    assert torch.equal(torch.get_rng_state(), rng), "the caller's RNG state is restored"
    assert not any(t.is_meta for t in tree.parameters())
    first = tree.plain[0].weight.clone()
    calls.clear()
    assert not materialize_meta_module(tree, torch.device("cpu"), seed=7), "nothing on the meta device: a no-op"
    assert calls == [] and torch.equal(tree.plain[0].weight, first)

    with torch.device("meta"):
        again = _Node("root", [], _Node("a", [], _Node("leaf", [])), _Node("c", []))
        again.plain = nn.Sequential(nn.Linear(2, 2))
    materialize_meta_module(again, torch.device("cpu"), seed=7)
    torch.testing.assert_close(again.plain[0].weight, first, rtol=0, atol=0,
                               msg="a module's draws depend on (seed, its name) only")

    class NoReset(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.empty(2))

    with torch.device("meta"):
        bad = nn.Sequential(NoReset())
    with pytest.warns(UserWarning, match="NoReset"):
        materialize_meta_module(bad, torch.device("cpu"), seed=7)
