"""``MoEStrategy``: HSDP + expert parallelism + pipeline parallelism for Lightning, with resharding checkpoints.

    Trainer(strategy=MoEStrategy(dp_replicate=2, dp_shard=2, ep=2), devices=4)
    Trainer(strategy=MoEStrategy(pp=2, ep=2, pipeline_schedule="dualpipe"), devices=4)
    Trainer(strategy="moe", devices=2)                    # registered name: dp_shard = all devices, ep = 1
    lightning-moe-train strategy=moe strategy.ep=2 trainer.devices=2

The LightningModule builds a plain model in ``configure_model``; the strategy then cuts it into this rank's pipeline
stages (pp > 1), applies ``parallelize`` (EP, AC, compile, FSDP2), initialises a meta-device model (``meta_init``:
every module's own ``reset_parameters``, see ``lightning_moe.parallel.meta_init``) before Lightning creates the
optimizer, and hands the module a ``PipelineRunner`` whose schedule runs forward and backward together.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Generator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from typing_extensions import override

from lightning_moe.errors import ConfigError
from lightning_moe.parallel.dims import Meshes, ParallelDims
from lightning_moe.parallel.meta_init import has_meta_tensors, materialize_meta_module
from lightning_moe.pipeline.runner import PipelineRunner
from lightning_moe.pipeline.split import PipelinePlan
from lightning_moe.pipeline.stage import StageModule, keep_stages

if TYPE_CHECKING:
    import lightning.pytorch as pl

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}


def _dtype(name: str | torch.dtype | None, key: str) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ConfigError(f"strategy.{key}={name!r}: must be one of {', '.join(_DTYPES)} or null")
    return _DTYPES[name]


class MoEStrategy(ModelParallelStrategy):
    """Data-parallel replicate x shard (HSDP) for dense weights, expert parallelism for routed experts.

    Args:
        dp_replicate: data-parallel replicas (HSDP outer dimension).
        dp_shard: data-parallel shards (FSDP); -1 uses the rest of the world size.
        ep: expert-parallel degree (borrows ranks from dp_shard; must divide it and ``model.num_experts``).
        pp: pipeline-parallel ranks; the model is cut into ``pp x stages per rank`` stages of consecutive layers.
        param_dtype: FSDP2 mixed-precision compute dtype (e.g. "bfloat16"); None keeps the parameters' dtype.
        reduce_dtype: dtype of gradient reductions.
        activation_checkpointing: recompute each block in backward.
        compile: ``torch.compile`` each block.
        meta_init: build the model on the meta device and initialise it after sharding (large models); the weights
            start from the model's own init distributions, as when it is built eagerly (not the same numbers).
        ep_groups: groups of EP ranks for node-limited routing (usually nodes; default: ep, one rank per group).
        max_ep_groups: node-limited routing: each token uses experts of at most this many EP groups (None: off).
        save_distributed_checkpoint: sharded (resharding) checkpoints; False gathers one file on rank 0.
        pipeline_schedule: "dualpipe" (DualPipeV), "zbv" (zero-bubble V), "1f1b", "interleaved_1f1b" or "gpipe".
        pipeline_microbatches: microbatches per batch (None: twice the number of stages).
        pipeline_stages_per_rank: stages per rank of "interleaved_1f1b" (V schedules have 2, the others 1).
        pipeline_layers: manual cut, layers of every stage in order (None: as even as possible).
        pipeline_overlap: DualPipeV with ep > 1: overlap the paired forward and backward chunks so that the expert
            all-to-alls of one run beside the computation of the other (``lightning_moe.pipeline.overlap``).
    """

    strategy_name = "moe"

    def __init__(self, dp_replicate: int = 1, dp_shard: int = -1, ep: int = 1, pp: int = 1,
                 param_dtype: str | torch.dtype | None = None, reduce_dtype: str | torch.dtype = "float32",
                 activation_checkpointing: bool = False, compile: bool = False, meta_init: bool = False,
                 ep_groups: int | None = None, max_ep_groups: int | None = None,
                 save_distributed_checkpoint: bool = True, pipeline_schedule: str = "dualpipe",
                 pipeline_microbatches: int | None = None, pipeline_stages_per_rank: int = 2,
                 pipeline_layers: list[int] | None = None, pipeline_overlap: bool = True,
                 process_group_backend: str | None = None,
                 timeout: timedelta | None = None) -> None:
        kwargs = {} if timeout is None else {"timeout": timeout}
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)
        self.sizes = {"dp_replicate": dp_replicate, "dp_shard": dp_shard, "ep": ep, "pp": pp}
        self.param_dtype = _dtype(param_dtype, "param_dtype")
        self.reduce_dtype = _dtype(reduce_dtype, "reduce_dtype")
        self.activation_checkpointing, self.compile, self.meta_init = activation_checkpointing, compile, meta_init
        self.ep_groups, self.max_ep_groups = ep_groups, max_ep_groups
        self.pipeline_schedule, self.pipeline_microbatches = pipeline_schedule, pipeline_microbatches
        self.pipeline_stages_per_rank = pipeline_stages_per_rank
        self.pipeline_layers = tuple(pipeline_layers) if pipeline_layers is not None else None
        self.pipeline_overlap = pipeline_overlap
        self.num_redundant_experts = 0
        """Redundant expert slots per MoE layer (EPLB), set by ``ExpertRebalancer`` in its ``setup`` hook, which runs
        before the model is built and sharded; ``parallelize`` creates them with the expert parallelism."""
        self.dims: ParallelDims | None = None
        self.meshes: Meshes | None = None
        self.plan: PipelinePlan | None = None
        self.pipeline: PipelineRunner | None = None

    # --- environment and mesh ---
    @override
    def setup_environment(self) -> None:
        # Validate before any process group exists: every rank raises the same error, none waits on another.
        world_size = self.num_nodes * self.num_processes
        self.dims = ParallelDims(**self.sizes, world_size=world_size)
        if self.dims.pp > 1:
            self.plan = self._pipeline_plan()
        super(ModelParallelStrategy, self).setup_environment()  # Strategy/ParallelStrategy: accelerator setup
        self._setup_distributed()
        self.meshes = self.dims.build_meshes(self.root_device.type)
        self._device_mesh = self.meshes.world
        self.lightning_module._device_mesh = self._device_mesh

    def _pipeline_plan(self) -> PipelinePlan:
        cfg = getattr(self.lightning_module, "model_cfg", None)
        if cfg is None:
            raise TypeError("pipeline parallelism (strategy.pp > 1) needs a lightning_moe.MoELanguageModel")
        if cfg.tie_embeddings:
            raise ConfigError("model.tie_embeddings=true is not supported with strategy.pp > 1 (the embedding and "
                              "the head are on different stages)")
        trainer = self.lightning_module._trainer
        if trainer is not None and trainer.accumulate_grad_batches != 1:
            raise ConfigError(f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}: with "
                              "strategy.pp > 1 use strategy.pipeline_microbatches instead (the schedule accumulates)")
        return PipelinePlan(self.pipeline_schedule, self.dims.pp, cfg.n_layers, self.pipeline_microbatches,
                            stages_per_rank=self.pipeline_stages_per_rank, layers_per_stage=self.pipeline_layers)

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        dp = self.meshes.dp
        return {"num_replicas": dp.size(), "rank": dp.get_local_rank()}

    @contextmanager
    @override
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        with super().tensor_init_context(empty_init=self.meta_init or bool(empty_init)):
            yield

    # --- model ---
    @override
    def setup(self, trainer: pl.Trainer) -> None:
        from lightning_moe.parallel.parallelize import parallelize  # noqa: PLC0415

        module = self.lightning_module
        model = getattr(module, "model", None)
        if not isinstance(model, torch.nn.Module):
            raise TypeError("MoEStrategy needs a LightningModule whose `configure_model` sets `self.model` to a "
                            "plain MoETransformer (see lightning_moe.MoELanguageModel)")
        stages = None
        if self.plan is not None:
            local = self.plan.stages_of_rank(self.meshes.pp.get_local_rank())
            ranges = self.plan.layer_ranges
            keep_stages(model, local, ranges)
            stages = [StageModule(model, s, self.plan.num_stages, ranges[s]) for s in local]
        if not any(p.is_meta for p in model.parameters()):
            model.to(self.root_device)
        parallelize(model, self.dims, self.meshes, param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype,
                    activation_checkpointing=self.activation_checkpointing, compile=self.compile,
                    ep_groups=self.ep_groups, max_ep_groups=self.max_ep_groups, stages=stages,
                    num_redundant_experts=self.num_redundant_experts)
        if hasattr(module, "expert_load_group"):
            # The data-parallel ranks of this pipeline position (they hold the same layers); None: the whole world.
            module.expert_load_group = self.meshes.dp.get_group() if self.dims.dp > 1 or self.dims.pp > 1 else None
        if has_meta_tensors(self.model):
            # Lightning's own materialisation would reset only the modules that own tensors (default nn.Linear init,
            # not the model's); this runs every module's reset_parameters, children first. Lightning then finds no
            # meta tensor left. The seed is the same on every rank (rank 0's).
            seed = self.broadcast(int(torch.randint(2 ** 62, (), device="cpu")))
            materialize_meta_module(self.model, self.root_device, seed)
        super().setup(trainer)
        if stages is not None:
            self.pipeline = PipelineRunner(self.plan, stages, self.meshes.pp.get_group(), self.root_device, model.cfg,
                                           tie_group=self._tie_group(model),
                                           activation_dtype=self.param_dtype or next(model.parameters()).dtype,
                                           overlap=self.pipeline_overlap)
            module.pipeline = self.pipeline
            module.grad_norm_groups = [self.meshes.pp.get_group()]

    def _tie_group(self, model: torch.nn.Module) -> Any:
        """Loop schedules with MTP: the group of pipeline ranks 0 and pp - 1 (first and last stage), which hold copies
        of the embedding. Every rank creates every such group (one per data-parallel position), in the same order."""
        if model.cfg.mtp_depth == 0 or self.plan.spec.style == "v":
            return None
        if self.dims.pp == 2:
            return self.meshes.pp.get_group()
        ranks = self.meshes.world.mesh.reshape(self.dims.pp, -1)  # [pp, dp positions] global ranks
        mine = None
        for col in range(ranks.shape[1]):
            pair = [int(ranks[0, col]), int(ranks[-1, col])]
            group = torch.distributed.new_group(pair)
            if self.global_rank in pair:
                mine = group
        return mine

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Under pipeline parallelism the schedule already ran backward inside ``training_step``."""
        if self.pipeline is not None:
            return closure_loss
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    # --- checkpoints ---
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Distributed checkpoints are written to a temporary folder and renamed into place when complete, so an
        interrupted save never leaves a torn checkpoint behind (old metadata beside new shards)."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(f".{path.name}.tmp-{self.broadcast(uuid.uuid4().hex[:8])}")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("checkpoint_written")
        if self.global_rank == 0:
            old = path.with_name(f".{path.name}.old")
            if path.exists():
                path.rename(old)
            tmp.rename(path)
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
        self.barrier("checkpoint_renamed")

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """Flattened optimizer state (``state.<param>.*`` and ``param_groups.<param>.*`` keys): every entry belongs to
        one parameter, so pipeline stages with different parameters save together and load into any layout."""
        if not self._save_distributed_checkpoint:
            return super().optimizer_state(optimizer)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict  # noqa: PLC0415

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer
        options = StateDictOptions(cpu_offload=True, flatten_optimizer_state_dict=True)
        return get_optimizer_state_dict(self.model, optimizer, options=options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Loads what ``save_checkpoint`` wrote into any layout (one process, other ep / dp / pp sizes)."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if not (path / ".metadata").is_file():
            return super().load_checkpoint(path, weights_only=weights_only)
        import torch.distributed.checkpoint as dcp  # noqa: PLC0415
        from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        model_state = {"state_dict": get_model_state_dict(self.model)}
        dcp.load(model_state, checkpoint_id=path)
        self.model.load_state_dict(model_state["state_dict"], strict=self.lightning_module.strict_loading)
        options = StateDictOptions(flatten_optimizer_state_dict=True)
        for idx, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{idx}"
            optim_state = {key: get_optimizer_state_dict(self.model, optimizer, options=options)}
            dcp.load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optim_state[key], options=options)
        return torch.load(path / "meta.pt", weights_only=weights_only)

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        if self.global_rank == 0:
            path = Path(filepath)
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="HSDP + expert parallelism for MoE models")


if MoEStrategy.strategy_name not in StrategyRegistry:
    MoEStrategy.register_strategies(StrategyRegistry)
