"""Hugging Face interop: import and export DeepSeek-V3, Mixtral and Qwen3-MoE checkpoints (config.json + safetensors).

    cfg, state_dict = load_hf_checkpoint("hf_folder")         # ModelConfig + our state dict
    model = from_hf("hf_folder", max_seq_len=4096)            # MoETransformer with the weights loaded
    export_hf(model, "out_folder", arch="deepseek_v3")        # loads back in transformers' AutoModelForCausalLM

Folders hold what ``save_pretrained`` writes: ``config.json`` and ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. ``transformers`` is not needed (it is a test dependency); ``safetensors`` is.

Layout decisions (import; export is the exact inverse, so import(export(m)) gives m's state dict bit for bit):

* Linear weights are ``[out, in]`` on both sides and copied as they are. Routed experts are stacked here,
  ``w13 [E, D, 2H]`` (gate | up) and ``w2 [E, H, D]``, and per expert there (``experts.{e}.gate_proj [H, D]``,
  ``up_proj [H, D]``, ``down_proj [D, H]``; Mixtral: ``w1``, ``w3``, ``w2``): transposed and stacked. The fused
  in-memory layout of transformers 5 (``experts.gate_up_proj [E, 2H, D]``, ``experts.down_proj [E, D, H]``) is
  accepted on import too; export writes the per-expert layout that released checkpoints use.
* RoPE: Mixtral and Qwen3 checkpoints use rotate-half within each head, as we do. DeepSeek checkpoints store the
  rotary rows of ``q_b_proj`` / ``q_proj`` and ``kv_a_proj_with_mqa`` interleaved (pairs ``(x0, x1), (x2, x3)``
  rotated together; transformers' ``rope_interleave=True``). We permute those rows to ``[x0, x2, ..., x1, x3, ...]``
  on import, after which rotate-half gives the same rotated vectors in the same order, so no attention flag is
  needed; with ``rope_interleave=false`` the rows are copied unchanged. Export writes interleaved rows.
* Router: ``gate.weight`` is our ``router.gate.weight``; DeepSeek's ``e_score_correction_bias`` is our
  ``router.expert_bias``. Our router adds the bias for selection only while ``bias_update_speed > 0``, so DeepSeek
  imports set ``bias_update_speed=1e-3`` (DeepSeek-V3's gamma); pass ``bias_update_speed=...`` to change it.
* MTP (DeepSeek-V3): depth k is checkpoint layer ``num_hidden_layers + k - 1`` (``enorm``, ``hnorm``, ``eh_proj``,
  ``shared_head.norm`` and a full decoder layer; its copies ``embed_tokens`` / ``shared_head.head`` of the main
  embedding and head are written on export and not read on import, as our MTP shares them). Import sets
  ``mtp_depth`` to the MTP layers present; transformers itself skips them. Other architectures have no MTP layers:
  export drops ``mtp.*`` with a warning.

Refused with a ``ValueError`` naming the setting: RoPE scaling (YaRN, linear, dynamic, ...), sliding-window
attention shorter than the context, attention or MLP biases, activations other than SiLU, dense/MoE layer patterns
other than "first k dense", top-1 routing with renormalised weights (our router keeps the raw score for k=1),
DeepSeek routing other than sigmoid + ``noaux_tc``, MLA with fewer key/value heads than heads, and DeepSeek's MLA
norms with an epsilon other than 1e-6 (transformers and the reference code hard-code it there). transformers'
training-time knobs (dropout, ``router_jitter_noise``, ``router_aux_loss_coef``) are not read.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from lightning_moe.models.config import ModelConfig

ARCHS = ("deepseek_v3", "mixtral", "qwen3_moe")
HF_CLASSES = {"deepseek_v3": "DeepseekV3ForCausalLM", "mixtral": "MixtralForCausalLM",
              "qwen3_moe": "Qwen3MoeForCausalLM"}
# transformers' defaults for keys a config.json may leave out.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "norm_topk_prob": True, "n_group": 8,
                    "topk_group": 4, "routed_scaling_factor": 2.5, "rope_interleave": True,
                    "first_k_dense_replace": 3, "n_shared_experts": 1, "max_position_embeddings": 4096},
    "mixtral": {"rope_theta": 1e6, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096 * 32},
    "qwen3_moe": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "norm_topk_prob": False, "decoder_sparse_step": 1,
                  "max_position_embeddings": 32768},
}
# Our training-only settings: HF configs cannot express them, so export keeps them under this config.json key and
# import restores them (transformers keeps unknown keys as plain attributes).
_OWN_KEY = "lightning_moe"
_TRAINING_KEYS = ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_speed", "capacity_factor",
                  "expert_kernel", "mtp_depth", "mtp_moe", "mtp_lambda", "mtp_lambda_final", "mtp_lambda_switch_step")
DEEPSEEK_BIAS_UPDATE_SPEED = 1e-3
_MLA_NORM_EPS = 1e-6
_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}  # (gate, up, down); others: gate_proj, up_proj, down_proj
_MOE_PREFIX = {"mixtral": "block_sparse_moe"}  # others: mlp


# --------------------------------------------------------------------------------------------------- config
def _arch_of(hf: dict[str, Any]) -> str:
    model_type = hf.get("model_type")
    if model_type in ARCHS:
        return model_type
    for arch, cls in HF_CLASSES.items():
        if cls in (hf.get("architectures") or []):
            return arch
    raise ValueError(f"unsupported Hugging Face model_type={model_type!r} (architectures={hf.get('architectures')}); "
                     f"supported: {', '.join(HF_CLASSES.values())}")


class _HFConfig:
    """config.json values with transformers' defaults and one-line refusals."""

    def __init__(self, arch: str, hf: dict[str, Any]) -> None:
        self.arch, self.hf = arch, hf

    def get(self, key: str, default: Any = None) -> Any:
        value = self.hf.get(key)
        return value if value is not None else _HF_DEFAULTS[self.arch].get(key, default)

    def require(self, key: str) -> Any:
        value = self.hf.get(key)
        if value is None:
            raise ValueError(f"{HF_CLASSES[self.arch]} config.json: missing {key!r}")
        return value

    def refuse(self, key: str, why: str) -> ValueError:
        return ValueError(f"{HF_CLASSES[self.arch]} config.json: {key}={self.hf.get(key)!r} is not supported ({why})")


