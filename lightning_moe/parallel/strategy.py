"""``MoEStrategy``: HSDP + expert parallelism for Lightning, with resharding distributed checkpoints.

    Trainer(strategy=MoEStrategy(dp_replicate=2, dp_shard=2, ep=2), devices=4)
    Trainer(strategy="moe", devices=2)                    # registered name: dp_shard = all devices, ep = 1
    lightning-moe-train strategy=moe strategy.ep=2 trainer.devices=2

The LightningModule builds a plain model in ``configure_model``; the strategy then applies ``parallelize`` (EP, AC,
compile, FSDP2) before Lightning materialises meta tensors and creates the optimizer.
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
        pp: pipeline stages (must be 1 until pipeline parallelism lands).
        param_dtype: FSDP2 mixed-precision compute dtype (e.g. "bfloat16"); None keeps the parameters' dtype.
        reduce_dtype: dtype of gradient reductions.
        activation_checkpointing: recompute each block in backward.
        compile: ``torch.compile`` each block.
        meta_init: build the model on the meta device and initialise it after sharding (large models).
        ep_groups: groups of EP ranks for node-limited routing (usually nodes; default: ep, one rank per group).
        max_ep_groups: node-limited routing: each token uses experts of at most this many EP groups (None: off).
        save_distributed_checkpoint: sharded (resharding) checkpoints; False gathers one file on rank 0.
    """

    strategy_name = "moe"

    def __init__(self, dp_replicate: int = 1, dp_shard: int = -1, ep: int = 1, pp: int = 1,
                 param_dtype: str | torch.dtype | None = None, reduce_dtype: str | torch.dtype = "float32",
                 activation_checkpointing: bool = False, compile: bool = False, meta_init: bool = False,
                 ep_groups: int | None = None, max_ep_groups: int | None = None,
                 save_distributed_checkpoint: bool = True, process_group_backend: str | None = None,
                 timeout: timedelta | None = None) -> None:
        kwargs = {} if timeout is None else {"timeout": timeout}
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)
        self.sizes = {"dp_replicate": dp_replicate, "dp_shard": dp_shard, "ep": ep, "pp": pp}
        self.param_dtype = _dtype(param_dtype, "param_dtype")
        self.reduce_dtype = _dtype(reduce_dtype, "reduce_dtype")
        self.activation_checkpointing, self.compile, self.meta_init = activation_checkpointing, compile, meta_init
        self.ep_groups, self.max_ep_groups = ep_groups, max_ep_groups
        self.dims: ParallelDims | None = None
        self.meshes: Meshes | None = None

    # --- environment and mesh ---
    @override
    def setup_environment(self) -> None:
        # Validate before any process group exists: every rank raises the same error, none waits on another.
        world_size = self.num_nodes * self.num_processes
        self.dims = ParallelDims(**self.sizes, world_size=world_size)
        if self.dims.pp > 1:
            raise ConfigError(f"strategy.pp={self.dims.pp}: pipeline parallelism is not available yet; use pp=1")
        super(ModelParallelStrategy, self).setup_environment()  # Strategy/ParallelStrategy: accelerator setup
        self._setup_distributed()
        self.meshes = self.dims.build_meshes(self.root_device.type)
        self._device_mesh = self.meshes.world
        self.lightning_module._device_mesh = self._device_mesh

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
        if not any(p.is_meta for p in model.parameters()):
            model.to(self.root_device)
        parallelize(model, self.dims, self.meshes, param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype,
                    activation_checkpointing=self.activation_checkpointing, compile=self.compile,
                    ep_groups=self.ep_groups, max_ep_groups=self.max_ep_groups)
        if hasattr(module, "expert_load_group"):
            module.expert_load_group = self.meshes.dp.get_group() if self.dims.dp > 1 else None
        super().setup(trainer)

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
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Like Lightning's, plus loading a sharded checkpoint into a model that is not sharded (one process)."""
        from torch.distributed.tensor import DTensor  # noqa: PLC0415

        path = Path(self.broadcast(str(checkpoint_path)))
        if any(isinstance(p, DTensor) for p in self.model.parameters()) or not (path / ".metadata").is_file():
            return super().load_checkpoint(path, weights_only=weights_only)
        import torch.distributed.checkpoint as dcp  # noqa: PLC0415
        from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        model_state = {"state_dict": get_model_state_dict(self.model)}
        dcp.load(model_state, checkpoint_id=path)
        self.model.load_state_dict(model_state["state_dict"], strict=self.lightning_module.strict_loading)
        for idx, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{idx}"
            optim_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optim_state[key])
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
