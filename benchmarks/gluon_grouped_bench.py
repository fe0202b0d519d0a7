"""The warp-specialised Gluon row GEMMs (lightning_moe/moe/gluon_grouped.py) against the Triton ones (GPU, sm_90).

    python benchmarks/gluon_grouped_bench.py                 # check + time the four row GEMMs of the benchmark layer
    python benchmarks/gluon_grouped_bench.py --ops fwd1 --variants "merge=0;merge=1"
    python benchmarks/gluon_grouped_bench.py --variants "timing=1;coop=0,interleave=0,stages=4"   # + ping-pong

A variant's keywords (``ws_rows_mm``'s) override the tiles the layer runs, ``gluon_grouped.CONFIGS``.

Each GEMM runs in a child process that is killed after ``--timeout`` seconds, so a kernel that hangs (a barrier
waiting forever) costs one timeout, not the session. Every variant is first checked against
``triton_grouped.grouped_rows_mm`` (itself tested against the loop kernel) on a small problem with uneven and empty
experts, then on the benchmark shapes; then both are timed with ``triton.testing.do_bench`` (median, L2 flushed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OPS = ("fwd1", "fwd2", "dgrad2", "dgrad1")


def _problem(n_tokens, dim, ffn, experts, topk, seed, skew=False):
    import torch  # noqa: PLC0415

    g = torch.Generator(device="cuda").manual_seed(seed)
    n = n_tokens * topk
    if skew:  # uneven experts, some empty, sizes not multiples of the tile
        probs = torch.rand(experts, device="cuda", generator=g) ** 3
        probs[::5] = 0
        routed = torch.multinomial(probs, n, replacement=True, generator=g).sort().values
    else:
        routed = torch.randint(0, experts, (n,), device="cuda", generator=g).sort().values
    counts = torch.bincount(routed, minlength=experts)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    dt = torch.bfloat16

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(dt)

    # The token of each routed row, as the layer's permutation gives it (each token topk times, in random order),
    # for the gathered variants; x and dy are the tokens' rows in that order.
    idx = (torch.randperm(n, device="cuda", generator=g) // topk).to(torch.int32)
    x_tok = rnd(n_tokens, dim)
    x = x_tok[idx]
    w13 = rnd(experts, dim, 2 * ffn, scale=dim ** -0.5)
    w2 = rnd(experts, ffn, dim, scale=ffn ** -0.5)
    h13 = rnd(n, 2 * ffn)
    h = rnd(n, ffn)
    dy_tok = rnd(n_tokens, dim)
    dy = dy_tok[idx]
    dh13 = rnd(n, 2 * ffn)
    rw = torch.rand(n, device="cuda", generator=g)
    return dict(x=x, w13=w13, w2=w2, h13=h13, h=h, dy=dy, dh13=dh13, rw=rw, offs=offs, n=n, dim=dim, ffn=ffn,
                idx=idx, x_tok=x_tok, dy_tok=dy_tok)


def _calls(op, p, variant):
    """(reference fn, gluon fn, flops) of one row GEMM."""
    from lightning_moe.moe import gluon_grouped as gg  # noqa: PLC0415
    from lightning_moe.moe import triton_grouped as tg  # noqa: PLC0415

    cfg = tg.CONFIGS
    variant = dict(variant)
    # Diagnostics: contig_b=1 hands the kernel b[e] stored [K, N] (not the transposed view); epi=0 runs the plain
    # epilogue instead of SwiGLU's backward (the result then differs from the reference).
    contig_b, epi = variant.pop("contig_b", 0), variant.pop("epi", None)
    variant.pop("timing", None)
    no_rw = variant.pop("no_rw", 0)
    # gather=1 (fwd1, dgrad2): A's rows gathered from the tokens' rows by the kernel (the reference takes them
    # pre-gathered); keep=1 also stores the gathered rows (returned last, left out of the comparison).
    gather, keep = variant.pop("gather", 0), variant.pop("keep", 0)
    if gather and op not in ("fwd1", "dgrad2"):
        raise ValueError("gather=1 applies to fwd1 and dgrad2, whose A rows are the tokens' rows")
    # A variant's keywords override the tiles the layer runs (gluon_grouped.CONFIGS); the ping-pong schedule of the
    # first version is coop=0,interleave=0 (with bn=64 for fwd1, bn=128 and stages=4 for the others).
    variant = {**gg.CONFIGS[op], **variant}
    x, w13, w2, offs, rw = p["x"], p["w13"], p["w2"], p["offs"], p["rw"]
    n, d, hid = p["n"], p["dim"], p["ffn"]
    if gather:
        variant.update(gather=p["idx"], keep_gathered=bool(keep))

    def rows(name):
        return p[name + "_tok"] if gather else p[name]

    def drop_kept(fn):
        if not keep:
            return fn

        def run():
            out = fn()[:-1]
            return out[0] if len(out) == 1 else out
        return run

    if op == "fwd1":
        return (lambda: tg.grouped_rows_mm(x, w13, offs, cfg["fwd1"], epilogue=1, row_weights=rw),
                drop_kept(lambda: gg.ws_rows_mm(rows("x"), w13, offs, epilogue=1, row_weights=rw, **variant)),
                2 * n * d * 2 * hid)
    if op == "fwd2":
        return (lambda: tg.grouped_rows_mm(p["h"], w2, offs, cfg["fwd2"]),
                lambda: gg.ws_rows_mm(p["h"], w2, offs, **variant), 2 * n * hid * d)
    if op == "dgrad2":
        b = w2.transpose(1, 2)
        bg = b.contiguous() if contig_b else b
        gkw = {"epilogue": 2, "aux": p["h13"], "row_weights": None if no_rw else rw}
        gkw = gkw if epi is None else {"epilogue": epi}
        return (lambda: tg.grouped_rows_mm(p["dy"], b, offs, cfg["dgrad2"], epilogue=2, aux=p["h13"], row_weights=rw),
                drop_kept(lambda: gg.ws_rows_mm(rows("dy"), bg, offs, **gkw, **variant)), 2 * n * d * hid)
    b = w13.transpose(1, 2)
    bg = b.contiguous() if contig_b else b
    return (lambda: tg.grouped_rows_mm(p["dh13"], b, offs, cfg["dgrad1"]),
            lambda: gg.ws_rows_mm(p["dh13"], bg, offs, **variant), 2 * n * 2 * hid * d)


def _timeline(op, p, variant):
    """Program 0's consumers, median over its tiles 4..63 (microseconds): waiting for the MMA turn, MMAs, epilogue;
    and over all programs: the spread of their start times, their spans (min / median / max), the kernel's span
    (first start to last end) and its tail (last end less the median end)."""
    import torch  # noqa: PLC0415

    programs = torch.cuda.get_device_properties(0).multi_processor_count
    buf = torch.zeros(256 + 4 * programs, dtype=torch.int64, device="cuda")
    import lightning_moe.moe.gluon_grouped as gg  # noqa: PLC0415

    real = gg.ws_rows_mm
    gg.ws_rows_mm = lambda *a, **kw: real(*a, **{**kw, "timing": buf})
    try:
        _, fn, _ = _calls(op, p, variant)
        fn()
        torch.cuda.synchronize()
    finally:
        gg.ws_rows_mm = real
    t = buf[:256].view(64, 4).double().cpu() / 1e3
    t = t[4:][t[4:, 3] > 0]
    per_program = buf[256:].view(programs, 2, 2).double().cpu() / 1e3  # [program, consumer, (start, end)]
    start, end = per_program[..., 0].min(1).values, per_program[..., 1].max(1).values
    span = end - start
    return {"wait_us": t[:, 1].sub(t[:, 0]).median().item(), "mma_us": t[:, 2].sub(t[:, 1]).median().item(),
            "epilogue_us": t[:, 3].sub(t[:, 2]).median().item(),
            "period_us": t[1:, 1].sub(t[:-1, 1]).median().item(), "tiles": int(t.shape[0]),
            "start_spread_us": (start.max() - start.min()).item(),
            "program_span_us": [span.min().item(), span.median().item(), span.max().item()],
            "kernel_span_us": (end.max() - start.min()).item(), "tail_us": (end.max() - end.median()).item()}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _compare(ref, out):
    ref = ref if isinstance(ref, tuple) else (ref,)
    out = out if isinstance(out, tuple) else (out,)
    if len(out) != len(ref):
        return float("nan")
    return max(_rel(o, r) for o, r in zip(out, ref, strict=True))


def child(op: str, variants: list[dict], shape: dict) -> None:
    """Runs in the child process: one JSON line per result."""
    import torch  # noqa: PLC0415
    from triton.testing import do_bench  # noqa: PLC0415

    small = _problem(700, 256, 192, 8, 3, seed=1, skew=True)
    big = _problem(**shape, seed=0)
    ref_small, _, _ = _calls(op, small, {})
    ref_big, _, flops = _calls(op, big, {})
    rs, rb = ref_small(), ref_big()
    ms_ref = do_bench(ref_big, warmup=25, rep=200, return_mode="median")
    print(json.dumps({"op": op, "variant": "triton (CONFIGS)", "ms": ms_ref, "tflops": flops / ms_ref / 1e9}),
          flush=True)
    for v in variants:
        _, fn_small, _ = _calls(op, small, v)
        err_small = _compare(rs, fn_small())
        torch.cuda.synchronize()
        _, fn_big, _ = _calls(op, big, v)
        err_big = _compare(rb, fn_big())
        ms = do_bench(fn_big, warmup=25, rep=200, return_mode="median")
        print(json.dumps({"op": op, "variant": v, "ms": ms, "tflops": flops / ms / 1e9, "err_small": err_small,
                          "err_big": err_big, "vs_triton": ms_ref / ms}), flush=True)
        if v.get("timing"):
            print(json.dumps({"op": op, "variant": v, "timeline": _timeline(op, big, v)}), flush=True)


def _parse_variants(text: str, op: str) -> list[dict]:
    """';'-separated variants, each 'key=int,...' or 'op+op@key=int,...' (only for those GEMMs)."""
    out = []
    for part in text.split(";"):
        if "@" in part:
            ops, part = part.split("@")
            if op not in ops.split("+"):
                continue
        v = {}
        for kv in filter(None, part.split(",")):
            key, val = kv.split("=")
            v[key.strip()] = int(val)
        out.append(v)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--variants", default="",
                   help="';'-separated variants of ws_rows_mm's keywords, 'key=int,key=int' or 'fwd1+fwd2@key=int'")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--out", default=None, help="also write the table here (markdown)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    shape = dict(n_tokens=args.tokens, dim=2048, ffn=1408, experts=64, topk=6)
    if args.child:
        child(args.child, _parse_variants(args.variants, args.child), shape)
        return
    rows = []
    for op in args.ops.split(","):
        cmd = [sys.executable, __file__, "--child", op, "--variants", args.variants, "--tokens", str(args.tokens)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines, status = res.stdout.splitlines(), f"rc={res.returncode}"
            if res.returncode:
                print(res.stderr[-3000:], flush=True)
        except subprocess.TimeoutExpired as exc:
            lines = (exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or "").splitlines()
            status = f"killed after {args.timeout:.0f} s (hang?)"
        for line in lines:
            if line.startswith("{"):
                rows.append(json.loads(line))
                print(line, flush=True)
        print(f"# {op}: {status}", flush=True)
    table = ["| gemm | variant | ms | TFLOP/s | vs triton | rel err small / big |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        if "ms" not in r:
            continue
        err = f"{r['err_small']:.1e} / {r['err_big']:.1e}" if "err_small" in r else ""
        table.append(f"| {r['op']} | {r['variant']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
                     f"{r.get('vs_triton', 1.0):.2f} | {err} |")
    print("\n".join(table))
    if args.out:
        Path(args.out).write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
