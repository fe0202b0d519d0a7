"""Structured-config schemas: the dataclasses behind the config groups, registered in Hydra's ConfigStore.

A group option starts with ``defaults: [base, _self_]`` so that a wrong key or type fails at composition time,
naming the key (``model.dimm=3`` -> "Key 'dimm' not in 'ModelConfig'").
"""

from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore

from lightning_moe.models.config import ModelConfig
from lightning_moe.optim import OptimizerConfig


@dataclass
class MoEStrategyConfig:
    """``conf/strategy/moe.yaml`` <-> ``lightning_moe.MoEStrategy`` (see its docstring for each field)."""

    _target_: str = "lightning_moe.MoEStrategy"
    dp_replicate: int = 1
    dp_shard: int = -1
    ep: int = 1
    pp: int = 1
    param_dtype: Optional[str] = None
    reduce_dtype: str = "float32"
    activation_checkpointing: bool = False
    compile: bool = False
    meta_init: bool = False
    ep_groups: Optional[int] = None
    max_ep_groups: Optional[int] = None
    save_distributed_checkpoint: bool = True
    pipeline_schedule: str = "dualpipe"
    pipeline_microbatches: Optional[int] = None
    pipeline_stages_per_rank: int = 2
    pipeline_layers: Optional[list[int]] = None
    pipeline_overlap: bool = True


cs = ConfigStore.instance()
cs.store(group="model", name="base", node=ModelConfig)
cs.store(group="optimizer", name="base", node=OptimizerConfig)
cs.store(group="strategy", name="base", node=MoEStrategyConfig)
