import pytest
import torch

from lightning_moe.moe.kernels import KERNELS, get_kernel, grouped_mm_experts, loop_experts


def _inputs(num_experts=6, dim=16, hidden=24, tokens=50, empty_expert=True):
    counts = torch.multinomial(torch.ones(num_experts), tokens, replacement=True).bincount(minlength=num_experts)
    if empty_expert:  # an expert with no tokens must work too
        counts[1] += counts[2]
        counts[2] = 0
    x = torch.randn(int(counts.sum()), dim, requires_grad=True)
    w13 = (torch.randn(num_experts, dim, 2 * hidden) * 0.2).requires_grad_()
    w2 = (torch.randn(num_experts, hidden, dim) * 0.2).requires_grad_()
    return x, counts, w13, w2


def _run(kernel, x, counts, w13, w2):
    out = kernel(x, counts, w13, w2)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w13, w2), grad_out)
    return out, grads, grad_out


@pytest.mark.parametrize("empty_expert", [True, False])
def test_grouped_mm_matches_loop(seed, empty_expert):
    x, counts, w13, w2 = _inputs(empty_expert=empty_expert)
    ref = loop_experts(x, counts, w13, w2)
    out = grouped_mm_experts(x, counts, w13, w2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (x, w13, w2), g)
    grads = torch.autograd.grad(out, (x, w13, w2), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_grouped_mm_backward_takes_expanded_gradients(seed):
    """``y.sum().backward()`` hands the kernel a stride-0 gradient, which ``grouped_mm``'s backward refuses raw."""
    x, counts, w13, w2 = _inputs()
    grads = torch.autograd.grad(grouped_mm_experts(x, counts, w13, w2).sum(), (x, w13, w2))
    ref_grads = torch.autograd.grad(loop_experts(x, counts, w13, w2).sum(), (x, w13, w2))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compiled_grouped_mm_fp32_falls_back_to_the_loop(seed, monkeypatch):
    """Under torch.compile torch's grouped GEMM wants bf16 on the CPU too: fp32 rows take the loop, with a warning."""
    from lightning_moe.moe import kernels

    monkeypatch.setattr(kernels, "_warned_loop_fallback", False)
    torch._dynamo.reset()
    x, counts, w13, w2 = _inputs()
    with pytest.warns(UserWarning, match="bfloat16 only"):
        out, grads, g = _run(torch.compile(grouped_mm_experts, backend="eager"), x, counts, w13, w2)
    ref = loop_experts(x, counts, w13, w2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, torch.autograd.grad(ref, (x, w13, w2), g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_loop_matches_per_token_math(seed):
    x, counts, w13, w2 = _inputs(num_experts=3, tokens=9)
    out = loop_experts(x, counts, w13, w2)
    expert_of_row = torch.repeat_interleave(torch.arange(3), counts)
    for row, e in enumerate(expert_of_row.tolist()):
        gate, up = (x[row] @ w13[e]).chunk(2)
        expected = (torch.nn.functional.silu(gate) * up) @ w2[e]
        torch.testing.assert_close(out[row], expected, rtol=1e-5, atol=1e-6)


def test_all_tokens_to_one_expert(seed):
    x, counts, w13, w2 = _inputs(num_experts=4, tokens=12)
    counts = torch.tensor([0, 0, int(counts.sum()), 0])
    torch.testing.assert_close(grouped_mm_experts(x, counts, w13, w2), loop_experts(x, counts, w13, w2))


def test_unknown_kernel_names_the_key():
    with pytest.raises(ValueError, match="model.expert_kernel='nope'"):
        get_kernel("nope")


def test_megablocks_missing_is_a_clear_error():
    for module in ("megablocks", "grouped_gemm"):
        try:
            __import__(module)
            pytest.skip(f"{module} is installed")
        except Exception:
            pass
    with pytest.raises(ImportError, match=r"model.expert_kernel=megablocks.*pip install"):
        get_kernel("megablocks")
    assert set(KERNELS) == {"loop", "grouped_mm", "megablocks", "triton"}


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@cuda
@pytest.mark.parametrize("name", ["grouped_mm", "megablocks"])
def test_gpu_kernels_match_loop_in_bf16(seed, name):
    try:
        kernel = get_kernel(name)
    except ImportError as err:
        pytest.skip(str(err)[:200])
    x, counts, w13, w2 = _inputs(num_experts=8, dim=256, hidden=128, tokens=1000)
    x, w13, w2 = (t.detach().cuda().bfloat16().requires_grad_() for t in (x, w13, w2))
    counts = counts.cuda()
    out, grads, g = _run(kernel, x, counts, w13, w2)
    ref = loop_experts(x.float(), counts, w13.float(), w2.float())
    ref_grads = torch.autograd.grad(ref, (x, w13, w2), g.float())
    def rel_err(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    assert rel_err(out, ref) < 1e-2  # bf16 has 8 mantissa bits: about 4e-3 relative per rounding
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < 2e-2


@cuda
def test_gpu_grouped_mm_fp32_falls_back_to_the_loop(seed, monkeypatch):
    """torch's CUDA grouped GEMM refuses fp32; the kernel warns once and gives the loop's results."""
    from lightning_moe.moe import kernels

    monkeypatch.setattr(kernels, "_warned_loop_fallback", False)
    counts = torch.tensor([5, 0, 9, 2], device="cuda")
    x = torch.randn(int(counts.sum()), 32, device="cuda", requires_grad=True)
    w13 = torch.randn(4, 32, 48, device="cuda", requires_grad=True)
    w2 = torch.randn(4, 24, 32, device="cuda", requires_grad=True)
    with pytest.warns(UserWarning, match="bfloat16 only"):
        out = kernels.grouped_mm_experts(x, counts, w13, w2)
    torch.testing.assert_close(out, loop_experts(x, counts, w13, w2))


@pytest.mark.parametrize("kernel", ["loop", "grouped_mm"])
def test_row_weights_scale_each_rows_output(seed, kernel):
    """kernel(..., row_weights) is row_weights[:, None] * kernel(...), with the row weights' gradients too."""
    x, counts, w13, w2 = _inputs()
    rw = torch.rand(x.shape[0], requires_grad=True)
    out = KERNELS[kernel](x, counts, w13, w2, rw)
    ref = loop_experts(x, counts, w13, w2) * rw.unsqueeze(-1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (x, w13, w2, rw), g)
    for a, b in zip(grads, torch.autograd.grad(ref, (x, w13, w2, rw), g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
