"""MoE layer forward+backward time and effective TFLOP/s per expert kernel, against a dense MLP of the same FLOPs.

    python benchmarks/moe_layer.py                      # DeepSeek-like layer on the GPU (bf16), writes docs/
    python benchmarks/moe_layer.py --tokens 2048 --dim 256 --ffn 128 --experts 16 --topk 4 --device cpu --dtype float32

Rows (all at the same useful FLOPs: T * K tokens through SwiGLU experts of size D x H):
    dense_mlp             SwiGLU MLP with hidden K * H on all T tokens (the baseline)
    experts[KERNEL]       the expert kernel alone on rows already sorted by expert
    moe_layer[KERNEL]     the whole layer: router, permutation, experts, combine (no shared expert)
"Effective TFLOP/s" divides the expert matmul FLOPs (6 * T * K * 3 * D * H for forward + backward) by the time, so
the overhead of routing and permutation shows up as a lower figure. Ratios are against dense_mlp in the same process.
Every step starts with the gradients set to None, as after ``optimizer.zero_grad(set_to_none=True)``; the rows marked
"grads accumulated" skip that, so each backward also adds into the previous step's ``.grad``.
On the GPU each row also shows the median SM clock and power draw while it was timed (``gpu_clocks.py``): at the
power limit the clock drops, so rows run at different clocks can differ by more than their code.

``--paired N`` then times the dense MLP and each layer row (eager and compiled; not ``loop``) again, alternating,
for N rounds of ``--iters`` calls each, and reports the median of the per-round ratios: the rows above run one
after another for a minute or more each, the dense MLP first, so drift in the GPU's state (temperature, and with it
the clock at the power limit) lands on one row and not the other; alternating puts both under the same conditions
in every round.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_clocks import ClockSampler  # noqa: E402

from lightning_moe.models.config import ModelConfig  # noqa: E402
from lightning_moe.moe.experts import RoutedExperts  # noqa: E402
from lightning_moe.moe.kernels import KERNELS  # noqa: E402
from lightning_moe.moe.layer import MoE  # noqa: E402


def clear_grads(*tensors: torch.Tensor) -> None:
    """What ``optimizer.zero_grad(set_to_none=True)`` does between training steps.

    Without it every backward adds into the existing ``.grad``: a read and write of all weight gradients, which for
    64 experts (10.7x the dense MLP's parameters at the same FLOPs) is 1.1 GB more traffic per step.
    """
    for t in tensors:
        t.grad = None


CLOCKS: list[str] = []
"""The GPU's median SM clock and power over each timed row (``gpu_clocks.py``), for the table; empty off the GPU."""


def timeit(fn, warmup: int, iters: int, device: torch.device, repeats: int = 5) -> float:
    """Milliseconds per fn() (forward + backward): the median over ``repeats`` of ``iters`` back-to-back calls.

    Calls run back to back, as training steps do, so the host's launch latency overlaps the previous call's GPU work
    and is not counted as GPU idle time (timing every call between two synchronisations would count it). On the GPU
    the SM clock and power are sampled meanwhile and appended to ``CLOCKS``: at the power limit the clock drops.
    """
    for _ in range(warmup):
        fn()
    times, host = [], []
    with ClockSampler() as clocks:
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                host.append((time.perf_counter() - t0) * 1e3 / iters)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / iters)
            else:
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                times.append((time.perf_counter() - t0) * 1e3 / iters)
    if device.type == "cuda":
        CLOCKS.append(clocks.summary())
        print(f"    GPU while timed: {clocks.summary() or 'no nvidia-smi'}", flush=True)
    if host:
        # When the host needs about as long to issue a call as the GPU to run it, the GPU waits on the host.
        print(f"    host time to issue one call: {statistics.median(host):.2f} ms", flush=True)
    return statistics.median(times)


