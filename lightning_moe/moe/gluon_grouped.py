"""Warp-specialised grouped row GEMMs for Hopper, written in Gluon (``triton.experimental.gluon``).

The same products as ``triton_grouped._rows_kernel`` (``out[rows of e] = a[rows of e] @ b[e]`` with the plain,
SwiGLU and SwiGLU-backward epilogues), with the schedules of CUTLASS's Hopper kernels:

- one persistent program per SM walks the output tiles (expert row tile x column tile) of a table built on the GPU;
- a one-warp **producer** partition issues the TMA loads of every tile into a ring of shared-memory stages;
- two four-warp **consumer** partitions run the MMAs (``wgmma``) and the epilogues, either
  - **ping-pong** (default): they take alternate tiles, and while one runs its tile's MMAs the other runs its
    epilogue; an ordering barrier hands the MMA turn from one to the other; or
  - **cooperative** (``coop``, what ``CONFIGS`` uses): both work on every tile, half its rows each, and with
    ``interleave`` each tile's epilogue runs in row slices between the next tile's k-steps, so that it overlaps
    the MMAs already issued; or with ``epi_warps`` a fourth partition of that many warps runs the epilogues, the
    tiles handed to it through shared memory, and the consumers only multiply.

With ``merge`` (SwiGLU, what ``CONFIGS`` uses) each k-step's gate and up columns share one stage and one MMA.
With ``gather`` A's rows are gathered from another matrix by ``cp.async`` (four producer warps; slower than a
separate copy on an H200, docs/moe_layer_benchmark.md, so the layer does not use it).
The epilogue rounds the accumulator to 16 bits into shared memory and reads it back in row slices, so that the SwiGLU
arithmetic holds few values per thread. Rows of a tile that belong to the next expert are computed but never stored
(masked stores).

Needs a Hopper GPU (sm_90) and Triton >= 3.6 with Gluon; ``triton_grouped.ROWS`` picks it for the ``triton`` expert
kernel with the tiles of ``CONFIGS``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

_PLAIN, _SWIGLU, _SWIGLU_BWD = 0, 1, 2

# ``ws_rows_mm`` keywords per row GEMM of the experts (``triton_grouped.CONFIGS``' keys), the fastest of
# benchmarks/gluon_grouped_bench.py on an H200 (ms, Triton's ``CONFIGS`` in the same process in brackets):
CONFIGS: dict[str, dict] = {
    # all four cooperative (two consumers x 64 rows); fwd1's gate and up columns merged into one MMA per k-step
    # (1.893 ms without merging, same process); epilogues interleaved with the next tile's k-steps, except dgrad2's,
    # which four more warps run while the consumers multiply (1.168 ms interleaved, same process), its saved values
    # loaded by TMA four 8-row slices ahead (1.100 ms loaded into registers one 16-row slice ahead)
    "fwd1": {"bn": 128, "stages": 3, "coop": True, "interleave": True, "sub": 8, "merge": True},  # 1.804 (2.086)
    "fwd2": {"bn": 256, "stages": 3, "coop": True, "interleave": True, "sub": 8},  # 0.909 (0.991)
    "dgrad2": {"bn": 128, "stages": 4, "coop": True, "sub": 8, "epi_warps": 4, "consumer_regs": 160,
               "aux_stages": 5},  # 1.066 (1.408); 16-row slices, 4 stages: 1.084, same process
    "dgrad1": {"bn": 256, "stages": 3, "coop": True, "interleave": True, "sub": 8},  # 1.788 (1.864)
}

# ------------------------------------------------------------------------------------------------------------ tiles
@triton.jit
def _tile_table_kernel(offs_ptr, table_ptr, E, MAX_T, BM: tl.constexpr, E_P2: tl.constexpr, BT: tl.constexpr):
    """table[0, t], table[1, t], table[2, t] = expert, first row, end row of row tile t (each expert owns
    ceil(rows / BM) consecutive row tiles); table[3, 0] = the number of row tiles."""
    idx = tl.arange(0, E_P2)
    ends = tl.load(offs_ptr + idx, mask=idx < E, other=0)
    starts = tl.load(offs_ptr + idx - 1, mask=(idx > 0) & (idx < E), other=0)
    tiles = (ends - starts + BM - 1) // BM
    cum = tl.cumsum(tiles, 0)
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    e = tl.sum((cum[None, :] <= t[:, None]).to(tl.int32), 1)
    sel = idx[None, :] == e[:, None]
    first_tile = tl.sum(tl.where(sel, (cum - tiles)[None, :], 0), 1)
    start = tl.sum(tl.where(sel, starts[None, :], 0), 1)
    end = tl.sum(tl.where(sel, ends[None, :], 0), 1)
    ok = t < MAX_T
    tl.store(table_ptr + t, e, mask=ok)
    tl.store(table_ptr + MAX_T + t, start + (t - first_tile) * BM, mask=ok)
    tl.store(table_ptr + 2 * MAX_T + t, end, mask=ok)
    tl.store(table_ptr + 3 * MAX_T + t, tl.sum(tiles, 0) + 0 * t, mask=t == 0)


def tile_table(offs: torch.Tensor, num_rows: int, bm: int) -> tuple[torch.Tensor, int]:
    """[4, MAX_T] int32 tile table of ``offs`` (see ``_tile_table_kernel``); MAX_T bounds the row tiles any counts
    of ``num_rows`` rows can need."""
    num_experts = offs.shape[0]
    max_t = triton.cdiv(num_rows, bm) + num_experts
    table = torch.empty(4, max_t, dtype=torch.int32, device=offs.device)
    bt = 128
    _tile_table_kernel[(triton.cdiv(max_t, bt),)](offs, table, num_experts, max_t, BM=bm,
                                                  E_P2=max(16, triton.next_power_of_2(num_experts)), BT=bt)
    return table, max_t


# ------------------------------------------------------------------------------------------------------ partitions
@gluon.jit
def _now(dep):
    """The GPU's nanosecond timer (``dep`` orders the read after the value it depends on)."""
    return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dep], dtype=gl.int64, is_pure=False,
                                     pack=1)


