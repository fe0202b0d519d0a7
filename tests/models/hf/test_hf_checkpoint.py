"""Hugging Face checkpoints: tiny random transformers models import with the same logits; export round-trips exactly."""

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import save_file  # noqa: E402

from lightning_moe.models.config import ModelConfig  # noqa: E402
from lightning_moe.models.hf import export_hf, from_hf, load_hf_checkpoint  # noqa: E402
from tests.helpers.hf import CASES, SEQ, VOCAB, hf_model  # noqa: E402


@torch.no_grad()
def logits(model, tokens):
    out = model(tokens)
    return out if torch.is_tensor(out) else out.logits


def same_fields(a: ModelConfig, b: ModelConfig) -> bool:
    return dataclasses.replace(a, extra={}) == dataclasses.replace(b, extra={})


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_transformers_and_export_round_trips(case, tmp_path, seed):
    hf = hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    expected = logits(hf, tokens)

    model = from_hf(tmp_path / "hf").eval()
    assert model.cfg.extra["hf_arch"] == hf.config.model_type
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in model.state_dict().values())
    assert (model.output.weight is model.tok_embeddings.weight) == hf.config.tie_word_embeddings
    torch.testing.assert_close(logits(model, tokens), expected, atol=1e-4, rtol=1e-4)

    export_hf(model, tmp_path / "ours")
    cfg, sd = load_hf_checkpoint(tmp_path / "ours")
    assert same_fields(cfg, model.cfg)
    ours = model.state_dict()
    assert sd.keys() == ours.keys()
    for key, value in ours.items():
        assert sd[key].dtype == value.dtype and torch.equal(sd[key], value), key

    back = type(hf).from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(logits(back, tokens), expected, atol=1e-5, rtol=0)
    if getattr(hf.config, "rope_interleave", True):  # export writes interleaved DeepSeek rotary rows
        reference = hf.state_dict()
        for key, value in back.state_dict().items():
            assert torch.equal(value, reference[key]), key


def test_deepseek_rotary_layout_matters(tmp_path, seed):
    """Control for the test above: reading interleaved rotary rows as rotate-half ones changes the logits."""
    hf = hf_model("deepseek_v3")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_interleave"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    diff = (logits(from_hf(tmp_path).eval(), tokens) - logits(hf, tokens)).abs().max()
    assert diff > 1e-3


def test_deepseek_mtp_layers_round_trip(tmp_path, seed):
    """Our MTP depth k is written as DeepSeek's layer num_hidden_layers + k - 1 and read back; transformers skips it."""
    hf = hf_model("deepseek_v3")
    hf.save_pretrained(tmp_path / "hf")
    model = from_hf(tmp_path / "hf", mtp_depth=1).eval()  # fresh MTP depth on the imported weights
    fresh = dict(model.mtp.named_parameters())
    assert fresh and all(t.device.type == "cpu" and torch.isfinite(t).all() for t in fresh.values())
    # the model's own init (init_std = initializer_range 0.1), not PyTorch's default (std 0.072 for 64 inputs)
    assert abs(fresh["layers.1.proj.weight"].std().item() - model.cfg.init_std) < 0.015
    with torch.no_grad():
        for p in model.mtp.parameters():
            p.normal_(std=0.1)
    export_hf(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    n = config["num_hidden_layers"]
    cfg, sd = load_hf_checkpoint(tmp_path / "ours")
    assert cfg.mtp_depth == 1 and cfg.mtp_moe
    ours = model.state_dict()
    assert sd.keys() == ours.keys() and any(k.startswith("mtp.") for k in sd)
    assert all(torch.equal(sd[k], v) for k, v in ours.items())
    _, hf_sd = load_hf_checkpoint(tmp_path / "ours", mtp_depth=0)  # the MTP layer is then skipped
    assert not any(k.startswith("mtp.") for k in hf_sd)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert torch.equal(f.get_tensor(f"model.layers.{n}.embed_tokens.weight"), ours["tok_embeddings.weight"])
    assert {f"model.layers.{n}.{k}.weight" for k in ("enorm", "hnorm", "eh_proj", "shared_head.norm",
                                                      "shared_head.head", "mlp.gate")} <= keys
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    back = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(logits(back, tokens), logits(hf, tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["mixtral", "deepseek_v3"])
def test_fused_in_memory_expert_layout_imports(case, tmp_path, seed):
    """transformers 5 holds experts fused (experts.gate_up_proj [E, 2H, D]); such a dump imports the same."""
    hf = hf_model(case)
    hf.save_pretrained(tmp_path / "released")
    (tmp_path / "fused").mkdir()
    (tmp_path / "fused" / "config.json").write_text((tmp_path / "released" / "config.json").read_text())
    fused = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in fused)
    save_file(fused, str(tmp_path / "fused" / "model.safetensors"), metadata={"format": "pt"})
    _, a = load_hf_checkpoint(tmp_path / "released")
    _, b = load_hf_checkpoint(tmp_path / "fused")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_export_and_dtype(tmp_path, seed):
    model = from_hf(_saved(tmp_path, "qwen3_moe")).eval()
    export_hf(model, tmp_path / "shards", max_shard_bytes=40_000, dtype=torch.bfloat16)
    index = json.loads((tmp_path / "shards" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((tmp_path / "shards" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, sd = load_hf_checkpoint(tmp_path / "shards")
    for key, value in model.state_dict().items():
        if key.endswith("expert_bias"):
            assert sd[key].dtype == torch.float32
        else:
            assert sd[key].dtype == torch.bfloat16 and torch.equal(sd[key], value.to(torch.bfloat16)), key
    back = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "shards")
    assert back.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16


def _saved(tmp_path, case):
    hf_model(case).save_pretrained(tmp_path / case)
    return tmp_path / case

