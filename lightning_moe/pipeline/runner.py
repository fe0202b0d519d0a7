"""Run a batch through a ``torch.distributed.pipelining`` schedule and agree on its losses across pipeline ranks.

The last stage computes the loss of each microbatch (next-token cross-entropy, plus the weighted MTP loss); the
schedule runs forward and backward together (training) or forward only (validation). Losses are returned on every
pipeline rank, so Lightning can log them from rank 0 whatever stage it runs.

Gradient scaling: the loss of each microbatch is divided by the number of microbatches (the schedule's own
``scale_grads`` would divide every gradient of the stage after the step, which also divides gradients accumulated
before it), so the gradients equal those of the mean loss over the whole batch.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

from lightning_moe.errors import ConfigError
from lightning_moe.models.config import ModelConfig
from lightning_moe.models.mtp import mtp_losses
from lightning_moe.moe.layer import MoE
from lightning_moe.parallel.expert_parallel import ExpertParallel
from lightning_moe.pipeline.actions import register_unsplit_backward, split_backward_supported
from lightning_moe.pipeline.forward_only import ForwardOnlySchedule
from lightning_moe.pipeline.overlap import enable_overlap
from lightning_moe.pipeline.split import PipelinePlan
from lightning_moe.pipeline.stage import StageModule

__all__ = ["PipelineRunner", "skip_handshakes_with_self"]


def skip_handshakes_with_self(stage: PipelineStage) -> None:
    """Before its first step a schedule exchanges a dummy tensor between neighbouring stages, to set up the
    communicators. torch 2.11 does this also between neighbours on one rank (V schedules: stages 1 and 2 at pp = 2),
    a send to itself, which gloo refuses ("Pair is not connected"); torch 2.13 skips them. Skip them here."""
    init_ops = stage._get_init_p2p_neighbors_ops
    rank = dist.get_rank(stage.group)

    def ops_with_other_ranks() -> list[dist.P2POp]:
        return [op for op in init_ops() if op.group_peer != rank]

    stage._get_init_p2p_neighbors_ops = ops_with_other_ranks


class PipelineRunner:
    """The schedules of one pipeline rank over its ``stage_modules`` (one per batch shape).

    ``step(tokens, targets, train=True)`` returns ``[main_loss, mtp_loss_1, ..., mtp_loss_k]`` (means over the batch,
    detached), the same on every rank of ``pp_group``. ``mtp_weight`` is the MTP loss weight of the coming steps.
    ``tie_group``: the pipeline ranks holding copies of the embedding (the first stage's and the last stage's, for MTP
    under loop schedules), whose gradients are summed after each training step. ``overlap``: DualPipeV runs each
    paired forward and backward chunk as two lanes that interleave at the EP all-to-alls (``pipeline.overlap``).
    """

    def __init__(self, plan: PipelinePlan, stage_modules: list[StageModule], pp_group: dist.ProcessGroup,
                 device: torch.device, cfg: ModelConfig, tie_group: dist.ProcessGroup | None = None,
                 activation_dtype: torch.dtype = torch.float32, overlap: bool = True) -> None:
        self.plan, self.stage_modules, self.pp_group, self.device = plan, stage_modules, pp_group, device
        self.mtp_depth, self.tie_group = cfg.mtp_depth, tie_group
        self.dim, self.vocab_size, self.activation_dtype = cfg.dim, cfg.vocab_size, activation_dtype
        self.mtp_weight = 0.0
        self._parts: list[torch.Tensor] = []
        self._moe_layers = [m for stage in stage_modules for m in stage.modules() if isinstance(m, MoE)]
        self._schedules: dict[tuple[int, int, bool], Any] = {}
        self._fsdp = any(isinstance(m, FSDPModule) for m in stage_modules)
        # zero-bubble schedules split each backward into input (I) and weight (W) gradients; the split needs no FSDP
        # and a torch that can start W at a custom autograd Function (``pipeline.actions``)
        self.split_backward = not self._fsdp and split_backward_supported()
        if not self._fsdp and not self.split_backward and plan.spec.style == "v":  # DualPipeV, ZBV: I and W
            warnings.warn(f"torch {torch.__version__} cannot split the backward at custom autograd Functions "
                          "(torch >= 2.13 can): each backward runs whole in its input-gradient slot of the "
                          f"{plan.spec.torch_name} schedule", stacklevel=2)
        self.overlap = overlap
        self._expert_parallel = any(isinstance(m.experts, ExpertParallel) and m.experts.ep_size > 1
                                    for m in self._moe_layers)

    def _stage_io(self, stage: StageModule, mb: int, seq: int) -> tuple[tuple, tuple]:
        """Meta tensors with the shapes of a stage's input and output for microbatches [mb, seq]: torch then skips
        its shape inference, which would run the model (and count routed tokens) on made-up data."""
        hidden = torch.empty(mb, seq, self.dim, dtype=self.activation_dtype, device="meta", requires_grad=True)
        inputs = (torch.empty(mb, seq, dtype=torch.long, device="meta"),) if stage.is_first else (hidden,)
        if not stage.is_last:
            return inputs, (hidden,)
        outputs = tuple(torch.empty(mb, seq - k, self.vocab_size, dtype=self.activation_dtype, device="meta",
                                    requires_grad=True) for k in range(1 + self.mtp_depth))
        return inputs, outputs

    def schedule(self, batch: int, seq: int, train: bool = True):
        """The schedule for batches [batch, seq] (built on first use: stage buffers depend on the shapes); with
        ``train=False`` a forward-only one."""
        key = (batch, seq, train)
        if key not in self._schedules:
            self.plan.check_batch(batch)
            mb = batch // self.plan.microbatches
            stages = []
            for m in self.stage_modules:
                inputs, outputs = self._stage_io(m, mb, seq)
                stage = PipelineStage(m, m.index, self.plan.num_stages, self.device, input_args=inputs,
                                      output_args=outputs, group=self.pp_group)
                skip_handshakes_with_self(stage)
                stages.append(stage)
            if not train:
                self._schedules[key] = ForwardOnlySchedule(stages, self.plan.microbatches, self._loss,
                                                           self.plan.stages_of_rank)
                return self._schedules[key]
            cls = get_schedule_class(self.plan.spec.torch_name)
            stage_arg = stages[0] if issubclass(cls, PipelineScheduleSingle) else stages
            try:
                schedule = cls(stage_arg, n_microbatches=self.plan.microbatches, loss_fn=self._loss,
                               scale_grads=False)
            except ValueError as err:  # torch's own checks of the microbatches / stages
                raise ConfigError(f"strategy.pipeline_schedule={self.plan.schedule}: {err}") from err
            if hasattr(schedule, "register_custom_function") and not self.split_backward:
                register_unsplit_backward(schedule)
            if self.overlap and self._expert_parallel and self.plan.schedule == "dualpipe":
                enable_overlap(schedule)  # EP dispatch/combine of one microbatch hides behind another's compute
            self._schedules[key] = schedule
        return self._schedules[key]

    def _loss(self, output, target: torch.Tensor) -> torch.Tensor:
        logits, *mtp_logits = output if isinstance(output, tuple) else (output,)
        main = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())
        parts, total = [main], main
        if mtp_logits:
            per_depth = mtp_losses(mtp_logits, target)
            total = total + self.mtp_weight * torch.stack(per_depth).mean()
            parts += per_depth
        self._parts.append(torch.stack([p.detach() for p in parts]))
        return total / self.plan.microbatches

    def step(self, tokens: torch.Tensor, targets: torch.Tensor, train: bool = True) -> torch.Tensor:
        """tokens, targets: [B, S] (B divisible by the microbatches) -> [1 + mtp_depth] losses."""
        # torch (2.11) checks each microbatch against the contiguous example its stages were built with, strides
        # included, and a batch sliced as batch[:, :-1] has row stride S + 1
        tokens, targets = tokens.contiguous(), targets.contiguous()
        schedule = self.schedule(*tokens.shape, train=train)
        kwargs = {"labels": targets} if self.mtp_depth else {}
        self._parts.clear()
        if train:
            for moe in self._moe_layers:  # the balance losses of each microbatch count 1 / microbatches, like its loss
                moe.aux_loss_scale = 1.0 / self.plan.microbatches
            schedule.step(tokens, target=targets, return_outputs=False, **kwargs)
            self._tie_embedding_grads()
        else:
            schedule.eval(tokens, target=targets, return_outputs=False, **kwargs)
        if self._parts:
            parts = torch.stack(self._parts).mean(0)
        else:
            parts = torch.zeros(1 + self.mtp_depth, device=self.device)
        self._parts.clear()
        dist.all_reduce(parts, group=self.pp_group)  # only the last stage's rank holds non-zero losses
        return parts

    @torch.no_grad()
    def _tie_embedding_grads(self) -> None:
        if self.tie_group is None:
            return
        for m in self.stage_modules:
            emb = m.tok_embeddings if m.is_first else m.mtp_embeddings if m.is_last else None
            if emb is None:
                continue
            grad = emb.weight.grad
            if grad is None:
                grad = emb.weight.grad = torch.zeros_like(emb.weight)
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            dist.all_reduce(local, group=self.tie_group)
            return
