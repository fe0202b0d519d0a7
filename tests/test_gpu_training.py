"""A short training run on one GPU with the settings of a real run: bf16 compute (FSDP2 mixed precision), compiled
blocks, meta-device initialisation, every balance loss, bias balancing and MTP. The loss must fall on data seen
again and again, and every logged scalar must be finite. In a subprocess, so its NCCL group does not outlive it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = """
import math, sys
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from lightning_moe.models.config import ModelConfig
from lightning_moe.module import MoELanguageModel
from lightning_moe.parallel.strategy import MoEStrategy

gpu = sys.argv[1] == "gpu"
cfg = ModelConfig(vocab_size=512, dim=256, n_layers=3, n_dense_layers=1, n_heads=4, dense_ffn_dim=512, num_experts=8,
                  top_k=2, moe_ffn_dim=128, num_shared_experts=1, max_seq_len=64, mtp_depth=1, aux_loss_coef=1e-3,
                  seq_aux_loss_coef=1e-3, z_loss_coef=1e-3, bias_update_speed=1e-3)
pl.seed_everything(int(sys.argv[2]))
module = MoELanguageModel(cfg, {"lr": 3e-3, "warmup_steps": 0})
history = []

class Record(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        history.append({k: float(v) for k, v in trainer.callback_metrics.items()})

strategy = MoEStrategy(param_dtype="bfloat16" if gpu else None, compile=gpu, meta_init=True)
trainer = pl.Trainer(accelerator="gpu" if gpu else "cpu", devices=1, strategy=strategy, max_steps=30, logger=False,
                     callbacks=[Record()], enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1)
data = torch.randint(0, 512, (8, 65), generator=torch.Generator().manual_seed(0)).repeat(4, 1)
trainer.fit(module, DataLoader(data, batch_size=4))
names = {"train/loss", "train/mtp_loss", "train/aux_loss", "train/seq_aux_loss", "train/z_loss", "moe/imbalance"}
assert names <= set(history[-1]), sorted(history[-1])
assert all(math.isfinite(v) for h in history for v in h.values())
first = sum(h["train/loss"] for h in history[:5]) / 5
last = sum(h["train/loss"] for h in history[-5:]) / 5
assert last < first - 1.0, (first, last)
print(f"OK loss {first:.3f} -> {last:.3f}")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_bf16_compiled_training_learns(seed):
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", SCRIPT, "gpu", str(seed)], cwd=root, capture_output=True, text=True,
                         timeout=500)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
