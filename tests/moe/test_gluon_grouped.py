"""The warp-specialised Gluon row GEMMs (``lightning_moe.moe.gluon_grouped``).

On the CPU: the kernel compiles for sm_90 into a warp-specialised kernel (register hand-over between partitions,
wgmma) without spills, and the tile table (a plain Triton kernel) matches a Python reference under Triton's
interpreter. On a Hopper GPU: every epilogue gives the results of ``triton_grouped.grouped_rows_mm`` (which
test_triton_grouped.py checks against the loop kernel).
"""

from __future__ import annotations

import tempfile

import pytest
import torch

from tests.helpers.gluon import hopper, needs_gluon
from tests.helpers.triton_interpreter import run_interpreted

_TABLE_SCRIPT = r"""
import sys
import torch
from lightning_moe.moe import gluon_grouped as gg

torch.manual_seed(int(sys.argv[1]))
bm = 16
for counts in (torch.tensor([7, 0, 33, 16, 0, 1]), torch.randint(0, 40, (9,)), torch.tensor([0, 0, 5])):
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    n = int(counts.sum())
    table, max_t = gg.tile_table(offs, n, bm)
    ref = [(e, start, start + c) for e, (start, c) in enumerate(zip((offs - counts).tolist(), counts.tolist()))]
    tiles = [(e, r0, end) for e, start, end in ref for r0 in range(start, end, bm)]
    got = [tuple(table[:3, t].tolist()) for t in range(len(tiles))]
    print(max_t >= len(tiles), int(table[3, 0]) == len(tiles), got == tiles)
"""


@needs_gluon
def test_tile_table_matches_reference_in_interpreter(seed):
    assert run_interpreted(_TABLE_SCRIPT, str(seed), timeout=300) == ["True True True"] * 3


@needs_gluon
@pytest.mark.parametrize("epilogue,b_kmajor,has_rw,bn,coop,interleave", [
    (0, False, False, 128, False, False), (0, True, False, 128, False, False), (1, False, True, 64, False, False),
    (2, True, True, 128, False, False), (0, True, False, 256, True, False), (1, False, True, 128, True, False),
    (2, True, True, 128, True, False), (2, True, True, 128, True, True), (1, False, True, 128, True, True),
    (1, False, True, 128, True, "merged")])
def test_kernel_compiles_warp_specialised_for_sm90(epilogue, b_kmajor, has_rw, bn, coop, interleave):
    from lightning_moe.moe import gluon_grouped as gg

    kernel = gg.compile_only(90, epilogue=epilogue, b_kmajor=b_kmajor, has_rw=has_rw, bn=bn, coop=coop,
                             stages=3 if coop and (bn == 256 or epilogue == 1) else 4, interleave=bool(interleave),
                             sub=8 if interleave else 32, merge=interleave == "merged")
    ptx = kernel.asm["ptx"]
    # Three partitions (two MMA consumers, one TMA producer) that hand registers over at run time.
    assert "ttg.warp_specialize" in kernel.asm["ttgir"]
    assert "setmaxnreg.inc.sync.aligned.u32 \t232" in ptx and "setmaxnreg.dec.sync.aligned.u32 \t40" in ptx
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx
    assert ".local" not in ptx  # no arrays in local memory
    assert kernel.metadata.shared <= 227 * 1024


