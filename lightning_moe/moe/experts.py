"""Expert MLPs: the dense SwiGLU (shared experts, dense layers) and the routed experts with a pluggable kernel.

Shapes: N routed rows sorted by expert, D hidden size, H expert hidden size, E experts (local experts under EP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from lightning_moe.moe.kernels import FUSES_ROW_WEIGHTS, get_kernel


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.init_std = init_std
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.w1, self.w3, self.w2):
            nn.init.normal_(lin.weight, std=self.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights, run by the configured kernel.

    Parameters: w13 [E, D, 2H] (gate and up projections side by side), w2 [E, H, D].
    ``forward(x: [N, D], counts: [E], row_weights: [N] | None = None) -> [N, D]`` with rows of x sorted by expert;
    ``row_weights`` scale each row's SwiGLU output (``kernels.py``). Expert parallelism wraps this module's inputs and
    outputs (token dispatch/combine); the module itself does no communication.
    """

    takes_row_weights = False
    """Whether the MoE layer hands this module the gate weights as ``row_weights`` (set per kernel from
    ``kernels.FUSES_ROW_WEIGHTS``; ``forward`` accepts them with every kernel)."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, kernel: str = "grouped_mm",
                 init_std: float = 0.02) -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.kernel_name = kernel
        self.kernel = get_kernel(kernel)
        self.takes_row_weights = kernel in FUSES_ROW_WEIGHTS
        self.init_std = init_std
        self.w13 = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w13, std=self.init_std)
        nn.init.normal_(self.w2, std=self.init_std)

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights of the experts held by this process (plain tensors even when sharded as DTensors)."""
        w13, w2 = self.w13, self.w2
        if isinstance(w13, DTensor):  # (torch.compile traces isinstance, not hasattr of a tensor subclass's method)
            w13, w2 = w13.to_local(), w2.to_local()
        return w13, w2

    def forward(self, x: torch.Tensor, counts: torch.Tensor, row_weights: torch.Tensor | None = None) -> torch.Tensor:
        w13, w2 = self.local_weights()
        return self.kernel(x, counts, w13, w2, row_weights)
