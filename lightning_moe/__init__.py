"""lightning_moe: train Mixture-of-Experts LLMs with PyTorch Lightning.

Importing this package pulls in neither Hydra, W&B nor MegaBlocks; those load only when used.
"""

from lightning_moe.callbacks import ThroughputMonitor
from lightning_moe.data import TokenDataModule
from lightning_moe.errors import ConfigError
from lightning_moe.models.config import ModelConfig
from lightning_moe.models.transformer import MoETransformer
from lightning_moe.module import MoELanguageModel
from lightning_moe.optim import OptimizerConfig
from lightning_moe.parallel.dims import ParallelDims
from lightning_moe.parallel.strategy import MoEStrategy  # registers Trainer(strategy="moe")

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "ModelConfig",
    "MoELanguageModel",
    "MoEStrategy",
    "MoETransformer",
    "ParallelDims",
    "OptimizerConfig",
    "ThroughputMonitor",
    "TokenDataModule",
]
