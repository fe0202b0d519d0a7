"""Weight names and tensor layouts: our state dict <-> Hugging Face tensors, in both directions.

See the package docstring (``lightning_moe.models.hf``) for the layout decisions (stacked experts, DeepSeek's
interleaved rotary rows, router bias, MTP layers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import torch

from lightning_moe.models.config import ModelConfig
from lightning_moe.models.hf.config import HF_CLASSES

_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}  # (gate, up, down); others: gate_proj, up_proj, down_proj
_MOE_PREFIX = {"mixtral": "block_sparse_moe"}  # others: mlp


def _rope_order(rope_dim: int) -> torch.Tensor:
    """Row order that turns interleaved rotary pairs into rotate-half halves: [0, 2, 4, ..., 1, 3, 5, ...]."""
    return torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)])


def _permute_rope_rows(w: torch.Tensor, group: int, rope_dim: int, order: torch.Tensor) -> torch.Tensor:
    """Reorder the last ``rope_dim`` rows of every block of ``group`` rows of ``w [rows, in]``."""
    blocks = w.reshape(-1, group, w.shape[-1])
    rope = blocks[:, group - rope_dim:][:, order]
    return torch.cat([blocks[:, : group - rope_dim], rope], dim=1).reshape(w.shape)


@dataclasses.dataclass(frozen=True)
class _Block:
    ours: str
    """Our key prefix of a transformer block: "layers.3." or "mtp.layers.1.block."."""
    hf: str
    """Its HF key prefix: "model.layers.3."."""
    moe: bool

    @property
    def ffn(self) -> str:
        """Our key prefix of its MLP or MoE: "layers.3.feed_forward."."""
        return f"{self.ours}feed_forward."

    def hf_moe(self, arch: str) -> str:
        """The HF key prefix of its MoE: "model.layers.3.mlp." (Mixtral: "...block_sparse_moe.")."""
        return f"{self.hf}{_MOE_PREFIX.get(arch, 'mlp')}."


def _mtp_layer(cfg: ModelConfig, k: int) -> str:
    """The HF key prefix of MTP depth ``k`` (from 1): DeepSeek stores it as layer ``n_layers + k - 1``."""
    return f"model.layers.{cfg.n_layers + k - 1}."


def _blocks(cfg: ModelConfig, mtp_depth: int = 0) -> list[_Block]:
    """The main blocks, then ``mtp_depth`` DeepSeek MTP blocks."""
    blocks = [_Block(f"layers.{i}.", f"model.layers.{i}.", cfg.is_moe_layer(i)) for i in range(cfg.n_layers)]
    blocks += [_Block(f"mtp.layers.{k}.block.", _mtp_layer(cfg, k), cfg.mtp_moe) for k in range(1, mtp_depth + 1)]
    return blocks


def _moe_blocks(cfg: ModelConfig, mtp_depth: int = 0) -> Iterator[_Block]:
    return (block for block in _blocks(cfg, mtp_depth) if block.moe)


def _expert_names(arch: str) -> tuple[str, str, str]:
    """HF names of an expert's (gate, up, down) projections."""
    return _EXPERT_NAMES.get(arch, ("gate_proj", "up_proj", "down_proj"))


def _renames(cfg: ModelConfig, arch: str, mtp_depth: int = 0) -> Iterator[tuple[str, str]]:
    """(our key, HF key) for every weight copied as it is (all but routed experts and tied heads)."""
    yield "tok_embeddings.weight", "model.embed_tokens.weight"
    yield "norm.weight", "model.norm.weight"
    if not cfg.tie_embeddings:
        yield "output.weight", "lm_head.weight"
    for k in range(1, mtp_depth + 1):
        ours, hf = f"mtp.layers.{k}.", _mtp_layer(cfg, k)
        for a, b in dict(embed_norm="enorm", hidden_norm="hnorm", proj="eh_proj", norm="shared_head.norm").items():
            yield f"{ours}{a}.weight", f"{hf}{b}.weight"
    for block in _blocks(cfg, mtp_depth):
        ours, hf = block.ours, block.hf
        yield ours + "attention_norm.weight", hf + "input_layernorm.weight"
        yield ours + "ffn_norm.weight", hf + "post_attention_layernorm.weight"
        att = {"wo": "o_proj"}
        if cfg.attention == "gqa":
            att.update(wq="q_proj", wk="k_proj", wv="v_proj")
            if cfg.qk_norm:
                att.update(q_norm="q_norm", k_norm="k_norm")
        else:
            att.update(wkv_a="kv_a_proj_with_mqa", kv_norm="kv_a_layernorm", wkv_b="kv_b_proj")
            att.update(dict(wq_a="q_a_proj", q_norm="q_a_layernorm", wq_b="q_b_proj") if cfg.q_lora_rank
                       else dict(wq="q_proj"))
        for a, b in att.items():
            yield f"{ours}attention.{a}.weight", f"{hf}self_attn.{b}.weight"
        ffn = block.ffn
        mlp = dict(w1="gate_proj", w3="up_proj", w2="down_proj")
        if not block.moe:
            for a, b in mlp.items():
                yield f"{ffn}{a}.weight", f"{hf}mlp.{b}.weight"
            continue
        moe = block.hf_moe(arch)
        yield ffn + "router.gate.weight", moe + "gate.weight"
        if arch == "deepseek_v3":
            yield ffn + "router.expert_bias", moe + "gate.e_score_correction_bias"
        if cfg.num_shared_experts:
            for a, b in mlp.items():
                yield f"{ffn}shared_experts.{a}.weight", f"{moe}shared_experts.{b}.weight"


