"""Launch helpers for multi-process tests: gloo on CPU, one process per rank via ``torch.multiprocessing``.

``run_workers(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes with a
gloo default process group initialised. ``fn`` must be a module-level function (it is pickled by name).

The rendezvous store is a TCPStore served by the parent on a port the OS picks (port 0), so concurrent tests never
race for a port. Collectives time out after ``timeout_s`` so a rank stuck in a collective (the typical EP bug)
fails the test instead of hanging it; a failure on any rank fails the test with that rank's traceback.

Start method: ``forkserver`` with ``torch`` and ``lightning_moe`` preloaded. A plain ``mp.spawn`` re-imports them in
every rank (``import lightning_moe`` pulls in Lightning: about 3.5 s per process, 8 s for 4 ranks on 2 cores); the
fork server imports them once per test session and forks each rank from that clean, single-threaded process (it has
never run a parallel op or created a process group, so forking it is safe). Set ``LIGHTNING_MOE_TEST_START=spawn``
to fall back to ``mp.spawn``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HOST = "127.0.0.1"
PRELOAD = ["torch", "torch.distributed", "lightning_moe", "lightning_moe.parallel.expert_parallel"]
START_METHOD = os.environ.get("LIGHTNING_MOE_TEST_START", "forkserver")


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, timeout_s: float, args: tuple) -> None:
    torch.set_num_threads(1)  # the ranks share a few cores
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(HOST, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # fail here, not in a later test, if ranks left unmatched collectives behind
    finally:
        dist.destroy_process_group()


def run_workers(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 60.0) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; raises if any rank fails."""
    store = dist.TCPStore(HOST, 0, None, is_master=True, timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    try:
        if START_METHOD == "forkserver":
            mp.set_forkserver_preload(PRELOAD)  # takes effect when the server starts (first call of the session)
        mp.start_processes(_entry, args=(fn, world_size, store.port, timeout_s, args), nprocs=world_size, join=True,
                           start_method=START_METHOD)
    finally:
        del store
