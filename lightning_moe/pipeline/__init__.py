"""Pipeline parallelism: cutting the model into stages, and running ``torch.distributed.pipelining`` schedules."""

from lightning_moe.pipeline.runner import PipelineRunner
from lightning_moe.pipeline.split import SCHEDULES, PipelinePlan, split_layers
from lightning_moe.pipeline.stage import StageModule, keep_stages

__all__ = ["SCHEDULES", "PipelinePlan", "PipelineRunner", "StageModule", "keep_stages", "split_layers"]
