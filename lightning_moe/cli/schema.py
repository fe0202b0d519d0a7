"""Structured-config schemas: the dataclasses behind the config groups, registered in Hydra's ConfigStore.

A group option starts with ``defaults: [base, _self_]`` so that a wrong key or type fails at composition time,
naming the key (``model.dimm=3`` -> "Key 'dimm' not in 'ModelConfig'").
"""

from hydra.core.config_store import ConfigStore

from lightning_moe.models.config import ModelConfig
from lightning_moe.optim import OptimizerConfig

cs = ConfigStore.instance()
cs.store(group="model", name="base", node=ModelConfig)
cs.store(group="optimizer", name="base", node=OptimizerConfig)
