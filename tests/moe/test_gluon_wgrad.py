"""The warp-specialised Gluon weight gradients (``lightning_moe.moe.gluon_wgrad``).

On the CPU: the kernel compiles for sm_90 into a warp-specialised kernel (m64n256 ``wgmma``, TMA loads and stores)
without spills, and refuses operands it cannot serve. On a Hopper GPU: every expert's slice matches an fp32
reference (empty experts, experts of fewer rows than a k-step, row counts that end mid-step, output columns that
end mid-tile, more tiles than programs).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.gluon import hopper, needs_gluon


@needs_gluon
def test_kernel_compiles_warp_specialised_for_sm90():
    from lightning_moe.moe import gluon_wgrad as gw

    kernel = gw.compile_only(90)
    ptx = kernel.asm["ptx"]
    assert kernel.metadata.num_warps == 12  # two consumer warp groups and the producer's
    assert kernel.asm["ttgir"].count("partition") >= 2
    assert "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16" in ptx
    assert "cp.async.bulk.tensor.2d.shared::cluster.global" in ptx  # TMA loads
    assert "cp.async.bulk.tensor.2d.global.shared" in ptx  # TMA stores of the output tiles
    assert ".local" not in ptx and "mbarrier.try_wait" in ptx
    assert kernel.metadata.shared <= 227 * 1024


@needs_gluon
@pytest.mark.parametrize("a_shape,b_shape,dtype", [((64, 100), (64, 64), torch.bfloat16),  # columns not / 128
                                                    ((64, 128), (32, 64), torch.bfloat16),  # rows differ
                                                    ((64, 128), (64, 60), torch.bfloat16),  # rows of 120 bytes
                                                    ((64, 128), (64, 64), torch.float32)])
def test_rejects_operands_it_cannot_serve(a_shape, b_shape, dtype):
    from lightning_moe.moe import gluon_wgrad as gw

    a, b = torch.zeros(a_shape, dtype=dtype), torch.zeros(b_shape, dtype=torch.bfloat16)
    assert not gw.supported(a, b)
    with pytest.raises(ValueError, match="gluon_wgrad"):
        gw.wgrad(a, b, torch.tensor([a_shape[0]], dtype=torch.int32))


@hopper
@needs_gluon
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("programs", [None, 3])
def test_gpu_matches_fp32_reference(seed, dtype, programs):
    from lightning_moe.moe import gluon_wgrad as gw

    g = torch.Generator(device="cuda").manual_seed(seed)
    experts, m, k = 7, 256, 320  # two row tiles; column tiles of 256 and 64
    counts = torch.randint(0, 300, (experts,), device="cuda", generator=g)
    counts[1], counts[4], counts[5] = 0, 37, 64  # empty, fewer rows than a k-step, exactly one k-step
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    n = int(counts.sum())
    a = torch.randn(n, m, device="cuda", generator=g).to(dtype)
    b = torch.randn(n, k, device="cuda", generator=g).to(dtype)
    out = gw.wgrad(a, b, offs, num_programs=programs)
    assert out.shape == (experts, m, k) and out.dtype == dtype
    start = 0
    for e, end in enumerate(offs.tolist()):
        ref = a[start:end].double().t() @ b[start:end].double()
        got = out[e].double()
        if end == start:
            assert torch.equal(got, torch.zeros_like(got)), e
        else:
            err = ((got - ref).norm() / ref.norm()).item()
            assert err < 4e-3, (e, err)  # one rounding to 16 bits of an fp32 sum
        start = end


@needs_gluon
def test_no_rows_give_zero_gradients_without_a_launch():
    from lightning_moe.moe import gluon_wgrad as gw

    a, b = torch.empty(0, 128, dtype=torch.bfloat16), torch.empty(0, 64, dtype=torch.bfloat16)
    out = gw.wgrad(a, b, torch.zeros(3, dtype=torch.int32))  # on the CPU: any launch would fail
    assert out.shape == (3, 128, 64) and torch.equal(out, torch.zeros_like(out))
