"""Hugging Face config mapping: what config.json settings we refuse or accept, and what an architecture can express."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from lightning_moe.errors import ConfigError  # noqa: E402
from lightning_moe.models.config import ModelConfig  # noqa: E402
from lightning_moe.models.hf import config_from_hf, export_hf  # noqa: E402
from lightning_moe.models.transformer import MoETransformer  # noqa: E402
from tests.helpers.hf import hf_config  # noqa: E402


@pytest.mark.parametrize(
    "case, changes, key",
    [
        ("deepseek_v3", {"rope_scaling": {"type": "yarn", "factor": 40}, "rope_parameters": None}, "rope_scaling"),
        ("deepseek_v3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
         "rope_parameters"),
        ("deepseek_v3", {"rms_norm_eps": 1e-5}, "rms_norm_eps"),
        ("deepseek_v3", {"scoring_func": "softmax"}, "scoring_func"),
        ("mixtral", {"sliding_window": 16}, "sliding_window"),
        ("mixtral", {"num_experts_per_tok": 1}, "num_experts_per_tok"),
        ("mixtral", {"hidden_act": "gelu"}, "hidden_act"),
        ("qwen3_moe", {"attention_bias": True}, "attention_bias"),
        ("qwen3_moe", {"mlp_only_layers": [1]}, "mlp_only_layers"),
        ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 8}, "sliding_window"),
        ("qwen3_moe", {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "model_type"),
    ],
)
def test_unsupported_configs_are_refused(case, changes, key):
    with pytest.raises(ValueError, match=key):
        config_from_hf(hf_config(case, **changes))


def test_harmless_settings_are_accepted():
    assert config_from_hf(hf_config("mixtral", sliding_window=32)).num_experts == 4  # window >= context
    assert config_from_hf(hf_config("qwen3_moe", sliding_window=8)).qk_norm  # use_sliding_window is false


def test_export_refuses_what_the_architecture_cannot_express(tmp_path):
    model = MoETransformer(ModelConfig(dim=32, n_layers=2, n_heads=2, num_experts=4, moe_ffn_dim=16))
    for arch, key in [("mixtral", "n_dense_layers"), ("qwen3_moe", "qk_norm"), ("deepseek_v3", "attention"),
                      ("llama", "arch")]:
        with pytest.raises(ValueError, match=key):
            export_hf(model, tmp_path, arch=arch)
    assert not list(tmp_path.iterdir())


def test_qk_norm_is_off_by_default_and_gqa_only():
    keys = MoETransformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_dense_layers=1)).state_dict().keys()
    assert not any("q_norm" in k or "k_norm" in k for k in keys)
    with pytest.raises(ConfigError, match="model.qk_norm"):
        ModelConfig(attention="mla", qk_norm=True)