def paired_rounds(fns: dict, rounds: int, iters: int, device: torch.device) -> tuple[list[dict], str]:
    """Alternate the timed calls of ``fns`` (name -> step; the first is the baseline) for ``rounds`` rounds.

    Returns one dict per round (name -> ms, and name + " clock" on the GPU) and a markdown table: per-round times
    and each row's median ratio against the baseline (the median of the per-round ratios, so a round where the whole
    GPU ran slower moves both sides). Each round runs each step once untimed first, so switching rows does not
    count the first call after the other row's (its caches and allocator state).
    """
    if rounds < 1 or len(fns) < 2:
        raise ValueError(f"paired timing needs at least one round and two rows, got {rounds} and {list(fns)}")
    names = list(fns)
    results = []
    for _ in range(rounds):
        result = {}
        for name in names:
            result[name] = timeit(fns[name], 1, iters, device, repeats=1)
            result[name + " clock"] = CLOCKS.pop() if CLOCKS else ""
        results.append(result)
    base = names[0]
    lines = [f"Paired rounds ({rounds} x {iters} calls per row, rows alternating): median ratio of "
             f"{base} time to the row's time over the rounds.", "",
             "| row | median (ms) | min-max (ms) | throughput vs " + base + " (median of rounds) | min-max ratio |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name in names:
        times = [r[name] for r in results]
        ratios = [r[base] / r[name] for r in results]
        lines.append(f"| {name} | {statistics.median(times):.2f} | {min(times):.2f}-{max(times):.2f} | "
                     f"{statistics.median(ratios):.1%} | {min(ratios):.1%}-{max(ratios):.1%} |")
    if any(r[n + " clock"] for r in results for n in names):
        lines += ["", "| round | " + " | ".join(names) + " |", "| ---: |" + " --- |" * len(names)]
        for i, r in enumerate(results):
            lines.append(f"| {i} | " + " | ".join(f"{r[n]:.2f} ms, {r[n + ' clock']}" for n in names) + " |")
    return results, "\n".join(lines)


def profile_layer(name: str, step, folder: Path, steps: int = 3) -> None:
    """Kernel table, Chrome trace and GPU idle gaps (``gpu_gaps.py``) of ``steps`` back-to-back steps.

    One more step runs first, inside the trace, so that the measured steps find work queued on the GPU as in
    training; marker kernels between the steps let ``gpu_gaps`` leave it out. The kernel table covers all steps.
    """
    from gpu_gaps import gap_report, load
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(1 + steps):
            torch.cuda._sleep(100)  # the step marker
            step()
        torch.cuda._sleep(100)
        torch.cuda.synchronize()
    steps += 1
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=90)
    busy = sum(e.self_device_time_total for e in prof.key_averages()) / steps / 1e3
    table += f"\nGPU busy per step (sum of kernel times / {steps}): {busy:.2f} ms\n"
    folder.mkdir(parents=True, exist_ok=True)
    trace = folder / f"trace_{name}.json"
    prof.export_chrome_trace(str(trace))
    gaps = gap_report(load(trace), steps)
    print(f"{name}: {gaps}", flush=True)
    (folder / f"profile_{name}.txt").write_text(table + "\n" + gaps)