@needs_gluon
@pytest.mark.parametrize("op", ["dgrad2", "dgrad2_tma", "dgrad2_tma_sub8", "fwd2", "fwd1"])
def test_epilogue_partition_compiles_without_spills(op):
    """With ``epi_warps`` a fourth partition runs the epilogues while both consumers multiply: four partitions
    (five warp groups' worth of registers shared out at run time), the tiles handed over in shared memory."""
    import triton

    from lightning_moe.moe import gluon_grouped as gg

    kw = {"dgrad2": dict(epilogue=2, b_kmajor=True, has_rw=True, epi_warps=4, consumer_regs=160, stages=4),
          "dgrad2_tma": dict(epilogue=2, b_kmajor=True, has_rw=True, epi_warps=4, consumer_regs=160, stages=4,
                             aux_stages=4),
          "dgrad2_tma_sub8": dict(epilogue=2, b_kmajor=True, has_rw=True, epi_warps=4, consumer_regs=160, stages=4,
                                  aux_stages=5, sub=8),
          "fwd2": dict(epilogue=0, epi_warps=8, consumer_regs=128, epi_regs=104, stages=4),
          "fwd1": dict(epilogue=1, has_rw=True, merge=True, epi_warps=2, consumer_regs=232, epi_regs=40,
                       stages=3)}[op]
    kw = {"sub": 16, **kw}
    kernel = gg.compile_only(90, coop=True, **kw)
    ptx = kernel.asm["ptx"]
    assert kernel.metadata.num_warps == 4 * triton.cdiv(4 + 4 + kw["epi_warps"] + 1, 4)
    assert kernel.asm["ttgir"].count("partition") >= 3 and "wgmma.mma_async" in ptx
    assert f"setmaxnreg.inc.sync.aligned.u32 \t{kw['consumer_regs']}" in ptx
    assert ".local" not in ptx and "mbarrier.try_wait" in ptx
    assert kernel.metadata.shared <= 227 * 1024
    if "tma" in op:  # TMA loads of the gate and up slices: aux_stages - 1 before the tile loop, then one per slice
        plain = gg.compile_only(90, coop=True, **{**kw, "aux_stages": 0}).asm["ptx"]
        tma = "cp.async.bulk.tensor.2d.shared::cluster.global"
        assert ptx.count(tma) == plain.count(tma) + 2 * (kw["aux_stages"] - 1 + 128 // kw["sub"])


@needs_gluon
@pytest.mark.parametrize("kw", [dict(aux_stages=3, epi_warps=4, coop=True),
                                dict(aux_stages=3, epilogue=2, coop=True),
                                dict(aux_stages=12, epilogue=2, epi_warps=4, coop=True, sub=16)])
def test_saved_value_ring_rejects_what_it_cannot_serve(kw):
    from lightning_moe.moe import gluon_grouped as gg

    a, b = torch.zeros(16, 64, dtype=torch.bfloat16), torch.zeros(2, 64, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="aux_stages"):
        gg.ws_rows_mm(a, b, torch.tensor([8, 16], dtype=torch.int32), **kw)


@needs_gluon
@pytest.mark.parametrize("kw", [dict(epi_warps=4, coop=True, interleave=True), dict(epi_warps=4, coop=False),
                                dict(epi_warps=3, coop=True)])
def test_epilogue_partition_rejects_schedules_it_cannot_serve(kw):
    from lightning_moe.moe import gluon_grouped as gg

    a, b = torch.zeros(16, 64, dtype=torch.bfloat16), torch.zeros(2, 64, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="epilogue partition"):
        gg.ws_rows_mm(a, b, torch.tensor([8, 16], dtype=torch.int32), **kw)


@needs_gluon
@pytest.mark.parametrize("sizes16", [True, False])
def test_interleaved_swiglu_backward_copies_saved_values_in_16_bytes(sizes16):
    """The interleaved SwiGLU backward stages its saved gate/up values by 16-byte ``cp.async`` copies, also where
    the launcher cannot tell the compiler that the sizes are multiples of 16 (an expert FFN of 136): copies of
    fewer than 4 bytes would not compile at all."""
    import re

    from lightning_moe.moe import gluon_grouped as gg

    kernel = gg.compile_only(90, epilogue=2, b_kmajor=True, has_rw=True, coop=True, interleave=True, sub=8,
                             sizes16=sizes16)
    sizes = re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*?, (0x[0-9a-f]+|\d+)", kernel.asm["ptx"])
    assert sizes.count("0x10") >= 2 * 8  # gate and up, per row slice of the tile
    assert set(sizes) <= {"0x10", "0x4"}  # and the fp32 row weights, one each
    assert ".local" not in kernel.asm["ptx"]


@hopper
@needs_gluon
@pytest.mark.parametrize("op", ["fwd1", "fwd2", "dgrad2", "dgrad1"])
@pytest.mark.parametrize("row_weights", [False, True])
@pytest.mark.parametrize("schedule", ["pingpong", "coop", "coop_interleaved", "coop_interleaved_merged",
                                      "coop_epilogue_warps", "coop_epilogue_warps_tma",
                                      "coop_epilogue_warps_tma_sub8"])
def test_gpu_matches_triton_rows(seed, op, row_weights, schedule):
    from lightning_moe.moe import gluon_grouped as gg
    from lightning_moe.moe import triton_grouped as tg

    if op in ("fwd2", "dgrad1") and row_weights:
        pytest.skip("row weights apply to the SwiGLU epilogues only")
    if schedule.endswith("merged") and op != "fwd1":
        pytest.skip("merge applies to the SwiGLU GEMM only")
    if "tma" in schedule and op != "dgrad2":
        pytest.skip("TMA loads of saved values apply to the SwiGLU backward only")
    g = torch.Generator(device="cuda").manual_seed(seed)
    # k-steps of 64: fwd1, dgrad2 17 (2 per epilogue slice, one left), dgrad1 10, fwd2 5 (fewer than the 8 slices)
    experts, dim, hidden = 8, 1088, 320
    probs = torch.rand(experts, device="cuda", generator=g) ** 3
    probs[3] = 0  # an expert with no rows
    counts = torch.bincount(torch.multinomial(probs, 2100, replacement=True, generator=g), minlength=experts)
    # Last row tiles whose second half holds only the next expert's rows (the cooperative consumer that owns it
    # skips its MMAs), exactly half a tile, and one row more than that.
    counts[5], counts[6], counts[7] = 128 + 40, 64, 65
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    n = int(counts.sum())

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=g).to(torch.bfloat16)

    w13, w2 = rnd(experts, dim, 2 * hidden) * dim ** -0.5, rnd(experts, hidden, dim) * hidden ** -0.5
    rw = torch.rand(n, device="cuda", generator=g) if row_weights else None
    cfg = tg.CONFIGS[op]
    x = rnd(n, {"fwd1": dim, "fwd2": hidden, "dgrad2": dim, "dgrad1": 2 * hidden}[op])
    b = {"fwd1": w13, "fwd2": w2, "dgrad2": w2.transpose(1, 2), "dgrad1": w13.transpose(1, 2)}[op]
    kw = {"fwd1": {"epilogue": 1, "row_weights": rw}, "dgrad2": {"epilogue": 2, "aux": rnd(n, 2 * hidden),
                                                                  "row_weights": rw}}.get(op, {})
    ref = tg.grouped_rows_mm(x, b, offs, cfg, **kw)
    if schedule != "pingpong":  # 128 x 256 tiles (fwd1: 128 gate + 128 up columns), 3 stages; dgrad2 128 x 128
        tile = {"bn": 128 if op in ("fwd1", "dgrad2") else 256, "stages": 4 if op == "dgrad2" else 3, "coop": True}
        if schedule.startswith("coop_interleaved"):
            tile.update(interleave=True, sub=8, merge=schedule.endswith("merged"))
        if "warps" in schedule:  # two 128 x 128 tiles in the hand-over buffers (fwd1: one 128 x 256)
            tile.update(bn=128, stages=4, epi_warps=4, sub=16, consumer_regs=160, interleave=False)
            if op == "fwd1":
                tile.update(stages=3, merge=True, epi_warps=2, consumer_regs=232, epi_regs=40)
            if schedule.endswith("tma"):  # 8 slices a tile, 3 in flight: the ring crosses into the next tiles
                tile.update(aux_stages=4)
            if schedule.endswith("tma_sub8"):  # 16 slices of 8 rows, 4 in flight
                tile.update(aux_stages=5, sub=8)
    else:
        tile = {"bn": 64 if op == "fwd1" else 128}
    out = gg.ws_rows_mm(x, b, offs, **tile, **kw)
    ref, out = (ref, out) if isinstance(ref, tuple) else ((ref,), (out,))
    for o, r in zip(out, ref, strict=True):
        assert o.shape == r.shape
        err = ((o.float() - r.float()).norm() / r.float().norm()).item()
        assert err < 1e-2, (op, err)


