"""Forward/backward overlap of the MoE all-to-alls (DualPipe, issue 5): how much communication one F+B pair hides.

    torchrun --standalone --nproc-per-node=2 benchmarks/pipeline_overlap.py               # 2 GPUs, NCCL, bf16
    torchrun --standalone --nproc-per-node=2 benchmarks/pipeline_overlap.py --device cpu  # CPU smoke run (gloo)
    python benchmarks/pipeline_overlap.py --device cpu                                    # same, spawns 2 ranks

One pipeline chunk (``--layers`` MoE transformer blocks, experts split over ep = all ranks) and, per F+B pair as in
an ``OVERLAP_F_B`` action of DualPipeV: the forward of microbatch A and the backward of microbatch B (whose forward
ran untimed before). Timed per pair, median over ``--reps``, slowest rank:

- ``fwd``, ``bwd``: each alone (synchronised in between);
- ``seq``: forward then backward, back to back (what torch's runtime does without a custom function);
- ``ovl``: the two as overlapped lanes (``lightning_moe.pipeline.overlap.run_overlapped``);
- ``comm``: the pair's all-to-alls alone, replayed in the same order with the same split sizes and no compute;
- hidden = (seq - ovl) / comm: the fraction of the communication time the overlap removed from the pair.

On GPU the table is written between the result markers of ``--out`` (default ``docs/pipeline_overlap.md``); on CPU
only with an explicit ``--out`` (CPU timings say nothing about GPUs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _launch import init_distributed, launch, publish  # noqa: E402 - benchmarks/ is on sys.path

from lightning_moe.models.attention import RotaryEmbedding  # noqa: E402
from lightning_moe.models.config import ModelConfig  # noqa: E402
from lightning_moe.models.transformer import TransformerBlock  # noqa: E402
from lightning_moe.parallel.expert_parallel import apply_expert_parallel  # noqa: E402
from lightning_moe.parallel.parallelize import apply_activation_checkpointing  # noqa: E402
from lightning_moe.pipeline.overlap import run_overlapped  # noqa: E402


def model_config(tiny: bool, seq: int) -> ModelConfig:
    if tiny:
        return ModelConfig(dim=64, n_heads=4, num_experts=8, top_k=2, moe_ffn_dim=32, num_shared_experts=1,
                           max_seq_len=seq, score_func="sigmoid")
    # DeepSeek-V2-Lite-like MoE blocks: hidden 2048, 64 fine-grained experts top-6 (FFN 1408), 2 shared experts
    return ModelConfig(dim=2048, n_heads=16, num_experts=64, top_k=6, moe_ffn_dim=1408, num_shared_experts=2,
                       max_seq_len=seq, score_func="sigmoid")


class Chunk(nn.Module):
    """One pipeline chunk: ``n_layers`` MoE transformer blocks, hidden states [B, S, D] in and out."""

    def __init__(self, cfg: ModelConfig, n_layers: int) -> None:
        super().__init__()
        self.rope = RotaryEmbedding(cfg.rotary_dim, cfg.max_seq_len, cfg.rope_theta)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i, moe=True) for i in range(n_layers)})

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        rope = self.rope(h.shape[1])
        for block in self.layers.values():
            h = block(h, rope)
        return h


class _RecordAllToAll:
    """Records the shapes and split sizes of every ``all_to_all_single`` while active (for the comm-only replay)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __enter__(self) -> _RecordAllToAll:
        self._original = dist.all_to_all_single

        def recording(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            self.calls.append((tuple(output.shape), tuple(input.shape), output.dtype,
                               None if output_split_sizes is None else list(output_split_sizes),
                               None if input_split_sizes is None else list(input_split_sizes)))
            return self._original(output, input, output_split_sizes, input_split_sizes, group=group,
                                  async_op=async_op)

        dist.all_to_all_single = recording
        return self

    def __exit__(self, *exc) -> None:
        dist.all_to_all_single = self._original


def _timed(fn: Callable[[], None], sync: Callable[[], None]) -> float:
    sync()
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def measure(cfg: ModelConfig, args, device: torch.device, dtype: torch.dtype, tokens: int,
            checkpointing: bool, ep_mesh) -> dict:
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same weights on every rank
    with torch.device(device):
        model = Chunk(cfg, args.layers).to(dtype)
    apply_expert_parallel(model, ep_mesh)
    if checkpointing:
        apply_activation_checkpointing(model)
    batch = max(1, tokens // args.seq)
    g = torch.Generator(device="cpu").manual_seed(1 + rank)

    def activation() -> torch.Tensor:  # a stage input: an activation that requires grad
        return torch.randn(batch, args.seq, cfg.dim, generator=g).to(device, dtype).requires_grad_()

    x_a, x_b, grad_b = activation(), activation(), activation().detach()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pending: dict = {}

    def forward_b() -> None:  # untimed: the microbatch whose backward the pair runs
        pending["y_b"] = model(x_b)

    def fwd() -> None:
        pending["y_a"] = model(x_a)

    def bwd() -> None:
        pending.pop("y_b").backward(grad_b)

    def seq() -> None:
        fwd()
        bwd()

    def ovl() -> None:
        run_overlapped(fwd, bwd)

    def pair(kind: str) -> float:
        forward_b()
        sync()
        if kind == "split":
            t = _timed(fwd, sync), _timed(bwd, sync)
        else:
            t = _timed(seq if kind == "seq" else ovl, sync)
        pending.pop("y_a", None)
        return t

    for _ in range(args.warmup):
        pair("seq")
        pair("ovl")
    times: dict[str, list[float]] = {"fwd": [], "bwd": [], "seq": [], "ovl": []}
    for _ in range(args.reps):  # interleaved, so drifts (clocks, other load) hit every mode alike
        t_f, t_b = pair("split")
        times["fwd"].append(t_f)
        times["bwd"].append(t_b)
        times["seq"].append(pair("seq"))
        times["ovl"].append(pair("ovl"))

    # The pair's collectives alone: record one sequential pair, then replay its all-to-alls back to back.
    forward_b()
    with _RecordAllToAll() as recorded:
        seq()
    pending.clear()
    group = ep_mesh.get_group()
    buffers = [(torch.empty(o, dtype=dt, device=device), torch.zeros(i, dtype=dt, device=device), os_, is_)
               for o, i, dt, os_, is_ in recorded.calls]

    def comm_only() -> None:
        for out, inp, out_splits, in_splits in buffers:
            dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)

    for _ in range(args.warmup):
        _timed(comm_only, sync)
    times["comm"] = [_timed(comm_only, sync) for _ in range(args.reps)]

    medians = torch.tensor([statistics.median(times[k]) for k in ("fwd", "bwd", "seq", "ovl", "comm")],
                           dtype=torch.float64, device=device)
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    t_fwd, t_bwd, t_seq, t_ovl, t_comm = (1e3 * v for v in medians.tolist())
    return dict(tokens=batch * args.seq, ac=checkpointing, fwd=t_fwd, bwd=t_bwd, seq=t_seq, ovl=t_ovl, comm=t_comm,
                collectives=len(recorded.calls), hidden=(t_seq - t_ovl) / t_comm if t_comm > 0 else float("nan"))


def table(rows: list[dict], cfg: ModelConfig, args, device: torch.device, dtype: torch.dtype) -> str:
    world = dist.get_world_size()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (gloo)"
    head = (f"{world} x {name}, torch {torch.__version__}, ep={world}, {str(dtype).removeprefix('torch.')}; "
            f"chunk of {args.layers} MoE blocks: dim {cfg.dim}, {cfg.n_heads} heads, {cfg.num_experts} experts "
            f"top-{cfg.top_k} (FFN {cfg.moe_ffn_dim}), {cfg.num_shared_experts} shared; sequence {args.seq}. "
            f"Median of {args.reps} pairs after {args.warmup} warm-ups, slowest rank; times in ms.")
    lines = [head, "",
             "| tokens / microbatch | activation checkpointing | fwd | bwd | seq (F then B) | ovl (overlapped) | "
             "comm alone | all-to-alls | hidden = (seq - ovl) / comm |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {'yes' if r['ac'] else 'no'} | {r['fwd']:.2f} | {r['bwd']:.2f} | "
                     f"{r['seq']:.2f} | {r['ovl']:.2f} | {r['comm']:.2f} | {r['collectives']} | {r['hidden']:.0%} |")
    return "\n".join(lines)




def worker(args) -> None:
    use_cuda = args.device == "cuda"
    rank, world, device = init_distributed(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if use_cuda else "fp32")]
    cfg = model_config(args.tiny, args.seq)
    ep_mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("ep",))["ep"]
    rows = [measure(cfg, args, device, dtype, tokens, ac, ep_mesh) for ac in (False, True) for tokens in args.tokens]
    if rank == 0:
        publish(table(rows, cfg, args, device, dtype), args.out or ("docs/pipeline_overlap.md" if use_cuda else None),
                "Pipeline forward/backward overlap")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (implied by --device cpu)")
    p.add_argument("--layers", type=int, default=4, help="MoE blocks per chunk")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192], help="tokens per microbatch")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--nproc", type=int, default=2, help="ranks to spawn when not started by torchrun")
    p.add_argument("--out", default=None, help="markdown file for the table (cuda default: docs/pipeline_overlap.md)")
    args = p.parse_args()
    if args.device == "cpu":
        args.tiny = True
    if args.tiny:
        args.layers, args.seq, args.tokens = min(args.layers, 2), 32, [32, 64]
        args.warmup, args.reps = min(args.warmup, 1), min(args.reps, 3)
    launch(worker, args, args.nproc)


if __name__ == "__main__":
    main()
