"""The experts' weight gradients: the Gluon kernel (lightning_moe/moe/gluon_wgrad.py) against torch's grouped_mm.

    python benchmarks/wgrad_bench.py                                   # the benchmark layer's two weight gradients
    python benchmarks/wgrad_bench.py --variants "bk=64,stages=3;bn=128,stages=4"

Rows (``triton.testing.do_bench`` medians, L2 flushed; a Hopper GPU, sm_90):

- ``grouped_mm``: torch's CUTLASS grouped GEMM, ``grouped_mm(a.t(), b, offs=offs)``, what the layer ran before;
- ``gluon`` and each ``--variants`` entry (``gluon_wgrad.wgrad`` keywords): each checked against grouped_mm first
  (relative error of the whole [E, M, K] result);
- ``dense, same FLOPs``: one ``a.t() @ b`` over the dense MLP's shapes (16k tokens, hidden 6 x FFN), for scale.

The table goes to ``--out`` (default ``docs/wgrad_benchmark.md``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_variants(text: str) -> list[dict]:
    """';'-separated variants of ``gluon_wgrad.wgrad``'s keywords, each 'key=int,key=int'."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        v = {}
        for kv in filter(None, part.split(",")):
            key, _, val = kv.partition("=")
            if not val:
                raise ValueError(f"variant {part!r}: {kv!r} is not key=int")
            v[key.strip()] = int(val)
        out.append(v)
    return out


def problems(tokens: int, dim: int, ffn: int, experts: int, topk: int, seed: int = 0) -> dict:
    """The operands of the layer's two weight gradients (rows sorted by expert, uniform routing), and of the dense
    MLP's of the same FLOPs."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    n = tokens * topk
    counts = torch.bincount(torch.randint(0, experts, (n,), device="cuda", generator=g), minlength=experts)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=g).to(torch.bfloat16)

    def ops(a, b, dense):
        return dict(a=a, b=b, offs=offs, dense=dense)

    return {"wgrad1": ops(rnd(n, dim), rnd(n, 2 * ffn), (rnd(tokens, dim), rnd(tokens, topk * 2 * ffn))),
            "wgrad2": ops(rnd(n, ffn), rnd(n, dim), (rnd(tokens, topk * ffn), rnd(tokens, dim)))}


def time_rows(a, b, offs, dense, variants, do_bench) -> list[tuple[str, float, str]]:
    """(kernel, ms, relative error against grouped_mm) of one weight gradient."""
    from lightning_moe.moe import gluon_wgrad  # noqa: PLC0415

    def bench(fn):
        return do_bench(fn, warmup=25, rep=300, return_mode="median")

    def ref_fn():
        return torch.nn.functional.grouped_mm(a.t(), b, offs=offs)

    ref = ref_fn().float()
    rows = [("grouped_mm", bench(ref_fn), "")]
    for kw in [{}, *variants]:
        def fn(kw=kw):
            return gluon_wgrad.wgrad(a, b, offs, **kw)

        err = ((fn().float() - ref).norm() / ref.norm()).item()
        label = "gluon" + (" " + ",".join(f"{k}={v}" for k, v in kw.items()) if kw else " (defaults)")
        rows.append((label, bench(fn), f"{err:.1e}"))
    da, db = dense
    rows.append((f"dense, same FLOPs ([{da.shape[1]} x {da.shape[0]}] @ [{db.shape[0]} x {db.shape[1]}])",
                 bench(lambda: da.t() @ db), ""))
    return rows


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="", help="';'-separated gluon_wgrad.wgrad keywords, 'key=int,key=int'")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "wgrad_benchmark.md"))
    args = p.parse_args(argv)
    variants = parse_variants(args.variants)
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)):
        raise SystemExit("wgrad_bench.py needs a Hopper GPU (sm_90): the Gluon kernel runs nowhere else")
    from triton.testing import do_bench  # noqa: PLC0415

    dim, ffn, experts, topk = 2048, 1408, 64, 6
    lines = [f"Weight gradients on {torch.cuda.get_device_name()}, torch {torch.__version__}, bfloat16: "
             f"{args.tokens} tokens x top-{topk} over {experts} experts, hidden {dim}, expert FFN {ffn}.", "",
             "| gradient | kernel | ms | TFLOP/s | vs grouped_mm | rel err vs grouped_mm |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, prob in problems(args.tokens, dim, ffn, experts, topk).items():
        a, b = prob["a"], prob["b"]
        flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
        rows = time_rows(a, b, prob["offs"], prob["dense"], variants, do_bench)
        base = rows[0][1]
        for label, ms, err in rows:
            lines.append(f"| {name} | {label} | {ms:.3f} | {flops / ms / 1e9:.0f} | {base / ms:.2f} | {err} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    print(table)
    header = "# Weight-gradient benchmark\n\nReproduce: `python benchmarks/wgrad_bench.py`\n\n"
    Path(args.out).write_text(header + table)
    return table


if __name__ == "__main__":
    main()
