"""Weights & Biases through Lightning's ``WandbLogger``, offline unless credentials exist.

The mode is decided once: ``WANDB_MODE`` if the user set it, else ``online`` when an API key is available
(``WANDB_API_KEY`` or a netrc entry for the W&B host), else ``offline``. Offline runs are written under
``<save_dir>/wandb/offline-run-*`` and uploaded later with ``wandb sync <that folder>``. Never prompts for a login.
"""

from __future__ import annotations

import netrc
import os
from typing import Any

from lightning_moe.errors import ConfigError


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        path = os.environ.get("NETRC")
        return netrc.netrc(path).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: str | None = None) -> str:
    """``mode`` if given, else $WANDB_MODE, else online with credentials, else offline."""
    mode = mode or os.environ.get("WANDB_MODE")
    if mode:
        mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
        if mode not in ("online", "offline", "disabled"):
            raise ConfigError(f"logger.wandb.mode={mode!r}: must be online, offline or disabled")
        return mode
    return "online" if has_wandb_credentials() else "offline"


def wandb_logger(project: str = "lightning-moe", save_dir: str = ".", name: str | None = None,
                 mode: str | None = None, id: str | None = None, log_model: bool = False,
                 **kwargs: Any):
    """Build a ``WandbLogger`` in the resolved mode.

    Args:
        project: W&B project.
        save_dir: folder under which ``wandb/`` run folders are written.
        name: run name.
        mode: online, offline or disabled (None: decided as the module docstring says).
        id: run id, to continue a run (the training CLI passes the id stored in the checkpoint when resuming).
        log_model: upload checkpoints as artifacts (online only; offline, use ``WandbCheckpointArtifacts``).
        kwargs: passed to ``wandb.init`` (entity, group, tags, ...).
    """
    from lightning.pytorch.loggers import WandbLogger  # noqa: PLC0415 - wandb is imported on use only

    mode = resolve_wandb_mode(mode)
    if mode == "disabled":
        os.environ["WANDB_MODE"] = "disabled"
    os.makedirs(save_dir, exist_ok=True)
    offline = mode != "online"
    return WandbLogger(project=project, save_dir=save_dir, name=name, id=id, offline=offline,
                       log_model=log_model and not offline, **kwargs)
