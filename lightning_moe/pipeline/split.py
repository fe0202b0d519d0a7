"""Where a model is cut into pipeline stages, and which stages each pipeline rank runs.

Stages are contiguous layer ranges, numbered in model order. Each pipeline rank runs ``stages_per_rank`` of them:
"loop" placement puts stage s on rank s % pp (1F1B, interleaved 1F1B); "v" placement folds the stages into a V, so
that rank r runs stages r and 2 pp - 1 - r (DualPipeV, zero-bubble V): the first and the last stage share rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_moe.errors import ConfigError

__all__ = ["SCHEDULES", "PipelinePlan", "ScheduleSpec", "split_layers"]


@dataclass(frozen=True)
class ScheduleSpec:
    """A schedule name of ``strategy.pipeline_schedule`` and what it needs."""

    torch_name: str  # ``torch.distributed.pipelining.schedules.get_schedule_class`` name
    style: str  # stage placement: "loop" or "v"
    stages_per_rank: int | None  # None: configurable (``strategy.pipeline_stages_per_rank``)
    min_microbatches: str  # "pp" or "stages": microbatches must be >= this many


SCHEDULES: dict[str, ScheduleSpec] = {
    "dualpipe": ScheduleSpec("DualPipeV", "v", 2, "stages"),
    "zbv": ScheduleSpec("ZBVZeroBubble", "v", 2, "stages"),
    "1f1b": ScheduleSpec("1F1B", "loop", 1, "pp"),
    "interleaved_1f1b": ScheduleSpec("Interleaved1F1B", "loop", None, "pp"),
    "gpipe": ScheduleSpec("GPipe", "loop", 1, "pp"),
}


def split_layers(n_layers: int, num_stages: int, layers_per_stage: list[int] | None = None) -> list[range]:
    """Contiguous layer ranges, one per stage.

    Automatic: as even as possible; the stages with the embedding (first) and with the head, loss and MTP (last)
    get the smaller shares when the layers do not divide evenly. Manual: ``layers_per_stage`` gives every stage's
    count (each >= 1, summing to ``n_layers``).
    """
    if n_layers < num_stages:
        raise ConfigError(f"model.n_layers={n_layers} is fewer than the {num_stages} pipeline stages: every stage "
                          "needs at least one layer (lower strategy.pp or the stages per rank)")
    if layers_per_stage is not None:
        counts = list(layers_per_stage)
        if len(counts) != num_stages or sum(counts) != n_layers or min(counts) < 1:
            raise ConfigError(f"strategy.pipeline_layers={counts}: needs {num_stages} entries (one per stage), "
                              f"each >= 1, summing to model.n_layers={n_layers}")
    else:
        base, extra = divmod(n_layers, num_stages)
        counts = [base] * num_stages
        # The remainder goes to the middle stages first (outermost stages carry embedding / head + loss).
        middle_first = sorted(range(num_stages), key=lambda s: (s in (0, num_stages - 1), abs(2 * s - num_stages + 1)))
        for s in middle_first[:extra]:
            counts[s] += 1
    ranges, start = [], 0
    for count in counts:
        ranges.append(range(start, start + count))
        start += count
    return ranges


@dataclass(frozen=True)
class PipelinePlan:
    """The stages of a ``pp``-rank pipeline and their layers."""

    schedule: str
    pp: int
    n_layers: int
    microbatches: int | None = None  # None: twice the number of stages
    stages_per_rank: int = 2
    layers_per_stage: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"strategy.pipeline_schedule={self.schedule!r}: must be one of {', '.join(SCHEDULES)}")
        if self.microbatches is None:
            object.__setattr__(self, "microbatches", 2 * self.num_stages)
        if self.spec.stages_per_rank is None and self.stages_per_rank < 2:
            raise ConfigError(f"strategy.pipeline_stages_per_rank={self.stages_per_rank}: interleaved schedules need "
                              ">= 2 stages per rank")
        need = self.num_stages if self.spec.min_microbatches == "stages" else self.pp
        if self.microbatches < need:
            raise ConfigError(f"strategy.pipeline_microbatches={self.microbatches}: the {self.schedule} schedule with "
                              f"{self.num_stages} stages on {self.pp} ranks needs at least {need} microbatches")
        if self.schedule == "interleaved_1f1b" and self.microbatches % self.pp:
            raise ConfigError(f"strategy.pipeline_microbatches={self.microbatches}: interleaved 1F1B needs a "
                              f"multiple of strategy.pp={self.pp}")
        split_layers(self.n_layers, self.num_stages, self.layers_per_stage)  # validates

    @property
    def spec(self) -> ScheduleSpec:
        return SCHEDULES[self.schedule]

    @property
    def num_stages(self) -> int:
        per_rank = self.spec.stages_per_rank or self.stages_per_rank
        return self.pp * per_rank

    @property
    def layer_ranges(self) -> list[range]:
        return split_layers(self.n_layers, self.num_stages,
                            list(self.layers_per_stage) if self.layers_per_stage else None)

    def stages_of_rank(self, rank: int) -> list[int]:
        """Stage indices run by pipeline rank ``rank``, in increasing order."""
        if self.spec.style == "v":
            return [s for s in range(self.num_stages) if self._v_rank(s) == rank]
        return [s for s in range(self.num_stages) if s % self.pp == rank]

    def _v_rank(self, stage: int) -> int:
        fold, pos = divmod(stage, self.pp)
        return pos if fold % 2 == 0 else self.pp - 1 - pos

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.microbatches:
            raise ConfigError(f"data.batch_size={batch_size} (per data-parallel rank) must be divisible by "
                              f"strategy.pipeline_microbatches={self.microbatches}")
