"""ExpertRebalancer under pipeline parallelism: Lightning runs at pp=2 x ep=2 on 4 gloo processes, and one run of
the training command (``callbacks=eplb strategy.pp=2 strategy.ep=2``).

Each pipeline rank holds only its stages' layers (global layer keys). The tests check that every stage plans its own
layers (placements identical over the data-parallel ranks of a pipeline position), that the model computes the same
function around each move and trains like the same run without the callback, that the logged imbalance covers the
layers of every stage (also from a rank whose stage has no MoE layer), and that the checkpointed placements are
those of every stage (Lightning writes the callback state from rank 0 only) and come back on resume, also in
another pipeline layout.

The same runs check ExpertLoadMonitor (the default ``expert_load`` callback) under pipeline parallelism: every rank
holds, and rank 0 logs, the loads and statistics of every stage's MoE layers under their global labels (also a rank
whose stage has none: it joins the collectives, nothing hangs); the CLI run's ``moe/...`` metrics equal those of the
one-process run; the checkpointed moving average covers every stage and comes back in another pipeline layout.

Ranks: the world mesh is (pp, dp): ranks 0, 1 are pipeline rank 0 and ranks 2, 3 pipeline rank 1; each pair is
one EP group (ep=2 over the 2 data-parallel ranks of a pipeline position).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from lightning_moe.callbacks import ExpertLoadMonitor, ExpertRebalancer
from lightning_moe.callbacks.expert_load import coefficient_of_variation
from lightning_moe.models.config import ModelConfig
from lightning_moe.module import MoELanguageModel
from lightning_moe.moe.balance import imbalance, moe_layers
from lightning_moe.parallel.strategy import MoEStrategy
from tests.helpers.loggers import RecordingLogger
from tests.parallel._dist import run_workers

pytestmark = pytest.mark.slow

E, REDUNDANT, STEPS, EVERY, WORLD = 4, 2, 4, 2, 4
BATCH = 8  # per data-parallel rank: the 8 microbatches of DualPipeV at pp=2 (4 stages), 1 sequence each


class _HotExpertModel(MoELanguageModel):
    """Block ``i`` routes every token to expert ``i % E``: skewed loads that differ per layer, so the plans (and a
    stage's placements) differ from layer to layer."""

    def configure_model(self) -> None:
        super().configure_model()
        for name, moe in moe_layers(self.model):
            moe.router.expert_bias.zero_()
            moe.router.expert_bias[int(name.split(".")[1]) % E] = 10.0


def _module(n_layers: int, n_dense_layers: int = 0) -> MoELanguageModel:
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=n_layers, n_dense_layers=n_dense_layers, n_heads=4,
                      dense_ffn_dim=64, num_experts=E, top_k=2, moe_ffn_dim=16, num_shared_experts=1,
                      max_seq_len=16, score_func="sigmoid", bias_update_speed=1e-6)
    return _HotExpertModel(cfg, {"lr": 1e-2, "warmup_steps": 0})