def _rope_rows(cfg: ModelConfig, mtp_depth: int = 0) -> Iterator[tuple[str, int]]:
    """(our key, rows per block) of the MLA weights whose last qk_rope_head_dim rows of each block are rotary."""
    if cfg.attention != "mla":
        return
    q = "wq_b" if cfg.q_lora_rank else "wq"
    for block in _blocks(cfg, mtp_depth):
        yield f"{block.ours}attention.{q}.weight", cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        yield f"{block.ours}attention.wkv_a.weight", cfg.kv_lora_rank + cfg.qk_rope_head_dim


def state_dict_from_hf(cfg: ModelConfig, arch: str, get: Callable[[str], torch.Tensor | None],
                       rope_interleave: bool = True, mtp_depth: int = 0) -> dict[str, torch.Tensor]:
    """Our state dict from HF tensors; ``get(hf_key)`` returns a tensor or None when the key is absent.

    ``mtp_depth``: DeepSeek MTP layers to read (``mtp.*``; their copies of the embedding and head are not read).
    The caller checks that no tensors were left unread.
    """

    def need(key: str) -> torch.Tensor:
        t = get(key)
        if t is None:
            raise ValueError(f"{HF_CLASSES[arch]} checkpoint: missing tensor {key!r}")
        return t

    sd: dict[str, torch.Tensor] = {}
    for ours, hf in _renames(cfg, arch, mtp_depth):
        if ours.endswith("router.expert_bias"):
            sd[ours] = need(hf).float()  # balancing bias stays fp32 (transformers keeps it fp32 too)
        else:
            sd[ours] = need(hf)
    for block in _moe_blocks(cfg, mtp_depth):
        ours = block.ffn
        if arch != "deepseek_v3":
            sd[ours + "router.expert_bias"] = torch.zeros(cfg.num_experts)
        moe = block.hf_moe(arch) + "experts."
        fused = get(moe + "gate_up_proj")
        if fused is not None:  # transformers 5 in-memory layout: gate_up_proj [E, 2H, D], down_proj [E, D, H]
            sd[ours + "experts.w13"] = fused.transpose(1, 2).contiguous()
            sd[ours + "experts.w2"] = need(moe + "down_proj").transpose(1, 2).contiguous()
            continue
        gate, up, down = _expert_names(arch)
        w13, w2 = [], []
        for e in range(cfg.num_experts):
            g, u = need(f"{moe}{e}.{gate}.weight"), need(f"{moe}{e}.{up}.weight")  # [H, D] each
            w13.append(torch.cat([g, u], dim=0).t())  # [D, 2H]
            w2.append(need(f"{moe}{e}.{down}.weight").t())  # [H, D]
        sd[ours + "experts.w13"] = torch.stack(w13)
        sd[ours + "experts.w2"] = torch.stack(w2)
    if cfg.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    if rope_interleave:
        order = _rope_order(cfg.qk_rope_head_dim)
        for key, group in _rope_rows(cfg, mtp_depth):
            sd[key] = _permute_rope_rows(sd[key], group, cfg.qk_rope_head_dim, order)
    return sd


def state_dict_to_hf(cfg: ModelConfig, arch: str, sd: dict[str, torch.Tensor],
                     mtp_depth: int = 0) -> dict[str, torch.Tensor]:
    """HF tensors (per-expert layout, interleaved DeepSeek rotary rows) from our full, plain state dict.

    DeepSeek-V3 gets ``mtp_depth`` MTP depths as layers ``num_hidden_layers + k - 1`` with their own copies of the
    embedding and head, as DeepSeek releases them (transformers skips those layers; speculative decoders use them).
    """
    sd = dict(sd)
    if arch == "deepseek_v3":
        inverse = torch.argsort(_rope_order(cfg.qk_rope_head_dim))
        for key, group in _rope_rows(cfg, mtp_depth):
            sd[key] = _permute_rope_rows(sd[key], group, cfg.qk_rope_head_dim, inverse)
    out: dict[str, torch.Tensor] = {}
    for ours, hf in _renames(cfg, arch, mtp_depth):
        out[hf] = sd[ours]
    for k in range(1, mtp_depth + 1):
        hf = _mtp_layer(cfg, k)
        out[hf + "embed_tokens.weight"] = sd["tok_embeddings.weight"]
        out[hf + "shared_head.head.weight"] = sd["output.weight"]
    gate, up, down = _expert_names(arch)
    h = cfg.moe_ffn_dim
    for block in _moe_blocks(cfg, mtp_depth):
        ours = block.ffn
        if arch != "deepseek_v3" and cfg.bias_update_speed > 0 and bool(sd[ours + "router.expert_bias"].any()):
            raise ValueError(f"arch={arch} has no router bias, but {ours}router.expert_bias is non-zero "
                             "(model.bias_update_speed > 0)")
        moe = block.hf_moe(arch) + "experts."
        w13, w2 = sd[ours + "experts.w13"], sd[ours + "experts.w2"]
        for e in range(cfg.num_experts):
            out[f"{moe}{e}.{gate}.weight"] = w13[e, :, :h].t()
            out[f"{moe}{e}.{up}.weight"] = w13[e, :, h:].t()
            out[f"{moe}{e}.{down}.weight"] = w2[e].t()
    return out
