"""ExpertRebalancer: a Lightning run at ep=2 on 2 gloo processes re-places redundant experts mid-training.

One test runs three fits in the same two processes (Lightning reuses the process group the harness created):

1. a reference fit without the callback (plain expert parallelism);
2. the same fit with the callback (2 redundant slots per layer, a plan every 2 steps, a hot expert so the plan
   differs from the default placement): the loss of a fixed batch right before and right after each move is the
   same, the replicas stay identical, and losses and final weights follow the reference run;
3. a resumed fit from the checkpoint of run 2: logical weights, optimizer state and the placements come back.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.distributed.tensor import DTensor

from lightning_moe.callbacks import ExpertRebalancer
from lightning_moe.errors import ConfigError
from lightning_moe.models.config import ModelConfig
from lightning_moe.module import MoELanguageModel
from lightning_moe.moe.balance import moe_layers
from lightning_moe.parallel.expert_parallel import ExpertParallel
from lightning_moe.parallel.redundant_experts import placement_tables
from lightning_moe.parallel.strategy import MoEStrategy
from tests.helpers.loggers import RecordingLogger
from tests.parallel._dist import run_workers

E, REDUNDANT, STEPS, EVERY = 4, 2, 4, 2
HOT = 3  # the expert every token picks (besides its best other one)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.detach().full_tensor() if isinstance(t, DTensor) else t.detach()


class _HotExpertModel(MoELanguageModel):
    """Routes every token to expert ``HOT``: the load is skewed, so a plan must replicate that expert."""

    def configure_model(self) -> None:
        super().configure_model()
        for _, moe in moe_layers(self.model):
            moe.router.expert_bias.zero_()
            moe.router.expert_bias[HOT] = 10.0


def _module() -> MoELanguageModel:
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_dense_layers=0, n_heads=4, dense_ffn_dim=64,
                      num_experts=E, top_k=2, moe_ffn_dim=16, num_shared_experts=1, max_seq_len=16,
                      score_func="sigmoid", bias_update_speed=1e-6)
    return _HotExpertModel(cfg, {"lr": 1e-2, "warmup_steps": 0})


def _logical_experts(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    out = {}
    for name, moe in moe_layers(module):
        for w in ("w13", "w2"):
            p = getattr(moe.experts, w)
            out[f"{name}.{w}"] = _full(moe.experts.logical_from_slots(p) if moe.experts.replicated else p)
    return out


def _logical_exp_avg(module: pl.LightningModule, optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for name, moe in moe_layers(module):
        for w in ("w13", "w2"):
            s = optimizer.state[getattr(moe.experts, w)]["exp_avg"]
            out[f"{name}.{w}"] = _full(moe.experts.logical_from_slots(s) if moe.experts.replicated else s)
    return out


def _probe_loss(module: pl.LightningModule, batch: torch.Tensor) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        loss = F.cross_entropy(module(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
    module.train()
    return loss


def _assert_replicas_identical(module: pl.LightningModule, optimizer) -> None:
    for name, moe in moe_layers(module):
        experts = moe.experts
        log2phy, logcnt = placement_tables(experts.placement, E)
        for w in ("w13", "w2"):
            p = getattr(experts, w)
            for what, t in ((w, p), (f"{w} exp_avg_sq", optimizer.state[p]["exp_avg_sq"])):
                full = _full(t)
                for e in range(E):
                    slots = log2phy[e, :int(logcnt[e])]
                    for s in slots[1:]:
                        assert torch.equal(full[s], full[slots[0]]), f"{name} {what}: replicas {slots.tolist()}"


class _ProbedRebalancer(ExpertRebalancer):
    """Records the loss of a fixed batch right before and right after each move, and the placements."""

    def __init__(self, probe: torch.Tensor, **kwargs) -> None:
        super().__init__(**kwargs)
        self.probe, self.moves = probe, []

    def rebalance(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        placements = [experts.placement for _, experts, _ in self._layers]
        weights = _logical_experts(pl_module)
        before = _probe_loss(pl_module, self.probe)
        super().rebalance(trainer, pl_module)
        after = _probe_loss(pl_module, self.probe)
        self.moves.append({"before": before, "after": after, "old": placements,
                           "new": [experts.placement for _, experts, _ in self._layers]})
        moved = _logical_experts(pl_module)
        for key, value in weights.items():
            assert torch.equal(moved[key], value), f"{key}: a move changed the logical weights"
        _assert_replicas_identical(pl_module, trainer.optimizers[0])


class _Record(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.start_weights: dict[str, torch.Tensor] | None = None
        self.start_avg: dict[str, torch.Tensor] | None = None
        self.start_placements: list[torch.Tensor] | None = None

    def on_train_start(self, trainer, pl_module) -> None:  # after checkpoint restore and the callback's re-placement
        self.start_weights = _logical_experts(pl_module)
        if trainer.optimizers[0].state:
            self.start_avg = _logical_exp_avg(pl_module, trainer.optimizers[0])
        self.start_placements = [m.experts.placement for _, m in moe_layers(pl_module)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit(module, callbacks, max_steps: int, data, logger=False, ckpt_path=None) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=MoEStrategy(ep=2), max_steps=max_steps,
                         logger=logger, callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         log_every_n_steps=1, gradient_clip_val=0.05)  # clips: replicas must count once
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2), ckpt_path=ckpt_path)
    return trainer


def _worker(rank: int, world_size: int, seed: int, ckpt: str) -> None:
    # The harness already created the process group; with these set, Lightning uses this process as rank `rank`.
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    data = torch.randint(0, 64, (16, 17), generator=torch.Generator().manual_seed(seed))
    probe = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(seed + 1 + rank))

    # 1. reference: plain expert parallelism
    pl.seed_everything(seed, verbose=False)
    ref_module, ref_record, ref_logger = _module(), _Record(), RecordingLogger()
    _fit(ref_module, [ref_record], STEPS, data, logger=ref_logger)
    assert not any(m.experts.replicated for _, m in moe_layers(ref_module))

    # 2. redundant experts, re-placed after steps 2 and 4
    pl.seed_everything(seed, verbose=False)
    module, record = _module(), _Record()
    rebalancer = _ProbedRebalancer(probe, every_n_steps=EVERY, num_redundant=REDUNDANT)
    logger = RecordingLogger()
    trainer = _fit(module, [rebalancer, record], STEPS, data, logger=logger)
    assert trainer.strategy.num_redundant_experts == 0, "reset in teardown"
    layers = [m.experts for _, m in moe_layers(module)]
    assert all(isinstance(x, ExpertParallel) and x.w13.shape[0] == E + REDUNDANT for x in layers)
    assert len(rebalancer.moves) == STEPS // EVERY == rebalancer.num_plans
    for k, move in enumerate(rebalancer.moves):
        # the same function before and after the move (fp32, same batch)
        torch.testing.assert_close(move["after"], move["before"], rtol=1e-6, atol=1e-6,
                                   msg=lambda m, k=k: f"probe loss around move {k}, rank {rank}: {m}")
    first = rebalancer.moves[0]
    for old, new in zip(first["old"], first["new"]):
        assert torch.equal(old, torch.arange(E + REDUNDANT) % E), "the default placement before the first plan"
        assert int((new == HOT).sum()) > 1, f"the hot expert gets replicas: {new.tolist()}"
    # training with replicas (and moves) follows the unreplicated run
    assert len(record.losses) == len(ref_record.losses) == STEPS
    torch.testing.assert_close(torch.tensor(record.losses), torch.tensor(ref_record.losses), rtol=1e-4, atol=1e-5)
    ref_weights, weights = _logical_experts(ref_module), _logical_experts(module)
    for key, value in ref_weights.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-3, atol=1e-4, msg=key)
    _assert_replicas_identical(module, trainer.optimizers[0])
    if rank == 0:
        logged = {k: v for _, row in logger.rows for k, v in row.items() if k.startswith("eplb/")}
        assert {"eplb/imbalance_before", "eplb/imbalance_after", "eplb/layer_0/imbalance_after",
                "eplb/slots_changed"} <= set(logged), sorted(logged)
        steps = [step for step, row in logger.rows if "eplb/imbalance_after" in row]
        assert steps == [EVERY - 1, 2 * EVERY - 1], steps
        # gradient clipping sees each logical expert once, however many replicas it has
        norms = [row["train/grad_norm"] for _, row in logger.rows if "train/grad_norm" in row]
        ref_norms = [row["train/grad_norm"] for _, row in ref_logger.rows if "train/grad_norm" in row]
        assert len(norms) == len(ref_norms) == STEPS
        # (tight: the replicated experts are a small part of the norm; counting them twice moves it by ~1e-5)
        torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=2e-6, atol=0)
        first_row = next(row for _, row in logger.rows if "eplb/imbalance_before" in row)
        assert first_row["eplb/imbalance_after"] < first_row["eplb/imbalance_before"]
    final_weights, final_avg = weights, _logical_exp_avg(module, trainer.optimizers[0])
    final_placements = [x.placement for x in layers]
    trainer.save_checkpoint(ckpt)

    # 3. resume: weights and optimizer state (logical layout) and the placements come back
    pl.seed_everything(seed + 1, verbose=False)
    resumed, resumed_record = _module(), _Record()
    resumed_rebalancer = _ProbedRebalancer(probe, every_n_steps=100, num_redundant=REDUNDANT)  # same state key
    _fit(resumed, [resumed_rebalancer, resumed_record], STEPS + 1, data, ckpt_path=ckpt)
    assert resumed_rebalancer.num_plans == STEPS // EVERY and not resumed_rebalancer.moves
    for key, value in final_weights.items():
        torch.testing.assert_close(resumed_record.start_weights[key], value, rtol=0, atol=0, msg=key)
        torch.testing.assert_close(resumed_record.start_avg[key], final_avg[key], rtol=0, atol=0, msg=key)
    for got, expected in zip(resumed_record.start_placements, final_placements):
        assert torch.equal(got, expected)
    assert len(resumed_record.losses) == 1 and torch.isfinite(torch.tensor(resumed_record.losses)).all()
    dist.barrier()


@pytest.mark.slow
def test_rebalancing_mid_training_keeps_the_function_and_the_trajectory(seed, tmp_path):
    run_workers(_worker, 2, seed, str(tmp_path / "last.ckpt"), timeout_s=300)


# --- settings errors, without processes -------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(every_n_steps=0), "every_n_steps=0"),
    (dict(num_redundant=-2), "num_redundant=-2"),
    (dict(num_groups=0), "num_groups=0"),
    (dict(every_n_steps=2.5), "every_n_steps=2.5"),
])
def test_bad_settings_fail_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ExpertRebalancer(**kwargs)


class _Strategy:
    def __init__(self, ep: int) -> None:
        self.dims = type("Dims", (), {"ep": ep})()
        self.meshes = object()


@pytest.mark.parametrize("strategy, kwargs, match", [
    (object(), {}, "needs strategy=moe with strategy.ep > 1"),
    (_Strategy(1), {}, "ep=1"),
    (_Strategy(4), dict(num_redundant=2), "num_redundant=2 must be a multiple of strategy.ep=4"),
    (_Strategy(4), dict(num_nodes=3), "num_nodes=3 must divide strategy.ep=4"),
])
def test_setup_rejects_runs_without_expert_parallelism(strategy, kwargs, match):
    trainer = type("Trainer", (), {"strategy": strategy})()
    with pytest.raises(ConfigError, match=match):
        ExpertRebalancer(**kwargs).setup(trainer, MoELanguageModel(), "fit")


def test_setup_refuses_to_resume_replicas_from_a_single_file_checkpoint(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"")
    trainer = type("Trainer", (), {"strategy": _Strategy(2), "ckpt_path": str(tmp_path / "last.ckpt")})()
    with pytest.raises(ConfigError, match="single-file checkpoint .* not supported with redundant experts"):
        ExpertRebalancer(num_redundant=2).setup(trainer, MoELanguageModel(), "fit")
    ExpertRebalancer(num_redundant=0).setup(trainer, MoELanguageModel(), "fit")  # no replicas: the plain load works


def test_fit_start_rejects_models_without_expert_parallel_layers():
    module = MoELanguageModel(ModelConfig(dim=32, n_layers=2, num_experts=4, moe_ffn_dim=16, dense_ffn_dim=32))
    module.configure_model()
    with pytest.raises(ConfigError, match="not expert-parallel"):
        ExpertRebalancer().on_fit_start(None, module)
    with pytest.raises(ConfigError, match="no MoE layers"):
        ExpertRebalancer().on_fit_start(None, torch.nn.Linear(2, 2))


def test_hydra_config_adds_the_callback_to_the_defaults():
    from hydra import compose, initialize_config_module  # noqa: PLC0415
    from hydra.core.global_hydra import GlobalHydra  # noqa: PLC0415
    from hydra.utils import instantiate  # noqa: PLC0415

    import lightning_moe.cli.schema  # noqa: F401, PLC0415 - registers the config schemas

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(version_base="1.3", config_module="lightning_moe.conf"):
            cfg = compose("train", overrides=["callbacks=eplb", "strategy=moe", "strategy.ep=4"])
            assert {"model_checkpoint", "expert_load", "eplb"} <= set(cfg.callbacks)
            callback = instantiate(cfg.callbacks.eplb)
            assert isinstance(callback, ExpertRebalancer) and callback.num_redundant == 4
            assert "eplb" not in compose("train").callbacks, "not in the default callbacks"
    finally:
        GlobalHydra.instance().clear()


def test_state_dict_round_trip():
    callback = ExpertRebalancer()
    assert callback.state_dict() == {}
    # the placements of every MoE layer (of every pipeline stage), keyed by layer label
    callback.ep, callback.num_plans = 2, 3
    callback._placements = {"layer_3": torch.arange(6) % 4, "layer_1": torch.tensor([0, 1, 2, 3, 3, 3])}
    state = callback.state_dict()
    assert state["ep"] == 2 and state["num_plans"] == 3 and sorted(state["placements"]) == ["layer_1", "layer_3"]
    assert torch.equal(state["placements"]["layer_1"], torch.tensor([0, 1, 2, 3, 3, 3]))
    restored = ExpertRebalancer()
    restored.load_state_dict(state)
    assert restored.num_plans == 3 and restored._restored["placements"].keys() == state["placements"].keys()


class _FakeExperts:
    num_slots = 6

    def __init__(self) -> None:
        self.applied = None

    def apply_placement(self, phy2log, optimizers) -> None:
        self.applied = phy2log


def test_restore_applies_each_layers_own_placement_by_label():
    trainer = type("Trainer", (), {"optimizers": []})()
    callback = ExpertRebalancer(num_redundant=2)
    callback.ep = 2
    a, b = _FakeExperts(), _FakeExperts()
    callback._layers = [("layer_1", a, None), ("layer_2", b, None)]  # e.g. the layers of pipeline rank 1
    saved = {f"layer_{i}": torch.tensor([i % 4, 3, 2, 1, 0, i % 4]) for i in range(4)}
    assert callback._restore({"ep": 2, "placements": saved}, trainer) == []
    assert torch.equal(a.applied, saved["layer_1"]) and torch.equal(b.applied, saved["layer_2"])
    # layers the checkpoint lacks, or with another slot count, keep their placement and are reported
    a.applied = b.applied = None
    problems = callback._restore({"ep": 2, "placements": {"layer_1": torch.zeros(8, dtype=torch.long)}}, trainer)
    assert problems == ["layer_1 (8 slots, this run has 6)", "layer_2 (not in the checkpoint)"]
    assert a.applied is None and b.applied is None
    assert "checkpoint ep=4" in callback._restore({"ep": 4, "placements": saved}, trainer)[0]
    # the older format ([L, R] in rank 0's layer order) is applied in order without pipeline, refused under it
    legacy = {"ep": 2, "placements": torch.stack([saved["layer_0"], saved["layer_3"]])}
    assert callback._restore(legacy, trainer) == [] and torch.equal(b.applied, saved["layer_3"])
    callback._pp_group, b.applied = object(), None
    assert "not keyed by layer" in callback._restore(legacy, trainer)[0] and b.applied is None
    callback._layers = []  # a pipeline rank without MoE layers
    assert callback._restore({"ep": 2, "placements": saved}, trainer) == []
