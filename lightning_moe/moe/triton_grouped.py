"""Triton grouped GEMMs for the routed experts: ``model.expert_kernel=triton``.

Shapes:
    N: routed rows sorted by expert, E: experts, D: hidden size, H: expert hidden size,
    offs: [E] int32 running row counts (``offs[e]`` is the end row of expert e), BM/BN/BK: tile sizes.

Two kernels cover the six GEMMs of a SwiGLU expert's forward and backward:

- ``_rows_kernel``: ``out[rows of e] = a[rows of e] @ b[e]``, tiles over (expert, row tile, column tile); the forward
  GEMMs and both data gradients. Its epilogue can apply SwiGLU (the first GEMM then computes the gate and up tiles of
  the same columns and also writes ``silu(gate) * up``) or SwiGLU's backward (the data gradient of the second GEMM
  reads the saved gate and up values and writes their gradients), so no separate elementwise pass runs. With row
  weights (the MoE layer's gate weights) the first epilogue scales ``silu(gate) * up`` by them and the backward one
  also returns their gradient. ``_rows_kernel_persistent`` is the same tile loop with one program per SM
  (``TileConfig.persistent``; slower on the H100, see docs/moe_layer_benchmark.md).
- ``_wgrad_kernel``: ``dw[e] = a[rows of e]^T @ g[rows of e]``, tiles over (expert, output tile); the weight gradients,
  reducing over each expert's rows. On Hopper the weight gradients use the warp-specialised Gluon kernel
  (``gluon_wgrad.py``), elsewhere on sm_90+ torch's ``grouped_mm`` (``WGRAD``).

On Hopper the operands are read through TMA tensor descriptors; elsewhere (and under ``TRITON_INTERPRET=1``) the
same kernels run on masked pointer loads. Importing this module needs ``triton``; ``kernels.py`` imports it on use.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


def _interpreter_compat() -> None:
    """Under ``TRITON_INTERPRET=1``: triton 3.6's interpreter turns scalars into ints with ``int(array of shape (1,))``,
    which numpy >= 2.4 refuses, so every loop over a run-time bound fails. Take the one element instead."""
    import triton.runtime.interpreter as interp  # noqa: PLC0415

    patch = getattr(interp, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_lightning_moe", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._lightning_moe = True
    interp._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_compat()


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration of a grouped GEMM."""

    bm: int
    bn: int
    bk: int
    num_warps: int
    num_stages: int
    persistent: bool = False
    """Row GEMMs only: one program per SM walks the tiles in a loop flattened with its k-loop, so the loads of the
    next tile are issued while this tile's epilogue runs (a one-tile-per-program launch drains its pipeline at each
    tile's end)."""


# Per GEMM of the expert forward/backward; tuned on an H100 (benchmarks/triton_grouped_tune.py). ``fwd1``'s ``bn``
# is per SwiGLU half: the program computes a gate tile and an up tile of that width.
CONFIGS: dict[str, TileConfig] = {
    "fwd1": TileConfig(128, 128, 64, 8, 4),
    "fwd2": TileConfig(128, 256, 64, 8, 3),
    "dgrad2": TileConfig(128, 128, 64, 8, 5),
    "dgrad1": TileConfig(128, 256, 64, 8, 3),
    "wgrad2": TileConfig(128, 256, 64, 8, 3),
    "wgrad1": TileConfig(128, 256, 64, 8, 3),
}

_PLAIN, _SWIGLU, _SWIGLU_BWD = 0, 1, 2


def use_tma(device: torch.device) -> bool:
    """TMA descriptors need a Hopper (sm_90) or newer GPU; the interpreter and older GPUs use pointer loads."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA wants 16-byte aligned base addresses and row strides."""
    return all(t.data_ptr() % 16 == 0 and (t.stride(-2) * t.element_size()) % 16 == 0 for t in tensors)


