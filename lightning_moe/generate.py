"""Greedy decoding, and speculative decoding that drafts with the MTP modules and verifies with the main model.

One sequence at a time and no KV cache: every step recomputes the whole prefix (meant for small models, tests and
benchmarks). Shapes: P tokens so far, K MTP depths, D hidden, V vocabulary.

Speculative step (DeepSeek-V3 MTP used as the draft model)::

    verify   one main forward on committed tokens + m drafts -> the main model's greedy token at each of the m + 1
             positions; keep the longest prefix of drafts that matches, plus the main model's own next token
    draft    from the main hidden states of the committed positions (before the final norm), MTP depth k proposes
             the token k ahead of the last committed one, each depth fed the previous depth's draft

The committed tokens are always the main model's greedy tokens, so the output equals ``generate``'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from lightning_moe.models.transformer import MoETransformer


@dataclass
class SpeculativeStats:
    """Counts of one ``speculative_generate`` call."""

    steps: int = 0
    """Forwards of the main model (one per step)."""
    new_tokens: int = 0
    """Tokens generated."""
    proposed: int = 0
    """Draft tokens proposed by the MTP modules."""
    accepted: int = 0
    """Draft tokens the main model agreed with."""
    proposed_per_depth: list[int] = field(default_factory=list)
    """proposed_per_depth[k-1]: drafts proposed by depth k."""
    accepted_per_depth: list[int] = field(default_factory=list)
    """accepted_per_depth[k-1]: drafts of depth k accepted (which needs depths 1..k-1 accepted in the same step)."""

    @property
    def acceptance_rate(self) -> float:
        """accepted / proposed drafts (0 when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens generated per main-model forward (1 for plain greedy decoding)."""
        return self.new_tokens / self.steps if self.steps else 0.0


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no capacity dropping, no expert-load counting) and no autograd, restoring the mode after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _check(model: MoETransformer, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    prompt = prompt.reshape(-1) if prompt.ndim == 2 and prompt.shape[0] == 1 else prompt
    if prompt.ndim != 1 or prompt.numel() == 0:
        raise ValueError(f"prompt must be a non-empty 1-D token tensor (one sequence), got shape {tuple(prompt.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    total = prompt.numel() + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens = {total} tokens exceed model.max_seq_len={model.cfg.max_seq_len} "
                         "(no sliding window: shorten the prompt or generate fewer tokens)")
    return prompt


def generate(model: MoETransformer, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding with the main model. prompt: [P] token ids -> [P + max_new_tokens]."""
    seq = _check(model, prompt, max_new_tokens)
    with _eval_mode(model):
        for _ in range(max_new_tokens):
            next_token = model(seq[None])[0, -1].argmax()
            seq = torch.cat([seq, next_token[None]])
    return seq


def speculative_generate(model: MoETransformer, prompt: torch.Tensor, max_new_tokens: int,
                         num_draft: int | None = None) -> tuple[torch.Tensor, SpeculativeStats]:
    """Greedy decoding sped up by MTP drafts; returns exactly ``generate``'s tokens.

    prompt: [P] token ids. num_draft: MTP depths used for drafting (default: all of ``model.mtp``).
    Returns (tokens [P + max_new_tokens], statistics).
    """
    seq = _check(model, prompt, max_new_tokens)
    if model.mtp is None:
        raise ValueError("speculative_generate needs MTP modules: train with model.mtp_depth > 0")
    depth = model.mtp.depth if num_draft is None else num_draft
    if not 0 <= depth <= model.mtp.depth:
        raise ValueError(f"num_draft={num_draft} must be in [0, model.mtp_depth={model.mtp.depth}]")
    total = seq.numel() + max_new_tokens
    stats = SpeculativeStats(proposed_per_depth=[0] * depth, accepted_per_depth=[0] * depth)
    drafts = seq.new_empty(0)
    with _eval_mode(model):
        while seq.numel() < total:
            # verify: one forward of the main model over committed tokens + drafts
            p, m = seq.numel(), drafts.numel()
            h = model.blocks(model.embed(torch.cat([seq, drafts])[None]))  # [1, P + m, D], before the final norm
            greedy = model.head(h[:, p - 1:])[0].argmax(-1)  # [m + 1]: the main model's tokens p .. p + m
            accepted = 0
            while accepted < m and drafts[accepted] == greedy[accepted]:
                accepted += 1
            seq = torch.cat([seq, greedy[:accepted + 1]])
            stats.steps += 1
            stats.proposed += m
            stats.accepted += accepted
            for k in range(m):
                stats.proposed_per_depth[k] += 1
                stats.accepted_per_depth[k] += int(k < accepted)
            # draft: at most as many as can still be used, so the next verify fits in total (<= max_seq_len)
            n_draft = min(depth, total - seq.numel() - 1)
            drafts = _draft(model, h[:, :p + accepted], seq, n_draft) if n_draft > 0 else seq.new_empty(0)
    stats.new_tokens = max_new_tokens
    return seq, stats


def _draft(model: MoETransformer, h: torch.Tensor, seq: torch.Tensor, n_draft: int) -> torch.Tensor:
    """Chain the first ``n_draft`` MTP depths from the last committed position.

    h: [1, n, D] main hidden states of positions 0..n-1, whose inputs are committed; seq: [n + 1] committed tokens
    (seq[n] is the main model's latest token, not yet fed to it). Depth k at position i reads token i + k, so at
    position n - 1 it drafts token n + k. Returns [n_draft] tokens.
    """
    n = h.shape[1]
    rope = model.rope(n)
    drafts = []
    for k in range(1, n_draft + 1):
        layer = model.mtp.layers[str(k)]
        ahead = torch.cat([seq, *drafts])[k:k + n]  # [n]: token i + k at position i
        h = layer(h, model.tok_embeddings(ahead[None]), rope)
        drafts.append(layer.logits(h[:, -1:], model.output)[0, -1].argmax()[None])
    return torch.cat(drafts)
