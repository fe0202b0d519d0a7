"""ExpertLoadMonitor: statistics against hand-computed values, per-step accounting in a CPU fit, and an offline W&B
run of the training command read back from disk (expert-load scalars and the heatmap image)."""

import json
import math
import struct
import zlib

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from lightning_moe import ModelConfig, MoELanguageModel, TokenDataModule
from lightning_moe.callbacks import ExpertLoadMonitor
from lightning_moe.callbacks.expert_load import (
    _model_order,
    coefficient_of_variation,
    encode_png,
    layer_label,
    load_heatmap,
    routing_entropy,
)
from lightning_moe.moe.balance import imbalance, moe_layers
from tests.helpers.loggers import RecordingLogger
from tests.helpers.wandb_reader import isolate_wandb, read_run

WHITE, RED, BLUE = (255, 255, 255), (178, 24, 43), (33, 102, 172)

def decode_png(data: bytes) -> np.ndarray:
    """uint8 [H, W, 3] from an 8-bit RGB PNG without row filters (what ``encode_png`` writes); checks the CRCs."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, tags = 8, b"", []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(tag + body)
        if tag == b"IHDR":
            w, h, depth, color_type = struct.unpack(">IIBB", body[:10])
        elif tag == b"IDAT":
            idat += body
        tags.append(tag)
        pos += 12 + n
    assert tags[0] == b"IHDR" and tags[-1] == b"IEND" and (depth, color_type) == (8, 2)
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(h, w, 3)


# --- statistics ---
def test_imbalance_and_cv_on_a_fixed_load():
    load = torch.tensor([[6.0, 2, 0, 0], [2, 2, 2, 2], [1, 3, 1, 3]])
    # means 2, 2, 2; max 6, 2, 3; population std sqrt((16+0+4+4)/4) = sqrt(6), 0, 1
    assert imbalance(load).tolist() == pytest.approx([3.0, 1.0, 1.5])
    assert coefficient_of_variation(load).tolist() == pytest.approx([math.sqrt(6) / 2, 0.0, 0.5])


def test_routing_entropy_softmax_and_sigmoid():
    softmax = torch.log(torch.tensor([[1.0, 1, 1, 1], [1, 1, 2, 1e-30], [1, 1e-30, 1e-30, 1e-30]]))
    # uniform over 4: ln 4; (1/4, 1/4, 1/2, 0): 1/2 ln 4 + 1/2 ln 2 = 1.5 ln 2; one-hot: 0
    assert routing_entropy(softmax, "softmax").tolist() == pytest.approx([math.log(4), 1.5 * math.log(2), 0.0],
                                                                         abs=1e-5)
    scores = torch.tensor([[0.2, 0.2, 0.6], [0.9, 0.9, 0.9], [0.1, 0.1, 0.2]])
    logits = torch.log(scores / (1 - scores))  # sigmoid(logits) == scores
    # sigmoid scores are normalised first: (0.2, 0.2, 0.6), uniform, (0.25, 0.25, 0.5)
    expected = [-(2 * 0.2 * math.log(0.2) + 0.6 * math.log(0.6)), math.log(3), 1.5 * math.log(2)]
    assert routing_entropy(logits, "sigmoid").tolist() == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="score_func"):
        routing_entropy(logits, "relu")


def test_layer_labels_name_blocks_by_global_index_and_mtp_by_depth():
    assert layer_label("model.layers.3.feed_forward", 0) == "layer_3"
    assert layer_label("model.layers.12._checkpoint_wrapped_module.feed_forward", 0) == "layer_12"
    assert layer_label("model.mtp.layers.1.block.feed_forward", 4) == "mtp_1"
    assert layer_label("moe", 2) == "moe_2"
    # the labels gathered from pipeline stages (in stage order) are put back in model order
    stages = ["layer_0", "layer_10", "mtp_1", "layer_2", "moe_1", "mtp_0", "moe_0"]
    assert sorted(stages, key=_model_order) == ["layer_0", "layer_2", "layer_10", "mtp_0", "mtp_1", "moe_1", "moe_0"]


# --- heatmap ---
def test_heatmap_colours_and_png_round_trip():
    load = torch.tensor([[4.0, 4, 4, 4], [16, 0, 0, 0], [2, 2, 6, 6]])
    rgb = load_heatmap(load, log2_range=2.0, width=8, height=6)  # cells of 2 x 2 pixels
    assert rgb.dtype == np.uint8 and rgb.shape == (3 * 2 + 2 + 4, 4 * 2, 3)
    cell = lambda layer, expert: tuple(rgb[2 * layer, 2 * expert])  # noqa: E731
    assert [cell(0, e) for e in range(4)] == [WHITE] * 4  # balanced
    assert cell(1, 0) == RED  # 4x the mean: log2 = 2 = full scale
    assert cell(1, 1) == cell(1, 3) == BLUE  # no tokens: clipped to the bottom of the scale
    half_blue, half_red = cell(2, 0), cell(2, 2)  # 0.5x and 1.5x the mean (log2: -1 of 2, +0.585 of 2)
    assert half_blue == tuple(round(255 + 0.5 * (b - 255)) for b in BLUE)
    assert half_red == tuple(round(255 + math.log2(1.5) / 2 * (r - 255)) for r in RED)
    assert tuple(rgb[7, 0]) == (96, 96, 96)  # the gap, then the colour scale from blue to red
    assert tuple(rgb[-1, 0]) == BLUE and tuple(rgb[-1, -1]) == RED
    np.testing.assert_array_equal(decode_png(encode_png(rgb)), rgb)


# --- the callback in a CPU fit ---



class RouterSpy(Callback):
    """Records the routers' counters before the monitor reads them, and each step's routing entropy, independently."""

    def __init__(self) -> None:
        self.loads, self.dropped, self.entropy = [], [], []
        self._sum = None

    def on_train_start(self, trainer, pl_module):
        layers = [m.router for _, m in moe_layers(pl_module)]
        self._sum = torch.zeros(len(layers), 2, dtype=torch.float64)
        for k, router in enumerate(layers):
            router.register_forward_hook(self._hook(k))

    def _hook(self, k):
        def hook(router, args, output):
            if router.training:
                with torch.no_grad():
                    scores = router._scores(F.linear(args[0], router.gate.weight)).double()
                    p = scores / scores.sum(-1, keepdim=True)
                    self._sum[k] += torch.tensor([-(p * p.log()).sum().item(), p.shape[0]], dtype=torch.float64)

        return hook

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        layers = [m.router for _, m in moe_layers(pl_module)]
        self.loads.append(torch.stack([r.tokens_per_expert.clone() for r in layers]))
        self.dropped.append(torch.stack([r.dropped_tokens.clone() for r in layers]))
        self.entropy.append((self._sum[:, 0] / self._sum[:, 1]).tolist())
        self._sum.zero_()


def test_monitor_statistics_in_a_fit_with_gradient_accumulation():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, dim=16, n_layers=3, n_heads=2, n_dense_layers=1, dense_ffn_dim=24,
                      num_experts=4, top_k=2, moe_ffn_dim=8, max_seq_len=16, score_func="sigmoid",
                      capacity_factor=1.0)
    rng = np.random.default_rng(0)
    data = TokenDataModule(source=lambda: (rng.integers(0, 32, 4000), rng.integers(0, 32, 400)), seq_len=16,
                           batch_size=4)
    spy, logger = RouterSpy(), RecordingLogger()
    monitor = ExpertLoadMonitor(log_every_n_steps=2, heatmap_every_n_steps=3, ema_decay=0.5, log_per_expert=True)
    trainer = pl.Trainer(max_steps=6, accumulate_grad_batches=2, logger=logger, callbacks=[spy, monitor],
                         log_every_n_steps=5, limit_val_batches=0, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(MoELanguageModel(cfg), datamodule=data)

    assert monitor.layer_labels == ["layer_1", "layer_2"]  # global block indices of the MoE layers
    assert len(spy.loads) == 6
    for load in spy.loads:  # one optimizer step = 2 micro-batches of 4 x 16 tokens, 2 experts each
        assert load.sum(-1).tolist() == [2 * 4 * 16 * 2] * 2
    ema = spy.loads[0]
    emas = [ema]
    for load in spy.loads[1:]:
        ema = 0.5 * ema + 0.5 * load
        emas.append(ema)
    torch.testing.assert_close(monitor.load_ema, emas[-1])

    rows = [(step, m) for step, m in logger.rows if "moe/imbalance_max" in m]
    assert [step for step, _ in rows] == [1, 3, 5]  # every 2nd optimizer step, at its own step
    for step, m in rows:
        load, dropped, ema = spy.loads[step], spy.dropped[step], emas[step]
        for k, layer in enumerate((1, 2)):
            p = f"moe/layer_{layer}/"
            assert m[p + "imbalance"] == pytest.approx(imbalance(load)[k].item())
            assert m[p + "imbalance_ema"] == pytest.approx(imbalance(ema)[k].item())
            assert m[p + "cv"] == pytest.approx(coefficient_of_variation(load)[k].item())
            assert m[p + "entropy"] == pytest.approx(spy.entropy[step][k], rel=1e-5)
            assert 0 < m[p + "entropy"] <= math.log(4) + 1e-6
            assert m[p + "dropped_frac"] == pytest.approx((dropped[k] / load[k].sum()).item())
            for j in range(4):
                assert m[f"{p}expert_{j}/tokens"] == pytest.approx(ema[k, j].item())
        assert m["moe/imbalance_max"] == pytest.approx(imbalance(load).max().item())
        assert m["moe/dropped_frac"] == pytest.approx((dropped.sum() / load.sum()).item())
    assert sum(d.sum() for d in spy.dropped) > 0  # capacity_factor=1.0 did drop tokens
    assert trainer.progress_bar_metrics["moe/imbalance_max"] == pytest.approx(rows[-1][1]["moe/imbalance_max"])
    assert monitor._hooks == []  # removed at the end of training

    restored = ExpertLoadMonitor()
    restored.load_state_dict(monitor.state_dict())
    torch.testing.assert_close(restored.load_ema, monitor.load_ema)


def test_checkpointed_moving_average_is_keyed_by_layer_labels():
    def module(n_dense_layers: int) -> MoELanguageModel:
        cfg = ModelConfig(vocab_size=32, dim=16, n_layers=3, n_heads=2, n_dense_layers=n_dense_layers,
                          dense_ffn_dim=24, num_experts=4, top_k=2, moe_ffn_dim=8, max_seq_len=16)
        m = MoELanguageModel(cfg)
        m.configure_model()
        return m

    def started(state: dict, pl_module: MoELanguageModel) -> ExpertLoadMonitor:
        monitor = ExpertLoadMonitor()
        monitor.load_state_dict(state)
        monitor.on_train_start(None, pl_module)
        monitor.on_train_end(None, pl_module)
        return monitor

    saved = ExpertLoadMonitor()
    assert saved.state_dict() == {"load_ema": None}
    saved.on_train_start(None, module(1))
    saved.load_ema = torch.arange(8.0).reshape(2, 4)
    state = saved.state_dict()
    assert state["labels"] == ["layer_1", "layer_2"]
    torch.testing.assert_close(started(state, module(1)).load_ema, saved.load_ema)
    # another model's layers: the moving average starts again
    with pytest.warns(UserWarning, match=r"for the MoE layers \['layer_1', 'layer_2'\], this model has \['layer_0'"):
        assert started(state, module(0)).load_ema is None
    # older checkpoints (no labels): kept (replaced at the first step if its shape does not fit)
    torch.testing.assert_close(started({"load_ema": saved.load_ema}, module(0)).load_ema, saved.load_ema)


# --- acceptance: the training command with W&B offline, read back from disk ---
@pytest.mark.slow
def test_offline_wandb_run_has_expert_load_metrics_and_heatmap(tmp_path, monkeypatch):
    import wandb
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from lightning_moe.cli.train import run

    isolate_wandb(tmp_path, monkeypatch)
    tokens = tmp_path / "train.bin"
    np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint16).tofile(tokens)
    out = tmp_path / "run"
    GlobalHydra.instance().clear()
    with initialize_config_module(version_base="1.3", config_module="lightning_moe.conf"):
        cfg = compose("train", overrides=[
            "recipe=tiny", "logger=wandb", f"paths.output_dir={out}", "data=tokens", f"data.source.path={tokens}",
            "~data.source.max_bytes", "data.seq_len=32", "model.n_layers=3", "trainer.max_steps=6",
            "trainer.log_every_n_steps=2", "trainer.enable_progress_bar=false",
            "callbacks.expert_load.heatmap_every_n_steps=3",
        ])
    GlobalHydra.instance().clear()
    try:
        run(cfg)
    finally:
        wandb.finish()
        wandb.teardown()  # the transaction log is complete only after teardown (or process exit)

    (run_dir,) = (out / "wandb").glob("offline-run-*")
    history = read_run(run_dir)["history"]
    scalars = [row for row in history if "moe/imbalance_max" in row]
    assert [row["trainer/global_step"] for row in scalars] == [1, 3, 5]
    for row in scalars:
        for layer in (1, 2):  # block 0 is dense
            for stat in ("imbalance", "imbalance_ema", "cv", "entropy"):
                assert f"moe/layer_{layer}/{stat}" in row
            assert row[f"moe/layer_{layer}/imbalance"] >= 1.0
            assert 0 < row[f"moe/layer_{layer}/entropy"] <= math.log(4) + 1e-6
    images = [row for row in history if "moe/load_heatmap/_type" in row]
    assert [row["trainer/global_step"] for row in images] == [2, 5]
    for row in images:
        assert row["moe/load_heatmap/_type"] == "image-file"
        path = run_dir / "files" / row["moe/load_heatmap/path"]
        assert path.parent == run_dir / "files" / "media" / "images" / "moe" and path.suffix == ".png"
        rgb = decode_png(path.read_bytes())
        # 2 MoE layers x 4 experts: cells of 32 x 32 pixels, a 2-pixel gap and a 16-pixel colour scale
        assert rgb.shape == (row["moe/load_heatmap/height"], row["moe/load_heatmap/width"], 3) == (82, 128, 3)
        assert "MoE layers layer_1, layer_2 (rows)" in row["moe/load_heatmap/caption"]
    assert sorted(p.name.split("_")[0] for p in (run_dir / "files" / "media" / "images" / "moe").iterdir()) == [
        "load", "load"]
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 6
