"""Pipeline schedules at pp=2 (issue 5): step time and measured bubble against each schedule's theoretical bubble.

    torchrun --standalone --nproc-per-node=2 benchmarks/pipeline_schedules.py               # 2 GPUs, NCCL, bf16
    torchrun --standalone --nproc-per-node=2 benchmarks/pipeline_schedules.py --device cpu  # CPU smoke run (gloo)
    python benchmarks/pipeline_schedules.py --device cpu                                    # same, spawns 2 ranks

One ``MoETransformer`` cut into pipeline stages by the project's own code (``PipelinePlan``, ``keep_stages``,
``StageModule``, ``parallelize``, ``PipelineRunner``) on pp = 2 ranks (dp = ep = 1), for every schedule of
``--schedules`` and microbatch count of ``--microbatches`` (``--mb-size`` sequences per microbatch). Per setting:

- step: median over ``--steps`` training steps (after ``--warmup``) of ``PipelineRunner.step`` (forward, loss and
  backward of the whole batch, no optimizer), slowest rank; ranks start each step together (barrier), and on GPU
  the clock stops after ``torch.cuda.synchronize``;
- measured bubble of a rank = 1 - compute / step, where compute is the time the rank spends inside its stages'
  ``forward_one_chunk`` / ``backward_one_chunk`` / ``backward_weight_one_chunk`` (timed with CUDA events on GPU,
  the wall clock on CPU); reported as the mean and the max over the ranks (median over the steps);
- theoretical bubble: the schedule's own action list (``pipeline_order`` of the torch schedule) replayed with costs
  per layer F = 1, full backward B = 2, input backward I = 1, weight backward W = 1, ``OVERLAP_F_B`` = its F then
  its B, zero-cost communication and no embedding / head / loss cost, each rank running its actions in order as
  soon as their inputs exist; bubble = 1 - busy / makespan, mean over ranks. For 1F1B this is
  (pp - 1) / (m + pp - 1).

On GPU the table is written between the result markers of ``--out`` (default ``docs/pipeline_schedules.md``); on CPU
only with an explicit ``--out`` (CPU timings say nothing about GPUs).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _launch import init_distributed, launch, publish  # noqa: E402 - benchmarks/ is on sys.path

from lightning_moe.models.config import ModelConfig  # noqa: E402
from lightning_moe.models.transformer import MoETransformer  # noqa: E402
from lightning_moe.parallel.dims import ParallelDims  # noqa: E402
from lightning_moe.parallel.parallelize import parallelize  # noqa: E402
from lightning_moe.pipeline import PipelinePlan, PipelineRunner, StageModule, keep_stages  # noqa: E402
from lightning_moe.pipeline.split import SCHEDULES  # noqa: E402

PP = 2
COSTS = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}  # per layer of the stage
UNSPLIT_COSTS = {**COSTS, "I": 2.0, "W": 0.0}  # the whole backward in the I slot (``PipelineRunner.split_backward``)


def model_config(args) -> ModelConfig:
    return ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                       dense_ffn_dim=4 * args.dim, num_experts=args.experts, top_k=args.top_k,
                       moe_ffn_dim=args.moe_ffn, num_shared_experts=1, max_seq_len=args.seq, score_func="sigmoid")


# --- theoretical bubble: replay of the schedule's action list ---

def _compute_actions(actions) -> list[tuple[str, int, int]]:
    """A rank's compute actions in order as (kind, stage, microbatch) (``OVERLAP_F_B`` as its sub-actions, one after
    the other; idle slots dropped: the replay decides when each action can start)."""
    out = []
    for a in actions:
        if a is None:
            continue
        if a.sub_actions is not None:
            out.extend(_compute_actions(a.sub_actions))
        elif a.computation_type.value in COSTS:
            out.append((a.computation_type.value, a.stage_index, a.microbatch_index))
    return out


def single_stage_order(schedule: str, pp: int, m: int) -> dict[int, list[tuple[str, int, int]]]:
    """The action lists of the single-stage schedules (rank r runs stage r), written out here: torch's
    ``pipeline_order`` of ``Schedule1F1B`` (torch 2.13) numbers the microbatches of the last rank from 1, which is
    only a display glitch (the runtime does not use it) but breaks a replay."""
    order = {}
    for r in range(pp):
        if schedule == "gpipe":
            order[r] = [("F", r, i) for i in range(m)] + [("B", r, i) for i in range(m)]
            continue
        warmup = min(pp - 1 - r, m)
        acts = [("F", r, i) for i in range(warmup)]
        for i in range(m - warmup):  # steady state: one forward, one backward
            acts += [("F", r, warmup + i), ("B", r, i)]
        acts += [("B", r, i) for i in range(m - warmup, m)]
        order[r] = acts
    return order


def theoretical_bubble(queues: dict[int, list[tuple[str, int, int]]], layer_ranges: list[range],
                       costs: dict[str, float] = COSTS) -> float:
    """Mean over ranks of 1 - busy / makespan for the compute actions ``queues`` (rank -> (kind, stage, mb))."""
    last = len(layer_ranges) - 1
    done: dict[tuple[str, int, int], float] = {}  # (kind, stage, microbatch) -> finish time
    free = {r: 0.0 for r in queues}
    busy = {r: 0.0 for r in queues}
    pos = {r: 0 for r in queues}

    def deps(a: tuple[str, int, int]) -> list[tuple[str, int, int]]:
        kind, s, m = a
        if kind == "F":
            return [("F", s - 1, m)] if s > 0 else []
        if kind in ("B", "I"):
            return [("F", s, m)] + ([("grad", s + 1, m)] if s < last else [])
        return [("grad", s, m)]  # W

    while any(pos[r] < len(queues[r]) for r in queues):
        progressed = False
        for r in queues:
            while pos[r] < len(queues[r]):
                a = queues[r][pos[r]]
                need = deps(a)
                if any(d not in done for d in need):
                    break
                kind, s, m = a
                cost = costs[kind] * len(layer_ranges[s])
                end = max([free[r]] + [done[d] for d in need]) + cost
                free[r], busy[r] = end, busy[r] + cost
                done[a] = end
                if kind in ("B", "I"):
                    done[("grad", s, m)] = end
                pos[r] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"the action list deadlocks in the replay at {pos}: {queues}")
    makespan = max(free.values())
    return statistics.mean(1 - busy[r] / makespan for r in queues)


# --- measured: compute time inside the stages ---

class ComputeTimer:
    """Sums the time spent in the compute methods of the schedule's ``PipelineStage`` objects."""

    METHODS = ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk")

    def __init__(self, stages, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.events: list[tuple] = []
        self.seconds = 0.0
        for stage in stages:
            for name in self.METHODS:
                setattr(stage, name, self._wrap(getattr(stage, name)))

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
                self.events.append((start, end))
                return out
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds += time.perf_counter() - t0
            return out
        return timed

    def reset(self) -> None:
        self.events.clear()
        self.seconds = 0.0

    def total(self) -> float:
        """Seconds of compute since ``reset`` (call after synchronising)."""
        return self.seconds + sum(s.elapsed_time(e) for s, e in self.events) / 1e3


def measure(schedule: str, microbatches: int, cfg: ModelConfig, args, device: torch.device, dtype: torch.dtype,
            dims: ParallelDims, meshes) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    plan = PipelinePlan(schedule, PP, cfg.n_layers, microbatches=microbatches,
                        stages_per_rank=args.stages_per_rank)
    torch.manual_seed(0)  # the same weights on every rank
    with torch.device(device):
        model = MoETransformer(cfg)
    local = plan.stages_of_rank(meshes.pp.get_local_rank())
    keep_stages(model, local, plan.layer_ranges)
    model.to(dtype)
    stages = [StageModule(model, s, plan.num_stages, plan.layer_ranges[s]) for s in local]
    parallelize(model, dims, meshes, stages=stages)
    runner = PipelineRunner(plan, stages, meshes.pp.get_group(), device, cfg, activation_dtype=dtype)
    batch = microbatches * args.mb_size
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, cfg.vocab_size, (batch, args.seq + 1), generator=g).to(device)
    tokens, targets = data[:, :-1], data[:, 1:]
    sched = runner.schedule(batch, args.seq)
    torch_stages = sched._stages if hasattr(sched, "_stages") else [sched._stage]
    timer = ComputeTimer(torch_stages, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    samples = []  # per timed step: [step seconds, compute seconds] of every rank
    for i in range(args.warmup + args.steps):
        model.zero_grad(set_to_none=False)
        timer.reset()
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        runner.step(tokens, targets)
        sync()
        elapsed = time.perf_counter() - t0
        if i >= args.warmup:
            row = torch.zeros(world, 2, dtype=torch.float64)
            row[rank] = torch.tensor([elapsed, timer.total()], dtype=torch.float64)
            samples.append(row)
    stats = torch.stack(samples).to(device)
    dist.all_reduce(stats)  # each rank filled its own row
    stats = stats.cpu()
    step = stats[:, :, 0].max(dim=1).values  # per step: the slowest rank
    bubbles = 1 - stats[:, :, 1] / step[:, None]  # [steps, ranks]
    if plan.spec.stages_per_rank == 1:
        order = single_stage_order(schedule, PP, microbatches)
    else:
        order = {r: _compute_actions(acts) for r, acts in sched.pipeline_order.items()}
    split = runner.split_backward
    theory = theoretical_bubble(order, plan.layer_ranges, COSTS if split else UNSPLIT_COSTS)
    del runner, sched, stages, model, timer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(schedule=schedule, torch_name=plan.spec.torch_name, stages=plan.num_stages, m=microbatches,
                step=1e3 * step.median().item(), bubble_mean=bubbles.mean(dim=1).median().item(),
                bubble_max=bubbles.max(dim=1).values.median().item(), theory=theory,
                tokens_s=batch * args.seq / step.median().item(),
                backward=("I + W" if split else "whole, in I") if plan.spec.style == "v" else "whole")


def table(rows: list[dict], cfg: ModelConfig, args, device: torch.device, dtype: torch.dtype) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (gloo)"
    head = (f"{dist.get_world_size()} x {name}, torch {torch.__version__}, pp={PP} (dp = ep = 1), "
            f"{str(dtype).removeprefix('torch.')}; model: {cfg.n_layers} layers ({cfg.n_dense_layers} dense), "
            f"dim {cfg.dim}, {cfg.n_heads} heads, {cfg.num_experts} experts top-{cfg.top_k} (FFN {cfg.moe_ffn_dim}), "
            f"vocab {cfg.vocab_size}; sequence {args.seq}, {args.mb_size} sequence(s) per microbatch. "
            f"Median of {args.steps} steps after {args.warmup} warm-ups. Step: slowest rank, ms. Bubbles: "
            "measured = 1 - stage compute time / step (mean and max over ranks); theoretical = replay of the "
            "schedule's action list with unit costs (F=1, B=2, I=W=1 per layer, or I=2 and W=0 where the backward runs "
            "whole in the I slot; free communication).")
    lines = [head, "",
             "| schedule | backward | stages | microbatches | step (ms) | tokens/s | measured bubble, mean | "
             "measured bubble, max | theoretical bubble |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['schedule']} ({r['torch_name']}) | {r['backward']} | {r['stages']} | {r['m']} | "
                     f"{r['step']:.1f} | "
                     f"{r['tokens_s']:.0f} | {r['bubble_mean']:.1%} | {r['bubble_max']:.1%} | {r['theory']:.1%} |")
    return "\n".join(lines)




def worker(args) -> None:
    use_cuda = args.device == "cuda"
    rank, world, device = init_distributed(args.device)
    if world != PP:
        raise SystemExit(f"run with {PP} ranks (pp={PP}), got {world}")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if use_cuda else "fp32")]
    cfg = model_config(args)
    dims = ParallelDims(pp=PP, dp_shard=1, world_size=world)
    meshes = dims.build_meshes(device.type)
    rows = []
    for m in args.microbatches:
        for schedule in args.schedules:
            try:
                rows.append(measure(schedule, m, cfg, args, device, dtype, dims, meshes))
            except Exception as err:  # e.g. too few microbatches for the schedule: skip the cell, keep the rest
                if "microbatches" not in str(err):
                    raise
                if rank == 0:
                    print(f"skipped {schedule} with {m} microbatches: {err}", flush=True)
    if rank == 0:
        publish(table(rows, cfg, args, device, dtype), args.out or ("docs/pipeline_schedules.md" if use_cuda else None),
                "Pipeline schedules at pp=2")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--schedules", nargs="+", choices=tuple(SCHEDULES), default=["dualpipe", "1f1b"])
    p.add_argument("--microbatches", type=int, nargs="+", default=None, help="default: 4 8 16 (cpu: 4 8)")
    p.add_argument("--mb-size", type=int, default=1, help="sequences per microbatch")
    p.add_argument("--stages-per-rank", type=int, default=2, help="interleaved_1f1b only")
    p.add_argument("--dim", type=int, default=None, help="default: 2048 (cpu: 64)")
    p.add_argument("--heads", type=int, default=None, help="default: 16 (cpu: 4)")
    p.add_argument("--layers", type=int, default=None, help="default: 8 (cpu: 4)")
    p.add_argument("--experts", type=int, default=None, help="default: 32 (cpu: 4)")
    p.add_argument("--top-k", type=int, default=None, help="default: 4 (cpu: 2)")
    p.add_argument("--moe-ffn", type=int, default=None, help="hidden size of one expert; default: 1024 (cpu: 32)")
    p.add_argument("--vocab", type=int, default=None, help="default: 32768 (cpu: 256)")
    p.add_argument("--seq", type=int, default=None, help="default: 2048 (cpu: 32)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--warmup", type=int, default=None, help="default: 3 (cpu: 1)")
    p.add_argument("--steps", type=int, default=None, help="default: 10 (cpu: 3)")
    p.add_argument("--nproc", type=int, default=PP, help="ranks to spawn when not started by torchrun")
    p.add_argument("--out", default=None, help="markdown file for the table (cuda default: docs/pipeline_schedules.md)")
    args = p.parse_args()
    cpu = args.device == "cpu"
    defaults = dict(microbatches=[4, 8] if cpu else [4, 8, 16], dim=64 if cpu else 2048, heads=4 if cpu else 16,
                    layers=4 if cpu else 8, experts=4 if cpu else 32, top_k=2 if cpu else 4,
                    moe_ffn=32 if cpu else 1024, vocab=256 if cpu else 32768, seq=32 if cpu else 2048,
                    warmup=1 if cpu else 3, steps=3 if cpu else 10)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    launch(worker, args, args.nproc)


if __name__ == "__main__":
    main()
