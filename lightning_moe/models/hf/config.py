"""Hugging Face ``config.json`` <-> our ``ModelConfig``: transformers' defaults, and refusals that name the setting.

See the package docstring (``lightning_moe.models.hf``) for what is refused and why.
"""

from __future__ import annotations

from typing import Any

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


def _arch_of(hf: dict[str, Any]) -> str:
    model_type = hf.get("model_type")
    if model_type in ARCHS:
        return model_type
    for arch, cls in HF_CLASSES.items():
        if cls in (hf.get("architectures") or []):
            return arch
    raise ValueError(f"unsupported Hugging Face model_type={model_type!r} (architectures={hf.get('architectures')}); "
                     f"supported: {', '.join(HF_CLASSES.values())}")


class HFConfig:
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


def _rope_theta(c: HFConfig) -> float:
    params = c.hf.get("rope_parameters") or {}
    scaling = c.hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        key = "rope_parameters" if c.hf.get("rope_parameters") else "rope_scaling"
        raise c.refuse(key, f"RoPE scaling {rope_type!r} is not implemented; only plain RoPE")
    return float(params.get("rope_theta") or c.get("rope_theta"))


def _common_config(c: HFConfig) -> dict[str, Any]:
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


def _check_window(c: HFConfig, enabled: bool, max_seq_len: int) -> None:
    window = c.hf.get("sliding_window")
    if enabled and window is not None and window < max_seq_len:
        raise c.refuse("sliding_window", f"sliding-window attention shorter than max_position_embeddings="
                                         f"{max_seq_len} is not implemented")


def _gqa_config(c: HFConfig, common: dict[str, Any]) -> dict[str, Any]:
    head_dim = c.hf.get("head_dim")
    return dict(attention="gqa", n_kv_heads=c.hf.get("num_key_value_heads") or common["n_heads"],
                head_dim=None if head_dim in (None, common["dim"] // common["n_heads"]) else head_dim)


def _routing(c: HFConfig, norm_key: str | None = "norm_topk_prob") -> tuple[int, bool]:
    """(top_k, renormalised) from ``num_experts_per_tok`` and ``norm_key`` (None: always renormalised, as Mixtral)."""
    top_k = c.require("num_experts_per_tok")
    renormalised = bool(c.get(norm_key)) if norm_key else True
    if top_k == 1 and renormalised:
        raise c.refuse(norm_key or "num_experts_per_tok",
                       "top-1 routing with renormalised gate weights (always 1.0); our router keeps the score")
    return top_k, renormalised


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our ``ModelConfig`` for a Hugging Face ``config.json`` dict (raises ``ValueError`` for what we lack)."""
    arch = _arch_of(hf)
    c = HFConfig(arch, hf)
    kw = _common_config(c)
    if arch == "mixtral":
        _check_window(c, True, kw["max_seq_len"])
        kw.update(_gqa_config(c, kw))
        top_k, _ = _routing(c, norm_key=None)
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
        top_k, norm = _routing(c)
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
        top_k, norm = _routing(c)
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
    norm_topk_prob = cfg.route_norm and cfg.top_k > 1  # for top-1 our router keeps the raw score
    hf: dict[str, Any] = dict(
        architectures=[HF_CLASSES[arch]], model_type=arch, vocab_size=cfg.vocab_size, hidden_size=cfg.dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings, rope_theta=cfg.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, attention_bias=False,
        attention_dropout=0.0, use_cache=True, router_aux_loss_coef=cfg.aux_loss_coef, num_experts_per_tok=cfg.top_k,
    )
    if arch in ("mixtral", "qwen3_moe"):
        hf.update(num_key_value_heads=cfg.kv_heads, head_dim=cfg.attn_head_dim, sliding_window=None,
                  output_router_logits=False)
    if arch == "mixtral":
        hf.update(intermediate_size=cfg.moe_ffn_dim, num_local_experts=cfg.num_experts, router_jitter_noise=0.0)
    elif arch == "qwen3_moe":
        hf.update(intermediate_size=cfg.dense_ffn_dim, moe_intermediate_size=cfg.moe_ffn_dim,
                  num_experts=cfg.num_experts, norm_topk_prob=norm_topk_prob,
                  decoder_sparse_step=1, mlp_only_layers=list(range(cfg.n_dense_layers)), use_sliding_window=False)
    elif arch == "deepseek_v3":
        hf.update(q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
                  qk_rope_head_dim=cfg.qk_rope_head_dim, qk_nope_head_dim=cfg.qk_nope_head_dim,
                  v_head_dim=cfg.v_head_dim, num_key_value_heads=cfg.n_heads, intermediate_size=cfg.dense_ffn_dim,
                  moe_intermediate_size=cfg.moe_ffn_dim, n_routed_experts=cfg.num_experts,
                  n_shared_experts=cfg.num_shared_experts, first_k_dense_replace=cfg.n_dense_layers,
                  norm_topk_prob=norm_topk_prob,
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


def infer_arch(cfg: ModelConfig) -> str:
    """The arch to export to by default: the imported one, else the one that can express ``cfg``'s attention."""
    if cfg.extra.get("hf_arch") in ARCHS:
        return cfg.extra["hf_arch"]
    if cfg.attention == "mla":
        return "deepseek_v3"
    return "qwen3_moe" if cfg.qk_norm else "mixtral"