@triton.jit
def _expert_table(offs_ptr, E, BM: tl.constexpr, E_P2: tl.constexpr):
    """Per expert (padded to E_P2): start row, end row, row tiles and running row-tile count. Each expert owns
    ceil(rows / BM) consecutive row tiles."""
    idx = tl.arange(0, E_P2)
    ends = tl.load(offs_ptr + idx, mask=idx < E, other=0)
    starts = tl.load(offs_ptr + idx - 1, mask=(idx > 0) & (idx < E), other=0)
    tiles = (ends - starts + BM - 1) // BM
    return idx, starts, ends, tiles, tl.cumsum(tiles, 0)


@triton.jit
def _locate(tile, idx, starts, ends, tiles, cum, BM: tl.constexpr):
    """The expert, first row and end row of row tile ``tile`` (expert E when ``tile`` is past the last one)."""
    e = tl.sum((cum <= tile).to(tl.int32), 0)
    sel = idx == e
    first_tile = tl.sum(tl.where(sel, cum - tiles, 0), 0)
    start = tl.sum(tl.where(sel, starts, 0), 0)
    end = tl.sum(tl.where(sel, ends, 0), 0)
    return e, start + (tile - first_tile) * BM, end


@triton.jit
def _load_b(b_ptr, b_desc, e, k0, n0, K, N, N_ROWS, s_be, s_bk, s_bn,
            BK: tl.constexpr, BN: tl.constexpr, B_KMAJOR: tl.constexpr, USE_TMA: tl.constexpr):
    """Tile b[e][k0:k0+BK, n0:n0+BN]; ``B_KMAJOR`` when k is the contiguous dimension of b's storage."""
    if USE_TMA:
        # b_desc views the storage as 2-D [E * rows, cols]. A tile that runs past an expert's last row reads the next
        # expert's: along k those meet the zero columns TMA pads a with, along n they land in columns never stored.
        if B_KMAJOR:
            b = tl.trans(b_desc.load([e * N_ROWS + n0, k0]))
        else:
            b = b_desc.load([e * K + k0, n0])
    else:
        ks = k0 + tl.arange(0, BK)
        ns = n0 + tl.arange(0, BN)
        ptrs = b_ptr + e.to(tl.int64) * s_be + ks[:, None] * s_bk + ns[None, :] * s_bn
        b = tl.load(ptrs, mask=(ks[:, None] < K) & (ns[None, :] < N), other=0.0)
    return b


