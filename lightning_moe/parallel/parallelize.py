"""Apply parallelism to a plain ``MoETransformer``, in a fixed order: expert parallel, activation checkpointing,
compile, FSDP2 (dense weights on the data-parallel mesh, experts on their own data-parallel mesh).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_moe.errors import ConfigError
from lightning_moe.moe.layer import MoE
from lightning_moe.parallel.dims import Meshes, ParallelDims
from lightning_moe.parallel.expert_parallel import apply_expert_parallel
from lightning_moe.parallel.recompute import checkpoint_contexts


# Two functions rather than one taking context_fn as an argument: Dynamo (torch 2.13) refuses a checkpoint whose
# context_fn is a variable of the traced function, and compiled blocks must use the plain one.
def _checkpointed_forward(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _checkpointed_forward_reusing_split_sizes(forward, *args, **kwargs):
    # the recomputation reuses the forward's expert-parallel split sizes (no count exchange, no host sync)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=checkpoint_contexts, **kwargs)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The main blocks, then the blocks of the multi-token-prediction modules (if any)."""
    blocks = list(model.layers.values())
    mtp = getattr(model, "mtp", None)
    if mtp is not None:
        blocks += [layer.block for layer in mtp.layers.values()]
    return blocks


def apply_activation_checkpointing(model: nn.Module, reuse_split_sizes: bool = True) -> None:
    """Recompute each transformer block in backward. Wraps ``forward`` in place, so parameter names don't change.

    ``reuse_split_sizes``: the recomputation takes the expert-parallel split sizes from the forward
    (``parallel.recompute``) instead of exchanging counts again. Not for blocks that will be compiled: under
    ``torch.compile`` a checkpoint accepts only dispatch modes as its contexts.
    """
    wrapper = _checkpointed_forward_reusing_split_sizes if reuse_split_sizes else _checkpointed_forward
    for block in transformer_blocks(model):
        block.forward = functools.partial(wrapper, block.forward)


def apply_node_limited_routing(model: nn.Module, ep: int, ep_groups: int, max_ep_groups: int) -> None:
    """Route each token to experts of at most ``max_ep_groups`` of the ``ep_groups`` groups of EP ranks (nodes).

    EP rank r holds experts [r * E / ep, (r + 1) * E / ep), so expert group g of the group-limited router (E /
    ep_groups consecutive experts) lives on the ep / ep_groups consecutive ranks of node g.
    """
    if ep_groups < 1 or ep % ep_groups:
        raise ConfigError(f"strategy.ep_groups={ep_groups} must divide strategy.ep={ep}")
    if not 1 <= max_ep_groups <= ep_groups:
        raise ConfigError(f"strategy.max_ep_groups={max_ep_groups} must be in [1, strategy.ep_groups={ep_groups}]")
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        router = moe.router
        if router.num_experts % ep_groups:
            raise ConfigError(f"model.num_experts={router.num_experts} must be divisible by strategy.ep_groups")
        per_group = router.num_experts // ep_groups
        if router.top_k > max_ep_groups * per_group:
            raise ConfigError(f"model.top_k={router.top_k} exceeds the {max_ep_groups * per_group} experts of "
                              f"strategy.max_ep_groups={max_ep_groups} groups")
        router.n_group, router.topk_group = ep_groups, max_ep_groups


def parallelize(model: nn.Module, dims: ParallelDims, meshes: Meshes | None, *, param_dtype: torch.dtype | None = None,
                reduce_dtype: torch.dtype = torch.float32, activation_checkpointing: bool = False,
                compile: bool = False, ep_groups: int | None = None, max_ep_groups: int | None = None,
                stages: list[nn.Module] | None = None, num_redundant_experts: int = 0) -> nn.Module:
    """Shard ``model`` (a ``MoETransformer``, or the part of it that one pipeline rank holds) in place; return it.

    ``num_redundant_experts``: extra expert slots per MoE layer for redundant experts (EPLB; needs ep > 1).

    ``stages``: under pipeline parallelism, the ``StageModule`` views of this rank over ``model``; they (not
    ``model``) become the FSDP roots, since the schedule calls them. Every rank must hold the same weights (or meta
    tensors) on entry.
    """
    moe_layers = [m for m in model.modules() if isinstance(m, MoE)]
    if max_ep_groups is not None:
        apply_node_limited_routing(model, dims.ep, ep_groups or dims.ep, max_ep_groups)
    if dims.ep > 1:
        for moe in moe_layers:
            if moe.num_experts % dims.ep:
                raise ConfigError(f"model.num_experts={moe.num_experts} must be divisible by strategy.ep={dims.ep}")
        apply_expert_parallel(model, meshes.ep, num_redundant_experts)
        if dims.fsdp_enabled:
            # Each EP rank's expert gradient sums the tokens of the whole ep group; FSDP then averages over the
            # expert data-parallel mesh (dp / ep ranks). Scaling by 1 / ep makes that the mean over all dp ranks,
            # like the dense weights. (FSDP's gradient divide factor would do it too, but needs PREMUL_SUM,
            # which gloo lacks.)
            for moe in moe_layers:
                moe.experts.weight_grad_scale = 1.0 / dims.ep
    if activation_checkpointing:
        apply_activation_checkpointing(model, reuse_split_sizes=not compile)
    if compile:
        for block in transformer_blocks(model):
            block.compile()
    # FSDP2 shards over dp > 1 ranks, and also carries the mixed-precision policy: with param_dtype set and one
    # data-parallel rank it wraps the model on its mesh of one, so the compute dtype is the one asked for.
    if dims.fsdp_enabled or param_dtype is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: PLC0415

        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        dense_mesh, expert_mesh = meshes.dense, meshes.expert_dp
        mtp = getattr(model, "mtp", None)
        units = list(model.layers.values()) + (list(mtp.layers.values()) if mtp is not None else [])
        for unit in units:  # a block, or an MTP layer (norms + projection + block)
            for moe in (m for m in unit.modules() if isinstance(m, MoE)):
                if dims.ep > 1:
                    fully_shard(moe.experts, mesh=expert_mesh, mp_policy=mp)
            fully_shard(unit, mesh=dense_mesh, mp_policy=mp)
        if stages is None:
            fully_shard(model, mesh=dense_mesh, mp_policy=mp)
            return model
        embedding_users = [s for s in stages if s.tok_embeddings is not None or s.mtp_embeddings is not None]
        if len(embedding_users) > 1:  # first and last stage on one rank, both using the embedding (MTP)
            fully_shard(model.tok_embeddings, mesh=dense_mesh, mp_policy=mp)
            # FSDP2 initialises the states under a root when the root first runs forward and refuses a state that
            # another root already initialised: the last stage calls the embedding unit without holding it as a
            # submodule (the first stage, which always runs forward first, holds it)
            for stage in embedding_users:
                if stage.mtp_embeddings is not None:
                    stage.hold_mtp_embeddings_unregistered()
        for stage in stages:
            fully_shard(stage, mesh=dense_mesh, mp_policy=mp)
    return model
