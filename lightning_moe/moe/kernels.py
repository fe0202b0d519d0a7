"""Routed-expert kernels: SwiGLU over tokens already grouped by expert.

Every kernel has one signature::

    kernel(x: [N, D], counts: [E] int, w13: [E, D, 2H], w2: [E, H, D], row_weights: [N] | None = None) -> [N, D]

where the rows of ``x`` are sorted by expert (``counts[e]`` rows for expert ``e``, in order, ``sum(counts) == N``)
and ``w13`` holds the gate and up projections side by side. With ``row_weights`` (each routed row's gate weight,
float32) every row's SwiGLU output is scaled by its weight before the down projection, which is the same function as
scaling the row's output (the down projection is linear); the MoE layer passes them so that its combine is a plain
sum and the routed outputs need not be kept for the gate weights' gradient (``layer.py``).

``loop`` is the readable reference the tests compare against; ``grouped_mm`` (default) runs all experts in one
``torch.nn.functional.grouped_mm`` per projection;
``megablocks`` uses the grouped GEMM of the optional ``megablocks`` package (GPU only); ``triton`` runs this package's
own Triton grouped GEMMs with SwiGLU and its backward fused into their epilogues (``triton_grouped.py``; needs
``triton``, which is imported only when this kernel is chosen).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

ExpertKernel = Callable[..., torch.Tensor]


def swiglu(h13: torch.Tensor) -> torch.Tensor:
    gate, up = h13.chunk(2, dim=-1)
    return F.silu(gate) * up


def scale_rows(h: torch.Tensor, row_weights: torch.Tensor | None) -> torch.Tensor:
    """h * row_weights[:, None], multiplied in float32 and rounded once to h's dtype; h itself when None."""
    if row_weights is None:
        return h
    return (h.float() * row_weights.unsqueeze(-1)).to(h.dtype)


