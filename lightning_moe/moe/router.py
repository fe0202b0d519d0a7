"""Top-k router with group-limited routing, balance losses and auxiliary-loss-free bias balancing.

Shapes:
    T: tokens in the batch (batch * seq), S: sequence length, D: hidden size,
    E: routed experts, K: experts per token, G: expert groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_moe.moe.permute import count_per_expert


@dataclass
class RoutingResult:
    """What the router decides for a batch of tokens."""

    expert_indices: torch.Tensor
    """[T, K] chosen experts (int64)."""
    weights: torch.Tensor
    """[T, K] gate weights (fp32), from the scores without the balancing bias."""
    aux_loss: torch.Tensor | None
    """Scalar sum of the enabled balance losses (already multiplied by their coefficients), or None."""
    losses: dict[str, torch.Tensor]
    """Detached per-loss values for logging (``aux_loss``, ``seq_aux_loss``, ``z_loss``)."""


def balance_loss(probs: torch.Tensor, expert_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Classic batch-wise balance loss ``E * sum_i f_i * P_i`` (1.0 when perfectly balanced).

    probs: [T, E] normalised scores; expert_indices: [T, K].
    f_i is the fraction of the T*K assignments that went to expert i, P_i the mean probability of expert i.
    """
    counts = count_per_expert(expert_indices.flatten(), num_experts).to(probs.dtype)
    f = counts / expert_indices.numel()
    return num_experts * torch.dot(f, probs.mean(0))


def sequence_balance_loss(probs: torch.Tensor, expert_indices: torch.Tensor, num_experts: int,
                          seq_len: int) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over sequences.

    probs: [T, E] scores normalised per token; expert_indices: [T, K]; tokens are laid out sequence by sequence.
    Per sequence: f_i = E / (K * S) * (tokens of the sequence routed to i), P_i = mean over the sequence of probs.
    """
    t, k = expert_indices.shape
    b = t // seq_len
    one_hot = torch.zeros(b, seq_len * k, num_experts, device=probs.device, dtype=probs.dtype)
    one_hot.scatter_(2, expert_indices.view(b, seq_len * k, 1), 1.0)
    f = one_hot.sum(1) * (num_experts / (k * seq_len))  # [B, E]
    p = probs.view(b, seq_len, num_experts).mean(1)  # [B, E]
    return (f * p).sum(-1).mean()


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated and returned in fp32. On CUDA 16-bit operands go straight into one GEMM with an fp32
    output (their products are exact in fp32), with no upcast copies; elsewhere the operands are upcast first."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _unfused_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` behind a pair of views, which keep Inductor from turning ``mm + add`` into ``addmm``.

    The tokens' gradient is the sum of the router's (this product, [T, D] from a [T, E] gradient) and the experts'
    (a gather-sum over each token's K routed rows). As ``addmm`` (its default for a sum that feeds no elementwise
    op) that copies the gather-sum into the output and runs the GEMM with beta = 1: a 67 MB copy (30 us) and a
    GEMM that reads and writes [T, D] (50 us) on the benchmark layer (H200). Unfused, the GEMM writes [T, D] once
    (23 us) and the add joins the gather-sum's kernel (131 against 113 us)."""
    return torch.mm(a, b).unsqueeze(0).squeeze(0)


class _RouterLogits(torch.autograd.Function):
    """fp32 logits ``x @ weight.T`` of 16-bit tokens and weights, without upcasting them.

    The forward equals the fp32 GEMM of the upcast operands up to summation order. The backward rounds the fp32 logit
    gradients to the tokens' dtype for its two GEMMs (fp32 accumulation), as every other GEMM of a 16-bit model does;
    the weight gradient is reduced over the tokens in fp32.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return _mm_fp32(x, weight.t())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        g = grad.to(x.dtype)
        grad_x = _unfused_mm(g, weight) if ctx.needs_input_grad[0] else None
        grad_w = _mm_fp32(g.t(), x).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[T, E] fp32 router logits of tokens x [T, D]. 16-bit tokens and weights use one GEMM with an fp32 output
    (``_RouterLogits``); other dtypes are upcast to fp32."""
    if x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype:
        return _RouterLogits.apply(x, weight)
    return F.linear(x.float(), weight.float())


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss: mean squared log-partition of the router logits. logits: [T, E]."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def top_k_indices(choice: torch.Tensor, k: int) -> torch.Tensor:
    """[T, K] indices of each row's K largest values of ``choice`` [T, E], largest first.

    Under ``torch.compile`` this is K rounds of argmax, each masking the winner, which Inductor turns into small
    fused kernels (11 for K = 6, 36 us in all for 16k tokens over 64 experts on an H200, the softmax included);
    ``torch.topk`` is a library call there (a radix select and a sort of the K winners, 65 us). Ties may resolve
    differently from ``torch.topk``, whose order among equal values is unspecified. Rows need K values above -inf
    (the router's configurations guarantee it). K above 16 keeps ``torch.topk``, as does eager mode."""
    if not torch.compiler.is_compiling() or k > 16:
        return choice.topk(k, dim=-1).indices
    picks = []
    for _ in range(k):
        pick = choice.argmax(-1, keepdim=True)
        picks.append(pick)
        choice = choice.scatter(-1, pick, float("-inf"))
    return torch.cat(picks, dim=-1)