def _probe_loss(module: MoELanguageModel, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of ``batch``: through the forward-only pipeline schedule (a collective over the
    pipeline and EP groups, the same value on every pipeline rank) or, without pipeline, the module itself."""
    module.eval()
    with torch.no_grad():
        if module.pipeline is not None:
            loss = module.pipeline.step(batch[:, :-1], batch[:, 1:], train=False)[0]
        else:
            loss = F.cross_entropy(module(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
    module.train()
    return loss


def _placements(callback: ExpertRebalancer) -> dict[str, torch.Tensor]:
    return {label: experts.placement for label, experts, _ in callback._layers}


class _ProbedRebalancer(ExpertRebalancer):
    """Records, at each move, the probe loss right before and right after, this rank's placements before and after,
    and this rank's plan (per-EP-rank loads before / after of its layers)."""

    def __init__(self, probe: torch.Tensor, **kwargs) -> None:
        super().__init__(**kwargs)
        self.probe, self.moves, self.plans, self.start_loss = probe, [], [], None

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.start_placements = _placements(self)
        self.start_loss = _probe_loss(pl_module, self.probe)

    def rebalance(self, trainer, pl_module) -> None:
        old, before = _placements(self), _probe_loss(pl_module, self.probe)
        super().rebalance(trainer, pl_module)
        self.moves.append({"before": before, "after": _probe_loss(pl_module, self.probe), "old": old,
                           "new": _placements(self)})

    def _plan(self, trainer, pl_module, load):
        plan = super()._plan(trainer, pl_module, load)
        self.plans.append(plan)
        return plan


class _Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit(module, callbacks, max_steps: int, data, *, pp: int = 2, schedule: str = "dualpipe", logger=False,
         ckpt_path=None) -> pl.Trainer:
    dp = WORLD // pp
    strategy = MoEStrategy(ep=2, pp=pp, pipeline_schedule=schedule)
    trainer = pl.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy,
                         max_steps=max_steps, logger=logger, callbacks=callbacks, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, log_every_n_steps=1, gradient_clip_val=0.05)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=BATCH * 2 // dp), ckpt_path=ckpt_path)
    return trainer


def _use_harness_group(rank: int) -> None:
    # The harness already created the process group; with these set, Lightning uses this process as rank `rank`.
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")


def _eplb_rows(logger: RecordingLogger) -> list[tuple[int, dict]]:
    return [(step, {k: v for k, v in row.items() if k.startswith("eplb/")}) for step, row in logger.rows
            if any(k.startswith("eplb/") for k in row)]


def _expected_imbalance(plans: list[dict]) -> tuple[float, float]:
    """Overall imbalance before / after over the layers of ``plans`` (each layer once)."""
    seen, before, after = set(), [], []
    for plan in plans:
        for label, b, a in zip(plan["labels"], plan["before"], plan["after"]):
            if label not in seen:
                seen.add(label)
                before.append(b)
                after.append(a)
    b, a = torch.stack(before), torch.stack(after)
    return float(b.amax(-1).sum() / b.mean(-1).sum()), float(a.amax(-1).sum() / a.mean(-1).sum())


def _all_gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class _LoadSpy(ExpertLoadMonitor):
    """ExpertLoadMonitor logging every step, that keeps each step's load (``last_load``: every stage's layers) and
    the moving average it starts from (restored from a checkpoint)."""

    def __init__(self) -> None:
        super().__init__(log_every_n_steps=1, heatmap_every_n_steps=0, log_per_expert=True)
        self.loads, self.start_ema = [], None

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.start_ema = None if self.load_ema is None else self.load_ema.clone()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.loads.append(None if self.last_load is None else self.last_load.clone())


