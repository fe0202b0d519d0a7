"""WandbCheckpointArtifacts: checkpoints (files and distributed-checkpoint folders) recorded as W&B artifacts in an
offline run, read back from its transaction log."""

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_moe import ModelConfig, MoELanguageModel, TokenDataModule
from lightning_moe.callbacks import WandbCheckpointArtifacts
from tests.helpers.wandb_reader import isolate_wandb, iter_payloads


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, its staging area and cache under tmp_path; torn down so the transaction log is complete."""
    import wandb

    isolate_wandb(tmp_path, monkeypatch)
    wandb.teardown()
    yield tmp_path
    wandb.finish()
    wandb.teardown()


def wandb_logger(save_dir: Path):
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(project="test", save_dir=str(save_dir), offline=True)


def artifact_records(save_dir: Path) -> list:
    """The ``artifact`` records of the one offline run under ``save_dir`` (call after ``wandb.teardown()``)."""
    import wandb
    from wandb.proto import wandb_internal_pb2

    wandb.finish()
    wandb.teardown()
    (log,) = Path(save_dir).glob("wandb/offline-run-*/run-*.wandb")
    records = []
    for payload in iter_payloads(log):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") == "artifact":
            records.append(rec.artifact)
    return records


def test_checkpoint_files_of_a_fit_are_logged_as_model_artifacts(offline_wandb):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, dim=16, n_layers=2, n_heads=2, n_dense_layers=1, dense_ffn_dim=24,
                      num_experts=4, top_k=2, moe_ffn_dim=8, max_seq_len=16)
    rng = np.random.default_rng(0)
    data = TokenDataModule(source=lambda: (rng.integers(0, 32, 4000), rng.integers(0, 32, 400)), seq_len=16,
                           batch_size=4)
    logger = wandb_logger(offline_wandb)
    artifacts = WandbCheckpointArtifacts(enabled=True)
    checkpoint = ModelCheckpoint(dirpath=offline_wandb / "ckpt", every_n_train_steps=2, save_top_k=1,
                                 save_last=True)
    trainer = pl.Trainer(max_steps=4, logger=logger, callbacks=[artifacts, checkpoint], limit_val_batches=0,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(MoELanguageModel(cfg), datamodule=data)
    run_id = logger.version

    # one version per save (steps 2 and 4): the newest file it wrote, last.ckpt, which is also the new best
    assert artifacts.logged == [(checkpoint.last_model_path, ["latest", "best"])] * 2
    records = artifact_records(offline_wandb)
    assert len(records) == 2
    for rec, step in zip(records, (2, 4)):
        assert (rec.name, rec.type, rec.run_id) == (f"model-{run_id}", "model", run_id)
        assert sorted(rec.aliases) == ["best", "latest"]
        assert json.loads(rec.metadata)["global_step"] == step
        (entry,) = rec.manifest.contents
        assert entry.path == "model.ckpt" and entry.size > 0
        # "mutable": a copy staged in WANDB_DATA_DIR, uploaded later by `wandb sync`
        assert Path(entry.local_path).is_relative_to(offline_wandb / "wandb-data") and Path(entry.local_path).exists()
    assert records[0].digest != records[1].digest


def write_dcp_folder(path: Path, content: bytes) -> None:
    """A distributed-checkpoint folder, renamed into place when complete (as MoEStrategy saves them)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.mkdir()
    for name in ("__0_0.distcp", "__1_0.distcp", "meta.pt", ".metadata"):
        (tmp / name).write_bytes(content + name.encode())
    if path.exists():
        shutil.rmtree(path)
    os.rename(tmp, path)


def test_distributed_checkpoint_folders_are_logged_with_their_files(offline_wandb):
    logger = wandb_logger(offline_wandb)
    ckpt = SimpleNamespace(last_model_path="", best_model_path="", best_k_models={}, monitor=None,
                           current_score=None, best_model_score=None, _last_global_step_saved=7)
    trainer = SimpleNamespace(is_global_zero=True, loggers=[logger], checkpoint_callbacks=[ckpt], global_step=8,
                              sanity_checking=False)
    folders, refs = WandbCheckpointArtifacts(enabled=True), WandbCheckpointArtifacts(enabled=True, policy="reference")
    off = WandbCheckpointArtifacts()  # the default: disabled
    old = offline_wandb / "old"
    write_dcp_folder(old, b"resumed from")
    ckpt.last_model_path = str(old)
    for cb in (folders, refs, off):
        cb.on_train_start(trainer, None)  # a checkpoint that exists at the start is not new
        cb.on_train_batch_end(trainer, None, None, None, 0)
    assert folders.logged == refs.logged == []

    last = offline_wandb / "last"
    write_dcp_folder(last, b"step 7")
    ckpt.last_model_path = str(last)
    for cb in (folders, refs, off):
        cb.on_train_batch_end(trainer, None, None, None, 0)
        cb.on_validation_end(trainer, None)  # nothing new since
    write_dcp_folder(last, b"step 9, same path")
    folders.on_train_end(trainer, None)
    assert folders.logged == [(str(last), ["latest"])] * 2
    assert refs.logged == [(str(last), ["latest"])]
    assert off.logged == []

    records = artifact_records(offline_wandb)
    assert len(records) == 3
    files = ["__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"]
    for rec in records:
        assert rec.type == "model" and rec.name == f"model-{logger.version}"
        assert sorted(e.path for e in rec.manifest.contents) == sorted(files)
        assert json.loads(rec.metadata)["global_step"] == 7
    staged, referenced = records[0], records[1]
    assert all(e.local_path and not e.ref for e in staged.manifest.contents)
    assert all(e.ref.startswith("file://") and not e.local_path for e in referenced.manifest.contents)
    assert records[2].digest != staged.digest  # the rewritten folder is a new version


def test_without_a_wandb_logger_it_warns_and_does_nothing(tmp_path):
    path = tmp_path / "last.ckpt"
    ckpt = SimpleNamespace(last_model_path="", best_model_path="", best_k_models={})
    trainer = SimpleNamespace(is_global_zero=True, loggers=[], checkpoint_callbacks=[ckpt], global_step=1)
    cb = WandbCheckpointArtifacts(enabled=True)
    cb.on_train_start(trainer, None)
    path.write_bytes(b"x")
    ckpt.last_model_path = str(path)
    with pytest.warns(UserWarning, match="no W&B logger"):
        cb.on_train_end(trainer, None)
    assert cb.logged == []
    with pytest.raises(ValueError, match="callbacks.checkpoint_artifacts.policy"):
        WandbCheckpointArtifacts(policy="copy")


def test_default_callbacks_config_has_it_off():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from lightning_moe.cli import schema  # noqa: F401 - registers the structured-config schemas

    GlobalHydra.instance().clear()
    with initialize_config_module(version_base="1.3", config_module="lightning_moe.conf"):
        off = compose("train", overrides=["paths.output_dir=."]).callbacks
        on = compose("train", overrides=["paths.output_dir=.", "callbacks.checkpoint_artifacts.enabled=true"]).callbacks
    GlobalHydra.instance().clear()
    assert instantiate(off.checkpoint_artifacts).enabled is False
    assert instantiate(on.checkpoint_artifacts).enabled is True
    assert instantiate(on.expert_load).heatmap_every_n_steps == 100