class TopKRouter(nn.Module):
    """Scores tokens against experts and picks the top-k, DeepSeek-V3 style.

    Buffers (statistics are consumed by callbacks and the balancing update, never by gradients):
        expert_bias [E] (persistent): auxiliary-loss-free balancing bias, added to scores for selection only.
        tokens_per_expert [E] (not persistent): routed assignments accumulated since the last optimizer step.
        dropped_tokens [] (not persistent): assignments dropped by the capacity limit since the last step.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, *, score_func: str = "softmax",
                 route_norm: bool = True, route_scale: float = 1.0, n_group: int = 1, topk_group: int = 1,
                 aux_loss_coef: float = 0.0, seq_aux_loss_coef: float = 0.0, z_loss_coef: float = 0.0,
                 bias_update_speed: float = 0.0, init_std: float = 0.02) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.score_func, self.route_norm, self.route_scale = score_func, route_norm, route_scale
        self.n_group, self.topk_group = n_group, topk_group
        self.aux_loss_coef, self.seq_aux_loss_coef, self.z_loss_coef = aux_loss_coef, seq_aux_loss_coef, z_loss_coef
        self.bias_update_speed = bias_update_speed
        self.init_std = init_std
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32), persistent=True)
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts, dtype=torch.float32), persistent=False)
        self.register_buffer("dropped_tokens", torch.zeros((), dtype=torch.float32), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate.weight, std=self.init_std)
        with torch.no_grad():
            self.expert_bias.zero_()
            self.tokens_per_expert.zero_()
            self.dropped_tokens.zero_()

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        if self.score_func == "softmax":
            return logits.softmax(dim=-1)
        return logits.sigmoid()

    def _group_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """[T, E] boolean mask of the experts in each token's best ``topk_group`` groups."""
        t = scores.shape[0]
        grouped = scores.view(t, self.n_group, -1)
        if self.score_func == "sigmoid" and grouped.shape[-1] > 1:
            # DeepSeek-V3: a group is as good as the sum of its two best experts.
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            group_scores = grouped.amax(dim=-1)
        best = group_scores.topk(self.topk_group, dim=-1).indices  # [T, topk_group]
        group_mask = torch.zeros(t, self.n_group, dtype=torch.bool, device=scores.device)
        group_mask.scatter_(1, best, True)
        return group_mask.unsqueeze(-1).expand_as(grouped).reshape(t, -1)

    def forward(self, x: torch.Tensor, seq_len: int) -> RoutingResult:
        """x: [T, D] tokens, laid out as consecutive sequences of ``seq_len`` tokens."""
        # fp32 router: the softmax/sigmoid and the balancing statistics are precision-sensitive.
        logits = router_logits(x, self.gate.weight)  # [T, E] fp32
        scores = self._scores(logits)
        choice = scores.detach() + self.expert_bias if self.bias_update_speed > 0 else scores.detach()
        if self.n_group > 1:
            choice = choice.masked_fill(~self._group_mask(choice), float("-inf"))
        expert_indices = top_k_indices(choice, self.top_k)  # [T, K]
        weights = scores.gather(1, expert_indices)
        if self.route_norm and self.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * self.route_scale

        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += count_per_expert(expert_indices.flatten(), self.num_experts)

        aux, losses = None, {}
        if self.training and (self.aux_loss_coef or self.seq_aux_loss_coef or self.z_loss_coef):
            probs = scores if self.score_func == "softmax" else scores / (scores.sum(-1, keepdim=True) + 1e-20)
            terms = []
            if self.aux_loss_coef:
                terms.append(("aux_loss", self.aux_loss_coef * balance_loss(probs, expert_indices, self.num_experts)))
            if self.seq_aux_loss_coef:
                loss = sequence_balance_loss(probs, expert_indices, self.num_experts, seq_len)
                terms.append(("seq_aux_loss", self.seq_aux_loss_coef * loss))
            if self.z_loss_coef:
                terms.append(("z_loss", self.z_loss_coef * z_loss(logits)))
            aux = sum(v for _, v in terms)
            losses = {k: v.detach() for k, v in terms}
        return RoutingResult(expert_indices, weights, aux, losses)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor | None = None) -> None:
        """Auxiliary-loss-free balancing step: push the bias of under-loaded experts up, of over-loaded ones down.

        tokens_per_expert: [E] load to balance (default: this router's accumulated counts, which callers
        all-reduce over data-parallel ranks first). Then resets the accumulated statistics.
        """
        load = self.tokens_per_expert if tokens_per_expert is None else tokens_per_expert
        if self.bias_update_speed > 0 and load.sum() > 0:
            self.expert_bias += self.bias_update_speed * torch.sign(load.mean() - load)
        self.tokens_per_expert.zero_()
        self.dropped_tokens.zero_()
