"""Tiny random transformers models of every supported architecture, for the Hugging Face interop tests.

Import it after ``pytest.importorskip("transformers")``.
"""

import torch
import transformers

VOCAB, SEQ = 64, 12
# initializer_range 0.1 spreads the router scores, so that fp32 rounding differences between the two
# implementations cannot flip a top-k choice.
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, initializer_range=0.1,
              max_position_embeddings=32)

CASES = {
    "mixtral": ("MixtralForCausalLM", "MixtralConfig",
                dict(intermediate_size=24, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig",
                  dict(intermediate_size=48, moe_intermediate_size=16, num_key_value_heads=2, num_experts=8,
                       num_experts_per_tok=2, head_dim=16, norm_topk_prob=True)),
    "qwen3_moe-dense0-tied-nonorm": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig",
                                     dict(intermediate_size=48, moe_intermediate_size=16, num_key_value_heads=1,
                                          num_experts=6, num_experts_per_tok=3, norm_topk_prob=False,
                                          mlp_only_layers=[0], tie_word_embeddings=True)),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "DeepseekV3Config",
                    dict(intermediate_size=48, moe_intermediate_size=16, num_key_value_heads=4, n_routed_experts=8,
                         n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=1,
                         kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
                         routed_scaling_factor=2.5)),
    "deepseek_v3-noqlora-rotatehalf-tied": ("DeepseekV3ForCausalLM", "DeepseekV3Config",
                                            dict(intermediate_size=48, moe_intermediate_size=16,
                                                 num_key_value_heads=4, n_routed_experts=4, n_shared_experts=2,
                                                 num_experts_per_tok=2, n_group=1, topk_group=1,
                                                 first_k_dense_replace=2, kv_lora_rank=16, q_lora_rank=None,
                                                 qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
                                                 norm_topk_prob=False, routed_scaling_factor=1.0,
                                                 rope_interleave=False, tie_word_embeddings=True)),
}


def hf_model(case: str):
    """A random transformers model of ``case`` (a key of ``CASES``), in eval mode."""
    cls, cfg_cls, kwargs = CASES[case]
    model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**COMMON, **kwargs)).eval()
    if cls == "DeepseekV3ForCausalLM":  # a non-zero correction bias, so that the mapping of the bias is tested
        with torch.no_grad():
            for layer in model.model.layers[kwargs["first_k_dense_replace"]:]:
                layer.mlp.gate.e_score_correction_bias.normal_(std=0.05)
    return model


def hf_config(case, **changes):
    """The ``config.json`` dict of ``case``, with ``changes``."""
    cls, cfg_cls, kwargs = CASES[case]
    config = getattr(transformers, cfg_cls)(**COMMON, **kwargs).to_dict()
    config["architectures"] = [cls]
    config.update(changes)
    return config
