"""Cut a ``MoETransformer`` into the pipeline stages of one rank.

``keep_stages`` prunes the rank's model in place to the layers of its stages (layers stay keyed by their global index,
so the state-dict keys are those of the whole model and distributed checkpoints reshard between pipeline layouts).
``StageModule`` is a view of one stage over that pruned model: it shares the model's submodules and adds none, so
the model (not the stages) is what the optimizer and the checkpoints see.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_moe.models.transformer import MoETransformer

__all__ = ["StageModule", "keep_stages"]


class StageModule(nn.Module):
    """Stage ``index`` of ``num_stages``: embedding (first stage), its blocks, then norm + head (+ MTP) (last stage).

    ``forward(x, labels=None)``: x is tokens [B, S] on the first stage, hidden states [B, S, D] otherwise. Returns
    hidden states, or on the last stage the logits [B, S, V] — with MTP modules and ``labels`` given, the tuple
    ``(logits, mtp_logits_1, ..., mtp_logits_k)`` (see ``MoETransformer.forward``).
    """

    def __init__(self, model: MoETransformer, index: int, num_stages: int, layers: range) -> None:
        super().__init__()
        self.index, self.num_stages = index, num_stages
        self.is_first, self.is_last = index == 0, index == num_stages - 1
        self.tok_embeddings = model.tok_embeddings if self.is_first else None
        self.rope = model.rope
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layers})
        self.norm = model.norm if self.is_last else None
        self.output = model.output if self.is_last else None
        self.mtp = model.mtp if self.is_last else None
        # MTP embeds the shifted labels with the main embedding: the same module as the first stage's when both
        # stages are on this rank (V schedules), else this rank's copy, kept in sync by ``PipelineRunner``
        # (gradients summed with the first stage's after each step).
        self.mtp_embeddings = model.tok_embeddings if self.is_last and model.mtp is not None else None

    def hold_mtp_embeddings_unregistered(self) -> None:
        """Keep using ``mtp_embeddings`` but drop it from this module's children (parameters, state dict, FSDP
        root traversal), for an embedding that another stage on this rank holds."""
        embeddings = self._modules.pop("mtp_embeddings")
        object.__setattr__(self, "mtp_embeddings", embeddings)

    def extra_repr(self) -> str:
        return f"stage={self.index}/{self.num_stages}, layers={list(self.layers)}"

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        h = self.tok_embeddings(x) if self.is_first else x
        rope = self.rope(h.shape[1])
        for layer in self.layers.values():
            h = layer(h, rope)
        if not self.is_last:
            return h
        logits = self.output(self.norm(h))
        if self.mtp is None or labels is None:
            return logits
        return (logits, *self.mtp(h, labels, self.mtp_embeddings, self.output, self.rope))


def keep_stages(model: MoETransformer, stages: list[int], layer_ranges: list[range]) -> None:
    """Delete, in place, every part of ``model`` that none of ``stages`` runs (``layer_ranges``: all stages')."""
    num_stages = len(layer_ranges)
    keep = {str(i) for s in stages for i in layer_ranges[s]}
    for key in list(model.layers):
        if key not in keep:
            del model.layers[key]
    has_first, has_last = 0 in stages, num_stages - 1 in stages
    if not has_first and not (has_last and model.mtp is not None):  # MTP on the last stage needs the embedding
        model.tok_embeddings = None
    if not has_last:
        model.norm = model.output = None
        model.mtp = None
