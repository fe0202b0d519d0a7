"""Warp-specialised grouped weight gradients for Hopper, written in Gluon: ``dw[e] = a[rows of e]^T @ b[rows of e]``.

The weight gradients of the experts reduce over each expert's rows (a few thousand), so each output tile is short
work (24 k-steps at the benchmark's 1536 rows per expert) followed by a store of the whole tile. torch's
``grouped_mm`` (CUTLASS) runs these at 580-635 TFLOP/s on an H200 where dense GEMMs of the same FLOPs run at 720
(docs/wgrad_benchmark.md). This kernel keeps the tensor cores busy through the stores:

- one persistent program per SM walks the output tiles (expert x row tile x column tile) in order;
- a one-warp **producer** partition loads each k-step's A and B tiles (``BK`` rows of both operands) by TMA into a
  ring of shared-memory stages, across tile boundaries;
- two four-warp **consumer** partitions each compute half the rows of every output tile (``wgmma`` with A read
  transposed from shared memory), then hand their half to a TMA store that runs while they multiply the next tile.

An expert's rows start anywhere, so its first k-step starts at its first row; its last k-step may reach into the
next expert's rows, which the consumers zero in their half of the A stage before multiplying (rows past the end of
``a`` come as zeros from TMA). An expert with no rows gets a zero gradient.

Needs a Hopper GPU (sm_90) and Triton >= 3.6 with Gluon; ``triton_grouped.WGRAD`` picks it for the ``triton``
expert kernel.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


@gluon.jit
def _tile(w, offs_ptr, NB_M, NB_N):
    """Output tile w: (expert, row tile, column tile, the expert's first row, its end row)."""
    per_expert = NB_M * NB_N
    e = w // per_expert
    tm = (w % per_expert) // NB_N
    tn = w % NB_N
    end = gl.load(offs_ptr + e)
    start = gl.where(e > 0, gl.load(offs_ptr + gl.maximum(e - 1, 0)), 0)
    return e, tm, tn, start, end


@gluon.jit
def _producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, offs_ptr, E, NB_M, NB_N):
    """TMA loads of every k-step of every tile of this program into the stage ring (one warp)."""
    BK: gl.constexpr = a_desc.block_type.shape[0]
    BM: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[1]
    S: gl.constexpr = a_bufs.type.shape[0]
    nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
    g = 0
    for w in range(gl.program_id(0), E * NB_M * NB_N, gl.num_programs(0)):
        e, tm, tn, start, end = _tile(w, offs_ptr, NB_M, NB_N)
        for kk in range(gl.cdiv(end - start, BK)):
            s = g % S
            mbarrier.wait(empty.index(s), ((g // S) & 1) ^ 1)
            bar = ready.index(s)
            mbarrier.expect(bar, nbytes)
            tma.async_copy_global_to_shared(a_desc, [start + kk * BK, tm * BM], bar, a_bufs.index(s))
            tma.async_copy_global_to_shared(b_desc, [start + kk * BK, tn * BN], bar, b_bufs.index(s))
            g += 1


@gluon.jit
def _consumer(c_id: gl.constexpr, a_bufs, b_bufs, ready, empty, out_smem, o_desc, offs_ptr, E, NB_M, NB_N, M):
    """Rows c_id * BM/2 .. of every output tile of this program: the k-steps' MMAs, each stage released once the MMAs
    reading it have completed; then the half tile is stored by TMA from ``out_smem`` (this consumer's own buffer),
    which the next tile waits for only when it needs the buffer again."""
    S: gl.constexpr = a_bufs.type.shape[0]
    BK: gl.constexpr = a_bufs.type.shape[1]
    BM: gl.constexpr = a_bufs.type.shape[2] // 2
    BN: gl.constexpr = b_bufs.type.shape[2]
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BN, 16])
    # [BK, BM] of the A stage, 8 consecutive columns (16 bytes) per thread: zeroing another expert's rows
    zero_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (BM // 8), BM // 8], [4, 1], [1, 0])
    g = 0
    for w in range(gl.program_id(0), E * NB_M * NB_N, gl.num_programs(0)):
        e, tm, tn, start, end = _tile(w, offs_ptr, NB_M, NB_N)
        ksteps = gl.cdiv(end - start, BK)
        acc = gl.zeros([BM, BN], gl.float32, mma_layout)
        for kk in range(ksteps):
            s = g % S
            mbarrier.wait(ready.index(s), (g // S) & 1)
            a = a_bufs.index(s).slice(c_id * BM, BM, dim=1)  # [BK rows, BM columns of a]: this consumer's half
            valid = end - start - kk * BK
            if valid < BK:  # the expert's last k-step reaches into the next expert's rows
                rows = gl.arange(0, BK, layout=gl.SliceLayout(1, zero_layout))
                v = a.load(zero_layout)
                a.store(gl.where((rows < valid)[:, None], v, gl.zeros_like(v)))
                fence_async_shared()
                gl.thread_barrier()
            acc = warpgroup_mma(a.permute((1, 0)), b_bufs.index(s), acc, use_acc=kk > 0, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            mbarrier.arrive(empty.index((g + S - 1) % S), pred=kk > 0)
            g += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index((g + S - 1) % S), pred=ksteps > 0)
        tma.store_wait(0)  # the previous tile's store has read the buffer
        gl.thread_barrier()
        out_smem.store(acc.to(o_desc.dtype))
        fence_async_shared()
        gl.thread_barrier()
        tma.async_copy_shared_to_global(o_desc, [e * M + tm * (2 * BM) + c_id * BM, tn * BN], out_smem)
    tma.store_wait(0)


@gluon.jit
def _wgrad_kernel(a_desc, b_desc, o_desc, offs_ptr, E, NB_M, NB_N, M, STAGES: gl.constexpr,
                  CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
    dtype: gl.constexpr = a_desc.dtype
    a_bufs = gl.allocate_shared_memory(dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # both consumers have read it
    out0 = gl.allocate_shared_memory(dtype, o_desc.block_type.shape, o_desc.layout)
    out1 = gl.allocate_shared_memory(dtype, o_desc.block_type.shape, o_desc.layout)
    fence_async_shared()
    gl.warp_specialize([
        (_consumer, (0, a_bufs, b_bufs, ready, empty, out0, o_desc, offs_ptr, E, NB_M, NB_N, M)),
        (_consumer, (1, a_bufs, b_bufs, ready, empty, out1, o_desc, offs_ptr, E, NB_M, NB_N, M)),
        (_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, offs_ptr, E, NB_M, NB_N)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def _descriptors(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, bm: int, bn: int, bk: int):
    gdt = gl.bfloat16 if a.dtype == torch.bfloat16 else gl.float16

    def desc(t, block):
        return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, gdt))

    return desc(a, [bk, bm]), desc(b, [bk, bn]), desc(out, [bm // 2, bn])


_CONSTEXPRS = ("STAGES", "CONSUMER_REGS", "PRODUCER_REGS")


def compile_only(arch: int = 90, *, bm: int = 128, bn: int = 256, bk: int = 32, stages: int = 6,
                 consumer_regs: int = 232, producer_regs: int = 40, maxnreg: int = 168):
    """Compile the kernel for ``sm_<arch>`` without a GPU (CPU is fine) and return Triton's compiled kernel (its
    ``asm`` holds the TTGIR, PTX and cubin), for tests that check the build."""
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.experimental.gluon._runtime import GluonASTSource  # noqa: PLC0415
    from triton.runtime.jit import mangle_type  # noqa: PLC0415

    probe = torch.empty(256, 512, dtype=torch.bfloat16)
    descs = _descriptors(probe, probe, probe, bm, bn, bk)
    names = ["a_desc", "b_desc", "o_desc", "offs_ptr", "E", "NB_M", "NB_N", "M"]
    signature = dict(zip(names, [mangle_type(d) for d in descs] + ["*i32"] + ["i32"] * 4, strict=True))
    constexprs = dict(zip(_CONSTEXPRS, (stages, consumer_regs, producer_regs), strict=True))
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in ("offs_ptr", "M")}
    src = GluonASTSource(_wgrad_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "maxnreg": maxnreg})


def supported(a: torch.Tensor, b: torch.Tensor, bm: int = 128) -> bool:
    """Whether ``wgrad`` takes these operands: 16-bit, the same dtype, rows of 16 bytes, a's columns a multiple of
    ``bm`` (the output's row tiles must not cross from one expert into the next)."""
    return (a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype and a.dim() == b.dim() == 2
            and a.shape[0] == b.shape[0] and a.shape[1] % bm == 0 and (b.shape[1] * a.element_size()) % 16 == 0
            and a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0)


def wgrad(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, *, bm: int = 128, bn: int = 256, bk: int = 32,
          stages: int = 6, consumer_regs: int = 232, producer_regs: int = 40, maxnreg: int = 168,
          num_programs: int | None = None) -> torch.Tensor:
    """a: [N, M], b: [N, K] rows sorted by expert, offs: [E] int32 end rows -> [E, M, K] in a's dtype, expert e's
    slice ``a[rows of e]^T @ b[rows of e]`` (fp32 accumulation; zero for an expert with no rows). Output tiles are
    ``bm`` x ``bn`` (each consumer ``bm / 2`` rows), the reduction runs in steps of ``bk`` rows through ``stages``
    shared-memory stages. The defaults measured fastest on an H200 (benchmarks/wgrad_bench.py, ms for the
    benchmark layer's first / second weight gradient): 1.695 / 0.853 against 1.726 / 0.871 with ``bk=64,
    stages=3``, 2.532 / 1.204 with ``bn=128, stages=4`` and torch's ``grouped_mm`` 1.786 / 0.978."""
    a, b = a.contiguous(), b.contiguous()
    if not supported(a, b, bm):
        raise ValueError(f"gluon_wgrad.wgrad needs 16-bit operands of the same dtype and rows, 16-byte rows and "
                         f"a's columns a multiple of bm={bm}: got a {a.dtype} {tuple(a.shape)}, b {b.dtype} "
                         f"{tuple(b.shape)}")
    offs = offs.to(torch.int32).contiguous()
    num_experts, m, k = offs.shape[0], a.shape[1], b.shape[1]
    out = a.new_empty(num_experts, m, k)
    if num_experts == 0 or out.numel() == 0 or a.shape[0] == 0:
        return out.zero_()
    a_desc, b_desc, o_desc = _descriptors(a, b, out.view(num_experts * m, k), bm, bn, bk)
    nb_m, nb_n = m // bm, triton.cdiv(k, bn)
    grid = num_programs or torch.cuda.get_device_properties(a.device).multi_processor_count
    _wgrad_kernel[(min(grid, num_experts * nb_m * nb_n),)](
        a_desc, b_desc, o_desc, offs, num_experts, nb_m, nb_n, m, STAGES=stages, CONSUMER_REGS=consumer_regs,
        PRODUCER_REGS=producer_regs, num_warps=4, maxnreg=maxnreg)
    return out
