"""Lightning callbacks: throughput/MFU, expert-load monitoring, expert rebalancing."""

from lightning_moe.callbacks.throughput import ThroughputMonitor

__all__ = ["ThroughputMonitor"]
