"""Does this Triton warp-specialise a matmul loop on Hopper? A compile-only check (no GPU needed).

    python benchmarks/triton_ws_check.py

Compiles one TMA matmul main loop, with and without ``tl.range(..., warp_specialize=True)``, for sm_90 (H100) and
sm_100 (B200), and prints whether the compiler split it into warp-group partitions: a ``ttg.warp_specialize`` op in
the TTGIR and ``setmaxnreg`` (register hand-off between the partitions) in the PTX. With Triton 3.6 the sm_90 loop
keeps only the ``tt.warp_specialize`` attribute and compiles to the same code as without it, which is why the grouped
GEMMs of ``lightning_moe.moe.triton_grouped`` do not ask for it (measured on an H100: within +-2% either way, see
docs/moe_layer_benchmark.md). Re-run this after a Triton upgrade.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@triton.jit
def _mm(a_desc, b_desc, c_ptr, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WS: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in tl.range(0, K, BK, warp_specialize=WS):
        acc = tl.dot(a_desc.load([pid_m * BM, k]), b_desc.load([k, pid_n * BN]), acc)
    rows, cols = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN)
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc.to(tl.bfloat16))


def check(arch: int, ws: bool, num_warps: int, bn: int) -> dict:
    bm, bk = 128, 64
    signature = {"a_desc": f"tensordesc<bf16[{bm}, {bk}]>", "b_desc": f"tensordesc<bf16[{bk}, {bn}]>",
                 "c_ptr": "*bf16", "N": "i32", "K": "i32",
                 "BM": "constexpr", "BN": "constexpr", "BK": "constexpr", "WS": "constexpr"}
    src = ASTSource(_mm, signature=signature, constexprs={"BM": bm, "BN": bn, "BK": bk, "WS": ws})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": 3})
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    return {"partitions": "ttg.warp_specialize" in ttgir, "setmaxnreg": ptx.count("setmaxnreg"),
            "ptx_lines": len(ptx.splitlines())}


# The row GEMMs of the expert layer: (epilogue, row weights, b k-major), as the layer launches them.
ROW_GEMMS = {"fwd1": (1, True, False), "fwd2": (0, False, False), "dgrad2": (2, True, True),
             "dgrad1": (0, False, True)}


def check_rows_kernel(arch: int, op: str, cfg, persistent: bool) -> dict:
    """Compile lightning_moe's grouped row GEMM as ``op`` runs it, with ``cfg``'s tiles and warp specialisation."""
    from lightning_moe.moe import triton_grouped as tg  # noqa: PLC0415

    epilogue, has_rw, kmajor = ROW_GEMMS[op]
    kernel = tg._rows_kernel_persistent if persistent else tg._rows_kernel
    b_block = [cfg.bn, cfg.bk] if kmajor else [cfg.bk, cfg.bn]
    signature = {name: "i32" for name in kernel.arg_names}
    signature.update({name: "*bf16" for name in ("a_ptr", "b_ptr", "c_ptr", "aux_ptr", "h_ptr")})
    signature.update(rw_ptr="*fp32", drw_ptr="*fp32", offs_ptr="*i32",
                     a_desc=f"tensordesc<bf16[{cfg.bm}, {cfg.bk}]>", b_desc=f"tensordesc<bf16{b_block}>")
    constexprs = {"BM": cfg.bm, "BN": cfg.bn, "BK": cfg.bk, "E_P2": 64, "B_KMAJOR": kmajor, "USE_TMA": True,
                  "EPILOGUE": epilogue, "HAS_RW": has_rw, "WS": cfg.warp_specialize}
    signature.update({name: "constexpr" for name in constexprs})
    src = ASTSource(kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    return {"partitions": "ttg.warp_specialize" in compiled.asm["ttgir"],
            "setmaxnreg": compiled.asm["ptx"].count("setmaxnreg")}


def main() -> None:
    print(f"triton {triton.__version__}")
    print(f"{'target':8s} {'tile':>8s} {'warps':>5s} {'warp_specialize':>15s} {'partitioned':>11s} "
          f"{'setmaxnreg':>10s} {'PTX lines':>9s}")
    for arch, warps, bn in itertools.product((90, 100), (4, 8), (128, 256)):
        for ws in (False, True):
            head = f"sm_{arch:<5d} {f'128x{bn}':>8s} {warps:5d} {str(ws):>15s}"
            try:
                r = check(arch, ws, warps, bn)
            except Exception as exc:  # an architecture or tile this build cannot compile
                print(f"{head} failed: {type(exc).__name__}: {str(exc)[:100]}")
                continue
            print(f"{head} {str(r['partitions']):>11s} {r['setmaxnreg']:>10d} {r['ptx_lines']:>9d}")
    print("\nlightning_moe row GEMMs, sm_90, warp_specialize=True")
    print(f"{'gemm':8s} {'tile':>12s} {'warps':>5s} {'stages':>6s} {'persistent':>10s} {'partitioned':>11s} "
          f"{'setmaxnreg':>10s}")
    from lightning_moe.moe.triton_grouped import TileConfig  # noqa: PLC0415

    for op in ROW_GEMMS:
        bn = 64 if op == "fwd1" else 128  # fwd1 holds a gate and an up accumulator
        for cfg, persistent in itertools.product([TileConfig(128, bn, 64, 4, 3, warp_specialize=True),
                                                  TileConfig(128, bn, 64, 4, 4, warp_specialize=True)],
                                                 (False, True)):
            tile = f"{cfg.bm}x{cfg.bn}x{cfg.bk}"
            head = f"{op:8s} {tile:>12s} {cfg.num_warps:5d} {cfg.num_stages:6d} {str(persistent):>10s}"
            try:
                r = check_rows_kernel(90, op, cfg, persistent)
            except Exception as exc:
                print(f"{head} failed: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            print(f"{head} {str(r['partitions']):>11s} {r['setmaxnreg']:>10d}")


if __name__ == "__main__":
    main()
