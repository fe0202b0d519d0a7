"""Tokens/s, model TFLOP/s and MFU of an MoE model, computed from its active-parameter FLOPs."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_moe.flops import training_flops_per_token

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment, for MFU when no peak is configured.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def detect_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


class ThroughputMonitor(Callback):
    """Logs ``perf/tokens_per_sec`` (all data-parallel ranks), ``perf/tokens_per_sec_per_device``,
    ``perf/tflops_per_device`` and ``perf/mfu`` every ``log_every_n_steps`` optimizer steps, averaged over them.

    The first step after the start of training or a validation (start-up, compilation) is not timed.

    Args:
        peak_tflops: per-device peak used for MFU (None: detected from the GPU name; no MFU on CPU).
        log_every_n_steps: averaging window and logging interval, in optimizer steps.
    """

    def __init__(self, peak_tflops: float | None = None, log_every_n_steps: int = 10) -> None:
        self.peak_tflops = peak_tflops
        self.window = max(1, log_every_n_steps)
        self._t0: float | None = None
        self._tokens = 0
        self._seq_len = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.peak_tflops is None:
            self.peak_tflops = detect_peak_tflops()
        self._t0, self._tokens = None, 0

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation time is not training throughput: restart the window at the next training batch.
        self._t0, self._tokens = None, 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._t0 is None:  # the first step includes start-up costs: start timing after it
            self._t0, self._tokens = time.perf_counter(), 0
            return
        self._tokens += batch[:, 1:].numel()
        self._seq_len = batch.shape[1] - 1
        if trainer.fit_loop._should_accumulate():
            return
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step Lightning logs this batch's metrics at
        if (step + 1) % self.window:
            return
        elapsed = time.perf_counter() - self._t0
        sampler_kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
        data_replicas = sampler_kwargs.get("num_replicas", 1) if trainer.world_size > 1 else 1
        global_tps = self._tokens * data_replicas / elapsed
        per_device = global_tps / trainer.world_size
        metrics = {"perf/tokens_per_sec": global_tps, "perf/tokens_per_sec_per_device": per_device}
        cfg = getattr(pl_module, "model_cfg", None)
        if cfg is not None:
            tflops = per_device * training_flops_per_token(cfg, self._seq_len) / 1e12
            metrics["perf/tflops_per_device"] = tflops
            if self.peak_tflops:
                metrics["perf/mfu"] = tflops / self.peak_tflops
        # Straight to the loggers at this step: values from `self.log` off Lightning's own logging steps would
        # reach the loggers only at its next logging step, late, and be sent again at the ones after.
        pl_module.log("perf/tokens_per_sec", global_tps, prog_bar=True, logger=False)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        self._t0, self._tokens = time.perf_counter(), 0
