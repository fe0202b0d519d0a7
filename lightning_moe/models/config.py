"""Model configuration: one flat dataclass, the ``model`` config group (``model.num_experts=8`` on the command line).

It is a plain dataclass (no Hydra import) so that checkpoints, Hugging Face export and tests use it directly; the CLI
registers it as a structured-config schema so that a wrong key or type fails before training.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from lightning_moe.errors import ConfigError

SCORE_FUNCS = ("softmax", "sigmoid")
EXPERT_KERNELS = ("grouped_mm", "loop", "megablocks", "triton")
ATTENTION_TYPES = ("gqa", "mla")


@dataclass
class ModelConfig:
    # --- transformer ---
    vocab_size: int = 256
    """Vocabulary size (256 for the byte-level default data)."""
    dim: int = 128
    """Hidden size."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads."""
    n_kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention (None: same as n_heads)."""
    head_dim: Optional[int] = None
    """Per-head size (None: dim // n_heads)."""
    attention: str = "gqa"
    """Attention type: gqa (grouped-query / multi-head) or mla (DeepSeek multi-head latent attention)."""
    qk_norm: bool = False
    """GQA: RMSNorm over each query and key head before RoPE (Qwen3)."""
    q_lora_rank: int = 0
    """MLA: rank of the query compression (0: no compression)."""
    kv_lora_rank: int = 64
    """MLA: rank of the joint key/value compression."""
    qk_rope_head_dim: int = 16
    """MLA: per-head size of the rotary part of queries and keys."""
    qk_nope_head_dim: int = 32
    """MLA: per-head size of the non-rotary part of queries and keys."""
    v_head_dim: int = 32
    """MLA: per-head size of values."""
    max_seq_len: int = 256
    """Longest sequence the rotary tables cover."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head."""
    init_std: float = 0.02
    """Standard deviation of the weight initialisation."""
    # --- feed-forward ---
    n_dense_layers: int = 1
    """The first n_dense_layers blocks use a dense SwiGLU MLP, the rest are MoE."""
    dense_ffn_dim: int = 512
    """Hidden size of the dense MLPs."""
    # --- mixture of experts ---
    num_experts: int = 8
    """Routed experts per MoE layer."""
    top_k: int = 2
    """Routed experts per token."""
    moe_ffn_dim: int = 128
    """Hidden size of one routed expert."""
    num_shared_experts: int = 1
    """Always-active shared experts (their hidden size is num_shared_experts * moe_ffn_dim)."""
    score_func: str = "softmax"
    """Router scores: softmax or sigmoid (DeepSeek-V3)."""
    route_norm: bool = True
    """Renormalise the top-k gate weights to sum to one."""
    route_scale: float = 1.0
    """Routed scaling factor applied to the gate weights."""
    n_group: int = 1
    """Expert groups for group-limited routing (1: off)."""
    topk_group: int = 1
    """Groups each token may use under group-limited routing."""
    aux_loss_coef: float = 0.0
    """Weight of the classic (batch-wise) auxiliary balance loss."""
    seq_aux_loss_coef: float = 0.0
    """Weight of DeepSeek-V3's sequence-wise balance loss."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss."""
    bias_update_speed: float = 0.0
    """Auxiliary-loss-free balancing: bias update speed gamma (0: off)."""
    capacity_factor: Optional[float] = None
    """Expert capacity factor with token dropping (None: dropless)."""
    expert_kernel: str = "grouped_mm"
    """Routed-expert kernel: grouped_mm (default), loop (reference), triton (GPU: fused SwiGLU grouped GEMMs) or
    megablocks (GPU, optional extra)."""
    # --- multi-token prediction ---
    mtp_depth: int = 0
    """DeepSeek-V3 multi-token prediction modules (0: off); depth k predicts token t+k+1 from position t."""
    mtp_moe: bool = True
    """MTP blocks use an MoE feed-forward like DeepSeek-V3's (false: a dense SwiGLU of dense_ffn_dim)."""
    mtp_lambda: float = 0.3
    """Weight of the MTP loss (mean of the per-depth cross-entropies) added to the main loss."""
    mtp_lambda_final: Optional[float] = None
    """MTP loss weight from optimizer step mtp_lambda_switch_step on (None: keep mtp_lambda; DeepSeek-V3: 0.1)."""
    mtp_lambda_switch_step: int = 0
    """Optimizer step at which the MTP loss weight switches to mtp_lambda_final."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata (architecture name, source checkpoint); ignored by the model."""

    def __post_init__(self) -> None:
        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"model.{key}={getattr(self, key)!r}: {msg}")

        for key in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "num_experts", "top_k",
                    "moe_ffn_dim", "dense_ffn_dim", "n_group", "topk_group"):
            if getattr(self, key) < 1:
                raise bad(key, "must be >= 1")
        for key in ("n_dense_layers", "num_shared_experts", "mtp_depth", "aux_loss_coef", "seq_aux_loss_coef",
                    "z_loss_coef", "bias_update_speed", "q_lora_rank"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0")
        if self.n_dense_layers > self.n_layers:
            raise bad("n_dense_layers", f"must be <= model.n_layers={self.n_layers}")
        if self.top_k > self.num_experts:
            raise bad("top_k", f"must be <= model.num_experts={self.num_experts}")
        if self.score_func not in SCORE_FUNCS:
            raise bad("score_func", f"must be one of {', '.join(SCORE_FUNCS)}")
        if self.expert_kernel not in EXPERT_KERNELS:
            raise bad("expert_kernel", f"must be one of {', '.join(EXPERT_KERNELS)}")
        if self.attention not in ATTENTION_TYPES:
            raise bad("attention", f"must be one of {', '.join(ATTENTION_TYPES)}")
        if self.qk_norm and self.attention != "gqa":
            raise bad("qk_norm", "is only available with model.attention=gqa")
        if self.num_experts % self.n_group:
            raise bad("n_group", f"must divide model.num_experts={self.num_experts}")
        if self.topk_group > self.n_group:
            raise bad("topk_group", f"must be <= model.n_group={self.n_group}")
        if self.n_group > 1 and self.top_k > self.topk_group * (self.num_experts // self.n_group):
            raise bad("top_k", "exceeds the experts available in model.topk_group groups")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise bad("capacity_factor", "must be > 0 (or null for dropless)")
        if self.attention == "gqa":
            if self.head_dim is None and self.dim % self.n_heads:
                raise bad("n_heads", f"must divide model.dim={self.dim} (or set model.head_dim)")
            if self.n_heads % self.kv_heads:
                raise bad("n_kv_heads", f"must divide model.n_heads={self.n_heads}")
            if self.rotary_dim % 2:
                raise bad("head_dim", "must be even for rotary embeddings")
        elif self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "must be even for rotary embeddings")
        # --- multi-token prediction ---
        for key in ("mtp_lambda", "mtp_lambda_switch_step"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0")
        if self.mtp_lambda_final is not None and self.mtp_lambda_final < 0:
            raise bad("mtp_lambda_final", "must be >= 0 (or null to keep model.mtp_lambda)")
        if self.mtp_depth >= self.max_seq_len:
            raise bad("mtp_depth", f"must be < model.max_seq_len={self.max_seq_len}")

    # --- derived sizes ---
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def rotary_dim(self) -> int:
        return self.qk_rope_head_dim if self.attention == "mla" else self.attn_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.n_dense_layers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"model: unknown keys {sorted(unknown)}")
        return cls(**d)
