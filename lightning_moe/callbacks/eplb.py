"""Training-time expert-parallel load balancing (EPLB): redundant experts re-placed from the observed load.

Shapes: L MoE layers (in model order), E logical experts per layer, R = E + num_redundant physical slots per layer,
P = ep expert-parallel ranks (R / P slots each).

Every optimizer step the callback adds the tokens each router sent to each expert (``tokens_per_expert``, read in
``on_before_optimizer_step`` before the module's bias update resets it) to a local [L, E] sum. Every
``every_n_steps`` steps, after the optimizer step, it all-reduces that sum over the data-parallel ranks, plans a new
placement per layer with ``lightning_moe.eplb.rebalance_experts``, and applies it to every ``ExpertParallel`` layer
(``apply_placement``: weights and optimizer state move, the model computes the same function). It then logs, per
layer and overall, the per-GPU load imbalance (max / mean tokens per EP rank over the window, each expert's tokens
split evenly over its replicas) under the old and the new placement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_moe.callbacks.expert_load import layer_label
from lightning_moe.eplb import gpu_loads, rebalance_experts
from lightning_moe.errors import ConfigError
from lightning_moe.moe.balance import moe_layers
from lightning_moe.parallel.expert_parallel import ExpertParallel, apply_expert_parallel
from lightning_moe.parallel.redundant_experts import register_optimizer_layout_hooks


def _positive_int(value: Any, key: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"callbacks.eplb.{key}={value!r}: must be an integer >= {minimum}")
    return value


class ExpertRebalancer(Callback):
    """Redundant experts re-placed every ``every_n_steps`` optimizer steps from the load of the last window.

    Needs expert parallelism (``strategy=moe strategy.ep=<P>`` with P > 1). With ``num_redundant > 0`` it gives
    every MoE layer R = E + num_redundant expert slots before the strategy shards the model: in ``setup`` it wraps
    the module's ``configure_model`` so that, right after the model is built, its routed experts become
    ``ExpertParallel`` layers with the extra slots (the strategy's own expert parallelism then keeps them). There is
    no Lightning hook between ``configure_model`` and the strategy's sharding, hence the wrapper; it is removed in
    ``teardown``. Until the first plan the slots hold experts ``s % E`` (``default_placement``).

    Logged at each plan, at that step, to every logger (W&B included): ``eplb/imbalance_before`` and
    ``eplb/imbalance_after`` (sum over layers of the busiest rank's tokens / sum of the mean rank's: the expert time
    of a step relative to perfect balance), the same per layer as ``eplb/layer_{i}/imbalance_{before,after}``,
    and ``eplb/slots_changed`` (slots that received another expert: the weights moved).

    Checkpoints: weights and optimizer state are saved in the logical expert layout (they load with or without
    redundant experts, at any ep); the callback's state keeps the placements, re-applied at the start of a resumed
    run with the same ep and slot count. The load window restarts on resume. Resuming with redundant experts needs a
    distributed checkpoint (the default): single-file checkpoints are refused in ``setup``.

    Gradient clipping: ``MoELanguageModel``'s norm counts every replica (``ExpertParallel.slot_norm_weights`` gives
    the weights that count each expert once), so with replicas the clipping factor differs slightly from a run
    without them.

    Args:
        every_n_steps: optimizer steps between plans (each plan uses the load of these steps).
        num_redundant: redundant slots per MoE layer, over all EP ranks (a multiple of strategy.ep); 0 only moves
            experts between ranks.
        num_groups: expert groups for the hierarchical policy (see ``rebalance_experts``; 1: global policy).
        num_nodes: nodes the EP ranks span (must divide strategy.ep); groups are kept on a node when
            ``num_groups % num_nodes == 0``.
        log_per_layer: also log the per-layer imbalance.
    """

    def __init__(self, every_n_steps: int = 100, num_redundant: int = 0, num_groups: int = 1, num_nodes: int = 1,
                 log_per_layer: bool = True) -> None:
        self.every_n_steps = _positive_int(every_n_steps, "every_n_steps", 1)
        self.num_redundant = _positive_int(num_redundant, "num_redundant", 0)
        self.num_groups = _positive_int(num_groups, "num_groups", 1)
        self.num_nodes = _positive_int(num_nodes, "num_nodes", 1)
        self.log_per_layer = log_per_layer
        self.num_plans = 0
        """Plans applied in this process."""
        self.ep = 0
        self._layers: list[tuple[str, ExpertParallel, Any]] = []  # (label, experts, router)
        self._load: torch.Tensor | None = None  # [L, E] float64 local tokens since the last plan
        self._pending = False
        self._last_step = -1
        self._restored: dict[str, Any] | None = None
        self._hooks: list[Any] = []
        self._wrapped: pl.LightningModule | None = None

    # --- set-up -----------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        dims, meshes = getattr(trainer.strategy, "dims", None), getattr(trainer.strategy, "meshes", None)
        ep = getattr(dims, "ep", 1)
        if meshes is None or ep < 2:
            raise ConfigError(f"callbacks.eplb (ExpertRebalancer) places experts over expert-parallel ranks: it needs "
                              f"strategy=moe with strategy.ep > 1 (got {type(trainer.strategy).__name__}, ep={ep})")
        if self.num_redundant % ep:
            raise ConfigError(f"callbacks.eplb.num_redundant={self.num_redundant} must be a multiple of "
                              f"strategy.ep={ep} (every EP rank holds the same number of expert slots)")
        if ep % self.num_nodes:
            raise ConfigError(f"callbacks.eplb.num_nodes={self.num_nodes} must divide strategy.ep={ep}")
        self.ep = ep
        if not self.num_redundant:
            return
        ckpt = getattr(trainer, "ckpt_path", None)
        if ckpt is not None and not (Path(ckpt) / ".metadata").is_file():
            # torch's full-state-dict load broadcasts into the parameters' own [R, ...] shapes, bypassing the
            # layer's logical-layout load hook; distributed checkpoints go through it.
            raise ConfigError(f"callbacks.eplb.num_redundant={self.num_redundant}: resuming from the single-file "
                              f"checkpoint {ckpt} is not supported with redundant experts; resume from a distributed "
                              "checkpoint (strategy.save_distributed_checkpoint=true), or resume this one without "
                              "callbacks.eplb (it holds the logical experts) and save a distributed one")
        if not is_overridden("configure_model", pl_module):
            apply_expert_parallel(pl_module, meshes.ep, self.num_redundant)  # the model already exists
        elif "configure_model" not in vars(pl_module):
            configure_model, num_redundant = pl_module.configure_model, self.num_redundant

            def configure_model_with_slots() -> None:
                configure_model()
                apply_expert_parallel(pl_module, meshes.ep, num_redundant)

            pl_module.configure_model = configure_model_with_slots
            self._wrapped = pl_module

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._wrapped is not None:
            vars(self._wrapped).pop("configure_model", None)
            self._wrapped = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = moe_layers(pl_module)
        if not layers:
            raise ConfigError("callbacks.eplb (ExpertRebalancer): the model has no MoE layers")
        plain = [name for name, m in layers if not isinstance(m.experts, ExpertParallel)]
        if plain:
            raise ConfigError(f"callbacks.eplb (ExpertRebalancer): the routed experts of {plain} are not expert-"
                              "parallel; use strategy=moe with strategy.ep > 1")
        for name, m in layers:
            experts = m.experts
            if experts.num_slots != experts.global_num_experts + self.num_redundant:
                raise ConfigError(
                    f"callbacks.eplb.num_redundant={self.num_redundant}, but {name} has "
                    f"{experts.num_slots - experts.global_num_experts} redundant slots: its experts were made "
                    "expert-parallel before this callback could add its slots")
            if experts.global_num_experts % self.num_groups:
                raise ConfigError(f"callbacks.eplb.num_groups={self.num_groups} must divide model.num_experts="
                                  f"{experts.global_num_experts}")
        if len({m.experts.global_num_experts for _, m in layers}) > 1:
            raise ConfigError("callbacks.eplb (ExpertRebalancer) needs the same number of experts in every MoE layer")
        self._layers = [(layer_label(name, k), m.experts, m.router) for k, (name, m) in enumerate(layers)]
        for handle in self._hooks:
            handle.remove()
        self._hooks = [h for opt in trainer.optimizers for h in register_optimizer_layout_hooks(opt, pl_module)]
        self._load, self._pending, self._last_step = None, False, -1

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restored, self._restored = self._restored, None
        if restored is None:
            return
        placements = restored.get("placements")
        expected = (len(self._layers), self._layers[0][1].num_slots)
        if restored.get("ep") != self.ep or placements is None or tuple(placements.shape) != expected:
            rank_zero_warn(f"ExpertRebalancer: the checkpoint's placements (ep={restored.get('ep')}, shape "
                           f"{None if placements is None else tuple(placements.shape)}) do not fit this run (ep="
                           f"{self.ep}, {expected}); starting from the default placement")
            return
        for (_, experts, _), phy2log in zip(self._layers, placements):
            experts.apply_placement(phy2log, trainer.optimizers)

    # --- every step: accumulate the load ------------------------------------------------------------------------
    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if step == self._last_step or not self._layers:  # several optimizers: count the step once
            return
        self._last_step = step
        load = torch.stack([router.tokens_per_expert.detach() for _, _, router in self._layers]).double()
        self._load = load if self._load is None else self._load + load
        if (step + 1) % self.every_n_steps == 0:
            self._pending = True  # applied after the optimizer step, in on_train_batch_end

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._pending:
            self._pending = False
            self.rebalance(trainer, pl_module)

    # --- the plan -------------------------------------------------------------------------------------------------
    def rebalance(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """All-reduce the window's load, plan, move every layer to its new placement, log. A collective: every rank
        calls it at the same step."""
        load, self._load = self._load, None
        if load is None:
            return
        group = getattr(pl_module, "expert_load_group", None)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(load, group=group)  # exact: token counts in float64
        load = load.cpu()
        if not load.sum() > 0:
            return
        num_slots = self._layers[0][1].num_slots
        old = torch.stack([experts.placement for _, experts, _ in self._layers])
        old_cnt = torch.stack([experts.replica_counts for _, experts, _ in self._layers])
        new, _, new_cnt = rebalance_experts(load, num_slots, self.num_groups, self.num_nodes, self.ep)
        for (_, experts, _), phy2log in zip(self._layers, new):
            experts.apply_placement(phy2log, trainer.optimizers)
        self.num_plans += 1
        self._log(trainer, gpu_loads(load, old, old_cnt, self.ep), gpu_loads(load, new, new_cnt, self.ep),
                  int((old != new).sum()))

    def _log(self, trainer: pl.Trainer, before: torch.Tensor, after: torch.Tensor, changed: int) -> None:
        """before, after: [L, P] tokens per EP rank under the old and the new placement."""
        if not trainer.is_global_zero:
            return
        metrics = {"eplb/imbalance_before": float(before.amax(-1).sum() / before.mean(-1).sum().clamp_min(1e-9)),
                   "eplb/imbalance_after": float(after.amax(-1).sum() / after.mean(-1).sum().clamp_min(1e-9)),
                   "eplb/slots_changed": float(changed)}
        if self.log_per_layer:
            for (label, _, _), b, a in zip(self._layers, before, after):
                metrics[f"eplb/{label}/imbalance_before"] = float(b.max() / b.mean().clamp_min(1e-9))
                metrics[f"eplb/{label}/imbalance_after"] = float(a.max() / a.mean().clamp_min(1e-9))
        # Direct logger calls at this step: `pl_module.log` would re-send the values at every later logging step
        # until the next plan. `_batches_that_stepped` is the step Lightning logs this batch's metrics at.
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # --- checkpointing ----------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        if not self._layers:
            return {}
        return {"ep": self.ep, "num_plans": self.num_plans,
                "placements": torch.stack([experts.placement for _, experts, _ in self._layers])}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self.num_plans = state_dict.get("num_plans", 0)
            self._restored = state_dict
