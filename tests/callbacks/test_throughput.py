"""ThroughputMonitor: the analytic FLOP count against a hand count, and the metrics a short CPU fit logs."""

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from lightning_moe import ModelConfig, MoELanguageModel, MoETransformer, TokenDataModule
from lightning_moe.callbacks import ThroughputMonitor
from lightning_moe.flops import active_matmul_params, training_flops_per_token
from tests.helpers.loggers import RecordingLogger

# 2 layers: block 0 dense, block 1 MoE. Head size 16 / 2 = 8, one key/value head.
TINY = dict(vocab_size=32, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, n_dense_layers=1, dense_ffn_dim=24,
            num_experts=4, top_k=2, moe_ffn_dim=8, num_shared_experts=1, max_seq_len=16)




def test_training_flops_per_token_matches_a_hand_count():
    cfg = ModelConfig(**TINY)
    attention = 16 * 16 + 16 * 8 + 16 * 8 + 16 * 16  # wq, wk, wv (1 kv head of 8), wo
    dense_ffn = 3 * 16 * 24  # SwiGLU w1, w3, w2
    moe_ffn = 16 * 4 + 2 * 3 * 16 * 8 + 3 * 16 * 8  # router, top_k=2 routed experts, 1 shared expert
    head = 16 * 32
    params = 2 * attention + dense_ffn + moe_ffn + head
    assert params == 4416 == active_matmul_params(cfg)
    seq_len = 10
    # per layer and head: QK^T and AV over S/2 keys on average, 2 FLOPs per multiply-add
    scores = 2 * 2 * 2 * (8 + 8) * seq_len // 2
    assert training_flops_per_token(cfg, seq_len) == 3 * (2 * params + scores) == 28416


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_active_params_match_the_model_weights(attention):
    cfg = ModelConfig(**TINY, attention=attention, q_lora_rank=12 if attention == "mla" else 0, kv_lora_rank=10,
                      qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=6)
    model = MoETransformer(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    routed = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    assert routed == cfg.n_moe_layers * cfg.num_experts * 3 * cfg.dim * cfg.moe_ffn_dim
    assert active_matmul_params(cfg) == linear + routed * cfg.top_k // cfg.num_experts


def tiny_data(seed: int = 0) -> TokenDataModule:
    rng = np.random.default_rng(seed)
    return TokenDataModule(source=lambda: (rng.integers(0, 32, 4000), rng.integers(0, 32, 400)), seq_len=16,
                           batch_size=4)


def test_monitor_logs_throughput_and_mfu_on_its_steps():
    torch.manual_seed(0)
    logger = RecordingLogger()
    monitor = ThroughputMonitor(peak_tflops=1e-6, log_every_n_steps=2)
    trainer = pl.Trainer(max_steps=6, logger=logger, callbacks=[monitor], log_every_n_steps=3, limit_val_batches=0,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(MoELanguageModel(ModelConfig(**TINY)), datamodule=tiny_data())
    keys = {"perf/tokens_per_sec", "perf/tokens_per_sec_per_device", "perf/tflops_per_device", "perf/mfu"}
    rows = [(step, m) for step, m in logger.rows if keys & set(m)]
    # every 2nd optimizer step, at the step it was measured (not at Lightning's log_every_n_steps=3)
    assert [step for step, _ in rows] == [1, 3, 5]
    flops = training_flops_per_token(ModelConfig(**TINY), 16)
    for _, m in rows:
        assert set(m) == keys
        assert m["perf/tokens_per_sec"] > 0
        assert m["perf/tokens_per_sec_per_device"] == m["perf/tokens_per_sec"]  # one device
        assert m["perf/tflops_per_device"] == pytest.approx(m["perf/tokens_per_sec"] * flops / 1e12)
        assert m["perf/mfu"] == pytest.approx(m["perf/tflops_per_device"] / 1e-6)
    assert "perf/tokens_per_sec" in trainer.progress_bar_metrics
