"""The safetensors files of a Hugging Face folder: open ``model.safetensors`` or its shards, write them back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"


def require_safetensors():
    """The ``safetensors`` package, or an ``ImportError`` that says how to install it."""
    try:
        import safetensors.torch  # noqa: PLC0415 - needed only for Hugging Face interop
    except ImportError as err:
        raise ImportError("Hugging Face import/export needs the safetensors package: "
                          "pip install \"lightning-moe[hf]\" (or safetensors)") from err
    return safetensors


def _tensor_files(folder: Path) -> list[Path]:
    index = folder / _INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / _SINGLE
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{folder}: no {_SINGLE} or {_INDEX} "
                            "(PyTorch .bin checkpoints are not read; re-save them with safe_serialization=True)")


def open_tensors(folder: Path) -> dict[str, Any]:
    """Every tensor name in ``folder`` -> the open safetensors file holding it (read with ``.get_tensor(name)``)."""
    safe_open = require_safetensors().safe_open
    handles = [safe_open(str(path), framework="pt") for path in _tensor_files(folder)]
    return {key: h for h in handles for key in h.keys()}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_tensors(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """Write ``tensors`` to ``folder`` as ``model.safetensors``, or, above ``max_shard_bytes``, as
    ``model-0000k-of-0000n.safetensors`` shards with an index; the weight files already there are removed."""
    save_file = require_safetensors().torch.save_file
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, seen = 0, set()
    for key, t in tensors.items():
        t = t.contiguous()
        if t.untyped_storage().data_ptr() in seen:  # safetensors refuses tensors sharing memory
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        nbytes = _nbytes(t)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    for old in list(folder.glob("model*.safetensors")) + list(folder.glob(_INDEX)):
        old.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(folder / _SINGLE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for k, shard in enumerate(shards, start=1):
            name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(_nbytes(t) for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
