"""Consolidate a distributed (sharded) checkpoint into one file for inference, and load it back.

    python -m lightning_moe.parallel.checkpoint outputs/.../checkpoints/last.ckpt model.pt

The folder written by ``MoEStrategy`` (``torch.distributed.checkpoint`` shards + ``meta.pt``) becomes a single
``torch.save`` file ``{"model_config": {...}, "state_dict": {...}}`` whose keys are those of a plain
``MoETransformer``; no process group is needed.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from lightning_moe.models.config import ModelConfig
from lightning_moe.models.transformer import MoETransformer


def consolidate(checkpoint_dir: str | Path, out_path: str | Path) -> Path:
    """Write the model weights (full tensors) and architecture of a sharded checkpoint to ``out_path``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # noqa: PLC0415

    checkpoint_dir, out_path = Path(checkpoint_dir), Path(out_path)
    if not (checkpoint_dir / ".metadata").is_file():
        raise FileNotFoundError(f"{checkpoint_dir} is not a distributed checkpoint folder (no .metadata)")
    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp) / "full.pt"
        dcp_to_torch_save(checkpoint_dir, full)
        state = torch.load(full, map_location="cpu", weights_only=True)
    meta = torch.load(checkpoint_dir / "meta.pt", map_location="cpu", weights_only=True)
    model_cfg = meta["hyper_parameters"]["model"]
    weights = state["state_dict"]
    # Lightning saves the LightningModule's state: strip the `model.` prefix of our module's attribute.
    weights = {k.removeprefix("model."): v for k, v in weights.items()}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_config": model_cfg, "state_dict": weights}, out_path)
    return out_path


def load_consolidated(path: str | Path, map_location: str = "cpu") -> MoETransformer:
    """A plain ``MoETransformer`` from a file written by ``consolidate`` (or any ``{model_config, state_dict}``)."""
    blob = torch.load(path, map_location=map_location, weights_only=True)
    model = MoETransformer(ModelConfig.from_dict(blob["model_config"]))
    model.load_state_dict(blob["state_dict"])
    return model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Consolidate a sharded lightning_moe checkpoint into one file.")
    p.add_argument("checkpoint_dir")
    p.add_argument("out_path")
    args = p.parse_args(argv)
    print(consolidate(args.checkpoint_dir, args.out_path))


if __name__ == "__main__":
    main()