def _check_load_monitor(rank: int, monitor: _LoadSpy, logger: RecordingLogger, labels: list[str], steps: int) -> None:
    """Every rank holds the loads of every stage's MoE layers (``labels``: global, model order), the same everywhere;
    block ``i`` sends each of the 16 x 16 tokens of a step to its hot expert ``i % E`` (and one other: top_k=2).
    Rank 0 logs every layer's statistics and aggregates over all of them; the heatmap has a row per layer."""
    assert monitor.layer_labels == labels, (rank, monitor.layer_labels)
    assert len(monitor.loads) == steps and all(load is not None for load in monitor.loads), (rank, monitor.loads)
    for load in monitor.loads:
        assert load.shape == (len(labels), E), (rank, load.shape)
        for k, label in enumerate(labels):
            hot = int(label.split("_")[1]) % E
            assert load[k, hot] == 16 * 16 and load[k].sum() == 2 * 16 * 16, (rank, label, load[k])
    everyone = _all_gather([load.cpu() for load in monitor.loads] + [monitor.load_ema.cpu()])
    for other in everyone[1:]:
        assert all(torch.equal(a, b) for a, b in zip(other, everyone[0])), "the same loads on every rank"
    rgb, caption = monitor.heatmap(steps - 1)
    assert f"of MoE layers {', '.join(labels)} (rows)" in caption
    assert rgb.shape[0] == 32 * len(labels) + 2 + 16  # 32-pixel rows, a gap, the colour scale
    for k, label in enumerate(labels):  # the hot expert's cell is red
        red, _, blue = rgb[32 * k, 32 * (int(label.split("_")[1]) % E)].tolist()
        assert red > blue, (label, red, blue)
    if rank != 0:
        return
    rows = [(step, row) for step, row in logger.rows if "moe/imbalance_max" in row]
    assert [step for step, _ in rows] == list(range(steps)), rows
    for (_, row), load in zip(rows, monitor.loads):
        assert {key.split("/")[1] for key in row if key.startswith("moe/layer_")} == set(labels), sorted(row)
        for k, label in enumerate(labels):
            assert row[f"moe/{label}/imbalance"] == pytest.approx(imbalance(load)[k].item(), rel=1e-6)
            assert row[f"moe/{label}/cv"] == pytest.approx(coefficient_of_variation(load)[k].item(), rel=1e-6)
            assert 0 < row[f"moe/{label}/entropy"] <= math.log(E) + 1e-6
        assert row["moe/imbalance_max"] == pytest.approx(imbalance(load).max().item(), rel=1e-6)
        assert row["moe/cv_max"] == pytest.approx(coefficient_of_variation(load).max().item(), rel=1e-6)
        assert row["moe/entropy_mean"] == pytest.approx(sum(row[f"moe/{label}/entropy"] for label in labels)
                                                        / len(labels), rel=1e-6)
    last = rows[-1][1]
    for k, label in enumerate(labels):
        for j in range(E):
            assert last[f"moe/{label}/expert_{j}/tokens"] == pytest.approx(monitor.load_ema[k, j].item())


