"""The MoE feed-forward layer: router -> permutation -> routed experts -> weighted combine, plus shared experts.

Shapes: B batch, S sequence, D hidden, T = B * S tokens, K experts per token, E routed experts.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_moe.models.config import ModelConfig
from lightning_moe.moe.experts import FeedForward, RoutedExperts
from lightning_moe.moe.permute import (
    combine,
    expert_capacity,
    gather_tokens,
    inverse_order,
    permute,
    slot_weights_by_row,
)
from lightning_moe.moe.router import TopKRouter


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on the activations whose backward also sends gradient 1 into the auxiliary loss.

    This adds the balance losses to the training objective without returning them through the model, so they work
    unchanged under pipeline parallelism (each stage's losses stay on its stage) and activation checkpointing.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.aux_dtype, ctx.aux_device, ctx.scale = aux_loss.dtype, aux_loss.device, scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.full((), ctx.scale, dtype=ctx.aux_dtype, device=ctx.aux_device), None


class MoE(nn.Module):
    """Routed + shared experts. Dropless unless ``capacity_factor`` is set.

    After each forward, ``last_losses`` holds the detached balance losses for logging.
    """

    weights_in_experts = True
    """Dropless, with experts that take row weights (``RoutedExperts.takes_row_weights``): the gate weights scale
    the experts' SwiGLU outputs and the combine sums. False: the combine weights the expert outputs (the same
    function; a reference for tests and benchmarks)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.capacity_factor = cfg.capacity_factor
        self.router = TopKRouter(
            cfg.dim, cfg.num_experts, cfg.top_k, score_func=cfg.score_func, route_norm=cfg.route_norm,
            route_scale=cfg.route_scale, n_group=cfg.n_group, topk_group=cfg.topk_group,
            aux_loss_coef=cfg.aux_loss_coef, seq_aux_loss_coef=cfg.seq_aux_loss_coef, z_loss_coef=cfg.z_loss_coef,
            bias_update_speed=cfg.bias_update_speed, init_std=cfg.init_std,
        )
        self.experts = RoutedExperts(cfg.num_experts, cfg.dim, cfg.moe_ffn_dim, cfg.expert_kernel, cfg.init_std)
        self.shared_experts = (
            FeedForward(cfg.dim, cfg.moe_ffn_dim * cfg.num_shared_experts, cfg.init_std)
            if cfg.num_shared_experts else None
        )
        self.last_losses: dict[str, torch.Tensor] = {}
        # Set to 1 / gradient-accumulation steps by the training module, so the aux losses average like the loss.
        self.aux_loss_scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, S, D] -> [B, S, D]."""
        b, s, d = x.shape
        tokens = x.reshape(-1, d)
        routing = self.router(tokens, s)
        capacity = None
        if self.capacity_factor is not None and self.training:
            capacity = expert_capacity(tokens.shape[0], self.top_k, self.num_experts, self.capacity_factor)
        perm = permute(routing.expert_indices, self.num_experts, capacity)
        if capacity is not None:
            with torch.no_grad():
                self.router.dropped_tokens += perm.dropped
        inverse = inverse_order(perm) if perm.dropless else None
        rows = gather_tokens(tokens, perm, inverse)
        if perm.dropless and self.weights_in_experts and self.experts.takes_row_weights:
            # The experts scale each row by its gate weight before their down projection, and the combine is a
            # plain sum: the gate weights' gradient comes out of the experts' backward, so the routed outputs
            # [N, D] need not be kept for it.
            routed_out = self.experts(rows, perm.counts, slot_weights_by_row(routing.weights, perm))
            out = combine(routed_out, perm, None, inverse)
        else:
            out = combine(self.experts(rows, perm.counts), perm, routing.weights, inverse)
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        out = out.view(b, s, d)
        self.last_losses = routing.losses
        if routing.aux_loss is not None and torch.is_grad_enabled():
            out = _AttachAuxLoss.apply(out, routing.aux_loss, self.aux_loss_scale)
        return out
