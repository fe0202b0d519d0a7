"""End-to-end runs of the training command (subprocesses, tiny recipe, seconds each)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.wandb_reader import read_run

pytestmark = pytest.mark.slow


def train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONSOLE="off")
    env.pop("WANDB_API_KEY", None)
    cmd = [sys.executable, "-m", "lightning_moe.train", "recipe=tiny", f"hydra.run.dir={run_dir}",
           "trainer.enable_progress_bar=false", *overrides]
    proc = subprocess.run(cmd, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def csv_losses(run_dir: Path) -> dict[int, float]:
    rows = list(csv.DictReader(open(run_dir / "csv" / "version_0" / "metrics.csv")))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def test_wandb_offline_run_has_losses_and_resolved_config(tmp_path):
    run_dir = tmp_path / "run"
    proc = train(run_dir, "logger=wandb", "model.num_experts=6")
    assert "final val/loss" in proc.stdout
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    run = read_run(runs[0])
    keys = set().union(*run["history"])
    assert {"train/loss", "val/loss", "lr", "perf/tokens_per_sec", "moe/imbalance", "trainer/global_step"} <= keys
    train_losses = [row["train/loss"] for row in run["history"] if "train/loss" in row]
    assert len(train_losses) >= 3 and all(0 < v < 10 for v in train_losses)
    # the resolved Hydra config, overrides included
    config = run["config"]["config"]
    assert config["model"]["num_experts"] == 6
    assert config["model"]["max_seq_len"] == config["data"]["seq_len"] == 64  # interpolation resolved
    assert config["trainer"]["max_steps"] == 20
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 20 and metrics["val/loss"] < 5.55


def test_resume_continues_step_count_and_loss_curve(tmp_path):
    full = tmp_path / "full"
    train(full, "trainer.max_steps=20")
    reference = csv_losses(full)
    first = tmp_path / "first"
    train(first, "trainer.max_steps=10")
    ckpt = first / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    resumed = tmp_path / "resumed"
    train(resumed, "trainer.max_steps=20", f"ckpt_path={ckpt}")
    after = csv_losses(resumed)
    assert min(after) >= 10, "resumed run must continue the step count, not restart it"
    assert json.loads((resumed / "metrics.json").read_text())["global_step"] == 20
    for step, loss in after.items():
        assert loss == pytest.approx(reference[step], rel=1e-4, abs=1e-4), (step, loss, reference[step])


def test_resume_continues_the_wandb_run(tmp_path):
    first = tmp_path / "first"
    train(first, "logger=wandb", "trainer.max_steps=10")
    resumed = tmp_path / "resumed"
    train(resumed, "logger=wandb", "trainer.max_steps=15", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}")
    first_id = next((first / "wandb").glob("offline-run-*")).name.rsplit("-", 1)[-1]
    resumed_id = next((resumed / "wandb").glob("offline-run-*")).name.rsplit("-", 1)[-1]
    assert first_id == resumed_id
