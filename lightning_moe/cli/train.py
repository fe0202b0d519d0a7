"""``lightning-moe-train`` / ``python -m lightning_moe.train``: compose the Hydra config, build everything, fit.

Configuration errors (unknown keys, wrong types, values the model or data refuse) end the process with exit code 2
and one line naming the key; anything else raises with its full traceback.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ProgressBar
from omegaconf import DictConfig, OmegaConf

from lightning_moe.cli import schema  # noqa: F401 - registers the structured-config schemas
from lightning_moe.errors import ConfigError, PathNotFoundError
from lightning_moe.models.config import ModelConfig
from lightning_moe.module import MoELanguageModel
from lightning_moe.optim import OptimizerConfig


class RecordWandbRunId(Callback):
    """Stores the W&B run id in checkpoints, so that resuming with ``ckpt_path=`` continues the same W&B run."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                checkpoint["wandb_run_id"] = logger.version


def checkpoint_wandb_run_id(ckpt_path: str) -> str | None:
    """The W&B run id stored in a checkpoint file or distributed-checkpoint folder (its ``meta.pt``)."""
    path = Path(ckpt_path)
    meta = path / "meta.pt" if path.is_dir() else path
    if not meta.is_file():
        return None
    state = torch.load(meta, map_location="cpu", weights_only=True, mmap=path.is_file())
    return state.get("wandb_run_id")


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build_loggers(cfg: DictConfig) -> list[Any]:
    loggers = []
    for name, node in (cfg.logger or {}).items():
        if not node:
            continue
        kwargs = {}
        if name == "wandb" and node.get("id") is None and cfg.get("ckpt_path"):
            kwargs["id"] = checkpoint_wandb_run_id(str(cfg.ckpt_path))
        loggers.append(hydra.utils.instantiate(node, _convert_="all", **kwargs))
    return loggers


def build_strategy(cfg: DictConfig) -> Any:
    node = cfg.strategy
    if node.get("_target_"):
        return hydra.utils.instantiate(node, _convert_="all")
    return node.name


def build(cfg: DictConfig) -> tuple[pl.Trainer, MoELanguageModel, pl.LightningDataModule]:
    """Instantiate trainer, module and data from a composed config (also used by tests)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{', '.join(missing)}: no value set (mandatory '???' in the config); set it on the command "
                          f"line, e.g. {missing[0]}=...")
    model_cfg: ModelConfig = OmegaConf.to_object(cfg.model)
    optim_cfg: OptimizerConfig = OmegaConf.to_object(cfg.optimizer)
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len}: exceeds model.max_seq_len={model_cfg.max_seq_len}")
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    module = MoELanguageModel(model_cfg, optim_cfg)
    callbacks = [hydra.utils.instantiate(c, _convert_="all") for c in (cfg.callbacks or {}).values() if c]
    if not cfg.trainer.get("enable_progress_bar", True):  # `trainer.enable_progress_bar=false` drops the bar
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    callbacks.append(RecordWandbRunId())
    loggers = build_loggers(cfg)
    trainer = hydra.utils.instantiate(cfg.trainer, _convert_="all", strategy=build_strategy(cfg),
                                      logger=loggers or False, callbacks=callbacks)
    for logger in trainer.loggers:
        logger.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True)})
    return trainer, module, datamodule


def run(cfg: DictConfig) -> dict[str, float]:
    """Train (and validate) as configured; returns the final metrics and writes them to ``metrics.json``."""
    ckpt_path = cfg.get("ckpt_path")
    # Lightning also takes the names "last", "best" and "hpc" (and "registry:..."), resolved by its callbacks.
    named = ckpt_path in ("last", "best", "hpc") or str(ckpt_path).startswith("registry")
    if ckpt_path and not named and not os.path.exists(os.path.expanduser(str(ckpt_path))):
        raise PathNotFoundError(f"ckpt_path={str(ckpt_path)!r} does not exist")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    trainer, module, datamodule = build(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    metrics["global_step"] = trainer.global_step
    if trainer.is_global_zero:
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        if "val/loss" in metrics:
            vocab = module.model_cfg.vocab_size
            print(f"final val/loss = {metrics['val/loss']:.4f} nats/token after {trainer.global_step} steps "
                  f"(uniform baseline ln {vocab} = {math.log(vocab):.4f}); outputs in {out}")
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://lightning_moe.conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        metrics = run(cfg)
    except Exception as err:
        # Inside the job, Hydra would log its own "Error executing job" line first: report config errors here.
        message = config_error_message(err)
        if message is None:
            raise
        _exit_with(message)
    return metrics.get("val/loss")  # for sweeps


def config_error_message(err: BaseException) -> str | None:
    """A one-line description of a configuration error, or None if ``err`` is not one."""
    from hydra.errors import HydraException  # noqa: PLC0415
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException  # noqa: PLC0415

    chain, seen = [], err
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for exc in chain:
        if isinstance(exc, ConfigError):
            return str(exc)
    for exc in chain:
        if isinstance(exc, OmegaConfBaseException) and getattr(exc, "full_key", None):
            detail = str(exc.msg if getattr(exc, "msg", None) else exc).splitlines()[0]
            if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
                hint = f"add a new key with +{exc.full_key}=..."
                moe_strategy = "MoEStrategy" in str(getattr(exc, "object_type_str", ""))
                if str(exc.full_key).startswith("strategy.") and not moe_strategy:
                    hint = "the MoE strategy's keys (ep, pp, dp_shard, ...) need strategy=moe; " + hint
                return f"{exc.full_key}: unknown key ({detail}; {hint})"
            return f"{exc.full_key}: {detail}"
    if isinstance(err, HydraException):
        text = str(err).split("Config search path")[0]
        return " ".join(line.strip() for line in text.splitlines() if line.strip())
    return None


def main() -> None:
    # Let configuration errors reach us so we can report them on one line (Hydra would print a stack).
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        _hydra_main()
    except Exception as err:
        message = config_error_message(err)
        if message is None:
            raise
        _exit_with(message)


def _exit_with(message: str) -> None:
    print(f"lightning-moe-train: error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
