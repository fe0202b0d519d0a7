"""Shared plumbing of the multi-process benchmarks: start ranks (torchrun or self-spawned), pick the device, and
write a result table into a docs page between markers."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def write_results(path: Path, text: str, title: str) -> None:
    """Replace the text between the result markers of ``path`` (a new page titled ``title``, or a section
    appended, when it has none)."""
    doc = path.read_text() if path.exists() else f"# {title}\n"
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc and END in doc:
        doc = doc[:doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip("\n") + f"\n\n## Results\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc)


def publish(text: str, out: str | None, title: str) -> None:
    """Print a result table and, when ``out`` is given, write it into that docs page (``write_results``)."""
    print(text, flush=True)
    if out:
        write_results(Path(out), text, title)


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """NCCL on "cuda" (one GPU per LOCAL_RANK), gloo on "cpu" (threads split among the ranks) -> (rank, world,
    device)."""
    use_cuda = device_name == "cuda"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    return rank, world, device


def _spawned(local_rank: int, world: int, port: int, worker: Callable, args) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    worker(args)


def launch(worker: Callable, args, nproc: int) -> None:
    """Run ``worker(args)`` here when started by torchrun, else on ``nproc`` spawned local ranks."""
    if "RANK" in os.environ:
        worker(args)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_spawned, args=(nproc, port, worker, args), nprocs=nproc, start_method="spawn")
