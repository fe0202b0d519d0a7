"""``MoELanguageModel`` logs each training scalar as its mean over the processes (one all-reduce for all of them):
the main loss, the MTP losses and the balance losses, on 2 gloo ranks that see different batches."""

import copy
from types import SimpleNamespace

import pytest
import torch

from lightning_moe.models.mtp import mtp_losses
from lightning_moe.module import MoELanguageModel
from lightning_moe.moe.balance import moe_layers
from tests.parallel._dist import run_workers
from tests.pipeline.test_pipeline import _cfg


def _local_values(model: torch.nn.Module, batch: torch.Tensor) -> dict[str, float]:
    logits, mtp_logits = model(batch[:, :-1], labels=batch[:, 1:])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    per_depth = mtp_losses(mtp_logits, batch[:, 1:])
    out = {"train/loss": loss.item(), "train/mtp_loss": torch.stack(per_depth).mean().item()}
    out.update({f"train/mtp_loss_{k}": v.item() for k, v in enumerate(per_depth, start=1)})
    for name in ("seq_aux_loss", "z_loss"):
        out[f"train/{name}"] = sum(m.last_losses[name].item() for _, m in moe_layers(model))
    return out


def _worker(rank: int, world_size: int, seed: int) -> None:
    torch.manual_seed(seed)  # the same model on both ranks
    module = MoELanguageModel(model=_cfg(n_layers=2, mtp_depth=2))
    module.configure_model()
    module._trainer = SimpleNamespace(optimizers=[], global_step=0, accumulate_grad_batches=1)
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    ref = copy.deepcopy(module.model)
    shares = torch.randint(0, 64, (2 * world_size, 13), generator=torch.Generator().manual_seed(seed + 1)).chunk(
        world_size)
    module.training_step(shares[rank], 0)
    per_rank = [_local_values(ref, share) for share in shares]
    for name in per_rank[0]:
        mean = sum(r[name] for r in per_rank) / world_size
        assert logged[name] == pytest.approx(mean, rel=1e-5, abs=1e-7), (name, logged[name], mean)
    # the two random batches give values far more different than that tolerance, so a rank's own values fail it
    spread = max(abs(per_rank[1][n] - per_rank[0][n]) / abs(per_rank[0][n]) for n in per_rank[0])
    assert spread > 1e-3, spread


def test_training_scalars_are_means_over_ranks(seed):
    run_workers(_worker, 2, seed)