# --- pp=2 x ep=2, DualPipeV (overlapped EP all-to-alls): every rank holds MoE layers of two stages --------------
def _worker_dualpipe(rank: int, world_size: int, seed: int, ckpt: str) -> None:
    _use_harness_group(rank)
    data = torch.randint(0, 64, (4 * BATCH * 2, 17), generator=torch.Generator().manual_seed(seed))
    probe = torch.randint(0, 64, (BATCH, 17), generator=torch.Generator().manual_seed(seed + 1))

    # 1. reference: the same run without the callback
    pl.seed_everything(seed, verbose=False)
    ref, ref_logger = _Losses(), RecordingLogger()
    _fit(_module(4), [ref], STEPS, data, logger=ref_logger)

    # 2. redundant experts, re-placed after steps 2 and 4
    pl.seed_everything(seed, verbose=False)
    module, record, logger, monitor = _module(4), _Losses(), RecordingLogger(), _LoadSpy()
    rebalancer = _ProbedRebalancer(probe, every_n_steps=EVERY, num_redundant=REDUNDANT)
    trainer = _fit(module, [rebalancer, record, monitor], STEPS, data, logger=logger)
    # expert-load monitoring: every stage's layers (pipeline rank 0 holds blocks 0 and 3, rank 1 blocks 1 and 2)
    _check_load_monitor(rank, monitor, logger, ["layer_0", "layer_1", "layer_2", "layer_3"], STEPS)
    mine = sorted(label for label, _, _ in rebalancer._layers)
    assert mine == (["layer_0", "layer_3"] if rank < 2 else ["layer_1", "layer_2"]), (rank, mine)
    assert rebalancer.num_plans == len(rebalancer.moves) == STEPS // EVERY
    for k, move in enumerate(rebalancer.moves):
        # the same function before and after the move (fp32, same batch, through the pipeline)
        torch.testing.assert_close(move["after"], move["before"], rtol=1e-6, atol=1e-6,
                                   msg=lambda m, k=k: f"probe loss around move {k}, rank {rank}: {m}")
    first = rebalancer.moves[0]
    for label in mine:
        assert torch.equal(first["old"][label], torch.arange(E + REDUNDANT) % E), "default placement at first"
        hot = int(label.split("_")[1]) % E
        assert int((first["new"][label] == hot).sum()) > 1, f"{label}: the hot expert gets replicas"
    # training with replicas (and moves) follows the run without them
    assert len(record.losses) == len(ref.losses) == STEPS
    torch.testing.assert_close(torch.tensor(record.losses), torch.tensor(ref.losses), rtol=1e-4, atol=1e-5)

    final = _placements(rebalancer)
    everyone = _all_gather({"rank": rank, "placements": final, "plans": rebalancer.plans})
    # the data-parallel ranks of a pipeline position planned the same placements
    for a, b in ((0, 1), (2, 3)):
        assert everyone[a]["placements"].keys() == everyone[b]["placements"].keys()
        for label, p in everyone[a]["placements"].items():
            assert torch.equal(p, everyone[b]["placements"][label]), (label, a, b)
    all_final = {k: v for r in everyone for k, v in r["placements"].items()}
    assert sorted(all_final) == ["layer_0", "layer_1", "layer_2", "layer_3"]
    assert len({tuple(p.tolist()) for p in all_final.values()}) == 4, "a placement per layer"
    if rank == 0:
        rows = _eplb_rows(logger)
        assert [step for step, _ in rows] == [EVERY - 1, 2 * EVERY - 1], rows
        for k, (_, row) in enumerate(rows):
            # both stages' layers, under their global index
            labels = sorted({key.split("/")[1] for key in row if key.startswith("eplb/layer_")})
            assert labels == ["layer_0", "layer_1", "layer_2", "layer_3"], sorted(row)
            # the overall imbalance over the layers of both stages
            before, after = _expected_imbalance([r["plans"][k] for r in everyone])
            assert row["eplb/imbalance_before"] == pytest.approx(before, rel=1e-9)
            assert row["eplb/imbalance_after"] == pytest.approx(after, rel=1e-9)
            # slots changed: the sum over the pipeline positions (ranks 0 and 2) of their layers' changes
            assert row["eplb/slots_changed"] == everyone[0]["plans"][k]["changed"] + everyone[2]["plans"][k]["changed"]
        # gradient clipping over both stages sees each logical expert once, however many replicas it has
        norms = [row["train/grad_norm"] for _, row in logger.rows if "train/grad_norm" in row]
        ref_norms = [row["train/grad_norm"] for _, row in ref_logger.rows if "train/grad_norm" in row]
        assert len(norms) == len(ref_norms) == STEPS
        torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=2e-6, atol=0)
        first_row = rows[0][1]
        assert first_row["eplb/imbalance_after"] < first_row["eplb/imbalance_before"]
        assert first_row["eplb/slots_changed"] > 0
    trainer.save_checkpoint(ckpt)
    if rank == 0:
        state = torch.load(Path(ckpt) / "meta.pt", weights_only=True)["callbacks"][rebalancer.state_key]
        assert state["placements"].keys() == all_final.keys(), "every stage's placements in rank 0's state"
        for label, p in all_final.items():
            assert torch.equal(state["placements"][label], p), label
        state = torch.load(Path(ckpt) / "meta.pt", weights_only=True)["callbacks"][monitor.state_key]
        assert state["labels"] == monitor.layer_labels, "every stage's moving-average load in rank 0's state"
        assert torch.equal(state["load_ema"], monitor.load_ema.cpu())

    # 3. resume: every stage gets its own layers' placements back, and the model computes the same function
    pl.seed_everything(seed + 1, verbose=False)
    resumed = _ProbedRebalancer(probe, every_n_steps=100, num_redundant=REDUNDANT)
    _fit(_module(4), [resumed], STEPS + 1, data, ckpt_path=ckpt)
    assert resumed.num_plans == STEPS // EVERY and not resumed.moves
    assert resumed.start_placements.keys() == final.keys()
    for label, p in final.items():
        assert torch.equal(resumed.start_placements[label], p), f"rank {rank} {label}: placement not restored"
    torch.testing.assert_close(resumed.start_loss, rebalancer.moves[-1]["after"], rtol=1e-6, atol=1e-6)
    dist.barrier()


