"""The LightningModule: next-token language modelling with an MoE transformer.

Batches are token windows ``[B, S + 1]``. The model is built in ``configure_model`` so that strategies can create it
on the meta device and shard it before materialising.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from lightning_moe.models.config import ModelConfig
from lightning_moe.models.mtp import mtp_lambda, mtp_losses
from lightning_moe.models.transformer import MoETransformer
from lightning_moe.moe.balance import collect_expert_load, imbalance, moe_layers, update_expert_biases
from lightning_moe.moe.layer import MoE
from lightning_moe.optim import OptimizerConfig, build_optimizer
from lightning_moe.parallel.clip import clip_grad_norm_
from lightning_moe.parallel.expert_parallel import ExpertParallel


def _in_backward() -> bool:
    """Whether this thread is running an autograd backward: an activation-checkpoint recompute (reentrant or not)
    runs its forward there, also on the helper thread of a pipeline overlap's backward lane."""
    return torch._C._current_graph_task_id() != -1


def _add_losses(totals: dict[str, torch.Tensor], losses: dict[str, torch.Tensor]) -> None:
    """totals[name] += losses[name] for every loss, starting new names at their value (in place)."""
    for name, value in losses.items():
        totals[name] = totals[name] + value if name in totals else value


class BalanceLossMeter:
    """Collects the balance losses (``MoE.last_losses``) of every training forward of each MoE layer within a step.

    ``attach(model)`` adds a forward hook to each MoE layer (once); ``reset()`` starts a step. A forward counts when
    the layer is in training mode (only then does the router compute balance losses) and it does not run inside a
    backward: that leaves out validation / eval-mode forwards and the forwards that activation checkpointing
    recomputes during backward (a microbatch again, and not necessarily every microbatch: counting them would skew the
    mean too). Grad mode is no criterion: under reentrant checkpointing the real forward runs without grad.

    ``totals()``: per loss name, the sum over this process's layers of the mean over the counted forwards of each
    layer (detached). ``counts[layer]``: the counted forwards of a layer since the last reset.
    """

    def __init__(self) -> None:
        self.counts: dict[MoE, int] = {}
        self._sums: dict[MoE, dict[str, torch.Tensor]] = {}

    def attach(self, model: torch.nn.Module) -> None:
        for _, moe in moe_layers(model):
            if not any(getattr(hook, "__self__", None) is self for hook in moe._forward_hooks.values()):
                moe.register_forward_hook(self._record)

    def reset(self) -> None:
        self.counts.clear()
        self._sums.clear()

    @torch.compiler.disable
    def _record(self, moe: MoE, args: Any, output: Any) -> None:
        if not (moe.training and moe.last_losses) or _in_backward():
            return
        _add_losses(self._sums.setdefault(moe, {}), {name: value.detach() for name, value in moe.last_losses.items()})
        self.counts[moe] = self.counts.get(moe, 0) + 1

    def totals(self) -> dict[str, torch.Tensor]:
        totals: dict[str, torch.Tensor] = {}
        for moe, sums in self._sums.items():
            _add_losses(totals, {name: value / self.counts[moe] for name, value in sums.items()})
        return totals


