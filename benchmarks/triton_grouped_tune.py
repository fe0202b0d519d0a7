"""Per-GEMM profile of the routed experts' forward + backward, and a tile sweep of the Triton grouped GEMMs (GPU).

    python benchmarks/triton_grouped_tune.py --out results/          # writes tune.json and best_configs.json

For each of the six GEMMs of a SwiGLU expert layer (fwd1: x @ w13 with SwiGLU, fwd2: h @ w2, dgrad2: dy @ w2^T with
SwiGLU's backward, dgrad1: dh13 @ w13^T, wgrad2: h^T @ dy, wgrad1: x^T @ dh13) it times:
    torch.nn.functional.grouped_mm on the same operands (plus the separate SwiGLU pass where Triton fuses it),
    one dense matmul of the same total shape (no expert boundaries: what a grouped GEMM could at best reach),
    the Triton kernels of lightning_moe/moe/triton_grouped.py for each tile configuration of the sweep.
It also prints the CUDA kernels of one grouped_mm forward + backward (torch.profiler) and checks every Triton
configuration against grouped_mm on the same inputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_moe.moe import triton_grouped as tg  # noqa: E402
from lightning_moe.moe.kernels import grouped_mm_experts, scale_rows, swiglu  # noqa: E402

# (bm, bn, bk, warps, stages). Three 128x128x64 stages (96 KB of shared memory) let two programs share an SM, so one's
# epilogue overlaps the other's main loop; the larger tiles run one program per SM.
_C = tg.TileConfig
ROWS_SWEEP = [_C(128, 128, 64, 4, 3), _C(128, 128, 64, 8, 3), _C(128, 128, 64, 8, 4), _C(128, 256, 64, 8, 3),
              _C(256, 128, 64, 8, 3), _C(64, 256, 64, 4, 3)]
SWIGLU_SWEEP = [_C(128, 64, 64, 4, 3), _C(128, 64, 64, 8, 3), _C(128, 64, 64, 8, 4), _C(128, 128, 64, 8, 3),
                _C(64, 128, 64, 4, 3), _C(128, 128, 64, 8, 4)]
SWIGLU_BWD_SWEEP = ROWS_SWEEP + [_C(128, 128, 64, 8, 5), _C(128, 64, 64, 4, 3), _C(128, 64, 64, 4, 4),
                                  _C(128, 64, 64, 8, 4)]
WGRAD_SWEEP = [_C(128, 128, 64, 4, 3), _C(128, 128, 64, 8, 3), _C(128, 128, 64, 8, 4), _C(128, 256, 64, 8, 3),
               _C(256, 128, 64, 8, 3)]


def bench(fn) -> float:
    """Median milliseconds; on the CPU (a dry run under TRITON_INTERPRET=1) one timed call."""
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench  # noqa: PLC0415

    return do_bench(fn, warmup=25, rep=150, return_mode="median")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--quick", action="store_true", help="first configuration of each sweep only")
    p.add_argument("--current", action="store_true",
                   help="the configuration in triton_grouped.CONFIGS only (and its persistent variant)")
    p.add_argument("--ops", default="fwd1,fwd2,dgrad2,dgrad1,wgrad2,wgrad1", help="which GEMMs to sweep")
    p.add_argument("--no-ptr", action="store_true", help="skip the pointer-load (no TMA) comparison")
    p.add_argument("--no-row-weights", action="store_true", help="time fwd1 and dgrad2 without gate weights")
    p.add_argument("--persistent", choices=("both", "only", "off"), default="both",
                   help="row GEMMs: also sweep (both), only sweep (only) or skip (off) the persistent launch")
    p.add_argument("--out", default=".")
    args = p.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A CPU dry run of this script (tiny sizes, TRITON_INTERPRET=1, float32) checks it before it spends GPU time.
    on_gpu = torch.cuda.is_available()
    dev, dt = torch.device("cuda" if on_gpu else "cpu"), torch.bfloat16 if on_gpu else torch.float32
    if not on_gpu:
        global ROWS_SWEEP, SWIGLU_SWEEP, SWIGLU_BWD_SWEEP, WGRAD_SWEEP
        ROWS_SWEEP = SWIGLU_SWEEP = WGRAD_SWEEP = [_C(16, 16, 16, 4, 2), _C(32, 16, 16, 4, 2)]
        SWIGLU_BWD_SWEEP = [_C(16, 16, 16, 4, 2), _C(32, 32, 16, 4, 2)]
    t, d, hid, e, k = args.tokens, args.dim, args.ffn, args.experts, args.topk
    n = t * k
    torch.manual_seed(0)
    routed = torch.randint(0, e, (n,), device=dev).sort().values
    counts = torch.zeros(e, dtype=torch.int64, device=dev).scatter_add_(0, routed, torch.ones_like(routed))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    x = torch.randn(n, d, device=dev, dtype=dt)
    w13 = torch.randn(e, d, 2 * hid, device=dev, dtype=dt) * d ** -0.5
    w2 = torch.randn(e, hid, d, device=dev, dtype=dt) * hid ** -0.5
    # The MoE layer hands the Triton kernel the gate weights (kernels.FUSES_ROW_WEIGHTS): fwd1 scales h by them and
    # dgrad2 also returns their gradient, so those two GEMMs are timed with row weights (--no-row-weights: without).
    rw = None if args.no_row_weights else torch.rand(n, device=dev)
    h13 = F.grouped_mm(x, w13, offs=offs)
    h = scale_rows(swiglu(h13), rw)
    dy = torch.randn(n, d, device=dev, dtype=dt)
    dh = F.grouped_mm(dy, w2.transpose(1, 2), offs=offs)

    def swiglu_bwd():
        h13_ = h13.detach().requires_grad_()
        return torch.autograd.grad(scale_rows(swiglu(h13_), rw), h13_, dh)[0]

    dh13 = swiglu_bwd()

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    # name: (flops, grouped_mm fn, dense fn of the same total shape, triton fn(cfg), reference for triton, sweep)
    ops = {
        "fwd1": (2 * n * d * 2 * hid,
                 lambda: scale_rows(swiglu(F.grouped_mm(x, w13, offs=offs)), rw),
                 lambda: x @ w13[0],
                 lambda c: tg.grouped_rows_mm(x, w13, offs, c, epilogue=1, row_weights=rw)[1], h, SWIGLU_SWEEP),
        "fwd2": (2 * n * hid * d,
                 lambda: F.grouped_mm(h, w2, offs=offs),
                 lambda: h @ w2[0],
                 lambda c: tg.grouped_rows_mm(h, w2, offs, c), None, ROWS_SWEEP),
        "dgrad2": (2 * n * d * hid,
                   lambda: (F.grouped_mm(dy, w2.transpose(1, 2), offs=offs), swiglu_bwd()),
                   lambda: dy @ w2[0].t(),
                   lambda c: first(tg.grouped_rows_mm(dy, w2.transpose(1, 2), offs, c, epilogue=2, aux=h13,
                                                      row_weights=rw)), dh13,
                   SWIGLU_BWD_SWEEP),
        "dgrad1": (2 * n * 2 * hid * d,
                   lambda: F.grouped_mm(dh13, w13.transpose(1, 2), offs=offs),
                   lambda: dh13 @ w13[0].t(),
                   lambda c: tg.grouped_rows_mm(dh13, w13.transpose(1, 2), offs, c), None, ROWS_SWEEP),
        "wgrad2": (2 * n * hid * d,
                   lambda: F.grouped_mm(h.t(), dy, offs=offs),
                   lambda: h.t() @ dy,
                   lambda c: tg.grouped_wgrad(h, dy, offs, c), None, WGRAD_SWEEP),
        "wgrad1": (2 * n * d * 2 * hid,
                   lambda: F.grouped_mm(x.t(), dh13, offs=offs),
                   lambda: x.t() @ dh13,
                   lambda c: tg.grouped_wgrad(x, dh13, offs, c), None, WGRAD_SWEEP),
    }
    results: dict = {"shape": vars(args), "ops": {}}
    best: dict[str, dict] = {}
    print(f"{'gemm':8s} {'variant':45s} {'ms':>8s} {'TFLOP/s':>8s} {'rel err':>9s}", flush=True)
    for name, (flops, gmm_fn, dense_fn, tri_fn, ref, sweep) in ops.items():
        if name not in args.ops.split(","):
            continue
        rec = {}
        ref_out = gmm_fn()
        ref_out = ref if ref is not None else ref_out
        for label, fn in (("grouped_mm", gmm_fn), ("dense mm (same total shape)", dense_fn)):
            ms = bench(fn)
            rec[label] = ms
            print(f"{name:8s} {label:45s} {ms:8.3f} {flops / ms / 1e9:8.1f}", flush=True)
        configs = sweep[:1] if args.quick else sweep
        configs = [tg.CONFIGS[name]] if args.current else configs
        if not name.startswith("wgrad") and args.persistent != "off":
            persistent = [dataclasses.replace(c, persistent=True) for c in configs]
            configs = persistent if args.persistent == "only" else configs + persistent
        variants = [(c, True) for c in configs]
        variants += [] if args.no_ptr else [(sweep[0], False)]
        for cfg, tma in variants:
            label = f"triton {cfg.bm}x{cfg.bn}x{cfg.bk} w{cfg.num_warps} s{cfg.num_stages}"
            label += (" persistent" if cfg.persistent else "") + ("" if tma else " ptr")
            try:
                def run(cfg=cfg, tma=tma, tri_fn=tri_fn):
                    saved = tg.use_tma
                    tg.use_tma = lambda device: tma
                    try:
                        return tri_fn(cfg)
                    finally:
                        tg.use_tma = saved
                err = rel(run(), ref_out)
                ms = bench(run)
            except Exception as exc:  # a configuration that does not compile or fit is skipped
                print(f"{name:8s} {label:45s} failed: {type(exc).__name__}: {str(exc)[:150]}", flush=True)
                continue
            rec[label] = ms
            print(f"{name:8s} {label:45s} {ms:8.3f} {flops / ms / 1e9:8.1f} {err:9.2e}", flush=True)
            if tma and err < (2e-2 if on_gpu else 1e-5) and (name not in best or ms < best[name]["ms"]):
                best[name] = {"ms": ms, "cfg": list(dataclasses.astuple(cfg))}
        results["ops"][name] = rec
    results["best"] = best
    (out_dir / "best_configs.json").write_text(json.dumps({k: v["cfg"] for k, v in best.items()}))
    (out_dir / "tune.json").write_text(json.dumps(results, indent=1))
    tg.CONFIGS.update({k: tg.TileConfig(*v["cfg"]) for k, v in best.items()})

    # Whole expert forward + backward: grouped_mm vs Triton with the best configurations.
    xg = x.clone().requires_grad_()
    w13g, w2g = w13.clone().requires_grad_(), w2.clone().requires_grad_()
    for label, kernel in (("experts grouped_mm", grouped_mm_experts), ("experts triton", tg.triton_experts)):
        def step(kernel=kernel):
            xg.grad = w13g.grad = w2g.grad = None  # as after optimizer.zero_grad(set_to_none=True)
            kernel(xg, counts, w13g, w2g).backward(dy)

        ms = bench(step)
        results[label] = ms
        print(f"{label:43s} {ms:8.3f} {3 * 3 * 2 * n * d * hid / ms / 1e9:8.1f}", flush=True)
    outs = []
    for kernel in (grouped_mm_experts, tg.triton_experts):
        xg.grad = w13g.grad = w2g.grad = None
        y = kernel(xg, counts, w13g, w2g)
        y.backward(dy)
        outs.append((y, xg.grad, w13g.grad, w2g.grad))
    errs = [rel(a, b) for a, b in zip(outs[1], outs[0])]
    results["triton_vs_grouped_mm_rel_err"] = errs
    print("triton vs grouped_mm rel err (y, dx, dw13, dw2):", [f"{v:.2e}" for v in errs], flush=True)
    (out_dir / "tune.json").write_text(json.dumps(results, indent=1))

    # Which CUDA kernels one grouped_mm forward + backward launches (contiguity copies would show here).
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    activity = ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU
    sort_by = "cuda_time_total" if on_gpu else "cpu_time_total"
    for label, kernel in (("grouped_mm", grouped_mm_experts), ("triton", tg.triton_experts)):
        with profile(activities=[activity]) as prof:
            for _ in range(3):
                xg.grad = w13g.grad = w2g.grad = None
                kernel(xg, counts, w13g, w2g).backward(dy)
            if on_gpu:
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by=sort_by, row_limit=14, max_name_column_width=70)
        (out_dir / f"profile_{label}.txt").write_text(table)
        print(f"--- profile experts[{label}] x3\n{table}", flush=True)
    # Where the rest of the layer's time goes: the whole MoE layer (eager) with the Triton experts.
    from lightning_moe.models.config import ModelConfig  # noqa: PLC0415
    from lightning_moe.moe.layer import MoE  # noqa: PLC0415

    cfg = ModelConfig(dim=d, num_experts=e, top_k=k, moe_ffn_dim=hid, num_shared_experts=0, n_layers=2,
                      n_heads=max(1, d // 128), max_seq_len=t)
    cfg.expert_kernel = "triton"  # set after validation, which may not list it yet
    layer = MoE(cfg).to(dev, dt)
    xl = torch.randn(1, t, d, device=dev, dtype=dt, requires_grad=True)
    gl = torch.randn(1, t, d, device=dev, dtype=dt)
    for _ in range(3):
        layer(xl).backward(gl)
    with profile(activities=[activity]) as prof:
        for _ in range(3):
            xl.grad = None
            layer.zero_grad(set_to_none=True)
            layer(xl).backward(gl)
        if on_gpu:
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=70)
    (out_dir / "profile_layer_triton.txt").write_text(table)
    print(f"--- profile moe_layer[triton] eager x3\n{table}", flush=True)
    (out_dir / "tune.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