def test_pp2_x_ep2_rebalances_every_stage_logs_all_layers_and_resumes(seed, tmp_path):
    run_workers(_worker_dualpipe, WORLD, seed, str(tmp_path / "last.ckpt"), timeout_s=300)


# --- pp=2 x ep=2, 1F1B: pipeline rank 0 holds a dense block only; resume at pp=1 ---------------------------------
def _worker_dense_stage(rank: int, world_size: int, seed: int, ckpt: str) -> None:
    _use_harness_group(rank)
    data = torch.randint(0, 64, (4 * BATCH * 2, 17), generator=torch.Generator().manual_seed(seed))
    probe = torch.randint(0, 64, (BATCH, 17), generator=torch.Generator().manual_seed(seed + 1))

    pl.seed_everything(seed, verbose=False)
    logger, monitor = RecordingLogger(), _LoadSpy()
    rebalancer = _ProbedRebalancer(probe, every_n_steps=1, num_redundant=REDUNDANT)
    trainer = _fit(_module(2, n_dense_layers=1), [rebalancer, monitor], 2, data, schedule="1f1b", logger=logger)
    assert [label for label, _, _ in rebalancer._layers] == ([] if rank < 2 else ["layer_1"])
    # expert-load monitoring: ranks 0, 1 (no MoE layer) join the collectives and hold the other stage's layer
    _check_load_monitor(rank, monitor, logger, ["layer_1"], 2)
    # every rank counts (and joins) the plans of the other stage
    assert rebalancer.num_plans == len(rebalancer.moves) == 2
    for move in rebalancer.moves:
        torch.testing.assert_close(move["after"], move["before"], rtol=1e-6, atol=1e-6)
    final = _all_gather(_placements(rebalancer))[2]["layer_1"]
    assert not torch.equal(final, torch.arange(E + REDUNDANT) % E)
    if rank == 0:  # logs, from a rank without MoE layers, the layer of the other stage
        rows = _eplb_rows(logger)
        assert [step for step, _ in rows] == [0, 1], rows
        for _, row in rows:
            assert sorted(row) == ["eplb/imbalance_after", "eplb/imbalance_before", "eplb/layer_1/imbalance_after",
                                   "eplb/layer_1/imbalance_before", "eplb/slots_changed"]
            assert row["eplb/imbalance_before"] == row["eplb/layer_1/imbalance_before"]
    trainer.save_checkpoint(ckpt)

    # resume without pipeline parallelism (ep=2 over 4 data-parallel ranks): layer 1 gets its placement back, and
    # its moving-average load (saved by rank 0, which held no MoE layer)
    pl.seed_everything(seed + 1, verbose=False)
    resumed, resumed_monitor = _ProbedRebalancer(probe, every_n_steps=100, num_redundant=REDUNDANT), _LoadSpy()
    _fit(_module(2, n_dense_layers=1), [resumed, resumed_monitor], 3, data, pp=1, ckpt_path=ckpt)
    assert torch.equal(resumed.start_placements["layer_1"], final)
    assert resumed_monitor.start_ema is not None, f"rank {rank}: moving-average load not restored"
    torch.testing.assert_close(resumed_monitor.start_ema, monitor.load_ema.cpu(), rtol=0, atol=0)
    torch.testing.assert_close(resumed.start_loss, rebalancer.moves[-1]["after"], rtol=1e-5, atol=1e-5)
    dist.barrier()


def test_pp2_stage_without_moe_layers_joins_plans_and_resumes_at_pp1(seed, tmp_path):
    run_workers(_worker_dense_stage, WORLD, seed, str(tmp_path / "last.ckpt"), timeout_s=300)