# fwd1 and dgrad2 as ``CONFIGS`` runs them (interleaved merged SwiGLU; epilogue partition with TMA'd saved values)
_GATHER_TILES = {
    "fwd1": dict(epilogue=1, has_rw=True, coop=True, interleave=True, sub=8, merge=True, bn=128, stages=3,
                 consumer_regs=232, producer_regs=40),
    "dgrad2": dict(epilogue=2, b_kmajor=True, has_rw=True, coop=True, sub=8, bn=128, stages=4, epi_warps=4,
                   consumer_regs=160, epi_regs=136, producer_regs=56, aux_stages=5),
    # the SwiGLU's up columns in a stage of their own (not merged): two B loads per k-step
    "fwd1_split": dict(epilogue=1, has_rw=True, coop=True, sub=8, bn=128, stages=4, producer_regs=40),
}


@needs_gluon
@pytest.mark.parametrize("op,lag,side", [("fwd1", 1, False), ("fwd1", 1, True), ("dgrad2", 2, True),
                                         ("dgrad2", 1, False), ("fwd1_split", 2, True)])
def test_gathered_rows_compile_to_copies_without_spills(op, lag, side):
    """gather: four producer warps copy A's rows by ``cp.async``, and with the side store the
    gathered tile goes out by TMA; no spills at the register shares the layer uses."""
    import re
    import subprocess
    from pathlib import Path

    import triton

    from lightning_moe.moe import gluon_grouped as gg

    kw = _GATHER_TILES[op]
    plain = gg.compile_only(90, **kw)
    kernel = gg.compile_only(90, **kw, gather=True, lag=lag, side=side)
    ptx, plain_ptx = kernel.asm["ptx"], plain.asm["ptx"]
    assert ptx.count("cp.async.cg.shared.global") > plain_ptx.count("cp.async.cg.shared.global")
    assert ("cp.async.bulk.tensor.2d.global.shared" in ptx) == side
    assert f"setmaxnreg.dec.sync.aligned.u32 \t{kw['producer_regs']}" in ptx and ".local" not in ptx
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if ptxas.exists():
        src = Path(tempfile.mkdtemp()) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(src), "-o", str(src.with_suffix(".cubin"))],
                             capture_output=True, text=True, check=True).stderr
        assert re.search(r"\b0 bytes spill stores", out), out


