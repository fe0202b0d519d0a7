"""Expert-load monitoring: per-layer balance statistics, routing entropy and a layer x expert load heatmap.

Shapes: L MoE layers (in model order), E routed experts, T tokens of a micro-batch.

The routers count the expert assignments of every micro-batch in their ``tokens_per_expert`` buffers. The training
module all-reduces and resets them right after the optimizer step (bias update), so this callback reads them just
before it, in ``on_before_optimizer_step``.

Pipeline parallelism (``strategy.pp > 1``): each pipeline rank holds only its stages' layers. The loads are summed
within a pipeline position (over the module's ``expert_load_group``), then combined over the pipeline group
(``pl_module.pipeline.pp_group``) every optimizer step, so that every rank holds the loads, moving averages and
statistics of every stage's layers (global labels, model order). Every rank joins that collective, also a rank whose
stages have no MoE layer.
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
import zlib
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_moe.moe.balance import collect_expert_load, imbalance, moe_layers

HEATMAP_KEY = "moe/load_heatmap"


# --- statistics -------------------------------------------------------------------------------------------------
def coefficient_of_variation(load: torch.Tensor) -> torch.Tensor:
    """Population standard deviation / mean of the tokens per expert, per layer. load: [L, E] -> [L]."""
    load = load.float()
    return load.std(-1, correction=0) / load.mean(-1).clamp_min(1e-9)


def routing_entropy(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    """Entropy (nats) of each token's routing distribution over the experts. logits: [T, E] -> [T].

    Softmax scores are the distribution. Sigmoid scores are independent per expert, so they are normalised to sum
    to one first, as the router does for its gate weights and balance losses. The maximum is ln(E) (uniform).
    """
    logits = logits.float()
    if score_func == "softmax":
        logp = logits.log_softmax(-1)
    elif score_func == "sigmoid":
        log_scores = F.logsigmoid(logits)
        logp = log_scores - log_scores.logsumexp(-1, keepdim=True)
    else:
        raise ValueError(f"score_func={score_func!r}: expected softmax or sigmoid")
    return -(logp.exp() * logp).sum(-1)


# --- heatmap rendering (no matplotlib/PIL: numpy + a hand-written PNG encoder) ---------------------------------
_UNDER = np.array([33, 102, 172], dtype=np.float32)  # blue: fewer tokens than the layer mean
_OVER = np.array([178, 24, 43], dtype=np.float32)  # red: more tokens than the layer mean
_WHITE = np.array([255, 255, 255], dtype=np.float32)  # balanced
_GAP = np.array([96, 96, 96], dtype=np.uint8)


def diverging_colors(v: np.ndarray) -> np.ndarray:
    """Blue-white-red colour map. v: [...] in [-1, 1] -> uint8 [..., 3]."""
    v = np.clip(np.nan_to_num(v.astype(np.float32)), -1.0, 1.0)[..., None]
    end = np.where(v < 0, _UNDER, _OVER)
    return np.rint(_WHITE + np.abs(v) * (end - _WHITE)).astype(np.uint8)


def load_heatmap(load: torch.Tensor | np.ndarray, log2_range: float = 3.0, width: int = 512,
                 height: int = 256) -> np.ndarray:
    """Render a layer x expert load table as an RGB image. load: [L, E] -> uint8 [H, W, 3].

    Each cell is coloured by log2(load / layer mean) clipped to +-``log2_range``: white is balanced, red
    overloaded, blue underloaded. Cells are square-ish blocks (nearest-neighbour upscaling to about ``width`` x
    ``height`` pixels). Under the table, after a grey gap, a strip shows the colour scale from -range to +range.
    """
    load = np.asarray(torch.as_tensor(load, dtype=torch.float64).cpu())
    if load.ndim != 2 or 0 in load.shape:
        raise ValueError(f"expected a [layers, experts] load table, got shape {load.shape}")
    num_layers, num_experts = load.shape
    ratio = load / np.maximum(load.mean(-1, keepdims=True), 1e-9)
    v = np.log2(np.maximum(ratio, 2.0 ** -log2_range)) / log2_range
    cell_w = int(np.clip(width // num_experts, 1, 32))
    cell_h = int(np.clip(height // num_layers, 2, 32))
    cells = diverging_colors(v).repeat(cell_h, axis=0).repeat(cell_w, axis=1)
    w = cells.shape[1]
    gap = np.broadcast_to(_GAP, (2, w, 3))
    scale = np.broadcast_to(diverging_colors(np.linspace(-1.0, 1.0, w))[None], (max(4, cell_h // 2), w, 3))
    return np.ascontiguousarray(np.concatenate([cells, gap, scale], axis=0))


def encode_png(rgb: np.ndarray) -> bytes:
    """Encode an RGB image (uint8 [H, W, 3]) as a PNG file: 8-bit truecolour, no filtering, zlib-compressed."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {rgb.shape}")
    h, w, _ = rgb.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1)  # filter byte 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, colour type 2 (RGB), deflate, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + chunk(b"IEND", b""))