# --- the training command: callbacks=eplb with strategy.pp=2 strategy.ep=2 --------------------------------------
def test_cli_pp2_x_ep2_with_eplb_trains_like_one_process_and_logs_every_stage(tmp_path):
    import csv

    from tests.parallel.test_strategy import losses, train

    # balance losses that do not depend on how the batch is cut into microbatches (as in tests/pipeline)
    same = ("model.n_layers=4", "model.aux_loss_coef=0", "model.seq_aux_loss_coef=0.01", "model.z_loss_coef=0.001",
            "trainer.log_every_n_steps=1", "trainer.max_steps=4", "trainer.limit_val_batches=0",
            "callbacks.expert_load.log_per_expert=true")
    train(tmp_path / "ref", 1, "strategy.pp=1", *same)
    run = tmp_path / "eplb"
    train(run, 4, "strategy.pp=2", "strategy.ep=2", "callbacks=eplb", "callbacks.eplb.every_n_steps=2", *same, dp=2)
    reference, curve = losses(tmp_path / "ref"), losses(run)
    assert sorted(curve) == sorted(reference) and len(curve) == 4
    for step, loss in curve.items():
        assert loss == pytest.approx(reference[step], rel=2e-4), (step, loss, reference[step])
    rows = [r for r in csv.DictReader(open(run / "csv" / "version_0" / "metrics.csv")) if r.get("eplb/imbalance_after")]
    assert [int(r["step"]) for r in rows] == [1, 3]
    for row in rows:
        # block 0 is dense (model=tiny_moe); DualPipeV puts blocks 0 and 3 on pipeline rank 0, 1 and 2 on rank 1
        logged = sorted(key.split("/")[1] for key, value in row.items() if value and key.startswith("eplb/layer_"))
        assert logged == ["layer_1", "layer_1", "layer_2", "layer_2", "layer_3", "layer_3"], row
        assert float(row["eplb/slots_changed"]) > 0
    _check_expert_load_metrics(_moe_metrics(run), _moe_metrics(tmp_path / "ref"))


def _moe_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    """{key: {step: value}} of the ExpertLoadMonitor metrics (``moe/...``) in a CLI run's metrics.csv."""
    import csv

    out: dict[str, dict[int, float]] = {}
    for row in csv.DictReader(open(run_dir / "csv" / "version_0" / "metrics.csv")):
        for key, value in row.items():
            if value and key.startswith("moe/") and key != "moe/imbalance":
                out.setdefault(key, {})[int(row["step"])] = float(value)
    return out


def _check_expert_load_metrics(got: dict[str, dict[int, float]], ref: dict[str, dict[int, float]]) -> None:
    """ExpertLoadMonitor under pp=2 (default callbacks): the per-layer metrics of every stage's MoE layers (blocks 1,
    2 on pipeline rank 1, block 3 on rank 0), under their global labels, and the aggregates over all of them, equal to
    those of the one-process run (token counts are exact; EPLB moves experts, not the routing)."""
    layers = {key.split("/")[1] for key in got if key.startswith("moe/layer_")}
    assert layers == {"layer_1", "layer_2", "layer_3"}, sorted(got)
    assert sorted(got) == sorted(ref)
    for key, curve in got.items():
        assert sorted(curve) == [0, 1, 2, 3], (key, curve)
        # the entropy is a mean of floats summed in another order (microbatches, ranks): fp32 rounding only
        rel = 1e-5 if "entropy" in key else 1e-6
        for step, value in curve.items():
            assert value == pytest.approx(ref[key][step], rel=rel), (key, step, value, ref[key][step])
    for layer in (1, 2, 3):  # step 0 (the moving average starts at the load): every token counted top_k times
        assert sum(got[f"moe/layer_{layer}/expert_{j}/tokens"][0] for j in range(4)) == 16 * 64 * 2