@gluon.jit
def _acquire_stage(empty, ready, g, nbytes: gl.constexpr):
    """Ring step g's stage, once the consumers have freed it, with its ``ready`` barrier expecting ``nbytes`` of
    TMA loads: (stage index, barrier)."""
    S: gl.constexpr = empty.type.shape[0]
    s = g % S
    mbarrier.wait(empty.index(s), ((g // S) & 1) ^ 1)
    bar = ready.index(s)
    mbarrier.expect(bar, nbytes)
    return s, bar


@gluon.jit
def _load_b(b_desc, b_bufs, u_bufs, bar, s, e, k0, n0, K, HALF, N_ROWS, EPILOGUE: gl.constexpr,
            B_KMAJOR: gl.constexpr, MERGE: gl.constexpr):
    """TMA loads of expert e's B tile for k-step k0 into stage s (``MERGE``: gate and up columns side by side; the
    SwiGLU without it: the up columns into ``u_bufs``), completing on ``bar``."""
    BN: gl.constexpr = b_desc.block_type.shape[0] if B_KMAJOR else b_desc.block_type.shape[1]
    if MERGE:
        b_stage = b_bufs.index(s)
        tma.async_copy_global_to_shared(b_desc, [e * K + k0, n0], bar, b_stage.slice(0, BN, dim=1))
        tma.async_copy_global_to_shared(b_desc, [e * K + k0, HALF + n0], bar, b_stage.slice(BN, BN, dim=1))
    elif B_KMAJOR:
        tma.async_copy_global_to_shared(b_desc, [e * N_ROWS + n0, k0], bar, b_bufs.index(s))
    else:
        tma.async_copy_global_to_shared(b_desc, [e * K + k0, n0], bar, b_bufs.index(s))
    if EPILOGUE == 1 and not MERGE:
        tma.async_copy_global_to_shared(b_desc, [e * K + k0, HALF + n0], bar, u_bufs.index(s))


@gluon.jit
def _producer(a_desc, b_desc, o_desc, a_bufs, b_bufs, u_bufs, ready, empty, table_ptr, MAX_T, NB_N, K, HALF, N_ROWS,
              EPILOGUE: gl.constexpr, B_KMAJOR: gl.constexpr, MERGE: gl.constexpr, x_ptr, idx_ptr, M_ROWS, s_xm,
              GATHER: gl.constexpr, LAG: gl.constexpr, SIDE: gl.constexpr):
    """The producer partition: ``_producer_gather`` where A's rows are gathered, else ``_producer_tma``."""
    if GATHER:
        _producer_gather(x_ptr, idx_ptr, o_desc, b_desc, a_bufs, b_bufs, u_bufs, ready, empty, table_ptr, MAX_T,
                         NB_N, K, HALF, N_ROWS, M_ROWS, s_xm, EPILOGUE, B_KMAJOR, MERGE, LAG, SIDE, 4)
    else:
        _producer_tma(a_desc, b_desc, a_bufs, b_bufs, u_bufs, ready, empty, table_ptr, MAX_T, NB_N, K, HALF, N_ROWS,
                      EPILOGUE, B_KMAJOR, MERGE)


@gluon.jit
def _producer_tma(a_desc, b_desc, a_bufs, b_bufs, u_bufs, ready, empty, table_ptr, MAX_T, NB_N, K, HALF, N_ROWS,
                  EPILOGUE: gl.constexpr, B_KMAJOR: gl.constexpr, MERGE: gl.constexpr):
    """TMA loads of every k-step of every tile of this program into the stage ring (one warp). ``MERGE`` (SwiGLU):
    the gate and up columns of a k-step go side by side into one stage, [BK, 2 * BN]."""
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[0] if B_KMAJOR else b_desc.block_type.shape[1]
    nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes * (2 if EPILOGUE == 1 else 1)
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    total = gl.load(table_ptr + 3 * MAX_T) * NB_N
    ksteps = gl.cdiv(K, BK)
    g = 0
    # The next tile's table entries are loaded one tile ahead, so their latency does not stall the ring.
    rt = gl.minimum(pid // NB_N, MAX_T - 1)
    e_next = gl.load(table_ptr + rt)
    row0_next = gl.load(table_ptr + MAX_T + rt)
    for w in range(pid, total, nprog):
        n0 = (w % NB_N) * BN
        e = e_next
        row0 = row0_next
        rt = gl.minimum((w + nprog) // NB_N, MAX_T - 1)
        e_next = gl.load(table_ptr + rt)
        row0_next = gl.load(table_ptr + MAX_T + rt)
        for kk in range(ksteps):
            s, bar = _acquire_stage(empty, ready, g, nbytes)
            k0 = kk * BK
            tma.async_copy_global_to_shared(a_desc, [row0, k0], bar, a_bufs.index(s))
            _load_b(b_desc, b_bufs, u_bufs, bar, s, e, k0, n0, K, HALF, N_ROWS, EPILOGUE, B_KMAJOR, MERGE)
            g += 1


@gluon.jit
def _gather_release(o_desc, a_bufs, ready, q, row_q, k_q, store_q, LAG: gl.constexpr, SIDE: gl.constexpr):
    """Ring step q's gathered A rows have landed (each thread waits for its own copies, LAG steps later): make them
    visible to the MMAs (``wgmma`` reads shared memory through the async proxy, the copies wrote it through the
    generic one) and to the side store, then mark the stage ready; with ``SIDE`` and ``store_q``, store it to
    ``o_desc`` at [row_q, k_q] by TMA."""
    S: gl.constexpr = a_bufs.type.shape[0]
    async_copy.wait_group(LAG)
    fence_async_shared()
    if SIDE:
        # The stage refilled next held step q + LAG + 1 - S, stored (if at all) S - LAG - 1 releases ago.
        tma.store_wait(S - LAG - 2)
    gl.thread_barrier()  # every thread's copies of step q are visible (and older stores have read their stages)
    mbarrier.arrive(ready.index(q % S))
    if SIDE:
        if store_q:
            tma.async_copy_shared_to_global(o_desc, [row_q, k_q], a_bufs.index(q % S))


@gluon.jit
def _producer_gather(x_ptr, idx_ptr, o_desc, b_desc, a_bufs, b_bufs, u_bufs, ready, empty, table_ptr, MAX_T, NB_N,
                     K, HALF, N_ROWS, M_ROWS, s_xm, EPILOGUE: gl.constexpr, B_KMAJOR: gl.constexpr, MERGE: gl.constexpr,
                     LAG: gl.constexpr, SIDE: gl.constexpr, num_warps: gl.constexpr):
    """``_producer`` whose A rows are gathered: routed row r of the tile is row ``idx[r]`` of ``x`` ([T, K], row
    stride s_xm), copied by ``cp.async`` (Hopper's TMA has no gather) by this partition's ``num_warps`` warps, 16
    bytes per copy; B still comes by TMA. A stage is marked ready LAG ring steps after its copies are issued
    (``_gather_release``), so LAG + 1 steps of copies are in flight. ``SIDE``: the gathered tile is also stored to
    ``o_desc`` (the routed rows [M, K]) from the first column tile of each row tile, for the weight gradient that
    needs them in row order."""
    BM: gl.constexpr = a_bufs.type.shape[1]
    BK: gl.constexpr = a_bufs.type.shape[2]
    BN: gl.constexpr = b_desc.block_type.shape[0] if B_KMAJOR else b_desc.block_type.shape[1]
    S: gl.constexpr = a_bufs.type.shape[0]
    gl.static_assert(S >= LAG + 2, "a gathered stage is released LAG steps after its copies: STAGES >= LAG + 2")
    nbytes: gl.constexpr = b_desc.block_type.nbytes * (2 if EPILOGUE == 1 else 1)
    # 16-byte copies, two threads per row side by side (one 32-byte sector per pair and instruction), so that
    # each thread keeps the addresses of few rows (BM / (16 * num_warps)) in its few registers.
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [16, 2], [num_warps, 1], [1, 0])
    rows_l = gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
    kcols = gl.arange(0, BK, layout=gl.SliceLayout(0, layout))
    # Multiples of 8 the compiler sees (16-byte copies; ``ws_rows_mm`` checks them; see _epilogue_copies).
    s_xm = (s_xm // 8) * 8
    K8 = (K // 8) * 8
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    total = gl.load(table_ptr + 3 * MAX_T) * NB_N
    ksteps = gl.cdiv(K, BK)
    g = 0
    # The step LAG behind, whose stage is released after this step's copies are issued: its row tile, k and
    # whether it is stored (in registers of this partition, a few steps of a tile).
    q_row = pid * 0
    q_k = pid * 0
    q_store = pid < 0
    prev_rows = pid * 0
    prev_k = pid * 0
    prev_store = pid < 0
    for w in range(pid, total, nprog):
        n0 = (w % NB_N) * BN
        rt = w // NB_N
        e = gl.load(table_ptr + rt)
        row0 = gl.load(table_ptr + MAX_T + rt)
        rows = row0 + rows_l
        row_ok = rows < M_ROWS
        tok = gl.load(idx_ptr + rows, mask=row_ok, other=0)
        src = x_ptr + tok.to(gl.int64)[:, None] * s_xm
        store = (w % NB_N) == 0
        for kk in range(ksteps):
            s, bar = _acquire_stage(empty, ready, g, nbytes)
            k0 = kk * BK
            _load_b(b_desc, b_bufs, u_bufs, bar, s, e, k0, n0, K, HALF, N_ROWS, EPILOGUE, B_KMAJOR, MERGE)
            kc = k0 + kcols
            async_copy.async_copy_global_to_shared(a_bufs.index(s), src + kc[None, :],
                                                   mask=row_ok[:, None] & (kc < K8)[None, :])
            async_copy.commit_group()
            if g >= LAG:
                _gather_release(o_desc, a_bufs, ready, g - LAG, q_row, q_k, q_store, LAG, SIDE)
            # shift the window of steps in flight (LAG of 1 or 2)
            if LAG == 2:
                q_row = prev_rows
                q_k = prev_k
                q_store = prev_store
                prev_rows = row0
                prev_k = k0
                prev_store = store
            else:
                q_row = row0
                q_k = k0
                q_store = store
            g += 1
    # the last LAG steps
    if LAG == 2:
        if g >= 2:
            _gather_release(o_desc, a_bufs, ready, g - 2, q_row, q_k, q_store, 1, SIDE)
        if g >= 1:
            _gather_release(o_desc, a_bufs, ready, g - 1, prev_rows, prev_k, prev_store, 0, SIDE)
    else:
        if g >= 1:
            _gather_release(o_desc, a_bufs, ready, g - 1, q_row, q_k, q_store, 0, SIDE)
    if SIDE:
        tma.store_wait(0)


@gluon.jit
def _mma_step(a_bufs, b_bufs, u_bufs, ready, empty, g0, kk, acc, acc_up,
              EPILOGUE: gl.constexpr, B_KMAJOR: gl.constexpr, A_ROW: gl.constexpr, A_ROWS: gl.constexpr,
              MERGE: gl.constexpr, LIVE: gl.constexpr = True):
    """k-step kk of a tile whose first ring step is g0: wait for its stage, issue its MMAs (rows A_ROW ..
    A_ROW + A_ROWS of the A tile), and release the previous step's stage once the MMAs reading it have completed.
    Not ``LIVE`` (none of those rows belongs to the tile's expert): wait for the stage and release it, no MMAs."""
    S: gl.constexpr = a_bufs.type.shape[0]
    g = g0 + kk
    s = g % S
    mbarrier.wait(ready.index(s), (g // S) & 1)
    if not LIVE:
        mbarrier.arrive(empty.index(s))
    else:
        a = a_bufs.index(s)
        if A_ROWS != a_bufs.type.shape[1]:
            a = a.slice(A_ROW, A_ROWS, dim=0)
        if B_KMAJOR:
            acc = warpgroup_mma(a, b_bufs.index(s).permute((1, 0)), acc, use_acc=kk > 0, is_async=True)
        else:
            acc = warpgroup_mma(a, b_bufs.index(s), acc, use_acc=kk > 0, is_async=True)
        if EPILOGUE == 1 and not MERGE:
            acc_up = warpgroup_mma(a, u_bufs.index(s), acc_up, use_acc=kk > 0, is_async=True)
            acc, acc_up = warpgroup_mma_wait(num_outstanding=2, deps=(acc, acc_up))
        else:
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        mbarrier.arrive(empty.index((g + S - 1) % S), pred=kk > 0)
    return acc, acc_up


@gluon.jit
def _mma_drain(empty, g0, ksteps, acc, acc_up, EPILOGUE: gl.constexpr, MERGE: gl.constexpr,
               LIVE: gl.constexpr = True):
    """Wait for a tile's last MMAs and release its last stage (not ``LIVE``: ``_mma_step`` released every one)."""
    S: gl.constexpr = empty.type.shape[0]
    if LIVE:
        if EPILOGUE == 1 and not MERGE:
            acc, acc_up = warpgroup_mma_wait(num_outstanding=0, deps=(acc, acc_up))
        else:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index((g0 + ksteps - 1) % S))
    return acc, acc_up


@gluon.jit
def _mainloop(a_bufs, b_bufs, u_bufs, ready, empty, g0, ksteps, acc, acc_up,
              EPILOGUE: gl.constexpr, B_KMAJOR: gl.constexpr, A_ROW: gl.constexpr, A_ROWS: gl.constexpr,
              MERGE: gl.constexpr, LIVE: gl.constexpr = True):
    """acc (and acc_up for SwiGLU without MERGE) = rows A_ROW .. A_ROW + A_ROWS of the tile's product over the
    stages of ring steps g0 .. g0 + ksteps - 1; each stage is released as soon as the MMAs reading it have
    completed (not ``LIVE``: as soon as it is loaded, acc unchanged)."""
    for kk in range(ksteps):
        acc, acc_up = _mma_step(a_bufs, b_bufs, u_bufs, ready, empty, g0, kk, acc, acc_up, EPILOGUE, B_KMAJOR,
                                A_ROW, A_ROWS, MERGE, LIVE)
    return _mma_drain(empty, g0, ksteps, acc, acc_up, EPILOGUE, MERGE, LIVE)


@gluon.jit
def _mainloop_interleaved(a_bufs, b_bufs, u_bufs, ready, empty, g0, ksteps, acc, acc_up,
                          epi_smem, up_smem, staged, prow0, prow_end, ptn, N, HALF,
                          c_ptr, aux_ptr, h_ptr, rw_ptr, drw_ptr, s_cm, s_auxm, s_hm, s_drw,
                          EPILOGUE: gl.constexpr, B_KMAJOR: gl.constexpr, A_ROW: gl.constexpr,
                          A_ROWS: gl.constexpr, HAS_RW: gl.constexpr, SUB: gl.constexpr, MERGE: gl.constexpr,
                          LIVE: gl.constexpr = True):
    """``_mainloop``, with the previous tile's epilogue (rows prow0 .. prow_end, column tile ptn, waiting in
    ``epi_smem``) run one row slice after every ksteps / slices k-steps, while the tensor cores work through the
    MMAs issued before it. A first tile passes prow_end = prow0: every store of its epilogue is masked off.
    Not ``LIVE``: the k-steps only pass the stages on (``_mma_step``), the epilogue slices run all the same.

    A slice's saved gate/up values and row weights come by ``cp.async`` into ``staged`` (two buffers), issued one
    slice ahead: loads into registers would hold up the next k-step, whose ``wgmma`` fence waits for every load in
    flight to the warp's registers (one memory round trip per slice)."""
    BN: gl.constexpr = _out_cols(epi_smem.type.shape[1], MERGE)
    NSL: gl.constexpr = epi_smem.type.shape[0] // SUB
    layout: gl.constexpr = _epilogue_layout(BN, 4)
    cols = ptn * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
    col_ok = cols < (N // 8) * 8  # see _epilogue_copies
    kps = ksteps // NSL
    _epilogue_copies(staged, 0, prow0, prow_end, cols, col_ok, aux_ptr, rw_ptr, s_auxm, HALF, EPILOGUE, HAS_RW,
                     SUB, layout)
    for r in gl.static_range(NSL):
        for kk in range(r * kps, (r + 1) * kps):
            acc, acc_up = _mma_step(a_bufs, b_bufs, u_bufs, ready, empty, g0, kk, acc, acc_up, EPILOGUE, B_KMAJOR,
                                    A_ROW, A_ROWS, MERGE, LIVE)
        async_copy.wait_group(0)
        # Every thread's copies of slice r have landed, and every thread is done reading slice r - 1's buffer,
        # which the copies of slice r + 1 overwrite.
        gl.thread_barrier()
        cur = _epilogue_staged(staged, r, EPILOGUE, HAS_RW, SUB, layout)
        if r + 1 < NSL:
            _epilogue_copies(staged, r + 1, prow0, prow_end, cols, col_ok, aux_ptr, rw_ptr, s_auxm, HALF, EPILOGUE,
                             HAS_RW, SUB, layout)
        _epilogue_slice(epi_smem, up_smem, r, cur, prow0, prow_end, cols, col_ok, ptn, HALF, c_ptr, h_ptr, drw_ptr,
                        s_cm, s_hm, s_drw, EPILOGUE, HAS_RW, SUB, layout, MERGE)
    for kk in range(NSL * kps, ksteps):
        acc, acc_up = _mma_step(a_bufs, b_bufs, u_bufs, ready, empty, g0, kk, acc, acc_up, EPILOGUE, B_KMAJOR,
                                A_ROW, A_ROWS, MERGE, LIVE)
    return _mma_drain(empty, g0, ksteps, acc, acc_up, EPILOGUE, MERGE, LIVE)


@gluon.jit
def _sigmoid(x):
    """1 / (1 + exp(-x)) of float32 x with the approximate ``ex2`` and ``rcp`` and no subnormal range checks
    (``.ftz``: about 4 instructions instead of 13; results differ only where they are below 1e-37 or round to 1)."""
    return gl.inline_asm_elementwise(
        "{ .reg .f32 t; mul.f32 t, $1, 0fBFB8AA3B; ex2.approx.ftz.f32 t, t; add.f32 t, t, 0f3F800000; "
        "rcp.approx.ftz.f32 $0, t; }", "=f,f", [x], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _round_bf16(x):
    """float32 x rounded to bfloat16 (to nearest even) and back, two values per conversion."""
    return gl.inline_asm_elementwise(
        "{ .reg .b32 p; cvt.rn.bf16x2.f32 p, $3, $2; shl.b32 $0, p, 16; and.b32 $1, p, 0xffff0000; }",
        "=f,=f,f,f", [x], dtype=gl.float32, is_pure=True, pack=2)


@gluon.jit
def _epilogue_loads(row0, r: gl.constexpr, row_end, cols, col_ok, aux_ptr, rw_ptr, s_auxm, HALF,
                    EPILOGUE: gl.constexpr, HAS_RW: gl.constexpr, SUB: gl.constexpr, layout: gl.constexpr):
    """Global loads of row slice r of the epilogue: saved gate and up values (SwiGLU backward) and row weights."""
    rows = row0 + r * SUB + gl.arange(0, SUB, layout=gl.SliceLayout(1, layout))
    row_ok = rows < row_end
    rows64 = rows.to(gl.int64)
    g = gl.zeros([SUB, 1], gl.bfloat16, layout)
    up = g
    w = gl.zeros([SUB], gl.float32, gl.SliceLayout(1, layout))
    if EPILOGUE == 2:
        mask = row_ok[:, None] & col_ok[None, :]
        aux_ptrs = aux_ptr + rows64[:, None] * s_auxm + cols[None, :]
        g = gl.load(aux_ptrs, mask=mask, other=0.0)
        up = gl.load(aux_ptrs + HALF, mask=mask, other=0.0)
    if HAS_RW:
        w = gl.load(rw_ptr + rows64, mask=row_ok, other=0.0)
    return g, up, w


@gluon.jit
def _epilogue_copies(staged, r: gl.constexpr, row0, row_end, cols, col_ok, aux_ptr, rw_ptr, s_auxm, HALF,
                     EPILOGUE: gl.constexpr, HAS_RW: gl.constexpr, SUB: gl.constexpr, layout: gl.constexpr):
    """``_epilogue_loads`` of row slice r as ``cp.async`` copies into buffer r % 2 of ``staged`` (gate, up, row
    weights), one commit group; masked elements are zero-filled."""
    g_st, u_st, w_st = staged
    # 16-byte copies: the host passes sizes and strides that are multiples of 8 elements (TMA needs as much, and
    # ``ws_rows_mm`` checks), but the launcher only tells the compiler of multiples of 16, and ``gl.multiple_of``
    # does not reach scalars: written as products of 8, the compiler sees it.
    HALF = (HALF // 8) * 8
    s_auxm = (s_auxm // 8) * 8
    rows = row0 + r * SUB + gl.arange(0, SUB, layout=gl.SliceLayout(1, layout))
    row_ok = rows < row_end
    rows64 = rows.to(gl.int64)
    if EPILOGUE == 2:
        mask = row_ok[:, None] & col_ok[None, :]
        aux_ptrs = aux_ptr + rows64[:, None] * s_auxm + cols[None, :]
        async_copy.async_copy_global_to_shared(g_st.index(r % 2), aux_ptrs, mask=mask)
        async_copy.async_copy_global_to_shared(u_st.index(r % 2), aux_ptrs + HALF, mask=mask)
    if HAS_RW:
        async_copy.async_copy_global_to_shared(w_st.index(r % 2), rw_ptr + rows64, mask=row_ok)
    async_copy.commit_group()


@gluon.jit
def _epilogue_staged(staged, r: gl.constexpr, EPILOGUE: gl.constexpr, HAS_RW: gl.constexpr, SUB: gl.constexpr,
                     layout: gl.constexpr):
    """Row slice r's values copied by ``_epilogue_copies``, as ``_epilogue_loads`` returns them."""
    g_st, u_st, w_st = staged
    g = gl.zeros([SUB, 1], gl.bfloat16, layout)
    up = g
    w = gl.zeros([SUB], gl.float32, gl.SliceLayout(1, layout))
    if EPILOGUE == 2:
        g = g_st.index(r % 2).load(layout)
        up = u_st.index(r % 2).load(layout)
    if HAS_RW:
        w = w_st.index(r % 2).load(gl.SliceLayout(1, layout))
    return g, up, w


@gluon.constexpr_function
def _out_cols(epi_cols, MERGE):
    """Output columns of a tile: the epilogue buffer holds the gate and up columns side by side with MERGE."""
    return epi_cols // 2 if MERGE else epi_cols


@gluon.constexpr_function
def _epilogue_layout(BN, num_warps):
    """Registers of an epilogue row slice: 8 consecutive columns (16 bytes) per thread, rows across warps."""
    tpw_n = min(BN // 8, 32)
    return gl.BlockedLayout([1, 8], [32 // tpw_n, tpw_n], [num_warps, 1], [1, 0])


@gluon.jit
def _epilogue_slice(epi_smem, up_smem, r: gl.constexpr, loaded, row0, row_end, cols, col_ok, tn, HALF,
                    c_ptr, h_ptr, drw_ptr, s_cm, s_hm, s_drw,
                    EPILOGUE: gl.constexpr, HAS_RW: gl.constexpr, SUB: gl.constexpr, layout: gl.constexpr,
                    MERGE: gl.constexpr):
    """Row slice r of a tile's epilogue: its values from shared memory, SwiGLU (backward) with the slice's
    ``loaded`` values (``_epilogue_loads``), masked stores."""
    g_in, up_in, w = loaded
    rows = row0 + r * SUB + gl.arange(0, SUB, layout=gl.SliceLayout(1, layout))
    row_ok = rows < row_end
    rows64 = rows.to(gl.int64)
    mask = row_ok[:, None] & col_ok[None, :]
    BN: gl.constexpr = _out_cols(epi_smem.type.shape[1], MERGE)
    slice_smem = epi_smem.slice(r * SUB, SUB, dim=0)
    if MERGE:
        v = slice_smem.slice(0, BN, dim=1).load(layout)
    else:
        v = slice_smem.load(layout)
    c_ptrs = c_ptr + rows64[:, None] * s_cm + cols[None, :]
    if EPILOGUE == 0:
        gl.store(c_ptrs, v, mask=mask)
    elif EPILOGUE == 1:
        if MERGE:
            up = slice_smem.slice(BN, BN, dim=1).load(layout)
        else:
            up = up_smem.slice(r * SUB, SUB, dim=0).load(layout)
        gl.store(c_ptrs, v, mask=mask)
        gl.store(c_ptrs + HALF, up, mask=mask)
        g = v.to(gl.float32)
        h = g * _sigmoid(g) * up.to(gl.float32)
        if HAS_RW:
            h = _round_bf16(h) * w[:, None]
        gl.store(h_ptr + rows64[:, None] * s_hm + cols[None, :], h.to(v.dtype), mask=mask)
    else:
        g = g_in.to(gl.float32)
        up = up_in.to(gl.float32)
        dh = v.to(gl.float32)
        sig = _sigmoid(g)
        silu = g * sig
        if HAS_RW:
            # Masked rows and columns hold g = up = 0 (so h = 0) and a finite dh (TMA fills outside the operands
            # with zeros): their products add nothing.
            part = gl.sum(dh * _round_bf16(silu * up), 1)
            gl.store(drw_ptr + tn * s_drw + rows64, part, mask=row_ok)
            dh = _round_bf16(dh * w[:, None])
        # d silu / dg = sig * (1 + g * (1 - sig)) = sig + silu * (1 - sig)
        d_gate = dh * up * (sig + (silu - silu * sig))
        d_up = dh * silu
        gl.store(c_ptrs, d_gate.to(v.dtype), mask=mask)
        gl.store(c_ptrs + HALF, d_up.to(v.dtype), mask=mask)


@gluon.jit
def _epilogue(epi_smem, up_smem, row0, row_end, n0, tn, N, HALF,
              c_ptr, aux_ptr, h_ptr, rw_ptr, drw_ptr, s_cm, s_auxm, s_hm, s_drw,
              EPILOGUE: gl.constexpr, HAS_RW: gl.constexpr, SUB: gl.constexpr, num_warps: gl.constexpr,
              MERGE: gl.constexpr, ready=None, phase=0):
    """Stores of one tile from its 16-bit copy in shared memory, SUB rows at a time.

    The global loads of row slice r + 1 are issued before slice r is computed and stored: while the other consumer
    streams its operands a round trip to memory takes microseconds, and loads issued only when their slice comes
    up would cost one round trip per slice. ``ready``: a barrier that says the tile is in shared memory (waited for
    at ``phase`` after the first slice's loads are issued)."""
    BM: gl.constexpr = epi_smem.type.shape[0]
    BN: gl.constexpr = _out_cols(epi_smem.type.shape[1], MERGE)
    layout: gl.constexpr = _epilogue_layout(BN, num_warps)
    cols = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
    col_ok = cols < N
    nxt = _epilogue_loads(row0, 0, row_end, cols, col_ok, aux_ptr, rw_ptr, s_auxm, HALF, EPILOGUE, HAS_RW, SUB,
                          layout)
    if ready is not None:
        mbarrier.wait(ready, phase)
    for r in gl.static_range(BM // SUB):
        cur = nxt
        if r + 1 < BM // SUB:
            nxt = _epilogue_loads(row0, r + 1, row_end, cols, col_ok, aux_ptr, rw_ptr, s_auxm, HALF, EPILOGUE,
                                  HAS_RW, SUB, layout)
        _epilogue_slice(epi_smem, up_smem, r, cur, row0, row_end, cols, col_ok, tn, HALF, c_ptr, h_ptr, drw_ptr,
                        s_cm, s_hm, s_drw, EPILOGUE, HAS_RW, SUB, layout, MERGE)


@gluon.jit
def _aux_issue(g_desc, u_desc, aux_bufs, aux_ready, q, row, col, pred):
    """TMA loads of the saved gate and up values of one epilogue row slice (rows row .., columns col ..) into
    buffer q % stages of the ring ``aux_bufs`` ([2 x stages, SUB, BN]: gate and up of each), skipped where not
    ``pred``."""
    NA: gl.constexpr = aux_ready.type.shape[0]
    s = q % NA
    bar = aux_ready.index(s)
    mbarrier.expect(bar, 2 * g_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(g_desc, [row, col], bar, aux_bufs.index(2 * s), pred=pred)
    tma.async_copy_global_to_shared(u_desc, [row, col], bar, aux_bufs.index(2 * s + 1), pred=pred)


@gluon.jit
def _epilogue_aux_tma(epi_smem, ready, phase, g_desc, u_desc, aux_bufs, aux_ready, j, row0, row_end, tn, row0_n,
                      tn_n, live_n, N, HALF, c_ptr, aux_ptr, h_ptr, rw_ptr, drw_ptr, s_cm, s_auxm, s_hm, s_drw,
                      HAS_RW: gl.constexpr, SUB: gl.constexpr, num_warps: gl.constexpr):
    """``_epilogue`` of the SwiGLU backward for an epilogue partition, whose saved gate and up values come by TMA
    through a ring of row slices, stages - 1 slices ahead of the one computed, across tiles (the next tile of this
    program: rows from row0_n, column tile tn_n, if ``live_n``): loads into registers one slice ahead leave too few
    bytes in flight to cover the memory's latency. Only the row weights are loaded into registers. This tile is
    the j-th of the program; its slices are j x slices .. in the ring's order."""
    BM: gl.constexpr = epi_smem.type.shape[0]
    BN: gl.constexpr = epi_smem.type.shape[1]
    NSL: gl.constexpr = BM // SUB
    NA: gl.constexpr = aux_ready.type.shape[0]
    LA: gl.constexpr = NA - 1
    layout: gl.constexpr = _epilogue_layout(BN, num_warps)
    cols = tn * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
    col_ok = cols < N
    nxt = _epilogue_loads(row0, 0, row_end, cols, col_ok, aux_ptr, rw_ptr, s_auxm, HALF, 0, HAS_RW, SUB, layout)
    mbarrier.wait(ready, phase)
    for r in gl.static_range(NSL):
        q = j * NSL + r
        cur = nxt
        if r + 1 < NSL:
            nxt = _epilogue_loads(row0, r + 1, row_end, cols, col_ok, aux_ptr, rw_ptr, s_auxm, HALF, 0, HAS_RW,
                                  SUB, layout)
        gl.thread_barrier()  # every warp is done reading slice q - 1's buffer, which slice q + LA reuses
        if r + LA < NSL:
            _aux_issue(g_desc, u_desc, aux_bufs, aux_ready, q + LA, row0 + (r + LA) * SUB, tn * BN, True)
        else:
            _aux_issue(g_desc, u_desc, aux_bufs, aux_ready, q + LA, row0_n + (r + LA - NSL) * SUB, tn_n * BN,
                       live_n)
        mbarrier.wait(aux_ready.index(q % NA), (q // NA) & 1)
        g = aux_bufs.index(2 * (q % NA)).load(layout)
        up = aux_bufs.index(2 * (q % NA) + 1).load(layout)
        _epilogue_slice(epi_smem, epi_smem, r, (g, up, cur[2]), row0, row_end, cols, col_ok, tn, HALF, c_ptr, h_ptr,
                        drw_ptr, s_cm, s_hm, s_drw, 2, HAS_RW, SUB, layout, False)


@gluon.jit
def _epilogue_partition(epi_bufs, handoff, g_desc, u_desc, aux_bufs, aux_ready, table_ptr, MAX_T, NB_N, N, HALF,
                        c_ptr, aux_ptr, h_ptr, rw_ptr, drw_ptr, s_cm, s_auxm, s_hm, s_drw, EPILOGUE: gl.constexpr,
                        HAS_RW: gl.constexpr, SUB: gl.constexpr, EPI_WARPS: gl.constexpr, MERGE: gl.constexpr,
                        AUX_STAGES: gl.constexpr):
    """``EPI_WARPS`` warps that run the epilogue of every tile of this program, whole tiles, while the consumers
    multiply the next one: they wait for tile j in buffer j % NBUF of ``epi_bufs`` (both consumers' halves), and
    free the buffer once it is stored. ``AUX_STAGES`` (SwiGLU backward): the saved gate and up values come by TMA
    (``_epilogue_aux_tma``)."""
    full, free = handoff
    NBUF: gl.constexpr = epi_bufs.type.shape[0]
    BN: gl.constexpr = _out_cols(epi_bufs.type.shape[2], MERGE)
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    total = gl.load(table_ptr + 3 * MAX_T) * NB_N
    if AUX_STAGES:  # the first tile's first slices
        row0_n = gl.load(table_ptr + MAX_T + gl.minimum(pid // NB_N, MAX_T - 1))
        for r in gl.static_range(AUX_STAGES - 1):
            _aux_issue(g_desc, u_desc, aux_bufs, aux_ready, r, row0_n + r * SUB, (pid % NB_N) * BN, pid < total)
    j = 0
    for w in range(pid, total, nprog):
        rt = w // NB_N
        tn = w % NB_N
        row0 = gl.load(table_ptr + MAX_T + rt)
        row_end = gl.load(table_ptr + 2 * MAX_T + rt)
        buf = epi_bufs.index(j % NBUF)
        if AUX_STAGES:
            w_n = w + nprog
            row0_n = gl.load(table_ptr + MAX_T + gl.minimum(w_n // NB_N, MAX_T - 1))
            _epilogue_aux_tma(buf, full.index(j % NBUF), (j // NBUF) & 1, g_desc, u_desc, aux_bufs, aux_ready, j,
                              row0, row_end, tn, row0_n, w_n % NB_N, w_n < total, N, HALF, c_ptr, aux_ptr, h_ptr,
                              rw_ptr, drw_ptr, s_cm, s_auxm, s_hm, s_drw, HAS_RW, SUB, EPI_WARPS)
        else:
            _epilogue(buf, buf, row0, row_end, tn * BN, tn, N, HALF, c_ptr, aux_ptr, h_ptr, rw_ptr, drw_ptr,
                      s_cm, s_auxm, s_hm, s_drw, EPILOGUE, HAS_RW, SUB, EPI_WARPS, MERGE, full.index(j % NBUF),
                      (j // NBUF) & 1)
        gl.thread_barrier()  # every warp is done reading the buffer
        mbarrier.arrive(free.index(j % NBUF))
        j += 1


@gluon.jit
def _consumer(c_id, a_bufs, b_bufs, u_bufs, ready, empty, order, epi_smem, up_smem, staged, handoff, table_ptr,
              MAX_T, NB_N, K, N, HALF, c_ptr, aux_ptr, h_ptr, rw_ptr, drw_ptr, s_cm, s_auxm, s_hm, s_drw, dbg_ptr,
              EPILOGUE: gl.constexpr, B_KMAJOR: gl.constexpr, HAS_RW: gl.constexpr, SUB: gl.constexpr,
              TIMING: gl.constexpr, COOP: gl.constexpr, INTERLEAVE: gl.constexpr, MERGE: gl.constexpr,
              EPI_WARPS: gl.constexpr, SKIP_IDLE: gl.constexpr):
    """Ping-pong: tiles c_id, c_id + 2, ... of this program (four warps), MMAs in turn with the other consumer,
    then the epilogue while the other one multiplies. Cooperative (``COOP``): every tile of this program, rows
    c_id * BM .. (c_id + 1) * BM of it, both consumers at once; with ``INTERLEAVE`` each tile's epilogue runs in
    slices between the next tile's k-steps (``_mainloop_interleaved``); with ``EPI_WARPS`` the consumers only
    multiply, and hand each tile to the epilogue partition (``_epilogue_partition``) through the buffers of
    ``epi_smem`` ([buffers, tile rows, columns]; ``handoff``: their full and free barriers). ``SKIP_IDLE``
    (cooperative): no MMAs for a tile whose rows of this consumer all belong to the next expert.
    """
    BM: gl.constexpr = a_bufs.type.shape[1] // 2 if COOP else a_bufs.type.shape[1]  # rows this consumer computes
    BK: gl.constexpr = a_bufs.type.shape[2]
    BN_ACC: gl.constexpr = epi_smem.type.shape[-1]  # accumulator columns (gate and up with MERGE)
    BN: gl.constexpr = _out_cols(BN_ACC, MERGE)  # output columns
    A_ROW: gl.constexpr = c_id * BM if COOP else 0
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BN_ACC, 16])
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    total = gl.load(table_ptr + 3 * MAX_T) * NB_N
    ksteps = gl.cdiv(K, BK)
    if COOP:
        j = 0
        first = pid
        step = nprog
        row_off = A_ROW
    else:
        j = c_id  # index of the tile among this program's tiles
        first = pid + c_id * nprog
        step = 2 * nprog
        row_off = 0
    if TIMING:
        t_begin = _now(pid)
    prow0 = pid * 0  # the previous tile (INTERLEAVE): none yet, so its epilogue stores nothing
    prow_end = prow0
    ptn = prow0
    for w in range(first, total, step):
        rt = w // NB_N
        tn = w % NB_N
        row0 = gl.load(table_ptr + MAX_T + rt) + row_off
        row_end = gl.load(table_ptr + 2 * MAX_T + rt)
        if TIMING:
            t0 = _now(j)
        if not COOP:
            # My MMA turn comes after the other consumer has issued the MMAs of tile j - 1.
            mbarrier.wait(order.index(c_id), (j // 2 - 1 + c_id) & 1, pred=j > 0)
        if TIMING:
            t1 = _now(j)
        acc = gl.zeros([BM, BN_ACC], gl.float32, mma_layout)
        if MERGE:
            acc_up = acc  # unused: the gate and up columns share acc
        else:
            acc_up = gl.zeros([BM, BN], gl.float32, mma_layout)
        # Cooperative: the last row tile of an expert is partly the next expert's rows, and where this consumer's
        # half holds none of its own the other consumer multiplies alone (about half the MMAs wasted on such tiles).
        if SKIP_IDLE and COOP and row0 >= row_end:
            if INTERLEAVE:
                acc, acc_up = _mainloop_interleaved(a_bufs, b_bufs, u_bufs, ready, empty, j * ksteps, ksteps, acc,
                                                    acc_up, epi_smem, up_smem, staged, prow0, prow_end, ptn, N, HALF,
                                                    c_ptr, aux_ptr, h_ptr, rw_ptr, drw_ptr, s_cm, s_auxm, s_hm, s_drw,
                                                    EPILOGUE, B_KMAJOR, A_ROW, BM, HAS_RW, SUB, MERGE, False)
            else:
                acc, acc_up = _mainloop(a_bufs, b_bufs, u_bufs, ready, empty, j * ksteps, ksteps, acc, acc_up,
                                        EPILOGUE, B_KMAJOR, A_ROW, BM, MERGE, False)
        elif INTERLEAVE:
            acc, acc_up = _mainloop_interleaved(a_bufs, b_bufs, u_bufs, ready, empty, j * ksteps, ksteps, acc, acc_up,
                                                epi_smem, up_smem, staged, prow0, prow_end, ptn, N, HALF, c_ptr,
                                                aux_ptr, h_ptr, rw_ptr, drw_ptr, s_cm, s_auxm, s_hm, s_drw,
                                                EPILOGUE, B_KMAJOR, A_ROW, BM, HAS_RW, SUB, MERGE)
        else:
            acc, acc_up = _mainloop(a_bufs, b_bufs, u_bufs, ready, empty, j * ksteps, ksteps, acc, acc_up,
                                    EPILOGUE, B_KMAJOR, A_ROW, BM, MERGE)
        if INTERLEAVE:
            gl.thread_barrier()  # every warp is done with the previous tile's values in epi_smem
        if not COOP:
            mbarrier.arrive(order.index(1 - c_id))
        if TIMING:
            t2 = _now(j)
        if EPI_WARPS:
            full, free = handoff
            NBUF: gl.constexpr = epi_smem.type.shape[0]
            mbarrier.wait(free.index(j % NBUF), ((j // NBUF) & 1) ^ 1)
            epi_smem.index(j % NBUF).slice(A_ROW, BM, dim=0).store(acc.to(c_ptr.dtype.element_ty))
        else:
            epi_smem.store(acc.to(c_ptr.dtype.element_ty))
        if EPILOGUE == 1 and not MERGE:
            up_smem.store(acc_up.to(c_ptr.dtype.element_ty))
        gl.thread_barrier()
        if EPI_WARPS:
            mbarrier.arrive(full.index(j % NBUF))
        elif INTERLEAVE:
            prow0 = row0
            prow_end = row_end
            ptn = tn
        else:
            _epilogue(epi_smem, up_smem, row0, row_end, tn * BN, tn, N, HALF, c_ptr, aux_ptr, h_ptr, rw_ptr,
                      drw_ptr, s_cm, s_auxm, s_hm, s_drw, EPILOGUE, HAS_RW, SUB, 4, MERGE)
            gl.thread_barrier()
        if TIMING:
            # Program 0's first 64 tiles: [tile, (before the turn, turn, MMAs done, epilogue done)] in ns.
            t3 = _now(j)
            ok = (pid == 0) & (j < 64)
            gl.store(dbg_ptr + j * 4, t0, mask=ok)
            gl.store(dbg_ptr + j * 4 + 1, t1, mask=ok)
            gl.store(dbg_ptr + j * 4 + 2, t2, mask=ok)
            gl.store(dbg_ptr + j * 4 + 3, t3, mask=ok)
        if COOP:
            j += 1
        else:
            j += 2
    if INTERLEAVE:  # the last tile's epilogue
        _epilogue(epi_smem, up_smem, prow0, prow_end, ptn * BN, ptn, N, HALF, c_ptr, aux_ptr, h_ptr, rw_ptr,
                  drw_ptr, s_cm, s_auxm, s_hm, s_drw, EPILOGUE, HAS_RW, SUB, 4, MERGE)
    if TIMING:
        # Every program, consumer c_id: [256 + 4 * pid + 2 * c_id + (start, end)] in ns.
        t_end = _now(j)
        gl.store(dbg_ptr + 256 + 4 * pid + 2 * c_id, t_begin)
        gl.store(dbg_ptr + 256 + 4 * pid + 2 * c_id + 1, t_end)


@gluon.jit
def _ws_rows_kernel(
    a_desc, b_desc, g_desc, u_desc, o_desc, c_ptr, aux_ptr, h_ptr, rw_ptr, drw_ptr, table_ptr, dbg_ptr, x_ptr,
    idx_ptr, MAX_T, N, K, NB_N, HALF, N_ROWS, s_cm, s_auxm, s_hm, s_drw, M_ROWS, s_xm,
    STAGES: gl.constexpr, EPILOGUE: gl.constexpr, B_KMAJOR: gl.constexpr, HAS_RW: gl.constexpr,
    SUB: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, TIMING: gl.constexpr,
    COOP: gl.constexpr, INTERLEAVE: gl.constexpr, MERGE: gl.constexpr, EPI_WARPS: gl.constexpr,
    EPI_REGS: gl.constexpr, SKIP_IDLE: gl.constexpr, AUX_STAGES: gl.constexpr, GATHER: gl.constexpr,
    LAG: gl.constexpr, SIDE: gl.constexpr,
):
    gl.static_assert(not MERGE or EPILOGUE == 1, "MERGE applies to the SwiGLU epilogue only")
    gl.static_assert(not EPI_WARPS or (COOP and not INTERLEAVE and (MERGE or EPILOGUE != 1)),
                     "an epilogue partition serves cooperative, not interleaved tiles (SwiGLU: merged)")
    BM: gl.constexpr = a_desc.block_type.shape[0]
    gl.static_assert(not AUX_STAGES or (EPI_WARPS and EPILOGUE == 2 and AUX_STAGES >= 2
                                        and AUX_STAGES <= BM // SUB + 1),
                     "TMA loads of the saved values (2 to BM / SUB + 1 stages) serve an epilogue partition's SwiGLU "
                     "backward")
    BN: gl.constexpr = b_desc.block_type.shape[0] if B_KMAJOR else b_desc.block_type.shape[1]
    dtype: gl.constexpr = a_desc.dtype
    BK: gl.constexpr = a_desc.block_type.shape[1]
    a_bufs = gl.allocate_shared_memory(dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    if MERGE:  # gate and up columns side by side: one [BK, 2 * BN] operand, one MMA per k-step
        b_bufs = gl.allocate_shared_memory(dtype, [STAGES, BK, 2 * BN],
                                           gl.NVMMASharedLayout.get_default_for([BK, 2 * BN], dtype))
        u_bufs = b_bufs
    else:
        b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
        if EPILOGUE == 1:
            u_bufs = gl.allocate_shared_memory(dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
        else:
            u_bufs = b_bufs
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    order = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        # Gathered A rows: the producer's arrival once its copies have landed, beside the TMA expectation of B's.
        mbarrier.init(ready.index(i), count=2 if GATHER else 1)
        # Cooperative: a stage is free once both consumers have read it.
        mbarrier.init(empty.index(i), count=2 if COOP else 1)
    for i in gl.static_range(2):
        mbarrier.init(order.index(i), count=1)
    # Rows of a tile each consumer computes.
    BMC: gl.constexpr = BM // 2 if COOP else BM
    epi_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BMC, BN], dtype)
    if EPI_WARPS:
        # Whole tiles, which the consumers hand to the epilogue partition: two buffers, one for the merged SwiGLU's
        # tiles of gate and up columns (enough where the epilogue of a tile is shorter than the MMAs of the next).
        EPI_COLS: gl.constexpr = 2 * BN if MERGE else BN
        epi0 = gl.allocate_shared_memory(dtype, [1 if MERGE else 2, BM, EPI_COLS],
                                         gl.NVMMASharedLayout.get_default_for([BM, EPI_COLS], dtype))
        epi1 = epi0
    elif MERGE:
        merged_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BMC, 2 * BN], dtype)
        epi0 = gl.allocate_shared_memory(dtype, [BMC, 2 * BN], merged_layout)
        epi1 = gl.allocate_shared_memory(dtype, [BMC, 2 * BN], merged_layout)
    else:
        epi0 = gl.allocate_shared_memory(dtype, [BMC, BN], epi_layout)
        epi1 = gl.allocate_shared_memory(dtype, [BMC, BN], epi_layout)
    if EPILOGUE == 1 and not MERGE:
        up0 = gl.allocate_shared_memory(dtype, [BMC, BN], epi_layout)
        up1 = gl.allocate_shared_memory(dtype, [BMC, BN], epi_layout)
    else:
        up0 = epi0
        up1 = epi1
    # Each consumer's two buffers of an interleaved epilogue slice's saved gate/up values and row weights
    # (``_epilogue_copies``); a token size where that epilogue does not use them.
    plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    SUB_BN: gl.constexpr = BN if (INTERLEAVE and EPILOGUE == 2) else 8
    SUB_W: gl.constexpr = SUB if (INTERLEAVE and HAS_RW) else 8
    st0 = (gl.allocate_shared_memory(dtype, [2, SUB, SUB_BN], plain),
           gl.allocate_shared_memory(dtype, [2, SUB, SUB_BN], plain),
           gl.allocate_shared_memory(gl.float32, [2, SUB_W], gl.SwizzledSharedLayout(1, 1, 1, [0])))
    st1 = (gl.allocate_shared_memory(dtype, [2, SUB, SUB_BN], plain),
           gl.allocate_shared_memory(dtype, [2, SUB, SUB_BN], plain),
           gl.allocate_shared_memory(gl.float32, [2, SUB_W], gl.SwizzledSharedLayout(1, 1, 1, [0])))
    handoff = (gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout()),
               gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout()))
    if EPI_WARPS:
        for i in gl.static_range(2):
            mbarrier.init(handoff[0].index(i), count=2)  # full: both consumers have stored their rows
            mbarrier.init(handoff[1].index(i), count=1)  # free: the epilogue partition is done with it
    if AUX_STAGES:  # the epilogue partition's ring of saved gate and up values ([gate, up] per stage)
        aux_bufs = gl.allocate_shared_memory(dtype, [2 * AUX_STAGES] + g_desc.block_type.shape, g_desc.layout)
        aux_ready = gl.allocate_shared_memory(gl.int64, [AUX_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(AUX_STAGES):
            mbarrier.init(aux_ready.index(i), count=1)
    else:  # not used
        aux_bufs = a_bufs
        aux_ready = ready
    fence_async_shared()

    PRODUCER_WARPS: gl.constexpr = 4 if GATHER else 1  # gathered rows: copies by four warps, not one TMA
    # Partition arguments are written out, in each call: constexprs inside a concatenated tuple reach the partitions
    # as run-time values, and tuples or functions held in variables do not compile (so the two calls repeat them).
    if EPI_WARPS:
        gl.warp_specialize([
            (_consumer, (0, a_bufs, b_bufs, u_bufs, ready, empty, order, epi0, up0, st0, handoff, table_ptr, MAX_T,
                         NB_N, K, N, HALF, c_ptr, aux_ptr, h_ptr, rw_ptr, drw_ptr, s_cm, s_auxm, s_hm, s_drw, dbg_ptr,
                         EPILOGUE, B_KMAJOR, HAS_RW, SUB, TIMING, COOP, INTERLEAVE, MERGE, EPI_WARPS,
                         SKIP_IDLE)),
            (_consumer, (1, a_bufs, b_bufs, u_bufs, ready, empty, order, epi1, up1, st1, handoff, table_ptr, MAX_T,
                         NB_N, K, N, HALF, c_ptr, aux_ptr, h_ptr, rw_ptr, drw_ptr, s_cm, s_auxm, s_hm, s_drw, dbg_ptr,
                         EPILOGUE, B_KMAJOR, HAS_RW, SUB, TIMING, COOP, INTERLEAVE, MERGE, EPI_WARPS,
                         SKIP_IDLE)),
            (_epilogue_partition, (epi0, handoff, g_desc, u_desc, aux_bufs, aux_ready, table_ptr, MAX_T, NB_N, N,
                                   HALF, c_ptr, aux_ptr, h_ptr, rw_ptr, drw_ptr, s_cm, s_auxm, s_hm, s_drw, EPILOGUE,
                                   HAS_RW, SUB, EPI_WARPS, MERGE, AUX_STAGES)),
            (_producer, (a_desc, b_desc, o_desc, a_bufs, b_bufs, u_bufs, ready, empty, table_ptr, MAX_T, NB_N, K,
                         HALF, N_ROWS, EPILOGUE, B_KMAJOR, MERGE, x_ptr, idx_ptr, M_ROWS, s_xm, GATHER, LAG, SIDE)),
        ], [4, EPI_WARPS, PRODUCER_WARPS], [CONSUMER_REGS, EPI_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_consumer, (0, a_bufs, b_bufs, u_bufs, ready, empty, order, epi0, up0, st0, handoff, table_ptr, MAX_T,
                         NB_N, K, N, HALF, c_ptr, aux_ptr, h_ptr, rw_ptr, drw_ptr, s_cm, s_auxm, s_hm, s_drw, dbg_ptr,
                         EPILOGUE, B_KMAJOR, HAS_RW, SUB, TIMING, COOP, INTERLEAVE, MERGE, EPI_WARPS,
                         SKIP_IDLE)),
            (_consumer, (1, a_bufs, b_bufs, u_bufs, ready, empty, order, epi1, up1, st1, handoff, table_ptr, MAX_T,
                         NB_N, K, N, HALF, c_ptr, aux_ptr, h_ptr, rw_ptr, drw_ptr, s_cm, s_auxm, s_hm, s_drw, dbg_ptr,
                         EPILOGUE, B_KMAJOR, HAS_RW, SUB, TIMING, COOP, INTERLEAVE, MERGE, EPI_WARPS,
                         SKIP_IDLE)),
            (_producer, (a_desc, b_desc, o_desc, a_bufs, b_bufs, u_bufs, ready, empty, table_ptr, MAX_T, NB_N, K,
                         HALF, N_ROWS, EPILOGUE, B_KMAJOR, MERGE, x_ptr, idx_ptr, M_ROWS, s_xm, GATHER, LAG, SIDE)),
        ], [4, PRODUCER_WARPS], [CONSUMER_REGS, PRODUCER_REGS])


# ----------------------------------------------------------------------------------------------------------- launch
def compile_only(arch: int = 90, *, epilogue: int = _PLAIN, b_kmajor: bool = False, has_rw: bool = False,
                 bm: int = 128, bn: int = 128, bk: int = 64, stages: int = 4, sub: int = 32,
                 consumer_regs: int = 232, producer_regs: int = 40, maxnreg: int = 168, timing: bool = False,
                 coop: bool = False, interleave: bool = False, merge: bool = False, sizes16: bool = True,
                 epi_warps: int = 0, epi_regs: int = 152, skip_idle: bool = True, aux_stages: int = 0,
                 gather: bool = False, lag: int = 1, side: bool = False):
    """Compile the kernel for ``sm_<arch>`` without a GPU (CPU is fine) and return Triton's compiled kernel, whose
    ``asm`` holds the TTGIR, PTX and cubin: tests check on the CPU that it is warp-specialised. ``sizes16``: the
    sizes and strides are multiples of 16, as the launcher specialises them for the benchmark's shapes; False: only
    the pointers are (e.g. an expert FFN of 136)."""
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.experimental.gluon._runtime import GluonASTSource  # noqa: PLC0415
    from triton.runtime.jit import mangle_type  # noqa: PLC0415

    probe = torch.empty(2 * max(bm, bn, bk), 2 * max(bm, bn, bk), dtype=torch.bfloat16)
    b_block = [bn, bk] if b_kmajor else [bk, bn]
    aux_block = [sub, bn] if aux_stages else [bm, bk]
    descs = [TensorDescriptor.from_tensor(probe, block, gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16))
             for block in ([bm, bk], b_block, aux_block, aux_block, [bm, bk])]
    names = ["a_desc", "b_desc", "g_desc", "u_desc", "o_desc", "c_ptr", "aux_ptr", "h_ptr", "rw_ptr", "drw_ptr",
             "table_ptr", "dbg_ptr", "x_ptr", "idx_ptr", "MAX_T", "N", "K", "NB_N", "HALF", "N_ROWS", "s_cm", "s_auxm",
             "s_hm", "s_drw", "M_ROWS", "s_xm"]
    types = [mangle_type(d) for d in descs] + ["*bf16", "*bf16", "*bf16", "*fp32", "*fp32", "*i32", "*i64", "*bf16",
                                               "*i32"]
    signature = dict(zip(names, types + ["i32"] * 12, strict=True))
    constexprs = {"STAGES": stages, "EPILOGUE": epilogue, "B_KMAJOR": b_kmajor, "HAS_RW": has_rw, "SUB": sub,
                  "CONSUMER_REGS": consumer_regs, "PRODUCER_REGS": producer_regs, "TIMING": timing,
                  "COOP": bool(coop), "INTERLEAVE": bool(interleave and coop),
                  "MERGE": bool(merge and epilogue == _SWIGLU), "EPI_WARPS": epi_warps, "EPI_REGS": epi_regs,
                  "SKIP_IDLE": bool(skip_idle), "AUX_STAGES": aux_stages, "GATHER": bool(gather), "LAG": lag,
                  "SIDE": bool(side and gather)}
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    # As the launcher specialises them on a GPU: pointers and the sizes of the benchmark shapes are 16-divisible.
    divisible = names[5:14] + (["N", "K", "HALF", "N_ROWS", "s_cm", "s_auxm", "s_hm", "s_xm"] if sizes16 else [])
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    src = GluonASTSource(_ws_rows_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": 4, "maxnreg": _launch_regs(maxnreg, epi_warps)})



def _launch_regs(maxnreg: int | None, epi_warps: int) -> int | None:
    """Registers per thread at launch: with an epilogue partition, what the register file holds for every warp
    group (the producer's warp and the epilogue's fill whole ones), at most ``maxnreg``."""
    if not epi_warps:
        return maxnreg
    threads = 32 * triton.cdiv(4 + 4 + epi_warps + 1, 4) * 4
    return min(maxnreg or 255, 65536 // threads // 8 * 8)


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def ws_rows_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, *, bm: int = 128, bn: int = 128, bk: int = 64,
               stages: int = 4, epilogue: int = _PLAIN, aux: torch.Tensor | None = None,
               row_weights: torch.Tensor | None = None, sub: int = 32, consumer_regs: int = 232,
               producer_regs: int = 40, maxnreg: int | None = 168, table: tuple[torch.Tensor, int] | None = None,
               num_programs: int | None = None, timing: torch.Tensor | None = None, coop: bool = False,
               interleave: bool = False, merge: bool = False, epi_warps: int = 0, epi_regs: int = 152,
               skip_idle: bool = True, aux_stages: int = 0, gather: torch.Tensor | None = None, lag: int = 1,
               keep_gathered: bool = False):
    """``triton_grouped.grouped_rows_mm`` on the warp-specialised kernel (same arguments and results); ``bn`` is
    per SwiGLU half for the SwiGLU epilogue. ``coop``: both consumers work on each ``bm`` x ``bn`` tile, ``bm / 2``
    rows each (CUTLASS's "cooperative" schedule), instead of taking alternate tiles ("ping-pong"). ``interleave``
    (cooperative only): each tile's epilogue runs in row slices of ``sub`` between the next tile's k-steps, so that
    it overlaps MMAs. ``merge`` (SwiGLU): each k-step's gate and up columns share one [bk, 2 x bn] stage and one MMA
    per consumer (m64n256 instead of two m64n128, which each read the A tile from shared memory). ``epi_warps``
    (cooperative, not interleaved): a partition of that many warps with ``epi_regs`` registers per thread runs the
    epilogues of whole tiles, which the consumers hand over in shared memory (two buffers; one with ``merge``), while
    the consumers multiply the next tile; the launch then gives fewer registers to each thread (``_launch_regs``),
    so that the consumers' share, ``consumer_regs``, is set at run time. ``skip_idle`` (cooperative): a consumer
    whose half of a row tile holds only the next expert's rows runs no MMAs for it. ``aux_stages`` (SwiGLU
    backward with ``epi_warps``): the epilogue partition loads the saved gate and up values by TMA through a ring of
    that many ``sub``-row slices (``aux_stages - 1`` slices in flight while one is computed). ``timing``: an
    int64 tensor of at least 256 + 4 x programs zeros, which receives %globaltimer readings: program 0's first 64
    tiles (4 each), then every program's start and end (2 per consumer).

    ``gather`` ([M] integers): A's rows are gathered, routed row r being ``a[gather[r]]`` (``a``: [T, K]), by
    ``cp.async`` copies of four producer warps instead of TMA loads of a [M, K] operand, ``lag`` ring steps of
    copies in flight beyond the one issued (1 or 2; ``stages`` >= ``lag`` + 2). ``keep_gathered``: the gathered
    rows [M, K] (``a[gather]``) are also stored, by TMA from the stages of each row tile's first column tile, and
    returned last."""
    if row_weights is not None and epilogue == _PLAIN:
        raise ValueError("row_weights apply to the SwiGLU epilogues only")
    a = a.contiguous()
    if b.stride(1) != 1 and b.stride(2) != 1:
        b = b.contiguous()
    m, k = a.shape
    if gather is not None:
        if gather.dim() != 1 or gather.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"gather must be a 1-d integer tensor of routed rows' source rows, got "
                             f"{gather.dtype} {tuple(gather.shape)}")
        if lag not in (1, 2) or stages < lag + 2:
            raise ValueError(f"gather: lag={lag} must be 1 or 2 with stages >= lag + 2 (stages={stages})")
        if a.data_ptr() % 16:
            raise ValueError("gather copies 16-byte pieces of a's rows: a must start 16-byte aligned")
        gather = gather.to(torch.int32).contiguous()
        m = gather.numel()
    elif keep_gathered:
        raise ValueError("keep_gathered stores the rows that gather selects: pass gather")
    num_experts, _, n_out = b.shape
    b_kmajor = b.stride(1) == 1 and b.stride(2) != 1
    if epilogue == _SWIGLU and b_kmajor:
        b = b.contiguous()
        b_kmajor = False
    n = n_out // 2 if epilogue == _SWIGLU else n_out
    half = n if epilogue == _SWIGLU else n_out
    c = a.new_empty(m, 2 * n if epilogue in (_SWIGLU, _SWIGLU_BWD) else n)
    h = a.new_empty(m, n) if epilogue == _SWIGLU else c
    if epi_warps and (epi_warps not in (2, 4, 8) or not coop or interleave):
        raise ValueError(f"epi_warps={epi_warps}: an epilogue partition of 2, 4 or 8 warps serves cooperative tiles "
                         f"that are not interleaved (coop=True, interleave=False)")
    if aux_stages and (epilogue != _SWIGLU_BWD or not epi_warps or not 2 <= aux_stages <= bm // sub + 1):
        raise ValueError(f"aux_stages={aux_stages}: TMA loads of the saved gate and up values serve the SwiGLU "
                         f"backward with an epilogue partition (epi_warps), 2 to bm / sub + 1 stages")
    if n % 8 or k % 8:
        raise ValueError(f"ws_rows_mm needs sizes that are multiples of 8 elements (16-byte rows), got k={k}, n={n}")
    aux = c if aux is None else aux.contiguous()
    if aux.data_ptr() % 16:  # the SwiGLU backward copies it in 16-byte pieces
        aux = aux.clone()
    has_rw = row_weights is not None
    rw = row_weights.float().contiguous() if has_rw else c
    nb_n = triton.cdiv(n, bn)
    # [column tile, row]: each tile's shares are stored contiguously over its rows.
    drw = a.new_empty(nb_n, m, dtype=torch.float32) if has_rw and epilogue == _SWIGLU_BWD else c
    gathered = a.new_empty(m, k) if keep_gathered else None
    if m:
        gdt = gl.bfloat16 if a.dtype == torch.bfloat16 else gl.float16
        storage = (b.transpose(1, 2) if b_kmajor else b).reshape(-1, b.shape[1] if b_kmajor else n_out)
        a_layout = gl.NVMMASharedLayout.get_default_for([bm, bk], gdt)
        # Gathered: a descriptor of A's tile shape (and the side store's target), not used for loads.
        a_desc = TensorDescriptor.from_tensor(a if gathered is None else gathered, [bm, bk], a_layout)
        b_block = [bn, bk] if b_kmajor else [bk, bn]
        b_desc = TensorDescriptor.from_tensor(storage, b_block, gl.NVMMASharedLayout.get_default_for(b_block, gdt))
        g_desc = u_desc = a_desc  # not used
        if aux_stages:  # the gate and up halves as two [m, n] views: columns past n read as zeros
            aux_layout = gl.NVMMASharedLayout.get_default_for([sub, bn], gdt)
            g_desc, u_desc = (TensorDescriptor.from_tensor(aux[:, i:i + n], [sub, bn], aux_layout)
                              for i in (0, half))
        tab, max_t = table if table is not None else tile_table(offs, m, bm)
        grid = num_programs or _num_sms(a.device)
        if timing is not None and (timing.dtype != torch.int64 or timing.numel() < 256 + 4 * grid):
            raise ValueError(f"timing must be an int64 tensor of at least 256 + 4 x {grid} programs elements, "
                             f"got {timing.dtype} with {timing.numel()}")
        maxnreg = _launch_regs(maxnreg, epi_warps)
        kwargs = {"maxnreg": maxnreg} if maxnreg else {}
        _ws_rows_kernel[(grid,)](
            a_desc, b_desc, g_desc, u_desc, a_desc, c, aux, h, rw, drw, tab, c if timing is None else timing, a,
            c if gather is None else gather, max_t, n, k, nb_n, half, n_out, c.stride(0), aux.stride(0), h.stride(0),
            drw.stride(0), m, a.stride(0),
            STAGES=stages, EPILOGUE=epilogue, B_KMAJOR=b_kmajor, HAS_RW=has_rw, SUB=sub,
            CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs, TIMING=timing is not None, COOP=bool(coop),
            INTERLEAVE=bool(interleave and coop), MERGE=bool(merge and epilogue == _SWIGLU),
            EPI_WARPS=epi_warps, EPI_REGS=epi_regs, SKIP_IDLE=bool(skip_idle), AUX_STAGES=aux_stages,
            GATHER=gather is not None, LAG=lag, SIDE=gathered is not None, num_warps=4,
            **kwargs,
        )
    out = (c, h) if epilogue == _SWIGLU else (c, drw.sum(0)) if has_rw else (c,)
    out += (gathered,) if gathered is not None else ()
    return out[0] if len(out) == 1 else out
