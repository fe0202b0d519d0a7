"""Expert parallel vs pure data parallel on one node: tokens/s per GPU and the share of step time in all-to-all.

    torchrun --standalone --nproc-per-node=2 benchmarks/ep_throughput.py            # GPUs (NCCL), writes docs/
    torchrun --standalone --nproc-per-node=2 benchmarks/ep_throughput.py --tiny     # CPU smoke run (gloo)

Both layouts shard dense weights with FSDP2 over all ranks (dp_shard = world); "dp" replicates every expert on every
rank (FSDP-sharded like the dense weights), "ep" splits the experts across ranks and moves tokens with all-to-all.
The all-to-all share is the GPU time of the token all-to-all kernels over the step time (torch.profiler).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_moe.models.config import ModelConfig  # noqa: E402
from lightning_moe.models.transformer import MoETransformer  # noqa: E402
from lightning_moe.parallel.dims import ParallelDims  # noqa: E402
from lightning_moe.parallel.parallelize import parallelize  # noqa: E402


def model_config(tiny: bool) -> ModelConfig:
    if tiny:
        return ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, num_experts=8, top_k=2, moe_ffn_dim=32,
                           dense_ffn_dim=128, max_seq_len=64, score_func="sigmoid", bias_update_speed=1e-3)
    # a small DeepSeek-style model: fine-grained experts (64, top-6), 2 shared experts, first layer dense
    return ModelConfig(vocab_size=32768, dim=1536, n_layers=8, n_heads=12, n_dense_layers=1, dense_ffn_dim=6144,
                       num_experts=64, top_k=6, moe_ffn_dim=768, num_shared_experts=2, max_seq_len=2048,
                       score_func="sigmoid", bias_update_speed=1e-3)


def run(layout: str, cfg: ModelConfig, args, device: torch.device) -> dict:
    world = dist.get_world_size()
    dims = ParallelDims(dp_shard=world, ep=world if layout == "ep" else 1, world_size=world)
    meshes = dims.build_meshes(device.type)
    torch.manual_seed(0)
    with torch.device(device):
        model = MoETransformer(cfg)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    parallelize(model, dims, meshes, param_dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(dist.get_rank())
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)

    def step():
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    a2a_share = float("nan")
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            sync()
        a2a_us = sum(e.self_device_time_total for e in prof.key_averages()
                     if "SendRecv" in e.key or "AllToAll" in e.key or "all_to_all" in e.key.lower())
        a2a_share = a2a_us / 3 / (step_s * 1e6)
    tokens_per_gpu = args.batch * args.seq / step_s
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"layout": layout, "step_ms": step_s * 1e3, "tokens_per_gpu": tokens_per_gpu, "a2a_share": a2a_share,
            "mem_gib": mem}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default="docs/ep_throughput.md")
    args = p.parse_args()
    if args.tiny:
        args.seq, args.batch, args.steps, args.warmup = 64, 2, 3, 1
    use_cuda = torch.cuda.is_available() and not args.tiny
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    cfg = model_config(args.tiny)
    rows = []
    for layout in ("dp", "ep"):
        rows.append(run(layout, cfg, args, device))  # the model and optimizer are freed when run returns
        if use_cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    if rank == 0:
        from lightning_moe.flops import active_matmul_params, training_flops_per_token

        name = torch.cuda.get_device_name() if use_cuda else "cpu"
        lines = [f"Expert parallel vs data parallel on {dist.get_world_size()} x {name}, torch {torch.__version__}, "
                 f"bf16 FSDP2 mixed precision, {args.batch} x {args.seq} tokens per GPU per step; model: dim "
                 f"{cfg.dim}, {cfg.n_layers} layers, {cfg.num_experts} experts top-{cfg.top_k} (FFN "
                 f"{cfg.moe_ffn_dim}), {cfg.num_shared_experts} shared, {active_matmul_params(cfg) / 1e6:.0f}M "
                 f"active matmul parameters.", "",
                 "| layout | step (ms) | tokens/s per GPU | model TFLOP/s per GPU | all-to-all share of step | "
                 "peak memory (GiB) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            tflops = r["tokens_per_gpu"] * training_flops_per_token(cfg, args.seq) / 1e12
            lines.append(f"| {r['layout']} | {r['step_ms']:.1f} | {r['tokens_per_gpu']:.0f} | {tflops:.1f} | "
                         f"{r['a2a_share']:.1%} | {r['mem_gib']:.1f} |")
        lines.append(f"\nep / dp tokens per GPU: {rows[1]['tokens_per_gpu'] / rows[0]['tokens_per_gpu']:.2f}")
        table = "\n".join(lines)
        print(table)
        if use_cuda:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text("# Expert-parallel throughput\n\nReproduce: `torchrun --standalone "
                                      "--nproc-per-node=2 benchmarks/ep_throughput.py`\n\n" + table + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
