"""The Triton expert kernel (``model.expert_kernel=triton``) against the loop reference.

On the CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, in a subprocess because the flag is
read when the kernels are defined) in float32: the interpreter's bf16 dot is not usable. On a GPU they run compiled,
in bf16, through both the TMA and the pointer-load paths where the GPU has TMA.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_moe.moe.kernels import KERNELS, loop_experts
from tests.helpers.triton_interpreter import run_interpreted

ROOT = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

# Runs in a fresh interpreter with TRITON_INTERPRET=1. Prints one line per case: relative errors of y, dx, dw13, dw2.
_INTERPRETER_SCRIPT = r"""
import sys
import torch
from lightning_moe.moe import triton_grouped as tg
from lightning_moe.moe.kernels import loop_experts

torch.manual_seed(int(sys.argv[1]))
E, D, H = 4, 32, 24  # H is not a multiple of the tile: the SwiGLU halves are masked
cases = {"empty expert": torch.tensor([7, 0, 20, 1]), "one expert": torch.tensor([0, 0, 17, 0])}
# One program per tile, and persistent programs (3 under the interpreter) that each loop over several tiles.
for tma, persistent in ((False, False), (True, False), (False, True), (True, True)):
    tg.use_tma = lambda device, tma=tma: tma
    small = tg.TileConfig(16, 16, 16, 4, 2, persistent)
    tg.CONFIGS.update({name: small for name in tg.CONFIGS})
    for name, counts in cases.items():
        # Gate weights per row (the MoE layer's default) for one case: the row weights get gradients too.
        for weighted in ((False, True) if name == "empty expert" else (False,)):
            x = torch.randn(int(counts.sum()), D, requires_grad=True)
            w13 = (torch.randn(E, D, 2 * H) * D ** -0.5).requires_grad_()
            w2 = (torch.randn(E, H, D) * H ** -0.5).requires_grad_()
            rw = torch.rand(x.shape[0], requires_grad=True) if weighted else None
            inputs = (x, w13, w2, rw) if weighted else (x, w13, w2)
            dy = torch.randn(x.shape[0], D)
            out = tg.triton_experts(x, counts, w13, w2, rw)
            grads = torch.autograd.grad(out, inputs, dy)
            ref = loop_experts(x, counts, w13, w2, rw)
            ref_grads = torch.autograd.grad(ref, inputs, dy)
            errs = [((a - b).norm() / b.norm()).item() for a, b in zip((out, *grads), (ref, *ref_grads))]
            label = name + (" weighted" if weighted else "")
            print("tma" if tma else "ptr", "persistent" if persistent else "tiles", label, *errs)
