"""Can this Triton warp-specialise a matmul loop on Hopper? Re-run after a Triton upgrade.

    python benchmarks/triton_ws_check.py          # compile only (CPU is fine): is the loop split into warp groups?
    python benchmarks/triton_ws_check.py --run    # GPU: also run it, in a child process that is killed if it hangs

One TMA matmul loop, with and without ``tl.range(..., warp_specialize=True)``, is compiled for sm_90 (H100) and
sm_100 (B200). The loop counts as split when the TTGIR holds a ``ttg.warp_specialize`` op and the PTX hands registers
between the partitions (``setmaxnreg``). Warp specialisation (TMA loads in one warp group, MMAs and the epilogue in
others) is what the grouped GEMMs of ``lightning_moe.moe.triton_grouped`` lack to reach cuBLAS speed on Hopper; see
docs/moe_layer_benchmark.md for what Triton 3.6 did with it.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@triton.jit
def _mm(a_desc, b_desc, c_ptr, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WS: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in tl.range(0, K, BK, warp_specialize=WS):
        acc = tl.dot(a_desc.load([pid_m * BM, k]), b_desc.load([k, pid_n * BN]), acc)
    rows, cols = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN)
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc.to(tl.bfloat16))


BM, BN, BK = 128, 128, 64


def compiled_split(arch: int, ws: bool, num_warps: int) -> tuple[bool, int]:
    signature = {"a_desc": f"tensordesc<bf16[{BM}, {BK}]>", "b_desc": f"tensordesc<bf16[{BK}, {BN}]>",
                 "c_ptr": "*bf16", "N": "i32", "K": "i32",
                 "BM": "constexpr", "BN": "constexpr", "BK": "constexpr", "WS": "constexpr"}
    src = ASTSource(_mm, signature=signature, constexprs={"BM": BM, "BN": BN, "BK": BK, "WS": ws})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps,
                                                                              "num_stages": 4})
    return "ttg.warp_specialize" in kernel.asm["ttgir"], kernel.asm["ptx"].count("setmaxnreg")


def run_once(ws: bool, num_warps: int) -> None:
    """On the GPU: time an 8192^3 bf16 matmul with this loop and check it against torch."""
    import time  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: PLC0415

    m = n = k = 8192
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    a_desc, b_desc = TensorDescriptor.from_tensor(a, [BM, BK]), TensorDescriptor.from_tensor(b, [BK, BN])

    def launch():
        _mm[(m // BM, n // BN)](a_desc, b_desc, c, n, k, BM, BN, BK, ws, num_warps=num_warps, num_stages=4)

    launch()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        launch()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / 10 * 1e3
    ref = (a @ b).float()
    err = ((c.float() - ref).norm() / ref.norm()).item()
    print(f"{ms:.3f} ms, {2 * m * n * k / ms / 1e9:.0f} TFLOP/s, rel err {err:.1e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="store_true", help="also run the sm_90 loops on this GPU (each in a child process)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a run counts as hung")
    p.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)  # ws, num_warps: one run, in the child
    args = p.parse_args()
    if args.child:
        run_once(bool(args.child[0]), args.child[1])
        return
    print(f"triton {triton.__version__}, tile {BM}x{BN}x{BK}")
    print(f"{'target':7s} {'warps':>5s} {'warp_specialize':>15s} {'split':>6s} {'setmaxnreg':>10s}  run")
    for arch, warps, ws in itertools.product((90, 100), (4, 8), (False, True)):
        head = f"sm_{arch:<4d} {warps:5d} {str(ws):>15s}"
        try:
            split, nreg = compiled_split(arch, ws, warps)
        except Exception as exc:  # an architecture this build cannot target
            print(f"{head} compile failed: {type(exc).__name__}: {str(exc)[:100]}")
            continue
        result = ""
        if args.run and arch == 90:
            cmd = [sys.executable, __file__, "--child", str(int(ws)), str(warps)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                result = proc.stdout.strip() or f"failed: {proc.stderr.strip()[-200:]}"
            except subprocess.TimeoutExpired:
                result = f"HUNG (killed after {args.timeout:.0f} s)"
        print(f"{head} {str(split):>6s} {nreg:10d}  {result}", flush=True)


if __name__ == "__main__":
    main()
