"""Checkpoints as W&B artifacts, for files and distributed-checkpoint folders alike, online or offline.

Lightning's ``WandbLogger(log_model=True)`` adds every checkpoint with ``add_file``, which fails on the folders that
distributed checkpoints are (``ValueError: Path is not a file``), and refuses offline runs. This callback logs
folders with ``add_dir`` and works offline: the artifact is staged in W&B's data dir (``WANDB_DATA_DIR``, default
``~/.local/share/wandb``) and uploaded by ``wandb sync`` from the same machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

POLICIES = ("mutable", "immutable", "reference")


def _signature(path: str) -> tuple | None:
    """What changes when a checkpoint file or folder is (re)written at ``path``; None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    sig: tuple = (st.st_ino, st.st_mtime_ns, st.st_size)
    if os.path.isdir(path):
        # torch.distributed.checkpoint writes `.metadata` last: it changes even when shards are overwritten in place.
        for marker in (".metadata", "meta.pt"):
            try:
                mt = os.stat(os.path.join(path, marker))
                sig += (marker, mt.st_ino, mt.st_mtime_ns, mt.st_size)
            except OSError:
                pass
    return sig


def _candidates(callback: Checkpoint) -> list[str]:
    """Checkpoint paths a checkpoint callback currently knows of (last, best, top-k), existing ones only."""
    paths = [getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", "")]
    paths += list(getattr(callback, "best_k_models", {}) or {})
    return [str(p) for p in dict.fromkeys(paths) if p and os.path.exists(p)]


class WandbCheckpointArtifacts(Callback):
    """After each checkpoint save, log the new checkpoint to every W&B logger as an artifact.

    The artifact is named ``model-<run id>`` (type ``model``), one version per save, with alias ``latest``, plus
    ``best`` when the save also produced the callback's new best checkpoint. A checkpoint file is stored as
    ``model.ckpt``; a distributed-checkpoint folder as its files. Metadata: the original file name, the global
    step and the monitored score.

    ``Callback.on_save_checkpoint`` runs before the file is written, so the callback instead watches the paths of
    the ``ModelCheckpoint`` callbacks (last, best, top-k) at the end of every training batch, validation and epoch,
    and at the end of training; a save is thus logged at the next such point (at the latest when training ends).
    Runs on global rank 0, which must see the whole checkpoint (shared storage for multi-node folders).

    Args:
        enabled: off by default; turn on with ``callbacks.checkpoint_artifacts.enabled=true``.
        policy: ``mutable`` copies the checkpoint into W&B's staging area now (safe when ``ModelCheckpoint`` later
            overwrites or deletes it, at the cost of disk space); ``immutable`` stages no copy, so the files must
            still exist unchanged at upload (``wandb sync``); ``reference`` records ``file://`` references with
            checksums and uploads nothing (large checkpoints on shared storage).
        name: artifact name (None: ``model-<run id>``).
    """

    def __init__(self, enabled: bool = False, policy: str = "mutable", name: str | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"callbacks.checkpoint_artifacts.policy={policy!r}: must be one of {', '.join(POLICIES)}")
        self.enabled = enabled
        self.policy = policy
        self.name = name
        self.logged: list[tuple[str, list[str]]] = []
        """(checkpoint path, aliases) of every artifact version logged so far, for inspection and tests."""
        self._seen: dict[int, dict[str, tuple]] = {}
        self._warned = False

    def _wandb_loggers(self, trainer: pl.Trainer) -> list[Any]:
        from lightning.pytorch.loggers import WandbLogger  # noqa: PLC0415 - does not import wandb itself

        return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]

    def _active(self, trainer: pl.Trainer) -> bool:
        if not (self.enabled and trainer.is_global_zero):
            return False
        if not self._wandb_loggers(trainer):
            if not self._warned:
                rank_zero_warn("callbacks.checkpoint_artifacts is enabled but there is no W&B logger: skipping")
                self._warned = True
            return False
        return True

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Checkpoints that exist already (a resumed run's own checkpoint, files from an earlier run) are not new.
        if not (self.enabled and trainer.is_global_zero):
            return
        self._seen = {
            id(cb): {p: _signature(p) for p in _candidates(cb)} for cb in trainer.checkpoint_callbacks
        }

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._scan(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._scan(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._scan(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._scan(trainer)

    def _scan(self, trainer: pl.Trainer) -> None:
        if not self._active(trainer):
            return
        for cb in trainer.checkpoint_callbacks:
            seen = self._seen.setdefault(id(cb), {})
            current = {p: _signature(p) for p in _candidates(cb)}
            new = [p for p, sig in current.items() if sig is not None and seen.get(p) != sig]
            seen.update(current)
            if not new:
                continue
            # Everything new was written by one save (we look after every batch): log the newest file once.
            path = max(new, key=lambda p: current[p][1])
            best = str(getattr(cb, "best_model_path", "") or "")
            aliases = ["latest", "best"] if best in new else ["latest"]
            self._log(trainer, cb, path, aliases)

    def _log(self, trainer: pl.Trainer, cb: Checkpoint, path: str, aliases: list[str]) -> None:
        import wandb  # noqa: PLC0415 - optional service, imported on use

        score = getattr(cb, "best_model_score" if "best" in aliases else "current_score", None)
        metadata = {
            "original_filename": Path(path).name,
            # the step the save happened at (we may look one batch later)
            "global_step": getattr(cb, "_last_global_step_saved", trainer.global_step),
            "score": float(score) if score is not None else None,
            "monitor": getattr(cb, "monitor", None),
        }
        for logger in self._wandb_loggers(trainer):
            run = logger.experiment
            artifact = wandb.Artifact(name=self.name or f"model-{run.id}", type="model", metadata=metadata)
            if self.policy == "reference":
                name = None if os.path.isdir(path) else "model.ckpt"
                artifact.add_reference(Path(path).resolve().as_uri(), name=name)
            elif os.path.isdir(path):
                artifact.add_dir(path, policy=self.policy)
            else:
                artifact.add_file(path, name="model.ckpt", policy=self.policy)
            run.log_artifact(artifact, aliases=aliases)
        self.logged.append((path, aliases))
