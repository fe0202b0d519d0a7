"""Short training runs on GPUs with the settings of a real run: bf16 compute (FSDP2 mixed precision), compiled
blocks, meta-device initialisation, every balance loss, bias balancing and MTP; on two GPUs also expert parallelism
and the DualPipeV pipeline. The loss must fall on data seen again and again, and every logged scalar must be finite.
In subprocesses (torchrun for two GPUs), so their NCCL groups do not outlive them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = """
import json, math, sys
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from lightning_moe.models.config import ModelConfig
from lightning_moe.module import MoELanguageModel
from lightning_moe.parallel.strategy import MoEStrategy

gpu = sys.argv[1] == "gpu"
cfg = ModelConfig(vocab_size=512, dim=256, n_layers=4, n_dense_layers=1, n_heads=4, dense_ffn_dim=512, num_experts=8,
                  top_k=2, moe_ffn_dim=128, num_shared_experts=1, max_seq_len=64, mtp_depth=1, aux_loss_coef=1e-3,
                  seq_aux_loss_coef=1e-3, z_loss_coef=1e-3, bias_update_speed=1e-3)
pl.seed_everything(int(sys.argv[2]))
module = MoELanguageModel(cfg, {"lr": 3e-3, "warmup_steps": 0})
history = []

class Record(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        history.append({k: float(v) for k, v in trainer.callback_metrics.items()})

devices, sizes = int(sys.argv[3]), json.loads(sys.argv[4])
strategy = MoEStrategy(param_dtype="bfloat16" if gpu else None, compile=gpu and sizes.get("pp", 1) == 1,
                       meta_init=True, **sizes)
trainer = pl.Trainer(accelerator="gpu" if gpu else "cpu", devices=devices, strategy=strategy, max_steps=30,
                     logger=False,
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
print(f"OK rank {trainer.global_rank} loss {first:.3f} -> {last:.3f}")
"""


def _train(tmp_path: Path, seed: int, devices: int, sizes: dict) -> None:
    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    launch = [sys.executable] if devices == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc-per-node={devices}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([*launch, str(script), "gpu", str(seed), str(devices), json.dumps(sizes)], cwd=root,
                         env=env, capture_output=True, text=True, timeout=500)
    assert out.returncode == 0 and out.stdout.count("OK rank") == devices, out.stdout[-3000:] + out.stderr[-3000:]
    print(out.stdout)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_bf16_compiled_training_learns(tmp_path, seed):
    _train(tmp_path, seed, 1, {})


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("sizes", [{"dp_shard": 2, "ep": 2}, {"pp": 2, "dp_shard": 1, "pipeline_microbatches": 4},
                                   {"pp": 2, "dp_shard": 1, "pipeline_microbatches": 4,
                                    "activation_checkpointing": True}],
                         ids=["ep2", "dualpipe", "dualpipe-ac"])
def test_two_gpu_bf16_training_learns(tmp_path, seed, sizes):
    _train(tmp_path, seed, 2, sizes)