def _rope_theta(c: _HFConfig) -> float:
    params = c.hf.get("rope_parameters") or {}
    scaling = c.hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        key = "rope_parameters" if c.hf.get("rope_parameters") else "rope_scaling"
        raise c.refuse(key, f"RoPE scaling {rope_type!r} is not implemented; only plain RoPE")
    return float(params.get("rope_theta") or c.get("rope_theta"))


def _common_config(c: _HFConfig) -> dict[str, Any]:
    hf = c.hf
    if hf.get("hidden_act", "silu") != "silu":
        raise c.refuse("hidden_act", "only SiLU-gated (SwiGLU) MLPs")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise c.refuse(key, "biases are not implemented")
    return dict(
        vocab_size=c.require("vocab_size"), dim=c.require("hidden_size"), n_layers=c.require("num_hidden_layers"),
        n_heads=c.require("num_attention_heads"), max_seq_len=c.get("max_position_embeddings"),
        rope_theta=_rope_theta(c), norm_eps=float(c.get("rms_norm_eps")),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=float(hf.get("initializer_range", 0.02)),
    )


def _check_window(c: _HFConfig, enabled: bool, max_seq_len: int) -> None:
    window = c.hf.get("sliding_window")
    if enabled and window is not None and window < max_seq_len:
        raise c.refuse("sliding_window", f"sliding-window attention shorter than max_position_embeddings="
                                         f"{max_seq_len} is not implemented")