def wandb_png_image(rgb: np.ndarray, caption: str | None = None) -> Any:
    """A ``wandb.Image`` of ``rgb`` (uint8 [H, W, 3]) that needs no PIL.

    ``wandb.Image`` decodes or encodes every image with PIL, which we do not depend on. This builds the same media
    object (history entry ``_type: image-file``, the file under ``files/media/images/``) from our own PNG: the file
    is written to a temporary path that W&B moves into the run when the image is logged.
    """
    import wandb  # noqa: PLC0415 - optional service, imported on use
    from wandb.sdk.data_types.base_types.media import Media  # noqa: PLC0415

    class _PngImage(wandb.Image):
        def __init__(self) -> None:
            Media.__init__(self, caption=caption)
            self._grouping = self._image = self._classes = self._boxes = self._masks = None
            self._height, self._width = rgb.shape[:2]
            self.format = self._file_type = "png"
            fd, path = tempfile.mkstemp(prefix="lightning_moe_", suffix=".png")
            with os.fdopen(fd, "wb") as f:
                f.write(encode_png(rgb))
            self._set_file(path, is_tmp=True)

    return _PngImage()


# --- the callback -----------------------------------------------------------------------------------------------
def layer_label(name: str, position: int) -> str:
    """Metric label of an MoE layer from its qualified name: ``layer_{i}`` for transformer block ``i`` (its global
    index, ``model.layers.3.feed_forward`` -> ``layer_3``), ``mtp_{k}`` for multi-token-prediction depth ``k``
    (``model.mtp.layers.1.block.feed_forward``), else ``moe_{position}`` (position among the MoE layers)."""
    if match := re.search(r"(?:^|\.)mtp\.layers\.(\d+)(?:\.|$)", name):
        return f"mtp_{match.group(1)}"
    if match := re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", name):
        return f"layer_{match.group(1)}"
    return f"moe_{position}"


def _model_order(label: str) -> tuple[int, int]:
    """Sort key that puts ``layer_label`` labels in model order: the blocks by index, then the MTP depths, then any
    other label (in its original order: the sort is stable)."""
    if match := re.fullmatch(r"(layer|mtp)_(\d+)", label):
        return (0 if match.group(1) == "layer" else 1, int(match.group(2)))
    return (2, 0)


def pipeline_group(pl_module: Any) -> dist.ProcessGroup | None:
    """The pipeline group of a pipeline-parallel module (``pl_module.pipeline.pp_group``), else None."""
    return getattr(getattr(pl_module, "pipeline", None), "pp_group", None)


