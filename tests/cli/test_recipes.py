"""The recipe zoo: every recipe composes into a valid model and strategy, the CPU-size ones train, sweeps run, and the
SLURM launcher renders the submission it would make."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

import lightning_moe.cli.schema  # noqa: F401 - registers the structured-config schemas
from lightning_moe.cli.train import run
from lightning_moe.models.transformer import MoETransformer

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.stem for p in (ROOT / "recipes" / "recipe").glob("*.yaml"))
CPU_RECIPES = [r for r in RECIPES if r == "tiny" or r.endswith("_tiny")]
HAS_MOE_STRATEGY = (ROOT / "conf" / "strategy" / "moe.yaml").is_file()
# (total, active) parameters in billions of the real-size layouts, MTP modules included.
SIZES = {"deepseek_v3_small": (0.93, 0.38), "deepseek_v2_lite": (15.7, 2.66), "mixtral_8x7b": (46.7, 12.9),
         "qwen3_moe_30b_a3b": (30.5, 3.35)}


def _compose(*overrides, hydra_config=False):
    GlobalHydra.instance().clear()
    with initialize_config_module(version_base="1.3", config_module="lightning_moe.conf"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra_config)


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine two spinning OpenMP threads
    made one 2-step run take 15-20 s instead of 1 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _uses_moe_strategy(recipe: str) -> bool:
    return "override /strategy: moe" in (ROOT / "recipes" / "recipe" / f"{recipe}.yaml").read_text()


def test_zoo_has_every_architecture():
    for arch in ("deepseek_v3", "mixtral", "qwen3_moe"):
        assert f"{arch}_tiny" in CPU_RECIPES
    assert set(SIZES) <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_to_valid_model_and_strategy(recipe):
    if _uses_moe_strategy(recipe) and not HAS_MOE_STRATEGY:
        pytest.skip("conf/strategy/moe.yaml (the MoEStrategy option) is not in this checkout yet")
    cfg = _compose(f"recipe={recipe}")
    model_cfg = OmegaConf.to_object(cfg.model)  # runs ModelConfig validation
    assert cfg.data.seq_len <= model_cfg.max_seq_len
    if not _uses_moe_strategy(recipe):
        assert recipe in CPU_RECIPES
        return
    from lightning_moe.parallel.dims import ParallelDims

    strategy = instantiate(cfg.strategy, _convert_="all")
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    dims = ParallelDims(**strategy.sizes, world_size=world)  # raises on sizes that do not fit the world
    assert model_cfg.num_experts % dims.ep == 0
    assert strategy.param_dtype == torch.bfloat16 and cfg.trainer.devices == 8
    with torch.device("meta"):
        model = MoETransformer(model_cfg)
    total, active = SIZES[recipe]
    assert model.num_params() / 1e9 == pytest.approx(total, rel=0.02)
    assert model.num_active_params() / 1e9 == pytest.approx(active, rel=0.02)


@pytest.mark.skipif(not HAS_MOE_STRATEGY, reason="conf/strategy/moe.yaml is not in this checkout yet")
def test_gpu_recipes_default_data_fills_every_rank():
    """`lightning-moe-train recipe=<name>` alone must run: the default (byte) data gives every data-parallel rank at
    least one batch of training and validation windows."""
    from lightning_moe.data.datamodule import WindowDataset, WindowSampler

    recipes = [r for r in RECIPES if _uses_moe_strategy(r)]
    sources = {}
    for recipe in recipes:
        cfg = _compose(f"recipe={recipe}")
        key = OmegaConf.to_yaml(cfg.data.source)
        if key not in sources:
            sources[key] = instantiate(cfg.data.source, _convert_="all")()
        world = cfg.trainer.devices * cfg.trainer.num_nodes
        for tokens, shuffle in zip(sources[key], (True, False)):
            sampler = WindowSampler(WindowDataset(tokens, cfg.data.seq_len), world, world - 1, shuffle=shuffle)
            assert len(sampler) >= cfg.data.batch_size, (recipe, shuffle, len(sampler))


@pytest.mark.parametrize("recipe", CPU_RECIPES)
def test_cpu_recipe_trains(recipe, tmp_path, one_thread):
    cfg = _compose(f"recipe={recipe}", "logger=none", "trainer.max_steps=2", "trainer.val_check_interval=2",
                   "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
                   f"hydra.run.dir={tmp_path}", hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        del cfg.hydra
    metrics = run(cfg)
    assert metrics["global_step"] == 2
    assert 0 < metrics["val/loss"] < 10
    assert json.loads((tmp_path / "metrics.json").read_text())["global_step"] == 2


def test_multirun_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "lightning_moe.train", "-m", "recipe=tiny", "model.top_k=1,2", "trainer.max_steps=2",
           "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
           "logger=none", f"hydra.sweep.dir={sweep}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # see one_thread
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for job, top_k in ((0, 1), (1, 2)):
        assert json.loads((sweep / str(job) / "metrics.json").read_text())["global_step"] == 2
        overrides = OmegaConf.load(sweep / str(job) / ".hydra" / "overrides.yaml")
        assert f"model.top_k={top_k}" in overrides


def test_slurm_launcher_renders_one_task_per_gpu(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'lightning-moe[slurm]'")
    import submitit

    cfg = _compose("hydra/launcher=slurm", "recipe=tiny", "trainer.num_nodes=2", "trainer.devices=8",
                   "hydra.launcher.partition=gpu", "hydra.launcher.setup=[source venv/bin/activate]",
                   f"hydra.sweep.dir={tmp_path}", hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    launcher.setup(hydra_context=None, task_function=None, config=cfg)

    rendered = {}

    def fake_map_array(executor, fn, *iterables):  # instead of calling sbatch: render the batch script
        slurm = executor._executor
        rendered["jobs"], rendered["parameters"] = len(iterables[0]), dict(slurm.parameters)
        rendered["script"] = slurm._make_submission_file_text(slurm._submitit_command_str, "uid")
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", fake_map_array)
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # no `srun` here
    launcher.launch([["model.top_k=1"], ["model.top_k=2"]], initial_job_idx=0)
    script = rendered["script"]
    assert rendered["jobs"] == 2 and rendered["parameters"]["array_parallelism"] == 16  # --array=0-1%16
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --signal=USR2@120", "#SBATCH --time=2880"):
        assert line in script, script
    assert "source venv/bin/activate" in script and "srun" in script
