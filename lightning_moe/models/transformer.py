"""Decoder-only MoE transformer as a plain ``nn.Module`` (no parallelism here; see ``lightning_moe.parallel``).

Shapes: B batch, S sequence, D hidden, V vocabulary.

Layers live in an ``nn.ModuleDict`` keyed by their global index, so a pipeline stage can delete the blocks it does
not own (and the embedding / head) and still load the same state-dict keys.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from lightning_moe.models.attention import RotaryEmbedding, build_attention
from lightning_moe.models.config import ModelConfig
from lightning_moe.moe.experts import FeedForward
from lightning_moe.moe.layer import MoE


class TransformerBlock(nn.Module):
    """Pre-norm block: attention, then a dense SwiGLU MLP or an MoE layer (``moe``; default: by ``layer_id``)."""

    def __init__(self, cfg: ModelConfig, layer_id: int, moe: bool | None = None) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = build_attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.moe = cfg.is_moe_layer(layer_id) if moe is None else moe
        self.feed_forward = MoE(cfg) if self.moe else FeedForward(cfg.dim, cfg.dense_ffn_dim, cfg.init_std)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope)
        return x + self.feed_forward(self.ffn_norm(x))


class MoETransformer(nn.Module):
    """Token embedding -> blocks -> final norm -> output head.

    On a pipeline stage some of ``tok_embeddings``, ``norm`` and ``output`` may be None: the stage then takes or
    returns hidden states [B, S, D] instead of tokens [B, S] / logits [B, S, V].

    With ``model.mtp_depth > 0``, ``mtp`` holds the multi-token-prediction modules (``lightning_moe.models.mtp``);
    they share ``tok_embeddings`` and ``output`` and run only when ``forward`` gets ``labels``. Setting ``mtp`` to
    None leaves a plain inference model with the same state-dict keys minus ``mtp.*``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rope = RotaryEmbedding(cfg.rotary_dim, cfg.max_seq_len, cfg.rope_theta)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i) for i in range(cfg.n_layers)})
        self.norm: nn.RMSNorm | None = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output: nn.Linear | None = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.reset_parameters()
        # --- multi-token prediction: built last, so the main weights draw the same random numbers without it ---
        self.mtp = None
        if cfg.mtp_depth:
            from lightning_moe.models.mtp import MultiTokenPrediction  # noqa: PLC0415 - mtp imports this module

            self.mtp = MultiTokenPrediction(cfg)

    def reset_parameters(self) -> None:
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight, std=1.0)
        if self.output is not None and not self.cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, std=self.cfg.dim ** -0.5)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens

    def blocks(self, h: torch.Tensor) -> torch.Tensor:
        rope = self.rope(h.shape[1])
        for layer in self.layers.values():
            h = layer(h, rope)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        if self.norm is None:
            return h
        h = self.norm(h)
        return self.output(h) if self.output is not None else h

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None):
        """tokens: [B, S] int (or hidden [B, S, D] on a later pipeline stage) -> logits [B, S, V].

        With ``labels`` ([B, S], the targets: tokens shifted left by one) returns ``(logits, mtp_logits)``, where
        ``mtp_logits[k-1]``: [B, S - k, V] are depth k's predictions of ``labels[:, k:]`` (an empty list without MTP
        modules). Training goes through ``forward`` so that FSDP's hooks on the root module run.
        """
        h = self.blocks(self.embed(tokens))
        logits = self.head(h)
        if labels is None:
            return logits
        if self.mtp is None:
            return logits, []
        return logits, self.mtp(h, labels, self.tok_embeddings, self.output, self.rope)

    def moe_layers(self) -> Iterator[tuple[str, MoE]]:
        """(layer key, MoE module) for every MoE layer held by this module, MTP blocks last (key ``mtp.{k}``)."""
        for key, layer in self.layers.items():
            if isinstance(layer.feed_forward, MoE):
                yield key, layer.feed_forward
        for key, layer in (self.mtp.layers.items() if self.mtp is not None else ()):
            if isinstance(layer.block.feed_forward, MoE):
                yield f"mtp.{key}", layer.block.feed_forward

    # --- parameter counts (for MFU and reports) ---
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self) -> int:
        """Parameters used per token: everything but the routed experts not chosen (top_k of num_experts)."""
        total = 0
        for name, p in self.named_parameters():
            if ".experts." in name:
                total += p.numel() * self.cfg.top_k // self.cfg.num_experts
            else:
                total += p.numel()
        return total
