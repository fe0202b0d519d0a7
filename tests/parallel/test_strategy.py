"""MoEStrategy through Lightning and the CLI: multi-process fits, checkpoints that reshard, one-line size errors."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_moe.parallel.checkpoint import consolidate, load_consolidated

pytestmark = pytest.mark.slow

STEPS, HALF = 12, 6


def train(run_dir: Path, devices: int, *overrides: str, check: bool = True, dp: int | None = None
          ) -> subprocess.CompletedProcess:
    # Same global batch (16 sequences) whatever the number of data-parallel ranks (dp, default: all processes), so
    # loss curves are comparable.
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "lightning_moe.train", "recipe=tiny", "logger=csv", f"hydra.run.dir={run_dir}",
           "strategy=moe", "trainer.accelerator=cpu", f"trainer.devices={devices}",
           f"data.batch_size={16 // (dp or devices)}",
           "trainer.enable_progress_bar=false", "trainer.val_check_interval=6", "trainer.limit_val_batches=1",
           f"callbacks.model_checkpoint.every_n_train_steps={HALF}", "~callbacks.throughput", *overrides]
    proc = subprocess.run(cmd, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    rows = csv.DictReader(open(run_dir / "csv" / "version_0" / "metrics.csv"))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted run at ep=2 on 2 processes."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    train(run_dir, 2, "strategy.ep=2", f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=1")
    return losses(run_dir)


@pytest.mark.parametrize("first, second", [((2, "strategy.ep=2"), (1, "strategy.ep=1")),
                                           ((1, "strategy.ep=1"), (2, "strategy.ep=2"))],
                         ids=["ep2x2procs-to-1proc", "1proc-to-ep2x2procs"])
def test_checkpoint_resumes_in_another_layout(tmp_path, reference, first, second):
    a, b = tmp_path / "a", tmp_path / "b"
    train(a, first[0], first[1], f"trainer.max_steps={HALF}", "trainer.log_every_n_steps=1")
    ckpt = a / "checkpoints" / "last.ckpt"
    assert (ckpt / ".metadata").is_file() and (ckpt / "meta.pt").is_file()
    train(b, second[0], second[1], f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=1", f"ckpt_path={ckpt}")
    resumed = losses(b)
    assert min(resumed) == HALF, "the resumed run continues the step count"
    for step, loss in resumed.items():
        # same weights, optimizer state, router biases and data position: the same curve
        assert loss == pytest.approx(reference[step], rel=2e-4), (step, loss, reference[step])
    # consolidated single file for inference: full expert weights, plain model keys
    model = load_consolidated(consolidate(b / "checkpoints" / "last.ckpt", tmp_path / "model.pt"))
    assert model.layers["1"].feed_forward.experts.w13.shape[0] == 4
    logits = model(torch.randint(0, 256, (1, 8)))
    assert torch.isfinite(logits).all()


def test_invalid_sizes_fail_fast_on_every_rank(tmp_path):
    proc = train(tmp_path / "bad", 2, "strategy.ep=4", "trainer.max_steps=1", check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lightning-moe-train: error:")]
    assert errors and all("strategy.ep=4 must divide strategy.dp_shard=2" in e for e in errors), proc.stderr[-2000:]