def gather_objects(obj: Any, group: dist.ProcessGroup | None) -> list[Any]:
    """``obj`` of every rank of ``group`` in group-rank order (a collective); ``[obj]`` without a group."""
    if group is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _every(step: int, interval: int | None) -> bool:
    """Whether optimizer step ``step`` (0-based) ends an interval, like Lightning's ``log_every_n_steps``."""
    return bool(interval) and (step + 1) % interval == 0


class ExpertLoadMonitor(Callback):
    """Logs how evenly each MoE layer spreads its tokens over the experts.

    Every ``log_every_n_steps`` optimizer steps, for each MoE layer (``layer_{i}`` for transformer block ``i``,
    ``mtp_{k}`` for the multi-token-prediction block of depth ``k``; see ``layer_label``):

    - ``moe/layer_{i}/imbalance``: max / mean tokens per expert in this step (1.0 is perfect balance);
    - ``moe/layer_{i}/imbalance_ema``: the same on the moving-average load;
    - ``moe/layer_{i}/cv``: coefficient of variation (std / mean) of the tokens per expert in this step;
    - ``moe/layer_{i}/entropy``: mean routing entropy per token in nats, over the step's micro-batches (ln E at
      most: uniform scores; low: confident routing);
    - ``moe/layer_{i}/dropped_frac``: share of assignments dropped by the capacity limit (capacity models only);
    - ``moe/layer_{i}/expert_{j}/tokens``: moving-average tokens per step of expert ``j`` (``log_per_expert``);

    and over layers ``moe/imbalance_max`` (also in the progress bar), ``moe/imbalance_ema_max``, ``moe/cv_max``,
    ``moe/entropy_mean``, ``moe/dropped_frac``. Loads are summed over the module's ``expert_load_group`` (all
    data-parallel ranks) and count token-expert assignments (top_k per token).

    Under pipeline parallelism every metric covers the MoE layers of every pipeline stage, under their global labels:
    the loads (and routing entropies) of each stage are combined over the pipeline group at every optimizer step (a
    collective that every rank joins, also one whose stages have no MoE layer), so rank 0 logs them all.

    Every ``heatmap_every_n_steps`` it logs ``moe/load_heatmap`` to each W&B logger: a layer x expert image of the
    moving-average load (see ``load_heatmap``). Other loggers get no image.

    Args:
        log_every_n_steps: optimizer steps between scalar logs (None: the trainer's ``log_every_n_steps``).
        heatmap_every_n_steps: optimizer steps between heatmaps (0: none).
        ema_decay: weight of the past in the per-expert moving average, updated every optimizer step.
        entropy: measure the routing entropy. It costs one extra [T, D] x [D, E] product per MoE layer and
            micro-batch, on logged steps only (a forward hook recomputes the router scores).
        log_per_expert: also log each expert's moving-average load as a scalar (L x E series: small models).
        heatmap_log2_range: the heatmap colours span load / mean from 2**-range to 2**range.
    """

    def __init__(self, log_every_n_steps: int | None = None, heatmap_every_n_steps: int = 100,
                 ema_decay: float = 0.9, entropy: bool = True, log_per_expert: bool = False,
                 heatmap_log2_range: float = 3.0) -> None:
        if log_every_n_steps is not None and log_every_n_steps < 0:
            raise ValueError(f"callbacks.expert_load.log_every_n_steps={log_every_n_steps}: must be >= 0 or null")
        if heatmap_every_n_steps < 0:
            raise ValueError(f"callbacks.expert_load.heatmap_every_n_steps={heatmap_every_n_steps}: must be >= 0")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"callbacks.expert_load.ema_decay={ema_decay}: must be in [0, 1)")
        if heatmap_log2_range <= 0:
            raise ValueError(f"callbacks.expert_load.heatmap_log2_range={heatmap_log2_range}: must be > 0")
        self.log_every_n_steps = log_every_n_steps
        self.heatmap_every_n_steps = heatmap_every_n_steps
        self.ema_decay = ema_decay
        self.entropy = entropy
        self.log_per_expert = log_per_expert
        self.heatmap_log2_range = heatmap_log2_range
        self.load_ema: torch.Tensor | None = None
        """[L, E] moving average of the tokens routed per optimizer step (identical on every rank; under pipeline
        parallelism the layers of every stage)."""
        self.last_load: torch.Tensor | None = None
        """[L, E] tokens routed in the last optimizer step (the layers of every stage)."""
        self.layer_labels: list[str] = []
        """Metric label of each MoE layer, in model order (``layer_3``, ``mtp_1``): under pipeline parallelism those
        of every stage."""
        self._pp_group: dist.ProcessGroup | None = None  # pipeline group (pp > 1), else None
        self._pp_device: torch.device | None = None  # device of the pipeline group's collectives
        self._rows: list[int] = []  # pp > 1: the row in layer_labels of each of this rank's MoE layers
        self._num_experts = 0
        self._ema_labels: list[str] | None = None  # labels of a restored load_ema (None: older checkpoints)
        self._hooks: list[Any] = []
        self._entropy_sum: torch.Tensor | None = None  # [L] summed per-token entropies of this step
        self._entropy_count: torch.Tensor | None = None  # [L] tokens behind them
        self._measure_entropy = False
        self._has_capacity = False
        self._last_step = -1

    def _log_interval(self, trainer: pl.Trainer) -> int:
        return trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps

    # --- router hooks ---
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        layers = moe_layers(pl_module)
        labels = [layer_label(name, k) for k, (name, _) in enumerate(layers)]
        has_capacity = any(getattr(m, "capacity_factor", None) is not None for _, m in layers)
        self._num_experts = layers[0][1].router.tokens_per_expert.numel() if layers else 0
        self._pp_group = pipeline_group(pl_module)
        if self._pp_group is None:
            self.layer_labels, self._has_capacity = labels, has_capacity
        else:
            self._setup_pipeline(pl_module, labels, has_capacity)
        self._last_step = -1
        if self.load_ema is not None and self._ema_labels is not None and self._ema_labels != self.layer_labels:
            rank_zero_warn(f"ExpertLoadMonitor: the checkpoint's moving-average load is for the MoE layers "
                           f"{self._ema_labels}, this model has {self.layer_labels}; it starts again")
            self.load_ema = None
        self._ema_labels = None
        if not (self.entropy and layers):
            return
        device = layers[0][1].router.tokens_per_expert.device
        self._entropy_sum = torch.zeros(len(layers), device=device)
        self._entropy_count = torch.zeros(len(layers), device=device)
        for k, (_, moe) in enumerate(layers):
            self._hooks.append(moe.router.register_forward_hook(self._entropy_hook(k)))

    def _setup_pipeline(self, pl_module: pl.LightningModule, labels: list[str], has_capacity: bool) -> None:
        """Learn the MoE layers of every pipeline stage (a collective over the pipeline group): their labels in model
        order, and the row of each of this rank's layers among them. Every rank raises the same errors."""
        gathered = gather_objects((labels, has_capacity, self._num_experts), self._pp_group)
        every = [label for stage_labels, _, _ in gathered for label in stage_labels]
        if len(set(every)) != len(every):
            raise ValueError(f"ExpertLoadMonitor: the MoE layer labels {every} of the pipeline stages are not unique "
                             "(metrics are keyed by them)")
        num_experts = {n for stage_labels, _, n in gathered if stage_labels}
        if len(num_experts) > 1:
            raise ValueError(f"ExpertLoadMonitor needs the same number of experts in every MoE layer of every "
                             f"pipeline stage (got {sorted(num_experts)})")
        self.layer_labels = sorted(every, key=_model_order)
        self._rows = [self.layer_labels.index(label) for label in labels]
        self._has_capacity = any(capacity for _, capacity, _ in gathered)
        self._num_experts = num_experts.pop() if num_experts else 0
        self._pp_device = pl_module.pipeline.device

    def _entropy_hook(self, k: int):
        def hook(router: nn.Module, args: tuple, output: Any) -> None:
            # Runs again when activation checkpointing recomputes the forward: sum and count double alike, so the
            # mean is unchanged.
            if not (self._measure_entropy and router.training):
                return
            with torch.no_grad():
                logits = F.linear(args[0].detach().float(), router.gate.weight.detach().float())
                entropy = routing_entropy(logits, router.score_func)
                self._entropy_sum[k] += entropy.sum()
                self._entropy_count[k] += entropy.numel()

        return hook

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._measure_entropy = False

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the same for every micro-batch of a step
        self._measure_entropy = bool(self._hooks) and _every(step, self._log_interval(trainer))

    # --- once per optimizer step, before the module's bias update resets the counters ---
    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if step == self._last_step:  # several optimizers: count the step once
            return
        self._last_step = step
        # A collective on the module's group: every rank calls it here, in the same order as the module's own.
        load, dropped = collect_expert_load(pl_module, getattr(pl_module, "expert_load_group", None))
        logged = _every(step, self._log_interval(trainer))
        entropy = None
        if self._pp_group is not None:  # every rank, with or without MoE layers of its own
            if not self.layer_labels:
                return
            sums = self._entropy_sums(pl_module) if logged and self.entropy else None
            load, dropped, sums = self._combine_stages(load, dropped, sums)
            entropy = self._mean_entropy(sums)
        elif not load.numel():
            return
        elif logged and self.entropy:
            entropy = self._mean_entropy(self._entropy_sums(pl_module))
        load = load.float()
        self.last_load = load
        if self.load_ema is None or self.load_ema.shape != load.shape:
            self.load_ema = load.clone()
        else:
            self.load_ema = self.load_ema.to(load.device).lerp_(load, 1.0 - self.ema_decay)
        if logged:
            self._log_scalars(trainer, pl_module, step, load, dropped, entropy)
        if _every(step, self.heatmap_every_n_steps) and trainer.is_global_zero:
            self._log_heatmap(trainer, step)

    def _entropy_sums(self, pl_module: pl.LightningModule) -> torch.Tensor | None:
        """[2, L] summed per-token routing entropies and token counts of this step, over the expert-load group (a
        collective), for this rank's layers; then reset. None without hooks (no MoE layer on this rank)."""
        if self._entropy_sum is None:
            return None
        packed = torch.stack([self._entropy_sum, self._entropy_count])
        group = getattr(pl_module, "expert_load_group", None)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(packed, group=group)
        self._entropy_sum.zero_()
        self._entropy_count.zero_()
        return packed

    @staticmethod
    def _mean_entropy(packed: torch.Tensor | None) -> torch.Tensor | None:
        """[L] mean routing entropy per token from ``_entropy_sums``; None when a layer counted no token (e.g. the
        hooks did not run under torch.compile)."""
        if packed is None or not bool((packed[1] > 0).all()):
            return None
        return packed[0] / packed[1]

    @torch.no_grad()
    def _combine_stages(self, load: torch.Tensor, dropped: torch.Tensor, sums: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pipeline parallelism: this rank's layers' load [L_local, E], dropped [L_local] and entropy sums [2, L_local]
        (already summed over its data-parallel ranks) -> those of every stage's layers ([L, E], [L], [2, L], rows in
        ``layer_labels`` order). A sum over the pipeline group of tables that hold each rank's own rows and zeros
        elsewhere (float64: exact); a collective that every rank joins, with or without MoE layers."""
        num_experts = self._num_experts
        table = torch.zeros(len(self.layer_labels), num_experts + 3, dtype=torch.float64, device=self._pp_device)
        if self._rows:
            rows = torch.tensor(self._rows, device=self._pp_device)
            table[rows, :num_experts] = load.to(self._pp_device, torch.float64)
            table[rows, num_experts] = dropped.to(self._pp_device, torch.float64)
            if sums is not None:
                table[rows, num_experts + 1:] = sums.t().to(self._pp_device, torch.float64)
        dist.all_reduce(table, group=self._pp_group)
        table = table.float()
        return table[:, :num_experts], table[:, num_experts], table[:, num_experts + 1:].t()

    def _log_scalars(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, load: torch.Tensor,
                     dropped: torch.Tensor, entropy: torch.Tensor | None) -> None:
        imb = imbalance(load)
        pl_module.log("moe/imbalance_max", imb.max(), prog_bar=True, logger=False)
        if not trainer.is_global_zero:
            return
        stats = {"imbalance": imb, "imbalance_ema": imbalance(self.load_ema), "cv": coefficient_of_variation(load)}
        if entropy is not None:
            stats["entropy"] = entropy
        if self._has_capacity:
            stats["dropped_frac"] = dropped.float() / load.sum(-1).clamp_min(1)
        values = {k: v.tolist() for k, v in stats.items()}  # one host sync per statistic, on logged steps only
        metrics: dict[str, float] = {}
        for k, label in enumerate(self.layer_labels):
            for name, per_layer in values.items():
                metrics[f"moe/{label}/{name}"] = per_layer[k]
        metrics["moe/imbalance_max"] = max(values["imbalance"])
        metrics["moe/imbalance_ema_max"] = max(values["imbalance_ema"])
        metrics["moe/cv_max"] = max(values["cv"])
        if entropy is not None:
            metrics["moe/entropy_mean"] = sum(values["entropy"]) / len(values["entropy"])
        if self._has_capacity:
            metrics["moe/dropped_frac"] = float(dropped.sum() / load.sum().clamp_min(1))
        if self.log_per_expert:
            for k, row in enumerate(self.load_ema.tolist()):
                for j, tokens in enumerate(row):
                    metrics[f"moe/{self.layer_labels[k]}/expert_{j}/tokens"] = tokens
        # Direct logger calls on our own schedule (values logged with `self.log` off Lightning's logging steps would
        # be re-sent later, stale). `_batches_that_stepped` is the step Lightning logs this batch's metrics at.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def heatmap(self, step: int) -> tuple[np.ndarray, str]:
        """The heatmap image (``load_heatmap`` of the moving-average load: every MoE layer of the model, one row
        each, in model order) and its caption."""
        rgb = load_heatmap(self.load_ema, self.heatmap_log2_range)
        r, layers = self.heatmap_log2_range, ", ".join(self.layer_labels)
        caption = (f"step {step}: moving-average tokens per expert (columns, 0..{self.load_ema.shape[1] - 1}) "
                   f"of MoE layers {layers} (rows); colour log2(load / layer mean) from -{r:g} (blue) "
                   f"through 0 (white) to +{r:g} (red), scale in the bottom strip")
        return rgb, caption

    def _log_heatmap(self, trainer: pl.Trainer, step: int) -> None:
        from lightning.pytorch.loggers import WandbLogger  # noqa: PLC0415 - does not import wandb itself

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        rgb, caption = self.heatmap(step)
        for logger in loggers:
            logger.log_metrics({HEATMAP_KEY: wandb_png_image(rgb, caption)}, step=step)

    # --- checkpointing: the moving average survives a resume ---
    @override
    def state_dict(self) -> dict[str, Any]:
        """The moving-average load of every MoE layer (under pipeline parallelism of every stage: Lightning writes
        callback states from rank 0 only) and the labels of its rows; the same in any pipeline layout."""
        if self.load_ema is None:
            return {"load_ema": None}
        return {"load_ema": self.load_ema.detach().cpu(), "labels": list(self.layer_labels)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the moving average; at the start of training it is kept only if its rows are this model's MoE
        layers (checkpoints without labels: if its shape matches)."""
        self.load_ema = state_dict.get("load_ema")
        self._ema_labels = state_dict.get("labels")
