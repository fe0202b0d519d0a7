"""Initialise a model that was built on the meta device and sharded (``MoEStrategy(meta_init=True)``).

Lightning's materialisation (``_materialize_distributed_module``) calls ``reset_parameters`` only on the modules that
own parameters or buffers themselves: every ``nn.Linear`` gets PyTorch's default init (kaiming-uniform), and the
model's own init, which lives in parent modules (``FeedForward``, ``Attention``, ``TopKRouter``,
``MoETransformer``, ...), never runs. ``materialize_meta_module`` allocates the tensors and calls every module's
``reset_parameters`` exactly once, children before parents (post-order), so a parent's init of its children wins, as
when the model is built eagerly.

Random numbers: each module's init draws from the default generators seeded with ``(seed, module name)``, with a
``seed`` that every rank shares. What a module draws therefore depends neither on the modules a rank holds
(pipeline stages) nor on its shard sizes: a module's replicated weights get the same numbers on every rank. Sharded
weights (DTensors: FSDP2, expert parallelism) draw through DTensor's RNG tracker, which gives each shard its own part
of the stream and the replicas of a shard the same part: torch's ``OffsetBasedRNGTracker`` on CUDA-like devices (each
shard at the offset of its position in the whole tensor), ``_ShardSeededTracker`` below on CPU (torch has none there;
without it every shard would be a copy of the same numbers: the same experts on every EP rank). The caller's RNG
state is restored afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from collections.abc import Generator, Iterator

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor import _random as dtensor_random

__all__ = ["has_meta_tensors", "materialize_meta_module"]


def has_meta_tensors(module: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def _mix(*parts: object) -> int:
    """A seed from ``parts``, the same in every process (unlike ``hash`` of a string)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


def _post_order(module: nn.Module, name: str = "", seen: set[nn.Module] | None = None,
                covered: bool = False) -> Iterator[tuple[str, nn.Module, bool]]:
    """``(name, module, initialised)`` of every module once, children before their parent; ``initialised``: the
    module or one of its ancestors has a ``reset_parameters``."""
    seen = set() if seen is None else seen
    if module in seen:
        return
    seen.add(module)
    covered = covered or callable(getattr(module, "reset_parameters", None))
    for child_name, child in module.named_children():
        yield from _post_order(child, f"{name}.{child_name}" if name else child_name, seen, covered)
    yield name, module, covered


class _ShardSeededTracker(dtensor_random._RNGStateTracker):
    """DTensor random ops on CPU: the local shard draws from a seed made of a number drawn from the default
    generator (the same on every rank) and the shard's coordinates (its rank's mesh coordinates, but 0 along the
    mesh dimensions the tensor is replicated over), so different shards get different numbers, replicas the same."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))

    @contextlib.contextmanager
    def _distribute_region(self, spec, generator: torch.Generator | None = None) -> Generator[None, None, None]:
        op_seed = int(torch.randint(2 ** 62, (), generator=generator, device="cpu"))
        shard = [0 if isinstance(p, Replicate) else c for p, c in zip(spec.placements, spec.mesh.get_coordinate())]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(_mix(op_seed, *shard))
            yield


@contextlib.contextmanager
def _init_rng(module: nn.Module, device: torch.device) -> Generator[None, None, None]:
    """Fork the default generators (CPU and ``device``); install a DTensor RNG tracker for the sharded weights if
    torch has none yet (no state broadcast: every rank seeds each module alike), and remove it afterwards."""
    mesh = next((p.device_mesh for p in module.parameters() if isinstance(p, DTensor)), None)
    previous = dtensor_random._rng_tracker
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
        if mesh is not None and previous is None:
            dtensor_random._rng_tracker = (
                _ShardSeededTracker() if mesh.device_type == "cpu"
                else dtensor_random.OffsetBasedRNGTracker(mesh, run_state_sync=False)
            )
        try:
            yield
        finally:
            dtensor_random._rng_tracker = previous


def _seed(seed: int, device: torch.device) -> None:
    torch.default_generator.manual_seed(seed)
    if device.type != "cpu":
        torch.get_device_module(device.type).manual_seed(seed)  # the current device (the strategy's)


@torch.no_grad()
def materialize_meta_module(module: nn.Module, device: torch.device, seed: int) -> bool:
    """Allocate every tensor of ``module`` on ``device`` (``to_empty``) and initialise it: each module's
    ``reset_parameters`` once, children before parents, module ``name`` drawing from ``(seed, name)``.

    ``seed`` must be the same on every rank. Every rank must call this at the same point: some ``reset_parameters``
    are collectives (``ExpertParallel`` copies replica slots). Returns False (and does nothing) without meta tensors.
    """
    if not has_meta_tensors(module):
        return False
    device = torch.device(device)
    module.to_empty(device=device)
    uninitialised = set()
    with _init_rng(module, device):
        for name, sub, covered in _post_order(module):
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                _seed(_mix(seed, name), device)
                reset()
            elif not covered and any(True for _ in itertools.chain(sub.parameters(recurse=False),
                                                                    sub.buffers(recurse=False))):
                uninitialised.add(type(sub).__name__)
    if uninitialised:
        rank_zero_warn("Parameter initialization incomplete: these modules have parameters or buffers with "
                       "uninitialized memory because neither they nor a parent module define `reset_parameters()`: "
                       f"{', '.join(sorted(uninitialised))}")
    return True
