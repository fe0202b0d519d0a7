"""Lightning callbacks: throughput/MFU, expert-load monitoring, checkpoints as W&B artifacts."""

from lightning_moe.callbacks.artifacts import WandbCheckpointArtifacts
from lightning_moe.callbacks.expert_load import ExpertLoadMonitor
from lightning_moe.callbacks.throughput import ThroughputMonitor

__all__ = ["ExpertLoadMonitor", "ThroughputMonitor", "WandbCheckpointArtifacts"]
