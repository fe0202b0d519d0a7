"""Config composition: groups, recipes, overrides and the one-line errors of the command line."""

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from lightning_moe.cli.train import config_error_message
from lightning_moe.models.config import ModelConfig


@pytest.fixture
def compose_cfg():
    def _compose(*overrides):
        GlobalHydra.instance().clear()
        with initialize_config_module(version_base="1.3", config_module="lightning_moe.conf"):
            return compose("train", overrides=list(overrides))

    yield _compose
    GlobalHydra.instance().clear()


def test_default_config_composes(compose_cfg):
    cfg = compose_cfg()
    model = OmegaConf.to_object(cfg.model)
    assert isinstance(model, ModelConfig)
    assert model.max_seq_len == cfg.data.seq_len
    assert set(cfg.logger) == {"wandb"}
    assert cfg.data.source._target_ == "lightning_moe.data.stdlib_source"


def test_recipe_and_overrides(compose_cfg):
    cfg = compose_cfg("recipe=tiny", "trainer.max_steps=50", "model.num_experts=8", "logger=csv")
    assert cfg.trainer.max_steps == 50
    assert cfg.model.num_experts == 8
    assert cfg.model.dim == 64  # from the recipe
    assert set(cfg.logger) == {"csv"}
    assert compose_cfg("logger=none").logger == {}


def test_structured_schema_rejects_bad_keys_and_types(compose_cfg):
    with pytest.raises(Exception) as info:
        compose_cfg("model.dimm=3")
    assert "model.dimm" in config_error_message(info.value)
    with pytest.raises(Exception) as info:
        compose_cfg("model.num_experts=many")
    msg = config_error_message(info.value)
    assert "model.num_experts" in msg and "\n" not in msg


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "lightning_moe.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize(
    "override, key, before_trainer",
    [
        ("model.top_k=16", "model.top_k", True),  # valid type, invalid value (more than num_experts=8)
        ("model.nonsense=1", "model.nonsense", True),  # unknown key
        ("trainer.nonsense=1", "trainer.nonsense", True),  # unknown key in a plain (non-schema) group
        ("model.dim=wide", "model.dim", True),  # wrong type
        ("recipe=nope", "recipe", True),  # unknown recipe
        ("data=text_files", "data.source.pattern", True),  # mandatory value left unset
        ("ckpt_path=nope.ckpt", "ckpt_path", True),  # checkpoint to resume from that does not exist
        ("strategy.ep=2", "strategy=moe", True),  # a MoE strategy key without strategy=moe: the error says so
        # Data is read in the data module's setup, after Lightning has printed its device lines.
        ("data=tokens data.source.path=nope.bin", "data.source.path", False),  # data file that does not exist
        ("recipe=tiny data=text_files data.source.pattern=nope/*.txt", "data.source.pattern", False),
    ],
)
def test_cli_config_errors_are_one_line(tmp_path, override, key, before_trainer):
    proc = _cli(*override.split(), "logger=none", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and (len(lines) == 1 or not before_trainer), proc.stderr
    assert lines[-1].startswith("lightning-moe-train: error:") and key in lines[-1]
