"""One object that owns every parallel size and builds every device mesh from one world mesh.

Layout of the world mesh (outermost first)::

    ("pp", "dp_replicate", "efsdp", "ep")        dp_shard = efsdp * ep

- dense weights: HSDP on ("dp_replicate", "dp_shard") — replicated across dp_replicate, sharded across dp_shard;
- routed experts: split across "ep" (expert parallel), then HSDP on ("dp_replicate", "efsdp") over the
  data-parallel ranks left over (expert parallelism borrows its ranks from dp_shard, as in torchtitan);
- data: every rank of the flattened "dp" = dp_replicate x dp_shard reads different samples; pipeline stages of one
  data-parallel rank read the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lightning_moe.errors import ConfigError


@dataclass
class ParallelDims:
    dp_replicate: int = 1
    """Data-parallel replicas (HSDP outer dimension)."""
    dp_shard: int = -1
    """Data-parallel shards (FSDP dimension); -1: whatever is left of the world size."""
    ep: int = 1
    """Expert-parallel degree; must divide dp_shard."""
    pp: int = 1
    """Pipeline stages."""
    world_size: int = 1
    """Processes in the job."""

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "ep", "pp", "world_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"strategy.{name}={getattr(self, name)}: must be >= 1")
        if self.dp_shard == -1:
            if self.world_size % (self.dp_replicate * self.pp):
                raise ConfigError(self._sizes("strategy.dp_replicate * strategy.pp must divide the world size"))
            self.dp_shard = self.world_size // (self.dp_replicate * self.pp)
        if self.dp_shard < 1:
            raise ConfigError(f"strategy.dp_shard={self.dp_shard}: must be >= 1 (or -1 for the rest of the world)")
        if self.dp_replicate * self.dp_shard * self.pp != self.world_size:
            raise ConfigError(self._sizes("dp_replicate * dp_shard * pp must equal the world size"))
        if self.dp_shard % self.ep:
            raise ConfigError(self._sizes(f"strategy.ep={self.ep} must divide strategy.dp_shard={self.dp_shard} "
                                          "(expert parallelism borrows data-parallel shard ranks)"))

    def _sizes(self, problem: str) -> str:
        return (f"invalid parallel sizes: {problem}; got dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard}"
                f" x pp={self.pp} (ep={self.ep}) for world size {self.world_size} "
                f"(world size = trainer.devices x trainer.num_nodes)")

    @property
    def efsdp(self) -> int:
        """Data-parallel shard ranks of the experts (dp_shard / ep)."""
        return self.dp_shard // self.ep

    @property
    def dp(self) -> int:
        """All data-parallel ranks: each reads different samples."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp > 1

    def build_meshes(self, device_type: str) -> Meshes:
        """Create the device meshes (and their process groups). Call once per process, on every rank."""
        dense_root = init_device_mesh(device_type, (self.pp, self.dp_replicate, self.dp_shard),
                                      mesh_dim_names=("pp", "dp_replicate", "dp_shard"))
        expert_root = init_device_mesh(device_type, (self.pp, self.dp_replicate, self.efsdp, self.ep),
                                       mesh_dim_names=("pp", "dp_replicate", "efsdp", "ep"))
        dense = dense_root["dp_replicate", "dp_shard"] if self.dp_replicate > 1 else dense_root["dp_shard"]
        expert_dp = expert_root["dp_replicate", "efsdp"] if self.dp_replicate > 1 else expert_root["efsdp"]
        dp = dense_root["dp_replicate", "dp_shard"]._flatten("dp")
        return Meshes(world=dense_root, dense=dense, expert_dp=expert_dp, ep=expert_root["ep"], dp=dp,
                      pp=dense_root["pp"])


@dataclass
class Meshes:
    """The named device meshes of one process (see the module docstring for the layout)."""

    world: DeviceMesh
    """(pp, dp_replicate, dp_shard): the strategy's ``device_mesh``."""
    dense: DeviceMesh
    """FSDP/HSDP mesh of the dense weights: (dp_replicate, dp_shard), or (dp_shard) without replicas."""
    expert_dp: DeviceMesh
    """FSDP/HSDP mesh of the routed experts: (dp_replicate, efsdp), or (efsdp)."""
    ep: DeviceMesh
    """Expert-parallel mesh (1-D)."""
    dp: DeviceMesh
    """All data-parallel ranks, flattened (1-D): data sharding and expert-load reductions."""
    pp: DeviceMesh
    """Pipeline mesh (1-D)."""