@triton.jit
def _row_tile(
    a_ptr, a_desc, b_ptr, b_desc, c_ptr, aux_ptr, h_ptr, rw_ptr, drw_ptr,
    e, row0, row_end, tile_n, N, K, HALF, N_ROWS,
    s_am, s_be, s_bk, s_bn, s_cm, s_auxm, s_hm, s_drw,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    B_KMAJOR: tl.constexpr, USE_TMA: tl.constexpr, EPILOGUE: tl.constexpr, HAS_RW: tl.constexpr,
):
    """One output tile: c[row0:row0+BM (< row_end), tile_n*BN:+BN] = a[rows] @ b[e] and its epilogue.

    EPILOGUE 1 (SwiGLU): columns n of the gate half and HALF + n of the up half are computed together; c gets both
    (the pre-activations, [rows, 2 * HALF]) and h_ptr gets silu(gate) * up ([rows, HALF]), times the row's weight
    rw_ptr[row] with HAS_RW.
    EPILOGUE 2 (SwiGLU backward): the product is the gradient of h_ptr's values; aux holds the saved [rows, 2 * HALF]
    gate and up values, and c gets their gradients. With HAS_RW the product is the gradient of the weighted h: this
    tile's share of each row weight's gradient, sum over its columns of product * silu(gate) * up, goes to
    drw_ptr[row, tile_n], and the product times the row weight is the gradient of h.
    """
    n0 = tile_n * BN
    rows = row0 + tl.arange(0, BM)
    cols = n0 + tl.arange(0, BN)
    row_mask = rows < row_end
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc_up = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        if USE_TMA:
            # Rows past row_end belong to the next expert: they are multiplied but never stored.
            a = a_desc.load([row0, k0])
        else:
            ks = k0 + tl.arange(0, BK)
            a = tl.load(a_ptr + rows64[:, None] * s_am + ks[None, :],
                        mask=row_mask[:, None] & (ks[None, :] < K), other=0.0)
        b = _load_b(b_ptr, b_desc, e, k0, n0, K, N, N_ROWS, s_be, s_bk, s_bn, BK, BN, B_KMAJOR, USE_TMA)
        acc = tl.dot(a, b, acc)
        if EPILOGUE == 1:
            b_up = _load_b(b_ptr, b_desc, e, k0, HALF + n0, K, 2 * HALF, N_ROWS, s_be, s_bk, s_bn,
                           BK, BN, B_KMAJOR, USE_TMA)
            acc_up = tl.dot(a, b_up, acc_up)

    mask = row_mask[:, None] & (cols[None, :] < N)
    c_ptrs = c_ptr + rows64[:, None] * s_cm + cols[None, :]
    if EPILOGUE == 0:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)
    elif EPILOGUE == 1:
        gate = acc.to(c_ptr.dtype.element_ty)
        up = acc_up.to(c_ptr.dtype.element_ty)
        tl.store(c_ptrs, gate, mask=mask)
        tl.store(c_ptrs + HALF, up, mask=mask)
        # From the rounded pre-activations, as the backward sees them.
        g = gate.to(tl.float32)
        h = g * tl.sigmoid(g) * up.to(tl.float32)
        if HAS_RW:
            w = tl.load(rw_ptr + rows64, mask=row_mask, other=0.0)
            h = h.to(h_ptr.dtype.element_ty).to(tl.float32) * w[:, None]
        tl.store(h_ptr + rows64[:, None] * s_hm + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)
    elif HAS_RW:  # EPILOGUE 2 with row weights
        # Two column halves one after the other: the epilogue holds several tile-sized values per thread, and
        # halving them keeps it out of register spills.
        halves = tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1))
        acc0, acc1 = tl.split(halves)
        w = tl.load(rw_ptr + rows64, mask=row_mask, other=0.0)
        cols0 = n0 + tl.arange(0, BN // 2)
        part = _swiglu_backward(acc0, w, rows64, row_mask, cols0, N, HALF, c_ptr, aux_ptr, s_cm, s_auxm, True)
        part += _swiglu_backward(acc1, w, rows64, row_mask, cols0 + BN // 2, N, HALF, c_ptr, aux_ptr, s_cm, s_auxm,
                                 True)
        tl.store(drw_ptr + rows64 * s_drw + tile_n, part, mask=row_mask)
    else:
        _swiglu_backward(acc, acc, rows64, row_mask, cols, N, HALF, c_ptr, aux_ptr, s_cm, s_auxm, False)


@triton.jit
def _swiglu_backward(acc, w, rows64, row_mask, cols, N, HALF, c_ptr, aux_ptr, s_cm, s_auxm, HAS_RW: tl.constexpr):
    """SwiGLU's backward on a tile: acc is the gradient of h (of h * w with HAS_RW, w [BM] the row weights); aux
    holds the saved gate and up values; c gets their gradients. Returns, with HAS_RW, each row's share of its row
    weight's gradient over these columns (sum of acc * h)."""
    mask = row_mask[:, None] & (cols[None, :] < N)
    aux_ptrs = aux_ptr + rows64[:, None] * s_auxm + cols[None, :]
    g = tl.load(aux_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(aux_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    dh = acc.to(c_ptr.dtype.element_ty).to(tl.float32)
    sig = tl.sigmoid(g)
    part = tl.zeros_like(rows64).to(tl.float32)
    if HAS_RW:
        # The forward's h before the weight, recomputed from the same rounded gate and up values.
        h = (g * sig * up).to(c_ptr.dtype.element_ty).to(tl.float32)
        part = tl.sum(tl.where(mask, dh * h, 0.0), 1)
        dh = (dh * w[:, None]).to(c_ptr.dtype.element_ty).to(tl.float32)
    d_gate = dh * up * sig * (1.0 + g * (1.0 - sig))
    d_up = dh * g * sig
    c_ptrs = c_ptr + rows64[:, None] * s_cm + cols[None, :]
    tl.store(c_ptrs, d_gate.to(c_ptr.dtype.element_ty), mask=mask)
    tl.store(c_ptrs + HALF, d_up.to(c_ptr.dtype.element_ty), mask=mask)
    return part


@triton.jit
def _rows_kernel(
    a_ptr, a_desc, b_ptr, b_desc, c_ptr, aux_ptr, h_ptr, rw_ptr, drw_ptr, offs_ptr,
    E, N, K, NB_N, HALF, N_ROWS,
    s_am, s_be, s_bk, s_bn, s_cm, s_auxm, s_hm, s_drw,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, E_P2: tl.constexpr,
    B_KMAJOR: tl.constexpr, USE_TMA: tl.constexpr, EPILOGUE: tl.constexpr, HAS_RW: tl.constexpr,
):
    """c[rows of e, :N] = a[rows of e] @ b[e] (b: [E, K, N] by strides; N_ROWS: b's full n extent), one program
    per output tile. The grid covers the most row tiles any counts can need; programs past the last one return."""
    pid = tl.program_id(0)
    idx, starts, ends, tiles, cum = _expert_table(offs_ptr, E, BM, E_P2)
    e, row0, row_end = _locate(pid // NB_N, idx, starts, ends, tiles, cum, BM)
    if e >= E:
        return
    _row_tile(a_ptr, a_desc, b_ptr, b_desc, c_ptr, aux_ptr, h_ptr, rw_ptr, drw_ptr, e, row0, row_end, pid % NB_N,
              N, K, HALF, N_ROWS, s_am, s_be, s_bk, s_bn, s_cm, s_auxm, s_hm, s_drw,
              BM, BN, BK, B_KMAJOR, USE_TMA, EPILOGUE, HAS_RW)


@triton.jit
def _rows_kernel_persistent(
    a_ptr, a_desc, b_ptr, b_desc, c_ptr, aux_ptr, h_ptr, rw_ptr, drw_ptr, offs_ptr,
    E, N, K, NB_N, HALF, N_ROWS,
    s_am, s_be, s_bk, s_bn, s_cm, s_auxm, s_hm, s_drw,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, E_P2: tl.constexpr,
    B_KMAJOR: tl.constexpr, USE_TMA: tl.constexpr, EPILOGUE: tl.constexpr, HAS_RW: tl.constexpr,
):
    """``_rows_kernel`` with a fixed grid: each program takes every num_programs-th tile of the exact tile count,
    in one loop that Triton flattens with the k-loop and software-pipelines across tiles."""
    idx, starts, ends, tiles, cum = _expert_table(offs_ptr, E, BM, E_P2)
    total = tl.sum(tiles, 0) * NB_N
    for work in tl.range(tl.program_id(0), total, tl.num_programs(0), flatten=True):
        e, row0, row_end = _locate(work // NB_N, idx, starts, ends, tiles, cum, BM)
        _row_tile(a_ptr, a_desc, b_ptr, b_desc, c_ptr, aux_ptr, h_ptr, rw_ptr, drw_ptr, e, row0, row_end,
                  work % NB_N, N, K, HALF, N_ROWS, s_am, s_be, s_bk, s_bn, s_cm, s_auxm, s_hm, s_drw,
                  BM, BN, BK, B_KMAJOR, USE_TMA, EPILOGUE, HAS_RW)


@triton.jit
def _wgrad_kernel(
    a_ptr, a_desc, g_ptr, g_desc, c_ptr, offs_ptr,
    KA, NG, NB_I, NB_J,
    s_am, s_gm, s_ce, s_cr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_TMA: tl.constexpr,
):
    """c[e] = a[rows of e]^T @ g[rows of e]; a: [N, KA], g: [N, NG], c: [E, KA, NG]. Experts without rows get 0."""
    pid = tl.program_id(0)
    per_expert = NB_I * NB_J
    e = pid // per_expert
    tile = pid % per_expert
    i0 = (tile // NB_J) * BM
    j0 = (tile % NB_J) * BN
    start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
    end = tl.load(offs_ptr + e)
    ia = i0 + tl.arange(0, BM)
    jg = j0 + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    tail = start
    if USE_TMA:
        # Whole BK-row chunks through TMA; the last partial chunk (rows of the next expert follow) by masked loads.
        n_full = (end - start) // BK
        for it in range(0, n_full):
            r0 = start + it * BK
            a = a_desc.load([r0, i0])
            g = g_desc.load([r0, j0])
            acc = tl.dot(tl.trans(a), g, acc)
        tail = start + n_full * BK
    for r0 in range(tail, end, BK):
        rr = r0 + tl.arange(0, BK)
        rmask = rr < end
        rr64 = rr.to(tl.int64)
        a = tl.load(a_ptr + rr64[:, None] * s_am + ia[None, :], mask=rmask[:, None] & (ia[None, :] < KA), other=0.0)
        g = tl.load(g_ptr + rr64[:, None] * s_gm + jg[None, :], mask=rmask[:, None] & (jg[None, :] < NG), other=0.0)
        acc = tl.dot(tl.trans(a), g, acc)
    c_ptrs = c_ptr + e.to(tl.int64) * s_ce + ia[:, None] * s_cr + jg[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(ia[:, None] < KA) & (jg[None, :] < NG))


def _e_p2(num_experts: int) -> int:
    return max(16, triton.next_power_of_2(num_experts))


def _num_sms(device: torch.device) -> int:
    """Programs of a persistent launch: one per multiprocessor (a few under the CPU interpreter)."""
    if device.type != "cuda":
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count


def grouped_rows_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, cfg: TileConfig, *,
                    epilogue: int = _PLAIN, aux: torch.Tensor | None = None, row_weights: torch.Tensor | None = None,
                    tma: bool | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """a: [N, K] rows sorted by expert; b: [E, K, N'] (any strides with one contiguous dim); offs: [E] int32.

    Returns [N, N'] (plain), ``(h13 [N, N'], h [N, N' / 2])`` (SwiGLU: b is w13 with its gate and up halves; h is
    scaled by ``row_weights`` [N] float32 when given), or the [N, N] gate/up gradients (SwiGLU backward: b is w2^T,
    aux the saved h13 [N, 2 * N']; with ``row_weights`` a is the gradient of the scaled h and the result is the pair
    (gate/up gradients, row weight gradients [N] float32)).
    """
    if row_weights is not None and epilogue == _PLAIN:
        raise ValueError("row_weights apply to the SwiGLU epilogues only (the first GEMM and its data gradient)")
    a = a.contiguous()
    if b.stride(1) != 1 and b.stride(2) != 1:
        b = b.contiguous()
    tma = use_tma(a.device) if tma is None else tma
    m, k = a.shape
    num_experts, _, n_out = b.shape
    b_kmajor = b.stride(1) == 1 and b.stride(2) != 1
    n = n_out // 2 if epilogue == _SWIGLU else n_out
    half = n if epilogue == _SWIGLU else n_out
    c_cols = 2 * n if epilogue in (_SWIGLU, _SWIGLU_BWD) else n
    c = a.new_empty(m, c_cols)
    h = a.new_empty(m, n) if epilogue == _SWIGLU else c
    aux = c if aux is None else aux.contiguous()
    has_rw = row_weights is not None
    rw = row_weights.float().contiguous() if has_rw else c
    a_desc = b_desc = None
    storage = b.transpose(1, 2) if b_kmajor else b
    storage = storage.reshape(-1, storage.shape[-1])  # a view when the weights are contiguous
    tma = tma and m > 0 and _tma_ok(a, storage)
    if tma:
        a_desc = TensorDescriptor.from_tensor(a, [cfg.bm, cfg.bk])
        b_desc = TensorDescriptor.from_tensor(storage, [cfg.bn, cfg.bk] if b_kmajor else [cfg.bk, cfg.bn])
    nb_n = triton.cdiv(n, cfg.bn)
    # Per row and column tile, that tile's share of the row weight's gradient (summed below: no atomics).
    drw = a.new_empty(m, nb_n, dtype=torch.float32) if has_rw and epilogue == _SWIGLU_BWD else c
    tiles = (triton.cdiv(m, cfg.bm) + num_experts) * nb_n  # at least the row tiles any counts can need
    kernel = _rows_kernel
    if cfg.persistent:
        kernel, tiles = _rows_kernel_persistent, min(tiles, _num_sms(a.device))
    if m:
        kernel[(tiles,)](
            a, a_desc, b, b_desc, c, aux, h, rw, drw, offs,
            num_experts, n, k, nb_n, half, n_out,
            a.stride(0), b.stride(0), b.stride(1), b.stride(2), c.stride(0), aux.stride(0), h.stride(0),
            drw.stride(0),
            BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, E_P2=_e_p2(num_experts),
            B_KMAJOR=b_kmajor, USE_TMA=tma, EPILOGUE=epilogue, HAS_RW=has_rw,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    if epilogue == _SWIGLU:
        return c, h
    if has_rw:
        return c, drw.sum(1)
    return c


def grouped_wgrad(a: torch.Tensor, g: torch.Tensor, offs: torch.Tensor, cfg: TileConfig, *,
                  tma: bool | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """a: [N, KA], g: [N, NG] rows sorted by expert -> [E, KA, NG] per-expert a^T @ g."""
    a, g = a.contiguous(), g.contiguous()
    tma = use_tma(a.device) if tma is None else tma
    ka, ng, num_experts = a.shape[1], g.shape[1], offs.shape[0]
    c = a.new_empty(num_experts, ka, ng, dtype=out_dtype or a.dtype)
    a_desc = g_desc = None
    tma = tma and a.shape[0] > 0 and _tma_ok(a, g)
    if tma:
        a_desc = TensorDescriptor.from_tensor(a, [cfg.bk, cfg.bm])
        g_desc = TensorDescriptor.from_tensor(g, [cfg.bk, cfg.bn])
    nb_i, nb_j = triton.cdiv(ka, cfg.bm), triton.cdiv(ng, cfg.bn)
    if num_experts:
        _wgrad_kernel[(num_experts * nb_i * nb_j,)](
            a, a_desc, g, g_desc, c, offs, ka, ng, nb_i, nb_j,
            a.stride(0), g.stride(0), c.stride(0), c.stride(1),
            BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, USE_TMA=tma,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return c


# Weight gradients: "gluon" (``gluon_wgrad.wgrad``: warp-specialised, Hopper only), "grouped_mm" (torch's CUTLASS
# grouped GEMM) or "triton" (``_wgrad_kernel``). "auto" takes gluon on sm_90 where it serves the operands, else
# grouped_mm where it runs (sm_90+), else triton. grouped_mm measured 1.66 against Triton's 1.85 ms on the first
# weight gradient of the benchmark layer on an H100 (equal on the second); gluon against grouped_mm on an H200:
# docs/moe_layer_benchmark.md.
WGRAD = "auto"


def _wgrad_backend(a: torch.Tensor, g: torch.Tensor) -> str:
    if WGRAD not in ("auto", "gluon", "grouped_mm", "triton"):
        raise ValueError(f"triton_grouped.WGRAD={WGRAD!r}: must be 'auto', 'gluon', 'grouped_mm' or 'triton'")
    if WGRAD != "auto":
        return WGRAD
    if _hopper(a.device) and _gluon_importable("gluon_wgrad"):
        from lightning_moe.moe import gluon_wgrad  # noqa: PLC0415

        if gluon_wgrad.supported(a, g):
            return "gluon"
    ok = a.device.type == "cuda" and torch.cuda.get_device_capability(a.device)[0] >= 9
    return "grouped_mm" if ok and hasattr(torch.nn.functional, "grouped_mm") else "triton"


def weight_grad(a: torch.Tensor, g: torch.Tensor, offs: torch.Tensor, cfg: TileConfig, out_dtype: torch.dtype,
                ) -> torch.Tensor:
    """dw[e] = a[rows of e]^T @ g[rows of e]: [E, a.shape[1], g.shape[1]] (zero for an expert with no rows)."""
    backend = _wgrad_backend(a, g)
    if backend == "gluon":
        if not _hopper(a.device):
            raise RuntimeError(f"triton_grouped.WGRAD='gluon' needs a Hopper GPU (sm_90), not {a.device}; "
                               "'auto' falls back to grouped_mm or the Triton kernel")
        from lightning_moe.moe import gluon_wgrad  # noqa: PLC0415

        return gluon_wgrad.wgrad(a, g, offs).to(out_dtype)
    if backend == "grouped_mm":
        return torch.nn.functional.grouped_mm(a.t(), g, offs=offs).to(out_dtype)
    return grouped_wgrad(a, g, offs, cfg, out_dtype=out_dtype)


# Row GEMMs: "triton" (``grouped_rows_mm``) or "gluon" (``gluon_grouped.ws_rows_mm``: warp-specialised, Hopper
# only, with its own tiles in ``gluon_grouped.CONFIGS``); "auto" takes gluon on sm_90 with 16-bit operands where
# Triton ships Gluon. On an H200 the Gluon kernels took 1.817 / 0.879 / 1.203 / 1.704 ms against Triton's
# 2.074 / 0.971 / 1.390 / 1.828 (fwd1 / fwd2 / dgrad2 / dgrad1, benchmarks/gluon_grouped_bench.py), and the
# compiled benchmark layer 9.35 against 9.90 ms (benchmarks/moe_layer.py, variant triton_rows; before fwd1's merge).
ROWS = "auto"


@functools.cache
def _gluon_importable(module: str = "gluon_grouped") -> bool:
    try:
        importlib.import_module(f"lightning_moe.moe.{module}")
    except ImportError:
        return False
    return True


def _gluon_shapes_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The Gluon kernels load through TMA only: 16-byte aligned rows of a and of b's storage (a has no pointer-load
    fallback as the Triton kernels have)."""
    size = a.element_size()
    return a.data_ptr() % 16 == 0 and all((n * size) % 16 == 0 for n in (a.shape[1], b.shape[1], b.shape[2]))


def _hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def _rows_backend(a: torch.Tensor, b: torch.Tensor) -> str:
    if ROWS not in ("auto", "triton", "gluon"):
        raise ValueError(f"triton_grouped.ROWS={ROWS!r}: must be 'auto', 'triton' or 'gluon'")
    if ROWS != "auto":
        return ROWS
    sixteen_bit = a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype
    usable = sixteen_bit and a.shape[0] > 0 and _gluon_shapes_ok(a, b)
    return "gluon" if usable and _hopper(a.device) and _gluon_importable() else "triton"


def rows_mm(op: str, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, cfgs: dict[str, TileConfig],
            tables: dict | None = None, **kwargs):
    """Row GEMM ``op`` (a key of ``CONFIGS``) of ``grouped_rows_mm`` on the backend ``ROWS`` picks.

    ``tables``: a dict that keeps the Gluon kernels' tile tables of ``offs`` (one per row-tile height), so that the
    row GEMMs of one forward or backward over the same rows build theirs once."""
    if _rows_backend(a, b) == "gluon":
        if not _hopper(a.device):
            raise RuntimeError(f"triton_grouped.ROWS='gluon' needs a Hopper GPU (sm_90), not {a.device}; "
                               "'auto' falls back to the Triton row GEMMs")
        from lightning_moe.moe import gluon_grouped  # noqa: PLC0415

        cfg = gluon_grouped.CONFIGS[op]
        if tables is not None:
            bm = cfg.get("bm", 128)
            if bm not in tables:
                tables[bm] = gluon_grouped.tile_table(offs, a.shape[0], bm)
            kwargs["table"] = tables[bm]
        return gluon_grouped.ws_rows_mm(a, b, offs, **cfg, **kwargs)
    return grouped_rows_mm(a, b, offs, cfgs[op], **kwargs)


def experts_forward(x: torch.Tensor, offs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                    row_weights: torch.Tensor | None = None, configs: dict[str, TileConfig] | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [N, D], offs: [E] int32, w13: [E, D, 2H], w2: [E, H, D], row_weights: [N] float32 or None
    -> (y [N, D], h13 [N, 2H], h [N, H]); h is the (weighted) input of the down projection."""
    cfgs, tables = configs or CONFIGS, {}
    h13, h = rows_mm("fwd1", x, w13, offs, cfgs, tables, epilogue=_SWIGLU, row_weights=row_weights)
    y = rows_mm("fwd2", h, w2, offs, cfgs, tables)
    return y, h13, h


def experts_backward(dy: torch.Tensor, x: torch.Tensor, offs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                     h13: torch.Tensor, h: torch.Tensor, row_weights: torch.Tensor | None = None,
                     configs: dict[str, TileConfig] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients (dx [N, D], dw13 [E, D, 2H], dw2 [E, H, D], d row_weights [N] or None) from dy [N, D] and the
    forward's saved tensors."""
    cfgs, tables = configs or CONFIGS, {}
    drw = None
    dh13 = rows_mm("dgrad2", dy, w2.transpose(1, 2), offs, cfgs, tables, epilogue=_SWIGLU_BWD, aux=h13,
                   row_weights=row_weights)
    if row_weights is not None:
        dh13, drw = dh13
    dw2 = weight_grad(h, dy, offs, cfgs["wgrad2"], w2.dtype)
    dx = rows_mm("dgrad1", dh13, w13.transpose(1, 2), offs, cfgs, tables)
    dw13 = weight_grad(x, dh13, offs, cfgs["wgrad1"], w13.dtype)
    return dx, dw13, dw2, drw


# Custom ops keep torch.compile from tracing into the Triton launches (it sees one opaque op each way).
@torch.library.custom_op("lightning_moe::triton_experts_fwd", mutates_args=())
def _experts_fwd_op(x: torch.Tensor, offs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                    row_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return experts_forward(x, offs, w13, w2, row_weights)


@_experts_fwd_op.register_fake
def _(x, offs, w13, w2, row_weights):
    n, hidden = x.shape[0], w2.shape[1]
    return x.new_empty(n, w2.shape[2]), x.new_empty(n, 2 * hidden), x.new_empty(n, hidden)


@torch.library.custom_op("lightning_moe::triton_experts_bwd", mutates_args=())
def _experts_bwd_op(dy: torch.Tensor, x: torch.Tensor, offs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                    h13: torch.Tensor, h: torch.Tensor, row_weights: torch.Tensor | None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw13, dw2, drw = experts_backward(dy, x, offs, w13, w2, h13, h, row_weights)
    return dx, dw13, dw2, x.new_empty(0, dtype=torch.float32) if drw is None else drw  # ops return no None


@_experts_bwd_op.register_fake
def _(dy, x, offs, w13, w2, h13, h, row_weights):
    drw = x.new_empty(0 if row_weights is None else x.shape[0], dtype=torch.float32)
    return torch.empty_like(x), torch.empty_like(w13), torch.empty_like(w2), drw


class _TritonExperts(torch.autograd.Function):
    """Returns only y, so autograd never materialises zero gradients for the saved h13 and h."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, offs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                row_weights: torch.Tensor | None) -> torch.Tensor:
        y, h13, h = _experts_fwd_op(x, offs, w13, w2, row_weights)
        ctx.save_for_backward(x, offs, w13, w2, h13, h, row_weights)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, offs, w13, w2, h13, h, row_weights = ctx.saved_tensors
        dx, dw13, dw2, drw = _experts_bwd_op(dy, x, offs, w13, w2, h13, h, row_weights)
        return dx, None, dw13, dw2, None if row_weights is None else drw


def triton_experts(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                   row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The expert kernel: x [N, D] sorted by expert, counts [E], row_weights [N] or None -> [N, D] (``kernels.py``)."""
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
    if row_weights is not None:
        row_weights = row_weights.float()
    return _TritonExperts.apply(x, offs, w13.to(x.dtype), w2.to(x.dtype), row_weights)
