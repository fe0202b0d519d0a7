"""Analytic FLOP counts of the MoE transformer (per token, training = forward + backward = 3 x forward).

Counts matrix multiplies only: 2 FLOPs per multiply-add, on the *active* parameters (shared experts, the router and
``top_k`` routed experts per MoE layer), plus causal attention scores, which attend to S/2 keys on average.
"""

from __future__ import annotations

from lightning_moe.models.config import ModelConfig


def attention_params(cfg: ModelConfig) -> int:
    d, h = cfg.dim, cfg.n_heads
    if cfg.attention == "mla":
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        q = cfg.q_lora_rank * (d + h * qk) if cfg.q_lora_rank else d * h * qk
        kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim +
                                                                                     cfg.v_head_dim)
        return q + kv + h * cfg.v_head_dim * d
    hd = cfg.attn_head_dim
    return d * hd * (2 * h + 2 * cfg.kv_heads)


def active_matmul_params(cfg: ModelConfig) -> int:
    """Weights multiplied per token in one forward pass (the embedding lookup is not a matmul)."""
    d = cfg.dim
    dense_ffn = 3 * d * cfg.dense_ffn_dim
    moe_ffn = d * cfg.num_experts + 3 * d * cfg.moe_ffn_dim * (cfg.top_k + cfg.num_shared_experts)
    total = cfg.n_layers * attention_params(cfg) + cfg.n_dense_layers * dense_ffn + cfg.n_moe_layers * moe_ffn
    return total + d * cfg.vocab_size


def attention_score_flops(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token of QK^T and AV over a causal window (S/2 keys on average), all layers."""
    if cfg.attention == "mla":
        qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        qk = v = cfg.attn_head_dim
    return cfg.n_layers * 2 * cfg.n_heads * (qk + v) * seq_len // 2


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    return 3 * (2 * active_matmul_params(cfg) + attention_score_flops(cfg, seq_len))
