"""DeepSeek-V3 multi-token prediction (MTP): extra sequential modules that predict tokens further ahead.

Shapes: B batch, S sequence (main model inputs), L positions a depth runs on, D hidden, V vocabulary.

Depth k (1..K) at position i combines the previous depth's hidden state ``h[k-1]_i`` (depth 0: the main model's
final hidden state, *before* its final norm) with the embedding of token ``t[i+k]`` and predicts ``t[i+k+1]``::

    h[k]_i = Block_k(Proj_k([RMSNorm(Emb(t[i+k])) ; RMSNorm(h[k-1]_i)]))      Proj_k: 2D -> D
    logits[k]_i = Output(RMSNorm_k(h[k]_i))

``Emb`` and ``Output`` are the main model's: the MTP modules own no copy of them and receive them as call
arguments, so the state dict has one embedding and one head and the MTP weights sit under ``mtp.*`` only. The
concatenation order (embedding first) is the one of DeepSeek-V3's released ``eh_proj`` weights.

Everything here needs only the main model's last hidden states, token ids and the shared embedding/head, so the MTP
modules can live on the last pipeline stage next to the output head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_moe.models.config import ModelConfig
from lightning_moe.models.transformer import TransformerBlock

Rope = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


class MTPLayer(nn.Module):
    """One MTP depth: norms, the 2D -> D projection, one transformer block and its own output norm.

    The block is a ``TransformerBlock`` of the main architecture; its feed-forward is MoE when ``model.mtp_moe`` is
    set (DeepSeek-V3), otherwise a dense SwiGLU of ``model.dense_ffn_dim``.
    """

    def __init__(self, cfg: ModelConfig, depth: int) -> None:
        super().__init__()
        self.depth = depth
        self.init_std = cfg.init_std
        self.embed_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.hidden_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = TransformerBlock(cfg, cfg.n_layers + depth - 1, moe=cfg.mtp_moe)
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for norm in (self.embed_norm, self.hidden_norm, self.norm):
            norm.reset_parameters()
        nn.init.normal_(self.proj.weight, std=self.init_std)

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                output: nn.Module | None = None):
        """h_prev: [B, L, D] previous depth's hidden; emb: [B, L, D] embeddings of the tokens k ahead -> [B, L, D].

        With ``output`` (the shared head) also returns this depth's logits [B, L, V], computed inside this call so
        that a sharded (FSDP) layer still has its norm gathered.
        """
        x = self.proj(torch.cat([self.embed_norm(emb), self.hidden_norm(h_prev)], dim=-1))
        h = self.block(x, rope)
        return h if output is None else (h, self.logits(h, output))

    def logits(self, h: torch.Tensor, output: nn.Module) -> torch.Tensor:
        """h: [B, L, D] this depth's hidden -> [B, L, V] through its own norm and the shared head."""
        return output(self.norm(h))


class MultiTokenPrediction(nn.Module):
    """``model.mtp_depth`` sequential ``MTPLayer``s, keyed "1".."K" (the depth)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.depth = cfg.mtp_depth
        self.layers = nn.ModuleDict({str(k): MTPLayer(cfg, k) for k in range(1, cfg.mtp_depth + 1)})

    def forward(self, h: torch.Tensor, labels: torch.Tensor, embed: nn.Module, output: nn.Module,
                rope: Rope) -> list[torch.Tensor]:
        """Training form: all depths on the positions that have a target.

        h: [B, S, D] main model's final hidden states (before its final norm) at input positions 0..S-1.
        labels: [B, S] the main model's targets (input tokens shifted left by one: ``labels[:, i]`` = t[i+1]).
        embed, output: the main model's embedding and output head (shared, not owned).
        rope: ``seq_len -> (cos, sin)`` of the main model.

        Returns one tensor per depth k: [B, S - k, V], predicting ``labels[:, k:]``.
        """
        s = labels.shape[1]
        if s <= self.depth:
            raise ValueError(f"sequence length {s} must exceed model.mtp_depth={self.depth}")
        out = []
        for k, layer in self.layers.items():
            n = s - int(k)
            h, logits = layer(h[:, :n], embed(labels[:, int(k) - 1:int(k) - 1 + n]), rope(n), output)
            out.append(logits)
        return out


def mtp_losses(mtp_logits: list[torch.Tensor], labels: torch.Tensor) -> list[torch.Tensor]:
    """Cross-entropy of each depth (mean over its positions), fp32.

    mtp_logits[k-1]: [B, S - k, V]; labels: [B, S] the main model's targets. Returns K scalars.
    """
    return [F.cross_entropy(logits.flatten(0, 1).float(), labels[:, k:].flatten())
            for k, logits in enumerate(mtp_logits, start=1)]


def mtp_lambda(cfg: ModelConfig, step: int) -> float:
    """Weight of the MTP loss at an optimizer step: ``mtp_lambda``, then ``mtp_lambda_final`` from
    ``mtp_lambda_switch_step`` on (DeepSeek-V3 used 0.3 for its first 10T tokens, then 0.1)."""
    if cfg.mtp_lambda_final is not None and step >= cfg.mtp_lambda_switch_step:
        return cfg.mtp_lambda_final
    return cfg.mtp_lambda