def loop_experts(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                 row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: one matmul pair per expert, in a Python loop."""
    w13, w2 = w13.to(x.dtype), w2.to(x.dtype)
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        rows = x[start:start + n]
        weights = None if row_weights is None else row_weights[start:start + n]
        outs.append(scale_rows(swiglu(rows @ w13[e]), weights) @ w2[e])
        start += n
    if not outs:
        return x.new_zeros(0, w2.shape[-1])
    return torch.cat(outs)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: ``grouped_mm``'s backward refuses gradients
    with zero or unaligned strides, such as the expanded gradient of ``y.sum()``."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _grouped_mm_supports(x: torch.Tensor) -> bool:
    """torch's CUDA grouped GEMM takes bf16 operands only (torch 2.11: "Expected inputs of BF16 type"), and so does
    its shape function under torch.compile (torch 2.13) whatever the device; the eager CPU one takes every floating
    dtype."""
    return x.dtype == torch.bfloat16 or not (x.is_cuda or torch.compiler.is_compiling())


_warned_loop_fallback = False


def grouped_mm_experts(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                       row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """All experts in two ``grouped_mm`` calls (one for gate+up, one for down).

    On a GPU or under torch.compile with other than bf16 rows (an fp32 run, or fp16) it falls back to
    ``loop_experts``, with a warning: the same results, much slower (a host synchronisation per layer).
    """
    if not _grouped_mm_supports(x):
        global _warned_loop_fallback
        if not _warned_loop_fallback:
            _warned_loop_fallback = True
            warnings.warn(f"model.expert_kernel=grouped_mm: torch's grouped GEMM takes bfloat16 only on GPUs and "
                          f"under torch.compile, so the {x.dtype} experts run one matmul pair per expert (slow). "
                          "Train in bf16 (strategy.param_dtype=bfloat16) for the grouped kernel.", stacklevel=2)
        return loop_experts(x, counts, w13, w2, row_weights)
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
    w13, w2 = w13.to(x.dtype), w2.to(x.dtype)
    h = scale_rows(swiglu(F.grouped_mm(x, w13, offs=offs)), row_weights)
    return _ContiguousGrad.apply(F.grouped_mm(h, w2, offs=offs))


_MEGABLOCKS_HELP = (
    "model.expert_kernel=megablocks needs the optional `megablocks` package with its grouped GEMM (CUDA only): "
    "pip install --no-deps megablocks==0.10.0 grouped_gemm  (in a CUDA environment whose torch they were built for). "
    "Use model.expert_kernel=grouped_mm otherwise."
)


def _megablocks_gmm() -> Callable[..., torch.Tensor]:
    """MegaBlocks' dropless grouped GEMM: ``megablocks.grouped_gemm_util.ops.gmm``, which is ``grouped_gemm.ops.gmm``.

    megablocks 0.10.0's own CUDA extension does not compile against CUDA 13 (docs/moe_layer_benchmark.md), and
    without it ``import megablocks`` fails; its grouped-GEMM backend package ``grouped_gemm`` does build there, so it
    is used directly when ``megablocks`` itself cannot be imported.
    """
    errors = []
    try:
        from megablocks import grouped_gemm_util as gg  # noqa: PLC0415 - optional extra, imported on use

        if gg.grouped_gemm_is_available():
            return gg.ops.gmm
        errors.append("megablocks imported but its `grouped_gemm` backend is missing")
    except Exception as err:  # ImportError, or its CUDA extension failing to load
        errors.append(f"import megablocks: {err}")
    try:
        import grouped_gemm  # noqa: PLC0415 - MegaBlocks' grouped-GEMM backend (its `gg` extra)

        return grouped_gemm.ops.gmm
    except Exception as err:
        errors.append(f"import grouped_gemm: {err}")
    raise ImportError(f"{_MEGABLOCKS_HELP} ({'; '.join(errors)})")


def megablocks_experts(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                       row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """MegaBlocks' dropless grouped GEMM (``grouped_gemm.ops.gmm``); batch sizes must live on the CPU."""
    gmm = _megablocks_gmm()
    batch_sizes = counts.to("cpu", torch.int64)
    w13, w2 = w13.to(x.dtype), w2.to(x.dtype)
    h = scale_rows(swiglu(gmm(x, w13, batch_sizes)), row_weights)
    return gmm(h, w2, batch_sizes)


_TRITON_HELP = "model.expert_kernel=triton needs the `triton` package (it ships with CUDA builds of torch)"


def _triton_module():
    try:
        from lightning_moe.moe import triton_grouped  # noqa: PLC0415 - needs triton, imported on use
    except ImportError as err:
        raise ImportError(f"{_TRITON_HELP}: {err}. Use model.expert_kernel=grouped_mm otherwise.") from err
    return triton_grouped


def triton_experts(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                   row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Triton grouped GEMMs with SwiGLU (and its backward) fused into the GEMM epilogues; TMA loads on Hopper."""
    return _triton_module().triton_experts(x, counts, w13, w2, row_weights)


# Kernels to which the MoE layer hands the gate weights (``row_weights``). Triton applies them in its GEMM epilogues
# and gets their gradient from values already in registers; under torch.compile, grouped_mm's SwiGLU backward plus
# the gate weights' gradient became two passes over the [N, 2H] activations, which cost more than the weighted
# combine saves (docs/moe_layer_benchmark.md), so the other kernels leave the weights to the combine.
FUSES_ROW_WEIGHTS = frozenset({"triton"})

KERNELS: dict[str, ExpertKernel] = {
    "loop": loop_experts,
    "grouped_mm": grouped_mm_experts,
    "megablocks": megablocks_experts,
    "triton": triton_experts,
}


def get_kernel(name: str) -> ExpertKernel:
    """The kernel for ``model.expert_kernel``; checks optional dependencies now rather than mid-training."""
    if name not in KERNELS:
        raise ValueError(f"model.expert_kernel={name!r}: must be one of {', '.join(KERNELS)}")
    if name == "megablocks":
        _megablocks_gmm()
    if name == "triton":
        return _triton_module().triton_experts  # imported now, so compiled code never runs the import
    return KERNELS[name]