"""


def test_triton_is_a_kernel_and_not_imported_eagerly():
    assert "triton" in KERNELS
    code = "import sys, lightning_moe.moe.experts, lightning_moe.moe.kernels; " \
           "assert 'lightning_moe.moe.triton_grouped' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@needs_triton
def test_triton_kernels_match_loop_in_interpreter(seed):
    lines = run_interpreted(_INTERPRETER_SCRIPT, str(seed))
    assert len(lines) == 12, lines
    assert sum("weighted" in line for line in lines) == 4
    for line in lines:
        errs = [float(v) for v in line.split()[-5 if "weighted" in line else -4:]]
        assert max(errs) < 1e-5, line


def _gpu_inputs(num_experts, dim, hidden, tokens, dtype=torch.bfloat16):
    counts = torch.multinomial(torch.ones(num_experts), tokens, replacement=True).bincount(minlength=num_experts)
    counts[1] += counts[2]  # an expert with no rows
    counts[2] = 0
    x = torch.randn(int(counts.sum()), dim, device="cuda", dtype=dtype, requires_grad=True)
    w13 = (torch.randn(num_experts, dim, 2 * hidden, device="cuda") * dim ** -0.5).to(dtype).requires_grad_()
    w2 = (torch.randn(num_experts, hidden, dim, device="cuda") * hidden ** -0.5).to(dtype).requires_grad_()
    return x, counts.cuda(), w13, w2


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@cuda
@needs_triton
@pytest.mark.parametrize("tma,wgrad,persistent,rows", [
    (True, "auto", False, "triton"), (False, "auto", False, "triton"), (True, "triton", False, "triton"),
    (True, "auto", True, "triton"), (False, "auto", True, "triton"), (True, "auto", False, "gluon"),
    (True, "triton", False, "gluon"), (True, "grouped_mm", False, "gluon")])
@pytest.mark.parametrize("shape", [(8, 256, 136, 1000), (16, 512, 384, 3000)])
def test_gpu_triton_matches_loop_in_bf16(seed, monkeypatch, tma, wgrad, persistent, rows, shape):
    import dataclasses

    from lightning_moe.moe import triton_grouped as tg

    if tma and not tg.use_tma(torch.device("cuda")):
        pytest.skip("this GPU has no TMA")
    if rows == "gluon" and not (torch.cuda.get_device_capability() == (9, 0) and tg._gluon_importable()):
        pytest.skip("the Gluon row GEMMs need a Hopper GPU and Triton with Gluon")
    monkeypatch.setattr(tg, "ROWS", rows)
    monkeypatch.setattr(tg, "use_tma", lambda device: tma)
    monkeypatch.setattr(tg, "WGRAD", wgrad)
    configs = {name: dataclasses.replace(cfg, persistent=persistent) for name, cfg in tg.CONFIGS.items()}
    monkeypatch.setattr(tg, "CONFIGS", configs)
    x, counts, w13, w2 = _gpu_inputs(*shape)
    rw = torch.rand(x.shape[0], device="cuda", requires_grad=True)
    for row_weights in (None, rw):
        inputs = (x, w13, w2) if row_weights is None else (x, w13, w2, row_weights)
        out = tg.triton_experts(x, counts, w13, w2, row_weights)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, inputs, g)
        ref = loop_experts(x.float(), counts, w13.float(), w2.float(), row_weights)
        ref_grads = torch.autograd.grad(ref, inputs, g.float())
        assert _rel(out, ref) < 1e-2  # bf16 operands: a few 1e-3 relative
        for a, b, want in zip(grads, ref_grads, inputs):
            assert a.dtype == b.dtype == want.dtype
            assert _rel(a, b) < 2e-2


@cuda
@needs_triton
def test_gpu_triton_under_torch_compile(seed):
    from lightning_moe.moe import triton_grouped as tg

    x, counts, w13, w2 = _gpu_inputs(8, 256, 128, 1000)
    g = torch.randn_like(x)
    eager = tg.triton_experts(x, counts, w13, w2)
    eager_grads = torch.autograd.grad(eager, (x, w13, w2), g)
    compiled = torch.compile(tg.triton_experts, fullgraph=True)(x, counts, w13, w2)
    grads = torch.autograd.grad(compiled, (x, w13, w2), g)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


@cuda
@needs_triton
def test_gpu_compiled_moe_layer_matches_eager(seed):
    """The compiled layer (argmax top-k, counts from the sort, one tile table per pass, the router's unfused token
    gradient) routes as eager mode does and gives its outputs and gradients."""
    from lightning_moe.models.config import ModelConfig
    from lightning_moe.moe.layer import MoE

    cfg = ModelConfig(dim=256, num_experts=16, top_k=4, moe_ffn_dim=128, num_shared_experts=0, n_layers=2,
                      n_heads=2, max_seq_len=512, aux_loss_coef=0.01)
    cfg.expert_kernel = "triton"
    layer = MoE(cfg).cuda().bfloat16()
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(x)
    results = []
    for fn in (layer, torch.compile(layer)):
        layer.router.tokens_per_expert.zero_()
        xi = x.clone().requires_grad_()
        out = fn(xi)
        grads = torch.autograd.grad(out, (xi, *layer.parameters()), g)
        results.append((out, *grads, layer.router.tokens_per_expert.clone()))
    for a, b in zip(*results):
        assert _rel(a, b) < 1e-2


@cuda
@needs_triton
def test_gpu_moe_layer_with_triton_matches_loop(seed):
    from lightning_moe.models.config import ModelConfig
    from lightning_moe.moe.layer import MoE

    cfg = ModelConfig(dim=256, num_experts=8, top_k=3, moe_ffn_dim=128, num_shared_experts=0, n_layers=2, n_heads=2,
                      max_seq_len=512)
    layers = {}
    for name in ("loop", "triton"):
        cfg.expert_kernel = name  # after validation, which may not list triton yet
        layers[name] = MoE(cfg).cuda().bfloat16()
    layers["triton"].load_state_dict(layers["loop"].state_dict())
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(x)
    results = {}
    for name, layer in layers.items():
        xi = x.clone().requires_grad_()
        out = layer(xi)
        grads = torch.autograd.grad(out, (xi, *layer.parameters()), g)
        results[name] = (out, *grads)
    for a, b in zip(results["triton"], results["loop"]):
        assert _rel(a, b) < 2e-2


def test_triton_missing_is_a_clear_error():
    from lightning_moe.moe.kernels import get_kernel

    if importlib.util.find_spec("triton") is not None:
        pytest.skip("triton is installed")
    with pytest.raises(ImportError, match=r"model.expert_kernel=triton needs the `triton` package"):
        get_kernel("triton")


@needs_triton
def test_row_weights_on_a_plain_gemm_are_refused():
    from lightning_moe.moe import triton_grouped as tg

    a, b, offs = torch.randn(4, 8), torch.randn(2, 8, 8), torch.tensor([2, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="SwiGLU epilogues only"):
        tg.grouped_rows_mm(a, b, offs, tg.CONFIGS["fwd2"], row_weights=torch.rand(4))


@needs_triton
def test_row_gemm_backend_choice(monkeypatch):
    from lightning_moe.moe import triton_grouped as tg

    a, b = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(2, 8, 8, dtype=torch.bfloat16)
    assert tg._rows_backend(a, b) == "triton"  # "auto" off a Hopper GPU
    monkeypatch.setattr(tg, "ROWS", "gluon")
    assert tg._rows_backend(a, b) == "gluon"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a Hopper GPU"):
            tg.rows_mm("fwd2", a, b, torch.tensor([2, 4], dtype=torch.int32), tg.CONFIGS)
    # TMA-only kernels: rows of 16 bytes' multiples, or "auto" keeps the Triton kernels.
    assert tg._gluon_shapes_ok(a, b)
    a12 = torch.randn(4, 12, dtype=torch.bfloat16)
    assert not tg._gluon_shapes_ok(a12, torch.randn(2, 12, 8, dtype=torch.bfloat16))
    assert not tg._gluon_shapes_ok(a, torch.randn(2, 8, 20, dtype=torch.bfloat16))
    monkeypatch.setattr(tg, "ROWS", "cutlass")
    with pytest.raises(ValueError, match="must be 'auto', 'triton' or 'gluon'"):
        tg._rows_backend(a, b)


@needs_triton
def test_weight_gradient_backend_choice(monkeypatch):
    from lightning_moe.moe import triton_grouped as tg

    a, g = torch.randn(4, 128, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16)
    offs = torch.tensor([1, 4], dtype=torch.int32)
    if not torch.cuda.is_available():
        assert tg._wgrad_backend(a, g) == "triton"  # "auto" off the GPU
    monkeypatch.setattr(tg, "WGRAD", "gluon")
    assert tg._wgrad_backend(a, g) == "gluon"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a Hopper GPU"):
            tg.weight_grad(a, g, offs, tg.CONFIGS["wgrad1"], a.dtype)
    monkeypatch.setattr(tg, "WGRAD", "cutlass")
    with pytest.raises(ValueError, match="must be 'auto', 'gluon', 'grouped_mm' or 'triton'"):
        tg._wgrad_backend(a, g)
