"""Lightning callbacks: throughput/MFU, expert-load monitoring, redundant-expert balancing (EPLB), checkpoints as W&B
artifacts."""

from lightning_moe.callbacks.artifacts import WandbCheckpointArtifacts
from lightning_moe.callbacks.eplb import ExpertRebalancer
from lightning_moe.callbacks.expert_load import ExpertLoadMonitor
from lightning_moe.callbacks.throughput import ThroughputMonitor

__all__ = ["ExpertLoadMonitor", "ExpertRebalancer", "ThroughputMonitor", "WandbCheckpointArtifacts"]