def _gqa_config(c: _HFConfig, common: dict[str, Any]) -> dict[str, Any]:
    head_dim = c.hf.get("head_dim")
    return dict(attention="gqa", n_kv_heads=c.hf.get("num_key_value_heads") or common["n_heads"],
                head_dim=None if head_dim in (None, common["dim"] // common["n_heads"]) else head_dim)


def _refuse_top1_norm(c: _HFConfig, top_k: int, renormalised: bool, key: str) -> None:
    if top_k == 1 and renormalised:
        raise c.refuse(key, "top-1 routing with renormalised gate weights (always 1.0); our router keeps the score")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our ``ModelConfig`` for a Hugging Face ``config.json`` dict (raises ``ValueError`` for what we lack)."""
    arch = _arch_of(hf)
    c = _HFConfig(arch, hf)
    kw = _common_config(c)
    if arch == "mixtral":
        _check_window(c, True, kw["max_seq_len"])
        kw.update(_gqa_config(c, kw))
        top_k = c.require("num_experts_per_tok")
        _refuse_top1_norm(c, top_k, True, "num_experts_per_tok")
        ffn = c.require("intermediate_size")
        kw.update(n_dense_layers=0, dense_ffn_dim=ffn, num_experts=c.require("num_local_experts"), top_k=top_k,
                  moe_ffn_dim=ffn, num_shared_experts=0, score_func="softmax", route_norm=True, route_scale=1.0)
    elif arch == "qwen3_moe":
        _check_window(c, bool(hf.get("use_sliding_window")), kw["max_seq_len"])
        kw.update(_gqa_config(c, kw), qk_norm=True)
        num_experts = hf.get("num_experts") or c.require("num_local_experts")
        step, mlp_only = c.get("decoder_sparse_step"), set(hf.get("mlp_only_layers") or [])
        moe = [i not in mlp_only and (i + 1) % step == 0 for i in range(kw["n_layers"])]
        n_dense = moe.index(True) if True in moe else len(moe)
        if not all(moe[n_dense:]):
            raise c.refuse("mlp_only_layers", f"with decoder_sparse_step={step}: only 'the first k layers dense, "
                                              "the rest MoE' is implemented")
        top_k, norm = c.require("num_experts_per_tok"), bool(c.get("norm_topk_prob"))
        _refuse_top1_norm(c, top_k, norm, "norm_topk_prob")
        kw.update(n_dense_layers=n_dense, dense_ffn_dim=c.require("intermediate_size"), num_experts=num_experts,
                  top_k=top_k, moe_ffn_dim=c.require("moe_intermediate_size"), num_shared_experts=0,
                  score_func="softmax", route_norm=norm, route_scale=1.0)
    else:  # deepseek_v3
        if hf.get("scoring_func", "sigmoid") != "sigmoid" or hf.get("topk_method", "noaux_tc") != "noaux_tc":
            raise c.refuse("scoring_func", "DeepseekV3 routing is sigmoid scores with noaux_tc (bias-corrected, "
                                           f"group-limited) top-k; got topk_method={hf.get('topk_method')!r}")
        if kw["norm_eps"] != _MLA_NORM_EPS:
            raise c.refuse("rms_norm_eps", f"MLA's q/kv latent norms use eps={_MLA_NORM_EPS} in DeepSeek and "
                                           "transformers while ours use model.norm_eps; only 1e-6 matches exactly")
        kv_heads = hf.get("num_key_value_heads")
        if kv_heads not in (None, kw["n_heads"]):
            raise c.refuse("num_key_value_heads", "MLA expands keys/values for every attention head")
        top_k, norm = c.require("num_experts_per_tok"), bool(c.get("norm_topk_prob"))
        _refuse_top1_norm(c, top_k, norm, "norm_topk_prob")
        kw.update(attention="mla", q_lora_rank=hf.get("q_lora_rank", 1536) or 0,  # null: no query compression
                  kv_lora_rank=c.require("kv_lora_rank"),
                  qk_rope_head_dim=c.require("qk_rope_head_dim"), qk_nope_head_dim=c.require("qk_nope_head_dim"),
                  v_head_dim=c.require("v_head_dim"), n_dense_layers=c.get("first_k_dense_replace"),
                  dense_ffn_dim=c.require("intermediate_size"), num_experts=c.require("n_routed_experts"),
                  top_k=top_k, moe_ffn_dim=c.require("moe_intermediate_size"),
                  num_shared_experts=c.get("n_shared_experts"), score_func="sigmoid", route_norm=norm,
                  route_scale=float(c.get("routed_scaling_factor")), n_group=c.get("n_group"),
                  topk_group=c.get("topk_group"), bias_update_speed=DEEPSEEK_BIAS_UPDATE_SPEED)
    own = hf.get(_OWN_KEY) or {}
    kw.update({k: own[k] for k in _TRAINING_KEYS if k in own})
    extra = {"hf_arch": arch}
    if arch == "deepseek_v3" and hf.get("num_nextn_predict_layers"):
        extra["hf_num_nextn_predict_layers"] = hf["num_nextn_predict_layers"]
    return ModelConfig(**kw, extra=extra)


def config_to_hf(cfg: ModelConfig, arch: str, mtp_depth: int = 0) -> dict[str, Any]:
    """The ``config.json`` dict of ``arch`` for our config (raises ``ValueError`` if ``arch`` cannot express it).

    ``mtp_depth``: DeepSeek MTP layers written after the main ones (``num_nextn_predict_layers``).
    """
    _check_exportable(cfg, arch)
    hf: dict[str, Any] = dict(
        architectures=[HF_CLASSES[arch]], model_type=arch, vocab_size=cfg.vocab_size, hidden_size=cfg.dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings, rope_theta=cfg.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, attention_bias=False,
        attention_dropout=0.0, use_cache=True, router_aux_loss_coef=cfg.aux_loss_coef,
    )
    if arch in ("mixtral", "qwen3_moe"):
        hf.update(num_key_value_heads=cfg.kv_heads, head_dim=cfg.attn_head_dim, num_experts_per_tok=cfg.top_k,
                  sliding_window=None, output_router_logits=False)
    if arch == "mixtral":
        hf.update(intermediate_size=cfg.moe_ffn_dim, num_local_experts=cfg.num_experts, router_jitter_noise=0.0)
    elif arch == "qwen3_moe":
        hf.update(intermediate_size=cfg.dense_ffn_dim, moe_intermediate_size=cfg.moe_ffn_dim,
                  num_experts=cfg.num_experts, norm_topk_prob=cfg.route_norm and cfg.top_k > 1,
                  decoder_sparse_step=1, mlp_only_layers=list(range(cfg.n_dense_layers)), use_sliding_window=False)
    elif arch == "deepseek_v3":
        hf.update(q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
                  qk_rope_head_dim=cfg.qk_rope_head_dim, qk_nope_head_dim=cfg.qk_nope_head_dim,
                  v_head_dim=cfg.v_head_dim, num_key_value_heads=cfg.n_heads, intermediate_size=cfg.dense_ffn_dim,
                  moe_intermediate_size=cfg.moe_ffn_dim, n_routed_experts=cfg.num_experts,
                  n_shared_experts=cfg.num_shared_experts, num_experts_per_tok=cfg.top_k,
                  first_k_dense_replace=cfg.n_dense_layers, norm_topk_prob=cfg.route_norm and cfg.top_k > 1,
                  routed_scaling_factor=cfg.route_scale, n_group=cfg.n_group, topk_group=cfg.topk_group,
                  scoring_func="sigmoid", topk_method="noaux_tc", rope_interleave=True,
                  num_nextn_predict_layers=mtp_depth)
    hf[_OWN_KEY] = {k: getattr(cfg, k) for k in _TRAINING_KEYS}
    return hf


def _check_exportable(cfg: ModelConfig, arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r}: must be one of {', '.join(ARCHS)}")
    needs: dict[str, Any] = {}
    if arch in ("mixtral", "qwen3_moe"):
        needs.update(attention="gqa", num_shared_experts=0, score_func="softmax", route_scale=1.0, n_group=1,
                     qk_norm=arch == "qwen3_moe")
    if arch == "mixtral":
        needs.update(n_dense_layers=0, route_norm=True)
        if cfg.top_k == 1:
            raise ValueError("arch=mixtral renormalises top-1 gate weights to 1.0; ours keep the score (top_k=1)")
    if arch == "deepseek_v3":
        needs.update(attention="mla", score_func="sigmoid", norm_eps=_MLA_NORM_EPS)
        if cfg.num_shared_experts < 1:
            raise ValueError("arch=deepseek_v3 always has shared experts: needs model.num_shared_experts >= 1")
        if cfg.num_experts // cfg.n_group < 2:
            raise ValueError("arch=deepseek_v3 scores a group by its two best experts: needs >= 2 experts a group")
    wrong = {k: (getattr(cfg, k), v) for k, v in needs.items() if getattr(cfg, k) != v}
    if wrong:
        detail = ", ".join(f"model.{k}={have!r} (needs {want!r})" for k, (have, want) in wrong.items())
        raise ValueError(f"cannot export to arch={arch}: {detail}")


def _infer_arch(cfg: ModelConfig) -> str:
    if cfg.extra.get("hf_arch") in ARCHS:
        return cfg.extra["hf_arch"]
    if cfg.attention == "mla":
        return "deepseek_v3"
    return "qwen3_moe" if cfg.qk_norm else "mixtral"


# -------------------------------------------------------------------------------------------------- weights
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


def _blocks(cfg: ModelConfig, mtp_depth: int = 0) -> list[_Block]:
    """The main blocks, then ``mtp_depth`` DeepSeek MTP blocks (depth k is checkpoint layer n_layers + k - 1)."""
    blocks = [_Block(f"layers.{i}.", f"model.layers.{i}.", cfg.is_moe_layer(i)) for i in range(cfg.n_layers)]
    blocks += [_Block(f"mtp.layers.{k}.block.", f"model.layers.{cfg.n_layers + k - 1}.", cfg.mtp_moe)
               for k in range(1, mtp_depth + 1)]
    return blocks


def _renames(cfg: ModelConfig, arch: str, mtp_depth: int = 0) -> Iterator[tuple[str, str]]:
    """(our key, HF key) for every weight copied as it is (all but routed experts and tied heads)."""
    yield "tok_embeddings.weight", "model.embed_tokens.weight"
    yield "norm.weight", "model.norm.weight"
    if not cfg.tie_embeddings:
        yield "output.weight", "lm_head.weight"
    for k in range(1, mtp_depth + 1):
        ours, hf = f"mtp.layers.{k}.", f"model.layers.{cfg.n_layers + k - 1}."
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
        ffn = ours + "feed_forward."
        mlp = dict(w1="gate_proj", w3="up_proj", w2="down_proj")
        if not block.moe:
            for a, b in mlp.items():
                yield f"{ffn}{a}.weight", f"{hf}mlp.{b}.weight"
            continue
        moe = f"{hf}{_MOE_PREFIX.get(arch, 'mlp')}."
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
    for block in _blocks(cfg, mtp_depth):
        if not block.moe:
            continue
        ours = f"{block.ours}feed_forward."
        if arch != "deepseek_v3":
            sd[ours + "router.expert_bias"] = torch.zeros(cfg.num_experts)
        moe = f"{block.hf}{_MOE_PREFIX.get(arch, 'mlp')}.experts."
        fused = get(moe + "gate_up_proj")
        if fused is not None:  # transformers 5 in-memory layout: gate_up_proj [E, 2H, D], down_proj [E, D, H]
            sd[ours + "experts.w13"] = fused.transpose(1, 2).contiguous()
            sd[ours + "experts.w2"] = need(moe + "down_proj").transpose(1, 2).contiguous()
            continue
        gate, up, down = _EXPERT_NAMES.get(arch, ("gate_proj", "up_proj", "down_proj"))
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
        hf = f"model.layers.{cfg.n_layers + k - 1}."
        out[hf + "embed_tokens.weight"] = sd["tok_embeddings.weight"]
        out[hf + "shared_head.head.weight"] = sd["output.weight"]
    gate, up, down = _EXPERT_NAMES.get(arch, ("gate_proj", "up_proj", "down_proj"))
    h = cfg.moe_ffn_dim
    for block in _blocks(cfg, mtp_depth):
        if not block.moe:
            continue
        ours = f"{block.ours}feed_forward."
        if arch != "deepseek_v3" and cfg.bias_update_speed > 0 and bool(sd[ours + "router.expert_bias"].any()):
            raise ValueError(f"arch={arch} has no router bias, but {ours}router.expert_bias is non-zero "
                             "(model.bias_update_speed > 0)")
        moe = f"{block.hf}{_MOE_PREFIX.get(arch, 'mlp')}.experts."
        w13, w2 = sd[ours + "experts.w13"], sd[ours + "experts.w2"]
        for e in range(cfg.num_experts):
            out[f"{moe}{e}.{gate}.weight"] = w13[e, :, :h].t()
            out[f"{moe}{e}.{up}.weight"] = w13[e, :, h:].t()
            out[f"{moe}{e}.{down}.weight"] = w2[e].t()
    return out


# ------------------------------------------------------------------------------------------------ files
def _safetensors():
    try:
        import safetensors.torch  # noqa: PLC0415 - needed only for Hugging Face interop
    except ImportError as err:
        raise ImportError("Hugging Face import/export needs the safetensors package: "
                          "pip install \"lightning-moe[hf]\" (or safetensors)") from err
    return safetensors


def _tensor_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                            "(PyTorch .bin checkpoints are not read; re-save them with safe_serialization=True)")


def load_hf_checkpoint(folder: str | Path, **overrides: Any) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face DeepSeek-V3 / Mixtral / Qwen3-MoE folder -> (ModelConfig, our state dict).

    ``overrides`` replace ModelConfig fields (``max_seq_len=4096``, ``expert_kernel="loop"``,
    ``bias_update_speed=0.0``, ``mtp_depth=1`` ...); the state dict keeps the checkpoint's dtypes.
    """
    safe_open = _safetensors().safe_open
    folder = Path(folder)
    hf = json.loads((folder / "config.json").read_text())
    cfg = config_from_hf(hf)
    cfg.extra["hf_source"] = str(folder)
    arch = cfg.extra["hf_arch"]
    handles = [safe_open(str(path), framework="pt") for path in _tensor_files(folder)]
    where = {key: h for h in handles for key in h.keys()}
    mtp_present = 0  # DeepSeek MTP layers stored after the main ones
    while arch == "deepseek_v3" and f"model.layers.{cfg.n_layers + mtp_present}.eh_proj.weight" in where:
        mtp_present += 1
    if mtp_present:
        cfg = dataclasses.replace(cfg, mtp_depth=mtp_present,
                                  mtp_moe=f"model.layers.{cfg.n_layers}.mlp.gate.weight" in where)
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    asked: set[str] = set()

    def get(key: str) -> torch.Tensor | None:
        if key not in where and ".block_sparse_moe." in key:  # Mixtral as transformers 5 holds it in memory
            key = key.replace(".block_sparse_moe.", ".mlp.")
        asked.add(key)
        return where[key].get_tensor(key) if key in where else None

    interleave = arch == "deepseek_v3" and bool(_HFConfig(arch, hf).get("rope_interleave"))
    sd = state_dict_from_hf(cfg, arch, get, rope_interleave=interleave, mtp_depth=min(cfg.mtp_depth, mtp_present))
    left = set(where) - asked
    if cfg.tie_embeddings:
        left.discard("lm_head.weight")  # some writers store the tied head anyway
    mtp = {k for k in left if k.startswith("model.layers.") and int(k.split(".")[2]) >= cfg.n_layers}
    if left - mtp:
        raise ValueError(f"{HF_CLASSES[arch]} checkpoint: tensors this mapping does not know (unsupported "
                         f"feature?): {sorted(left - mtp)[:8]}{' ...' if len(left - mtp) > 8 else ''}")
    return cfg, sd


def from_hf(folder: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            **overrides: Any):
    """A ``MoETransformer`` with the weights of a Hugging Face folder (see ``load_hf_checkpoint``).

    The model is built on the meta device and takes the checkpoint's tensors (no random initialisation, no second
    copy), cast to ``dtype`` (fp32 master weights by default; the router's balancing statistics are always fp32).
    MTP depths requested with ``mtp_depth=...`` beyond those in the checkpoint are freshly initialised.
    """
    from lightning_moe.models.transformer import MoETransformer  # noqa: PLC0415 - transformer imports moe

    cfg, sd = load_hf_checkpoint(folder, **overrides)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    fresh = [k for k in missing if k.startswith("mtp.")]
    if len(fresh) < len(missing) or unexpected:
        raise ValueError(f"state dict mismatch: missing {[k for k in missing if k not in fresh][:8]}, "
                         f"unexpected {unexpected[:8]}")
    if fresh:  # MTP depths the checkpoint lacks: built for real, so that they get their own initialisation
        with torch.device(device):
            new = type(model.mtp)(cfg).state_dict()
        model.load_state_dict({k: new[k.removeprefix("mtp.")] for k in fresh}, strict=False, assign=True)
    if cfg.tie_embeddings:  # assign=True gave the two modules separate Parameters: share one again
        model.output.weight = model.tok_embeddings.weight
    _materialize_buffers(model, device)
    model.to(device=device, dtype=dtype)
    model.rope.float()  # RoPE tables and ...
    for _, moe in model.moe_layers():  # ... balancing statistics stay fp32
        for name in ("expert_bias", "tokens_per_expert", "dropped_tokens"):
            setattr(moe.router, name, getattr(moe.router, name).float())
    return model


def _materialize_buffers(model: torch.nn.Module, device: str | torch.device) -> None:
    """Real storage for the non-persistent buffers that no checkpoint holds: a module made only of them (the RoPE
    tables) recomputes them with ``reset_parameters``; elsewhere they are statistics that start at zero."""
    for module in model.modules():
        own = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        meta = [name for name, t in own.items() if t is not None and t.is_meta]
        if not meta:
            continue
        if any(name in module._parameters for name in meta):
            raise ValueError(f"{type(module).__name__}: parameters {meta} are not in the checkpoint")
        if len(meta) == len(own) and hasattr(module, "reset_parameters"):
            module.to_empty(device=device, recurse=False)
            module.reset_parameters()
        else:
            for name in meta:
                module._buffers[name] = torch.zeros_like(module._buffers[name], device=device)


def _full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = {}
    for key, value in model.state_dict().items():
        if hasattr(value, "full_tensor"):  # DTensor (FSDP2 / expert parallel): gather the whole tensor
            value = value.full_tensor()
        sd[key] = value.detach().cpu()
    return sd


def export_hf(model: torch.nn.Module, folder: str | Path, arch: str | None = None, *,
              dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write ``model`` (a whole ``MoETransformer``) as a Hugging Face folder of ``arch``.

    ``arch``: deepseek_v3, mixtral or qwen3_moe (default: the imported one, else inferred from the config).
    ``dtype`` casts the weights (default: as they are). Shards above ``max_shard_bytes`` go to
    ``model-0000k-of-0000n.safetensors`` with an index. Returns the folder.
    """
    save_file = _safetensors().torch.save_file
    cfg: ModelConfig = model.cfg
    arch = arch or _infer_arch(cfg)
    if getattr(model, "tok_embeddings", None) is None or getattr(model, "output", None) is None:
        raise ValueError("export_hf needs the whole model (this looks like one pipeline stage)")
    sd = _full_state_dict(model)
    has_mtp = any(k.startswith("mtp.") for k in sd)
    mtp_depth = cfg.mtp_depth if has_mtp and arch == "deepseek_v3" else 0
    if has_mtp and not mtp_depth:
        warnings.warn(f"export_hf: arch={arch} has no multi-token-prediction layers; mtp.* is not exported",
                      stacklevel=2)
    hf_cfg = config_to_hf(cfg, arch, mtp_depth)
    tensors = state_dict_to_hf(cfg, arch, sd, mtp_depth)
    if dtype is not None:
        tensors = {k: v if k.endswith("e_score_correction_bias") else v.to(dtype) for k, v in tensors.items()}
    weight_dtype = tensors["model.embed_tokens.weight"].dtype
    hf_cfg["torch_dtype"] = str(weight_dtype).removeprefix("torch.")

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, seen = 0, set()
    for key, t in tensors.items():
        t = t.contiguous()
        if t.untyped_storage().data_ptr() in seen:  # safetensors refuses tensors sharing memory
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    for old in list(folder.glob("model*.safetensors")) + list(folder.glob("model.safetensors.index.json")):
        old.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for k, shard in enumerate(shards, start=1):
            name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    (folder / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    return folder
