"""The entry points: read a Hugging Face folder into our config and state dict or a whole model, export a model."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from lightning_moe.models.config import ModelConfig
from lightning_moe.models.hf.config import HF_CLASSES, HFConfig, config_from_hf, config_to_hf, infer_arch
from lightning_moe.models.hf.files import open_tensors, require_safetensors, write_tensors
from lightning_moe.models.hf.weights import state_dict_from_hf, state_dict_to_hf


def load_hf_checkpoint(folder: str | Path, **overrides: Any) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face DeepSeek-V3 / Mixtral / Qwen3-MoE folder -> (ModelConfig, our state dict).

    ``overrides`` replace ModelConfig fields (``max_seq_len=4096``, ``expert_kernel="loop"``,
    ``bias_update_speed=0.0``, ``mtp_depth=1`` ...); the state dict keeps the checkpoint's dtypes.
    """
    require_safetensors()  # before any work
    folder = Path(folder)
    hf = json.loads((folder / "config.json").read_text())
    cfg = config_from_hf(hf)
    cfg.extra["hf_source"] = str(folder)
    arch = cfg.extra["hf_arch"]
    where = open_tensors(folder)
    mtp_present = 0  # DeepSeek MTP layers stored after the main ones
    while arch == "deepseek_v3" and f"model.layers.{cfg.n_layers + mtp_present}.eh_proj.weight" in where:
        mtp_present += 1
    if mtp_present:
        cfg = dataclasses.replace(cfg, mtp_depth=mtp_present,
                                  mtp_moe=f"model.layers.{cfg.n_layers}.mlp.gate.weight" in where)
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    asked: set[str] = set()

    def get(key: str) -> torch.Tensor | None:
        if key not in where and ".block_sparse_moe." in key:  # Mixtral as transformers 5 holds it in memory
            key = key.replace(".block_sparse_moe.", ".mlp.")
        asked.add(key)
        return where[key].get_tensor(key) if key in where else None

    interleave = arch == "deepseek_v3" and bool(HFConfig(arch, hf).get("rope_interleave"))
    sd = state_dict_from_hf(cfg, arch, get, rope_interleave=interleave, mtp_depth=min(cfg.mtp_depth, mtp_present))
    left = set(where) - asked
    if cfg.tie_embeddings:
        left.discard("lm_head.weight")  # some writers store the tied head anyway
    mtp = {k for k in left if k.startswith("model.layers.") and int(k.split(".")[2]) >= cfg.n_layers}
    if left - mtp:
        raise ValueError(f"{HF_CLASSES[arch]} checkpoint: tensors this mapping does not know (unsupported "
                         f"feature?): {sorted(left - mtp)[:8]}{' ...' if len(left - mtp) > 8 else ''}")
    return cfg, sd


def from_hf(folder: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            **overrides: Any):
    """A ``MoETransformer`` with the weights of a Hugging Face folder (see ``load_hf_checkpoint``).

    The model is built on the meta device and takes the checkpoint's tensors (no random initialisation, no second
    copy), cast to ``dtype`` (fp32 master weights by default; the router's balancing statistics are always fp32).
    MTP depths requested with ``mtp_depth=...`` beyond those in the checkpoint are freshly initialised.
    """
    from lightning_moe.models.transformer import MoETransformer  # noqa: PLC0415 - transformer imports moe

    cfg, sd = load_hf_checkpoint(folder, **overrides)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    fresh = [k for k in missing if k.startswith("mtp.")]
    if len(fresh) < len(missing) or unexpected:
        raise ValueError(f"state dict mismatch: missing {[k for k in missing if k not in fresh][:8]}, "
                         f"unexpected {unexpected[:8]}")
    if fresh:  # MTP depths the checkpoint lacks: built for real, so that they get their own initialisation
        with torch.device(device):
            new = type(model.mtp)(cfg).state_dict()
        model.load_state_dict({k: new[k.removeprefix("mtp.")] for k in fresh}, strict=False, assign=True)
    if cfg.tie_embeddings:  # assign=True gave the two modules separate Parameters: share one again
        model.output.weight = model.tok_embeddings.weight
    _materialize_buffers(model, device)
    model.to(device=device, dtype=dtype)
    model.rope.float()  # RoPE tables and ...
    for _, moe in model.moe_layers():  # ... balancing statistics stay fp32
        for name in ("expert_bias", "tokens_per_expert", "dropped_tokens"):
            setattr(moe.router, name, getattr(moe.router, name).float())
    return model


def _materialize_buffers(model: torch.nn.Module, device: str | torch.device) -> None:
    """Real storage for the non-persistent buffers that no checkpoint holds: a module made only of them (the RoPE
    tables) recomputes them with ``reset_parameters``; elsewhere they are statistics that start at zero."""
    for module in model.modules():
        own = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        meta = [name for name, t in own.items() if t is not None and t.is_meta]
        if not meta:
            continue
        if any(name in module._parameters for name in meta):
            raise ValueError(f"{type(module).__name__}: parameters {meta} are not in the checkpoint")
        if len(meta) == len(own) and hasattr(module, "reset_parameters"):
            module.to_empty(device=device, recurse=False)
            module.reset_parameters()
        else:
            for name in meta:
                module._buffers[name] = torch.zeros_like(module._buffers[name], device=device)


def _full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = {}
    for key, value in model.state_dict().items():
        if hasattr(value, "full_tensor"):  # DTensor (FSDP2 / expert parallel): gather the whole tensor
            value = value.full_tensor()
        sd[key] = value.detach().cpu()
    return sd


def export_hf(model: torch.nn.Module, folder: str | Path, arch: str | None = None, *,
              dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write ``model`` (a whole ``MoETransformer``) as a Hugging Face folder of ``arch``.

    ``arch``: deepseek_v3, mixtral or qwen3_moe (default: the imported one, else inferred from the config).
    ``dtype`` casts the weights (default: as they are). Shards above ``max_shard_bytes`` go to
    ``model-0000k-of-0000n.safetensors`` with an index. Returns the folder.
    """
    require_safetensors()  # before gathering the weights
    cfg: ModelConfig = model.cfg
    arch = arch or infer_arch(cfg)
    if getattr(model, "tok_embeddings", None) is None or getattr(model, "output", None) is None:
        raise ValueError("export_hf needs the whole model (this looks like one pipeline stage)")
    sd = _full_state_dict(model)
    has_mtp = any(k.startswith("mtp.") for k in sd)
    mtp_depth = cfg.mtp_depth if has_mtp and arch == "deepseek_v3" else 0
    if has_mtp and not mtp_depth:
        warnings.warn(f"export_hf: arch={arch} has no multi-token-prediction layers; mtp.* is not exported",
                      stacklevel=2)
    hf_cfg = config_to_hf(cfg, arch, mtp_depth)
    tensors = state_dict_to_hf(cfg, arch, sd, mtp_depth)
    if dtype is not None:
        tensors = {k: v if k.endswith("e_score_correction_bias") else v.to(dtype) for k, v in tensors.items()}
    weight_dtype = tensors["model.embed_tokens.weight"].dtype
    hf_cfg["torch_dtype"] = str(weight_dtype).removeprefix("torch.")

    folder = Path(folder)
    write_tensors(folder, tensors, max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    return folder