class MoELanguageModel(pl.LightningModule):
    """Args:
        model: the architecture (``ModelConfig`` or a dict of its fields).
        optimizer: AdamW + schedule settings (``OptimizerConfig`` or a dict).
    """

    def __init__(self, model: ModelConfig | dict[str, Any] | None = None,
                 optimizer: OptimizerConfig | dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model_cfg = model if isinstance(model, ModelConfig) else ModelConfig.from_dict(dict(model or {}))
        self.optim_cfg = optimizer if isinstance(optimizer, OptimizerConfig) else OptimizerConfig(**(optimizer or {}))
        # Plain dicts only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters({"model": self.model_cfg.to_dict(), "optimizer": dataclasses.asdict(self.optim_cfg)})
        self.model: MoETransformer | None = None
        # Set by MoEStrategy: the group over which expert loads are summed (None: all ranks), and the groups over
        # which squared gradient norms are summed on top of DTensor reductions (pipeline stages).
        self.expert_load_group = None
        self.grad_norm_groups: list = []
        # Set by MoEStrategy under pipeline parallelism: runs each batch through the schedule (lightning_moe.pipeline)
        self.pipeline = None
        # the balance losses of this step's training forwards, for logging (see _aux_loss_totals)
        self.balance_losses = BalanceLossMeter()
        self._checked_vocab = False

    # --- model ---
    def configure_model(self) -> None:
        if self.model is None:
            self.model = MoETransformer(self.model_cfg)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def lm_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def _check_batch(self, batch: torch.Tensor) -> None:
        if self._checked_vocab:
            return
        if batch.ndim != 2 or batch.shape[1] < 2:
            raise ValueError(f"expected token batches of shape [batch, seq_len + 1], got {tuple(batch.shape)}")
        top = int(batch.max())
        if top >= self.model_cfg.vocab_size:
            raise ValueError(f"data has token id {top} but model.vocab_size={self.model_cfg.vocab_size}")
        self._checked_vocab = True

    def on_fit_start(self) -> None:
        # Under pipeline parallelism a step runs several microbatches: count their balance losses with forward hooks,
        # registered before the first training forward (a compiled block traced without them would never call them;
        # torch.compile does not guard on submodule hooks). One forward per step needs no hooks (``last_losses``).
        if self.pipeline is not None:
            self.balance_losses.attach(self.model)

    # --- steps ---
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self._check_batch(batch)
        if self.pipeline is not None:
            self.balance_losses.attach(self.model)  # normally done in on_fit_start already
            self.balance_losses.reset()
            return self._pipeline_step(batch, "train")
        scale = 1.0 / self.trainer.accumulate_grad_batches if self._trainer is not None else 1.0
        for _, moe in moe_layers(self.model):
            moe.aux_loss_scale = scale
        logits, mtp_logits = self._forward_with_mtp(batch)
        loss = self.lm_loss(logits, batch[:, 1:])
        # train/loss is the main next-token loss only (comparable with MTP off); MTP terms are logged apart
        metrics = {"train/loss": loss}
        if mtp_logits:
            weight = mtp_lambda(self.model_cfg, self.global_step)
            mtp = self._mtp_metrics(mtp_losses(mtp_logits, batch[:, 1:]), "train", metrics)
            loss = loss + weight * mtp
            self.log("train/mtp_lambda", weight)
        self._log_train_metrics(metrics)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.pipeline is not None:
            return self._pipeline_step(batch, "val")
        logits, mtp_logits = self._forward_with_mtp(batch)
        loss = self.lm_loss(logits, batch[:, 1:])
        metrics = {"val/loss": loss}
        if mtp_logits:
            self._mtp_metrics(mtp_losses(mtp_logits, batch[:, 1:]), "val", metrics)
        self._log_val_metrics(metrics)
        return loss

    def _pipeline_step(self, batch: torch.Tensor, stage: str) -> torch.Tensor:
        """One batch through the pipeline schedule: forward and backward together when training (the strategy then
        skips Lightning's backward), forward only in validation. Logs what the non-pipelined steps log."""
        train = stage == "train"
        weight = mtp_lambda(self.model_cfg, self.global_step) if self.model_cfg.mtp_depth else 0.0
        if train:
            self.pipeline.mtp_weight = weight
            for optimizer in self.trainer.optimizers:  # see optimizer_zero_grad
                optimizer.zero_grad(set_to_none=True)
        parts = self.pipeline.step(batch[:, :-1], batch[:, 1:], train=train)
        loss = parts[0]
        metrics = {f"{stage}/loss": loss}
        if parts.numel() > 1:
            mtp = self._mtp_metrics(list(parts[1:]), stage, metrics)
            if train:
                self.log("train/mtp_lambda", weight)
                loss = loss + weight * mtp
        if train:
            self._log_train_metrics(metrics)
        else:
            self._log_val_metrics(metrics)
        return loss

    # --- multi-token prediction (lightning_moe.models.mtp) ---
    def _forward_with_mtp(self, batch: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """batch: [B, S + 1] -> (logits [B, S, V], per-depth MTP logits [B, S - k, V]; empty without MTP)."""
        if getattr(self.model, "mtp", None) is None:
            return self.model(batch[:, :-1]), []
        return self.model(batch[:, :-1], labels=batch[:, 1:])

    @staticmethod
    def _mtp_metrics(losses: list[torch.Tensor], stage: str, metrics: dict[str, torch.Tensor]) -> torch.Tensor:
        """Adds ``{stage}/mtp_loss_{k}`` (per depth) and ``{stage}/mtp_loss`` (their unweighted mean) to ``metrics``;
        returns the mean."""
        for k, value in enumerate(losses, start=1):
            metrics[f"{stage}/mtp_loss_{k}"] = value
        mean = torch.stack(losses).mean()
        metrics[f"{stage}/mtp_loss"] = mean
        return mean

    def _log_val_metrics(self, metrics: dict[str, torch.Tensor]) -> None:
        for name, value in metrics.items():  # Lightning averages them over the epoch and the ranks
            self.log(name, value, prog_bar=name == "val/loss", sync_dist=True)

    def _log_train_metrics(self, metrics: dict[str, torch.Tensor]) -> None:
        """Log a training step's scalars (``metrics``, the balance losses, ``lr``) as their means over all processes,
        with one all-reduce for all of them (``sync_dist=True`` would issue one per value).

        Every process logs the same names in the same order (they depend on the config only). Under pipeline
        parallelism the values are already the same on every stage of a pipeline, so the mean over all processes is
        the mean over the data-parallel replicas.
        """
        metrics = {**metrics, **{f"train/{k}": v for k, v in self._aux_loss_totals().items()}}
        names = list(metrics)
        device = self.pipeline.device if self.pipeline is not None else self.device
        values = torch.stack([torch.as_tensor(metrics[n]).detach().float().reshape(()).to(device) for n in names])
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(values)
            values = values / dist.get_world_size()
        for name, value in zip(names, values):
            self.log(name, value, prog_bar=name == "train/loss")
        if self._trainer is not None and self.trainer.optimizers:
            self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=False)

    def _aux_loss_totals(self) -> dict[str, torch.Tensor]:
        """``{aux_loss,seq_aux_loss,z_loss}`` (each already times its coefficient) of this training step, logged as
        ``train/...`` (mean over the data-parallel replicas): the sum over the MoE layers (under pipeline
        parallelism: over every stage's layers) of the mean over the step's microbatches of each layer's loss.

        The scale ``aux_loss_scale`` (gradient accumulation, microbatches) weights the gradients only, not these.

        - Without pipeline parallelism a step makes one forward: each layer's ``last_losses``, the losses of the whole
          batch (an activation-checkpoint recompute repeats the same values).
        - Under pipeline parallelism (M microbatches in one step), what ``BalanceLossMeter`` counted: each
          training-mode forward of a layer since the step began, once; the forwards that activation checkpointing
          recomputes in backward and eval-mode (validation) forwards are not counted. The mean over the M
          microbatches: for the losses
          that are means over sequences or tokens (``seq_aux_loss``, ``z_loss``) that equals the one-process value
          for the whole batch; the classic ``aux_loss`` (products of batch-wide statistics) is defined per forward,
          so it is the mean of the per-microbatch values, which is also what the gradients see.
        - With gradient accumulation each ``training_step`` logs its own batch, like ``train/loss``; Lightning writes
          the values of the last batch of each accumulation window.
        """
        if self.pipeline is None:
            totals: dict[str, torch.Tensor] = {}
            for _, moe in moe_layers(self.model):
                _add_losses(totals, moe.last_losses)
        else:  # every rank joins, with or without MoE layers of its own
            totals = self.balance_losses.totals()
            missed = [moe for _, moe in moe_layers(self.model)
                      if moe.last_losses and moe not in self.balance_losses.counts]
            if missed:  # hooks that never ran (a block compiled and traced before they were registered)
                warnings.warn("train/aux_loss etc.: the balance-loss hooks of some MoE layers did not run; logging "
                              "their last microbatch instead of the mean over the microbatches", stacklevel=2)
                for moe in missed:
                    _add_losses(totals, moe.last_losses)
            cfg = self.model_cfg
            names = [n for n, coef in (("aux_loss", cfg.aux_loss_coef), ("seq_aux_loss", cfg.seq_aux_loss_coef),
                                       ("z_loss", cfg.z_loss_coef)) if coef]
            vec = torch.zeros(len(names), device=self.pipeline.device)
            for i, name in enumerate(names):
                vec[i] += totals.get(name, 0)
            torch.distributed.all_reduce(vec, group=self.pipeline.pp_group)
            totals = dict(zip(names, vec))
        return totals

    # --- expert balancing, once per optimizer step ---
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        load, dropped = collect_expert_load(self.model, self.expert_load_group)
        if self.pipeline is not None:  # the mean over the layers of every stage
            per_layer = (imbalance(load) if load.numel() else torch.zeros(0)).float().to(self.pipeline.device)
            stats = torch.stack([per_layer.sum(), per_layer.new_tensor(float(per_layer.numel()))])
            torch.distributed.all_reduce(stats, group=self.pipeline.pp_group)
            if stats[1] > 0:
                self.log("moe/imbalance", stats[0] / stats[1], prog_bar=True)
        elif load.numel():
            self.log("moe/imbalance", imbalance(load).mean(), prog_bar=True)
        if load.numel():
            if self.model_cfg.capacity_factor is not None:
                self.log("moe/dropped_tokens", dropped.sum())
            update_expert_biases(self.model, load)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        """Lightning zeroes gradients between ``training_step`` and backward; under pipeline parallelism the backward
        has already run inside ``training_step``, which zeroes the gradients itself before the schedule."""
        if self.pipeline is None:
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Norm clipping that also works when dense and expert weights are sharded on different meshes."""
        if gradient_clip_val is None or gradient_clip_val <= 0:
            return
        if gradient_clip_algorithm not in (None, "norm") or not (
            self.grad_norm_groups or any(isinstance(p, DTensor) for p in self.model.parameters())
        ):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        weights = {}  # redundant expert replicas (EPLB): each logical expert counts once in the norm
        for m in self.model.modules():
            if isinstance(m, ExpertParallel) and m.replicated:
                for p in (m.w13, m.w2):
                    if p.grad is not None:
                        weights[id(p)] = m.slot_norm_weights(p.grad)
        norm = clip_grad_norm_(params, gradient_clip_val, extra_groups=self.grad_norm_groups, weights=weights)
        self.log("train/grad_norm", norm)

    # --- optimizer ---
    def configure_optimizers(self):
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        opt, sched = build_optimizer(self.model, self.optim_cfg, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
