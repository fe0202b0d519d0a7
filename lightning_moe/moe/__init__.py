"""Mixture-of-Experts layer: router, permutation, expert kernels, balancing."""

from lightning_moe.moe.experts import FeedForward, RoutedExperts
from lightning_moe.moe.kernels import KERNELS, get_kernel
from lightning_moe.moe.layer import MoE
from lightning_moe.moe.router import RoutingResult, TopKRouter

__all__ = ["KERNELS", "FeedForward", "MoE", "RoutedExperts", "RoutingResult", "TopKRouter", "get_kernel"]