@needs_gluon
def test_gather_rejects_what_it_cannot_serve():
    from lightning_moe.moe import gluon_grouped as gg

    a, b = torch.zeros(8, 64, dtype=torch.bfloat16), torch.zeros(2, 64, 64, dtype=torch.bfloat16)
    offs = torch.tensor([8, 16], dtype=torch.int32)
    idx = torch.arange(16, dtype=torch.int32) // 2
    with pytest.raises(ValueError, match="lag=3"):
        gg.ws_rows_mm(a, b, offs, gather=idx, lag=3)
    with pytest.raises(ValueError, match="lag=2"):
        gg.ws_rows_mm(a, b, offs, gather=idx, lag=2, stages=3)
    with pytest.raises(ValueError, match="1-d integer"):
        gg.ws_rows_mm(a, b, offs, gather=idx.float())
    with pytest.raises(ValueError, match="pass gather"):
        gg.ws_rows_mm(a, b, offs, keep_gathered=True)
    with pytest.raises(ValueError, match="16-byte aligned"):
        gg.ws_rows_mm(torch.zeros(8 * 64 + 1, dtype=torch.bfloat16)[1:].view(8, 64), b, offs, gather=idx)


@hopper
@needs_gluon
@pytest.mark.parametrize("op,lag", [("fwd1", 1), ("dgrad2", 1), ("dgrad2", 2)])
@pytest.mark.parametrize("keep", [False, True])
def test_gpu_gathered_rows_match_pregathered(seed, op, lag, keep):
    """Gathering A's rows in the kernel gives bit for bit what the same kernel gives on the rows gathered
    beforehand (the same MMAs in the same order), and ``keep_gathered`` returns exactly those rows, rows of the
    next expert in a tile and a last tile past the end included."""
    from lightning_moe.moe import gluon_grouped as gg

    g = torch.Generator(device="cuda").manual_seed(seed)
    experts, dim, hidden, topk = 8, 1088, 320, 3
    probs = torch.rand(experts, device="cuda", generator=g) ** 3
    probs[3] = 0
    counts = torch.bincount(torch.multinomial(probs, 2100, replacement=True, generator=g), minlength=experts)
    counts[5], counts[6], counts[7] = 128 + 40, 64, 65
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    n = int(counts.sum())
    tokens = -(-n // topk)
    idx = (torch.randperm(tokens * topk, device="cuda", generator=g)[:n] // topk).to(torch.int32)

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=g).to(torch.bfloat16)

    src = rnd(tokens, dim)
    rw = torch.rand(n, device="cuda", generator=g)
    tiles = {k: v for k, v in _GATHER_TILES[op].items() if k not in ("has_rw", "b_kmajor")}
    if op == "fwd1":
        b, kw = rnd(experts, dim, 2 * hidden) * dim ** -0.5, {"row_weights": rw}
    else:
        b = (rnd(experts, hidden, dim) * hidden ** -0.5).transpose(1, 2)
        kw = {"aux": rnd(n, 2 * hidden), "row_weights": rw}
    ref = gg.ws_rows_mm(src[idx.long()], b, offs, **tiles, **kw)
    out = gg.ws_rows_mm(src, b, offs, **tiles, **kw, gather=idx, lag=lag, keep_gathered=keep)
    if keep:
        *out, kept = out
        assert torch.equal(kept, src[idx.long()])
    for o, r in zip(out, ref, strict=True):
        assert torch.equal(o, r), (op, ((o.float() - r.float()).abs().max()).item())


@needs_gluon
def test_timing_build_reads_the_global_timer():
    from lightning_moe.moe import gluon_grouped as gg

    plain = gg.compile_only(90, epilogue=2, b_kmajor=True, has_rw=True, coop=True, interleave=True, sub=8)
    timed = gg.compile_only(90, epilogue=2, b_kmajor=True, has_rw=True, coop=True, interleave=True, sub=8,
                            timing=True)
    assert "%globaltimer" in timed.asm["ptx"] and "%globaltimer" not in plain.asm["ptx"]


@needs_gluon
def test_merged_swiglu_runs_one_mma_over_gate_and_up():
    """merge: the SwiGLU GEMM loads each k-step's gate and up columns side by side and multiplies them in one
    m64n256 wgmma per consumer (two m64n128 ones without it, each reading the A tile)."""
    import re
    from collections import Counter

    from lightning_moe.moe import gluon_grouped as gg

    kw = dict(epilogue=1, has_rw=True, bn=128, stages=3, coop=True, interleave=True, sub=8)
    shapes = {merge: Counter(re.findall(r"wgmma.mma_async.sync.aligned.(m64n\d+k16)",
                                        gg.compile_only(90, merge=merge, **kw).asm["ptx"]))
              for merge in (False, True)}
    assert set(shapes[False]) == {"m64n128k16"} and set(shapes[True]) == {"m64n256k16"}
    assert sum(shapes[False].values()) == 2 * sum(shapes[True].values())