def layer_variants(name, layer, xl, run_compiled, record, args, device, paired=None) -> None:
    """Compiled-layer variants, each against the row just above it in the same process.

    - ``rows gathered``: the token rows copied to their routed rows by a gather (``index_select``) instead of a
      scatter from the tokens (``permute._rows_from_tokens``), in the forward and in the combine's backward.
    - ``weighted combine``: the gate weights applied by the combine to the expert outputs (``MoE.weights_in_experts``
      off), instead of by the experts to their SwiGLU outputs.
    - ``bmm combine``: the gathers written as ``index_select`` + ``bmm`` (eager mode's form) instead of the
      product-sum form Inductor fuses (``permute._fusible``), i.e. the layer before that change (with the weighted
      combine, which is the only one it changes).
    - ``fp32 router``: the router GEMM on upcast fp32 copies of the tokens and weights (the form before
      ``router._RouterLogits``), with ``float32_matmul_precision`` as set (TF32 with ``high``).
    - ``CUDA graphs``: ``mode="reduce-overhead"`` (no launch gaps); the layer has no host synchronisation.
    - ``Triton weight gradients`` / ``grouped_mm weight gradients`` (``triton`` only): ``triton_grouped.WGRAD=
      "triton"`` / ``"grouped_mm"`` instead of what "auto" takes (the Gluon kernel on Hopper).
    - ``one program per tile`` (``triton`` only, when a row GEMM's configuration is persistent): every row GEMM
      launched one program per output tile instead.
    - ``Triton row GEMMs`` (``triton`` only): ``triton_grouped.ROWS="triton"`` instead of the warp-specialised Gluon
      row GEMMs that "auto" takes on Hopper.
    """
    from lightning_moe.moe import permute as permute_mod
    from lightning_moe.moe import router as router_mod

    def fresh(**kwargs):
        torch._dynamo.reset()
        return torch.compile(layer, **{"mode": args.compile_mode, **kwargs})

    def timed(label, note, compiled, step=None):
        step = step or (lambda: run_compiled(compiled=compiled))
        record(f"moe_layer[{name}]+compile, {label}", timeit(step, args.warmup, args.iters, device), note)

    wanted = set(args.variants.split(","))
    if "gather_rows" in wanted:
        scatter = permute_mod._rows_from_tokens
        permute_mod._rows_from_tokens = lambda x, inverse, token_index: x.index_select(0, token_index)
        try:
            timed("rows gathered", "previous form: token rows gathered by index, not scattered", fresh())
        finally:
            permute_mod._rows_from_tokens = scatter
    if "weighted_combine" in wanted:
        layer.weights_in_experts = False
        try:
            timed("weighted combine", "previous form: gate weights applied in the combine", fresh())
        finally:
            layer.weights_in_experts = True
    if "bmm" in wanted:
        fusible = permute_mod._fusible
        permute_mod._fusible = lambda dtype: False
        layer.weights_in_experts = False
        try:
            timed("bmm combine", "previous form", fresh())
        finally:
            permute_mod._fusible = fusible
            layer.weights_in_experts = True
    if "fp32_router" in wanted:
        logits = router_mod.router_logits
        router_mod.router_logits = lambda x, w: F.linear(x.float(), w.float())
        try:
            timed("fp32 router", "previous form: upcast copies, fp32 GEMMs", fresh())
        finally:
            router_mod.router_logits = logits
    if device.type == "cuda" and "cuda_graphs" in wanted:
        graphed = fresh(mode="reduce-overhead")

        def run_graphed():
            torch.compiler.cudagraph_mark_step_begin()
            run_compiled(compiled=graphed)

        timed("CUDA graphs", "mode=reduce-overhead", graphed, run_graphed)
        if paired is not None:  # the only variant that patches nothing, so it can run again later
            paired[f"moe_layer[{name}]+compile, CUDA graphs"] = run_graphed
    if name == "triton":
        from lightning_moe.moe import triton_grouped

        # Backends of the triton kernel switched back to earlier ones: variant -> (setting, value, row label).
        backends = {"triton_wgrad": ("WGRAD", "triton", "Triton weight gradients"),
                    "grouped_mm_wgrad": ("WGRAD", "grouped_mm", "grouped_mm weight gradients"),
                    "triton_rows": ("ROWS", "triton", "Triton row GEMMs")}
        for key, (setting, value, label) in backends.items():
            if key in wanted:
                with mock.patch.object(triton_grouped, setting, value):
                    timed(label, f"previous form: triton_grouped.{setting}={value}", fresh())
        configs = dict(triton_grouped.CONFIGS)
        if "per_tile" in wanted and any(c.persistent for c in configs.values()):
            triton_grouped.CONFIGS.update({k: dataclasses.replace(c, persistent=False) for k, c in configs.items()})
            try:
                timed("one program per tile", "previous form: no persistent row GEMMs", fresh())
            finally:
                triton_grouped.CONFIGS.update(configs)
    torch._dynamo.reset()


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kernels", default="grouped_mm,triton,loop,megablocks")
    p.add_argument("--triton-configs", default=None,
                   help="JSON {gemm: [bm, bn, bk, warps, stages]} from benchmarks/triton_grouped_tune.py")
    p.add_argument("--gluon-configs", default=None,
                   help='JSON {gemm: {ws_rows_mm keyword: value}} merged into gluon_grouped.CONFIGS, e.g. '
                        '\'{"fwd1": {"merge": false}}\'')
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20, help="back-to-back calls per timed repeat (5 repeats)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd layers")
    p.add_argument("--paired", type=int, default=0, metavar="N",
                   help="then time the dense MLP and each layer alternately for N rounds (module docstring)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode of every compiled row, e.g. "
                   "max-autotune-no-cudagraphs (Inductor's GEMM templates, with prologue/epilogue fusion)")
    p.add_argument("--out", default=None, help="markdown file for the table (default: docs/ on GPU runs)")
    p.add_argument("--profile", default=None, help="folder for CUDA kernel tables of the compiled layers")
    p.add_argument("--variants-for", default="", help="kernels (comma-separated) for which to also time the compiled "
                   "layer with the eager bmm combine, with the fp32 router GEMMs, and with CUDA graphs")
    p.add_argument("--variants",
                   default="gather_rows,weighted_combine,bmm,fp32_router,cuda_graphs,triton_wgrad,per_tile,triton_rows",
                   help="which of those variants to time (layer_variants says what each is)")
    args = p.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.triton_configs:
        from lightning_moe.moe import triton_grouped

        tuned = json.loads(Path(args.triton_configs).read_text())
        triton_grouped.CONFIGS.update({k: triton_grouped.TileConfig(*v) for k, v in tuned.items()})
    if args.gluon_configs:
        from lightning_moe.moe import gluon_grouped

        for op, overrides in json.loads(args.gluon_configs).items():
            gluon_grouped.CONFIGS[op] = {**gluon_grouped.CONFIGS[op], **overrides}
    t, d, h, e, k = args.tokens, args.dim, args.ffn, args.experts, args.topk
    torch.manual_seed(0)
    flops = 3 * 2 * t * k * 3 * d * h  # forward + backward of the expert matmuls
    rows: list[dict] = []

    def record(name: str, ms: float | None, note: str = "") -> None:
        clocks = CLOCKS.pop() if ms is not None and CLOCKS else ""
        rows.append({"name": name, "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12 if ms else None, "note": note,
                     "clocks": clocks})
        print(f"{name:32s} {'' if ms is None else f'{ms:9.2f} ms'} {note}", flush=True)

    x = torch.randn(t, d, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(t, d, device=device, dtype=dtype)

    # dense baseline
    w1 = (torch.randn(k * h, d, device=device, dtype=dtype) * 0.02).requires_grad_()
    w3 = (torch.randn(k * h, d, device=device, dtype=dtype) * 0.02).requires_grad_()
    w2 = (torch.randn(d, k * h, device=device, dtype=dtype) * 0.02).requires_grad_()

    def dense_mlp(x):
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)

    def dense(fn=dense_mlp, accumulate=False):
        if not accumulate:
            clear_grads(x, w1, w3, w2)
        fn(x).backward(grad)

    record("dense_mlp", timeit(dense, args.warmup, args.iters, device))
    paired = {"dense_mlp": dense}
    record("dense_mlp, grads accumulated", timeit(lambda: dense(accumulate=True), args.warmup, args.iters, device),
           "no zero_grad between steps")
    if args.compile:
        compiled_dense = torch.compile(dense_mlp, mode=args.compile_mode)
        record("dense_mlp+compile", timeit(lambda: dense(compiled_dense), args.warmup, args.iters, device))
        if args.profile and device.type == "cuda":
            profile_layer("dense_mlp_compiled", lambda: dense(compiled_dense), Path(args.profile))

    # balanced-ish counts for the pre-permuted expert kernels
    routed = torch.randint(0, e, (t * k,), device=device).sort().values
    counts = torch.zeros(e, dtype=torch.int64, device=device).scatter_add_(0, routed, torch.ones_like(routed))
    xr = torch.randn(t * k, d, device=device, dtype=dtype, requires_grad=True)
    gr = torch.randn(t * k, d, device=device, dtype=dtype)
    cfg = ModelConfig(dim=d, num_experts=e, top_k=k, moe_ffn_dim=h, num_shared_experts=0, n_layers=2,
                      n_heads=max(1, d // 128), max_seq_len=t)
    # Weight layout experiment: experts stored [E, out, in] (nn.Linear / Hugging Face layout) and transposed on use.
    w13t = (torch.randn(e, 2 * h, d, device=device, dtype=dtype) * 0.02).requires_grad_()
    w2t = (torch.randn(e, d, h, device=device, dtype=dtype) * 0.02).requires_grad_()
    if "grouped_mm" in args.kernels.split(","):
        from lightning_moe.moe.kernels import grouped_mm_experts

        def run_transposed():
            clear_grads(xr, w13t, w2t)
            grouped_mm_experts(xr, counts, w13t.transpose(-2, -1), w2t.transpose(-2, -1)).backward(gr)

        record("experts[grouped_mm, [E,out,in] layout]", timeit(run_transposed, args.warmup, args.iters, device))

    for name in args.kernels.split(","):
        if name not in KERNELS:
            continue
        if name == "triton" and device.type != "cuda":
            record(f"experts[{name}]", None, "GPU only")
            continue
        iters = args.iters if name != "loop" else max(3, args.iters // 4)
        try:
            experts = RoutedExperts(e, d, h, kernel=name).to(device, dtype)
        except ImportError as err:
            record(f"experts[{name}]", None, f"unavailable: {str(err).split('(import failed')[-1][:120]}")
            record(f"moe_layer[{name}]", None, "unavailable")
            continue

        def run_experts(experts=experts):
            clear_grads(xr, *experts.parameters())
            experts(xr, counts).backward(gr)

        record(f"experts[{name}]", timeit(run_experts, args.warmup, iters, device))
        cfg.expert_kernel = name
        layer = MoE(cfg).to(device, dtype)
        xl = x.view(1, t, d)

        def run_layer(layer=layer, xl=xl):
            clear_grads(x, *layer.parameters())
            layer(xl).backward(grad.view(1, t, d))

        record(f"moe_layer[{name}]", timeit(run_layer, args.warmup, iters, device))
        if name != "loop":
            paired[f"moe_layer[{name}]"] = run_layer
        if args.compile and name != "loop":
            compiled = torch.compile(layer, mode=args.compile_mode)

            def run_compiled(compiled=compiled, xl=xl, layer=layer, accumulate=False):
                if not accumulate:
                    clear_grads(x, *layer.parameters())
                compiled(xl).backward(grad.view(1, t, d))

            record(f"moe_layer[{name}]+compile", timeit(run_compiled, args.warmup, iters, device))
            paired[f"moe_layer[{name}]+compile"] = run_compiled
            record(f"moe_layer[{name}]+compile, grads accumulated",
                   timeit(lambda f=run_compiled: f(accumulate=True), args.warmup, iters, device),
                   "no zero_grad between steps")
            if name in args.variants_for.split(","):
                layer_variants(name, layer, xl, run_compiled, record, args, device, paired)
            if args.profile and device.type == "cuda":
                profile_layer(f"{name}_compiled", run_compiled, Path(args.profile))

    dense_ms = rows[0]["ms"]
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    lines = [
        f"MoE layer benchmark on {dev_name}, torch {torch.__version__}, {args.dtype}, forward+backward: "
        f"{t} tokens, hidden {d}, expert FFN {h}, {e} experts, top-{k}.",
        "",
        "| variant | time (ms) | effective TFLOP/s | throughput vs dense | GPU while timed | note |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        if r["ms"] is None:
            lines.append(f"| {r['name']} | - | - | - | | {r['note']} |")
        else:
            ratio = dense_ms / r["ms"]
            lines.append(f"| {r['name']} | {r['ms']:.2f} | {r['tflops']:.1f} | {ratio:.1%} | {r['clocks']} | "
                         f"{r['note']} |")
    table = "\n".join(lines)
    if args.paired and len(paired) > 1:
        print(f"paired rounds: {list(paired)}", flush=True)
        _, paired_table = paired_rounds(paired, args.paired, args.iters, device)
        table += "\n\n" + paired_table
    print("\n" + table)
    out = args.out or ("docs/moe_layer_benchmark.md" if device.type == "cuda" else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        cmd = "python benchmarks/moe_layer.py " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(out).write_text(f"# MoE layer benchmark\n\nReproduce: `{cmd.strip()}`\n\n{table}\n")
    return rows


if __name__ == "__main__":
    main()
