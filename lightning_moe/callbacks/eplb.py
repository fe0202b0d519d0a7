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

Pipeline parallelism (``strategy.pp > 1``): each pipeline rank holds only its stages' layers. The load is summed, and
each layer planned, within its pipeline position (over the module's ``expert_load_group``: the data-parallel ranks
that hold the same layers, so they plan the same placements); the logged imbalance and the checkpointed placements
are then gathered over the pipeline group (``pl_module.pipeline.pp_group``) so that they cover every stage's layers.
Every rank joins those collectives at the same steps, also a rank whose stages have no MoE layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_moe.callbacks.expert_load import gather_objects, layer_label, pipeline_group
from lightning_moe.eplb import gpu_loads, rebalance_experts
from lightning_moe.errors import ConfigError
from lightning_moe.moe.balance import moe_layers
from lightning_moe.parallel.expert_parallel import ExpertParallel
from lightning_moe.parallel.redundant_experts import register_optimizer_layout_hooks


def _positive_int(value: Any, key: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"callbacks.eplb.{key}={value!r}: must be an integer >= {minimum}")
    return value


class ExpertRebalancer(Callback):
    """Redundant experts re-placed every ``every_n_steps`` optimizer steps from the load of the last window.

    Needs expert parallelism (``strategy=moe strategy.ep=<P>`` with P > 1). With ``num_redundant > 0`` every MoE
    layer gets R = E + num_redundant expert slots: ``setup`` (which Lightning runs before the model is built and
    sharded) sets the strategy's ``num_redundant_experts``, and the strategy's expert parallelism creates the slots.
    Until the first plan the slots hold experts ``s % E`` (``default_placement``).

    Logged at each plan, at that step, to every logger (W&B included): ``eplb/imbalance_before`` and
    ``eplb/imbalance_after`` (sum over layers of the busiest rank's tokens / sum of the mean rank's: the expert time
    of a step relative to perfect balance), the same per layer as ``eplb/layer_{i}/imbalance_{before,after}``
    (``layer_label``: ``i`` is the global block index, ``mtp_{k}`` for MTP depths), and ``eplb/slots_changed`` (slots
    that received another expert: the weights moved). All of them cover every MoE layer of the model, under
    pipeline parallelism those of every stage.

    Checkpoints: weights and optimizer state are saved in the logical expert layout (they load with or without
    redundant experts, at any ep); the callback's state keeps the placement of every MoE layer of the model (of every
    pipeline stage: Lightning writes callback states from rank 0 only), keyed by layer label, re-applied at the start
    of a resumed run, in any pipeline layout, to each layer whose slot count and ep match (other layers start from
    the default placement, with a warning). The load window restarts on resume. Resuming with redundant experts needs
    a distributed checkpoint (the default): single-file checkpoints are refused in ``setup``.

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
        """Plans applied (to the layers of any pipeline stage)."""
        self.ep = 0
        self._layers: list[tuple[str, ExpertParallel, Any]] = []  # (label, experts, router) of this rank's stages
        self._placements: dict[str, torch.Tensor] = {}  # label -> phy2log [R] of every stage's layers (checkpoints)
        self._pp_group: dist.ProcessGroup | None = None  # pipeline group (pp > 1), else None
        self._load: torch.Tensor | None = None  # [L, E] float64 local tokens since the last plan
        self._pending = False
        self._last_step = -1
        self._restored: dict[str, Any] | None = None
        self._hooks: list[Any] = []

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
        trainer.strategy.num_redundant_experts = self.num_redundant

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and hasattr(trainer.strategy, "num_redundant_experts"):
            trainer.strategy.num_redundant_experts = 0

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = moe_layers(pl_module)
        labels = [layer_label(name, k) for k, (name, _) in enumerate(layers)]
        self._pp_group = pipeline_group(pl_module)
        # Under pipeline parallelism every rank learns every stage's problems and layers (a collective), so that all
        # raise the same error: a stage raising alone would leave the others waiting in a collective.
        gathered = gather_objects((self._check_layers(layers), labels), self._pp_group)
        problems = [problem for problem, _ in gathered if problem]
        if problems:
            raise ConfigError(problems[0])
        every = [label for _, stage_labels in gathered for label in stage_labels]
        if not every:
            raise ConfigError("callbacks.eplb (ExpertRebalancer): the model has no MoE layers")
        if len(set(every)) != len(every):
            raise ConfigError(f"callbacks.eplb (ExpertRebalancer): the MoE layer labels {every} of the pipeline stages "
                              "are not unique (metrics and checkpointed placements are keyed by them)")
        self._layers = [(label, m.experts, m.router) for label, (_, m) in zip(labels, layers)]
        for handle in self._hooks:
            handle.remove()
        self._hooks = [h for opt in trainer.optimizers for h in register_optimizer_layout_hooks(opt, pl_module)]
        self._load, self._pending, self._last_step, self._placements = None, False, -1, {}

    def _check_layers(self, layers: Sequence[tuple[str, Any]]) -> str | None:
        """What keeps this rank's MoE layers from being rebalanced (None: nothing)."""
        plain = [name for name, m in layers if not isinstance(m.experts, ExpertParallel)]
        if plain:
            return (f"callbacks.eplb (ExpertRebalancer): the routed experts of {plain} are not expert-parallel; use "
                    "strategy=moe with strategy.ep > 1")
        for name, m in layers:
            experts = m.experts
            if experts.num_slots != experts.global_num_experts + self.num_redundant:
                return (f"callbacks.eplb.num_redundant={self.num_redundant}, but {name} has "
                        f"{experts.num_slots - experts.global_num_experts} redundant slots: its experts were made "
                        "expert-parallel before this callback could add its slots")
            if experts.global_num_experts % self.num_groups:
                return (f"callbacks.eplb.num_groups={self.num_groups} must divide model.num_experts="
                        f"{experts.global_num_experts}")
        if len({m.experts.global_num_experts for _, m in layers}) > 1:
            return "callbacks.eplb (ExpertRebalancer) needs the same number of experts in every MoE layer"
        return None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restored, self._restored = self._restored, None
        skipped = self._restore(restored, trainer) if restored else []
        # Every stage's placements, for the checkpoints (rank 0 writes the callback state), and every stage's
        # restore problems, for one warning: a collective over the pipeline group.
        own = {label: experts.placement for label, experts, _ in self._layers}
        gathered = gather_objects((own, skipped), self._pp_group)
        self._placements = {label: p for table, _ in gathered for label, p in table.items()}
        skipped = [problem for _, stage in gathered for problem in stage]
        if skipped:
            rank_zero_warn(f"ExpertRebalancer: the checkpoint's placements do not fit this run for {'; '.join(skipped)}"
                           "; those layers start from the default placement")

    def _restore(self, state: dict[str, Any], trainer: pl.Trainer) -> list[str]:
        """Apply the checkpointed placements to this rank's layers; returns the problems (the layers left as they
        are). Every rank of a pipeline position holds the same layers and state, so they make the same moves."""
        if not self._layers:
            return []
        placements, labels = state.get("placements"), [label for label, _, _ in self._layers]
        if isinstance(placements, torch.Tensor):  # older format: [L, R], rank 0's layers in model order
            if self._pp_group is not None or len(placements) != len(labels):
                return [f"{labels} (the checkpoint's {tuple(placements.shape)} placements are not keyed by layer)"]
            placements = dict(zip(labels, placements))
        if state.get("ep") != self.ep or not isinstance(placements, dict):
            return [f"{labels} (checkpoint ep={state.get('ep')}, this run's ep={self.ep})"]
        problems = []
        for label, experts, _ in self._layers:
            phy2log = placements.get(label)
            if phy2log is None:
                problems.append(f"{label} (not in the checkpoint)")
            elif tuple(phy2log.shape) != (experts.num_slots,):
                problems.append(f"{label} ({phy2log.shape[-1]} slots, this run has {experts.num_slots})")
            else:
                experts.apply_placement(phy2log, trainer.optimizers)
        return problems

    # --- every step: accumulate the load ------------------------------------------------------------------------
    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if step == self._last_step:  # several optimizers: count the step once
            return
        self._last_step = step
        if self._layers:
            load = torch.stack([router.tokens_per_expert.detach() for _, _, router in self._layers]).double()
            self._load = load if self._load is None else self._load + load
        if (step + 1) % self.every_n_steps == 0:  # also on pipeline ranks without MoE layers: they join the gathers
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
        calls it at the same step (under pipeline parallelism each stage plans its own layers, then the results are
        gathered over the pipeline group)."""
        load, self._load = self._load, None
        plans = gather_objects(self._plan(trainer, pl_module, load), self._pp_group)
        plans = [plan for plan in plans if plan is not None]
        if not plans:
            return
        for plan in plans:
            self._placements.update(plan["placements"])
        self.num_plans += 1
        self._log(trainer, [label for plan in plans for label in plan["labels"]],
                  torch.cat([plan["before"] for plan in plans]), torch.cat([plan["after"] for plan in plans]),
                  sum(plan["changed"] for plan in plans))

    def _plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
              load: torch.Tensor | None) -> dict[str, Any] | None:
        """Plan and apply new placements for this rank's layers from their local ``load`` [L, E], summed over the
        data-parallel ranks that hold the same layers (a collective over ``expert_load_group``). Returns the labels,
        the per-EP-rank loads [L, P] before and after, the slots changed and the new placements; None when there is
        nothing to plan (no MoE layer on this rank, or no load)."""
        if not self._layers or load is None:
            return None
        group = getattr(pl_module, "expert_load_group", None)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(load, group=group)  # exact: token counts in float64
        load = load.cpu()
        if not load.sum() > 0:
            return None
        num_slots = self._layers[0][1].num_slots
        old = torch.stack([experts.placement for _, experts, _ in self._layers])
        old_cnt = torch.stack([experts.replica_counts for _, experts, _ in self._layers])
        new, _, new_cnt = rebalance_experts(load, num_slots, self.num_groups, self.num_nodes, self.ep)
        for (_, experts, _), phy2log in zip(self._layers, new):
            experts.apply_placement(phy2log, trainer.optimizers)
        labels = [label for label, _, _ in self._layers]
        return {"labels": labels, "before": gpu_loads(load, old, old_cnt, self.ep),
                "after": gpu_loads(load, new, new_cnt, self.ep), "changed": int((old != new).sum()),
                "placements": {label: experts.placement for label, experts, _ in self._layers}}

    def _log(self, trainer: pl.Trainer, labels: list[str], before: torch.Tensor, after: torch.Tensor,
             changed: int) -> None:
        """labels: the MoE layers of every stage; before, after: [L, P] tokens per EP rank under the old and the new
        placement."""
        if not trainer.is_global_zero:
            return
        metrics = {"eplb/imbalance_before": float(before.amax(-1).sum() / before.mean(-1).sum().clamp_min(1e-9)),
                   "eplb/imbalance_after": float(after.amax(-1).sum() / after.mean(-1).sum().clamp_min(1e-9)),
                   "eplb/slots_changed": float(changed)}
        if self.log_per_layer:
            for label, b, a in zip(labels, before, after):
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
        """The placement of every MoE layer of the model, keyed by layer label: on every rank, those of every pipeline
        stage (kept up to date at each plan and at the start of training, so saving needs no collective)."""
        if not self._placements:
            return {}
        return {"ep": self.ep, "num_plans": self.num_plans,
                "placements": {label: self._placements[label].clone() for label in sorted(self._placements)}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self.num_plans = state_dict.get("num_plans", 0)
            self._restored = state_dict
