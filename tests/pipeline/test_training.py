"""Pipeline parallelism through Lightning and the CLI: the same loss curve as one process, validation, checkpoints
that resume in another layout, and one-line errors for bad pipeline configs."""

import pytest

from tests.parallel.test_strategy import losses, train

pytestmark = pytest.mark.slow

STEPS, HALF = 8, 4
# Balance losses that do not depend on how the batch is cut into microbatches (the classic aux loss does).
SAME = ("model.n_layers=4", "model.aux_loss_coef=0", "model.seq_aux_loss_coef=0.01", "model.z_loss_coef=0.001",
        "trainer.log_every_n_steps=1", "trainer.val_check_interval=2")
# Logged balance losses: the mean over the microbatches of each layer's loss, summed over the layers of all stages;
# for these losses the same as one process's value for the whole batch.
BALANCE = ("train/seq_aux_loss", "train/z_loss")


def _close(curve: dict[int, float], reference: dict[int, float]) -> None:
    assert curve, "no losses logged"
    for step, loss in curve.items():
        assert loss == pytest.approx(reference[step], rel=2e-4), (step, loss, reference[step])


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    train(run_dir, 1, "strategy.pp=1", f"trainer.max_steps={STEPS}", *SAME)
    return run_dir


@pytest.fixture(scope="module")
def reference(reference_dir):
    return losses(reference_dir)


def test_dualpipe_pp2_trains_like_one_process_and_resumes_without_pipeline(tmp_path, reference, reference_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    # a mid-epoch checkpoint (the one written when fit ends marks the epoch done, and a resume starts the next one)
    train(a, 2, "strategy.pp=2", "strategy.pipeline_schedule=dualpipe", f"trainer.max_steps={HALF}",
          f"callbacks.model_checkpoint.every_n_train_steps={HALF}", *SAME, dp=1)
    _close(losses(a), reference)
    # expert-load imbalance: the mean over the layers of both ranks, from loads summed over the microbatches
    ref_metrics = _metrics(reference_dir)
    _close(_metrics(a)["moe/imbalance"], ref_metrics["moe/imbalance"])
    for key in BALANCE:
        assert len(_metrics(a)[key]) == HALF
        _close(_metrics(a)[key], ref_metrics[key])
    # validation runs forward only through the pipeline (a forward-only schedule) and gives the same loss
    assert len(_metrics(a)["val/loss"]) == HALF // 2
    _close(_metrics(a)["val/loss"], ref_metrics["val/loss"])
    ckpt = a / "checkpoints" / "last.ckpt"
    assert (ckpt / ".metadata").is_file()
    # the stages' shards together hold the whole model: one process resumes the same curve
    train(b, 1, "strategy.pp=1", f"trainer.max_steps={STEPS}", f"ckpt_path={ckpt}", *SAME)
    resumed = losses(b)
    assert min(resumed) == HALF
    _close(resumed, reference)


def test_dualpipe_pp2_x_ep2_with_overlap_and_checkpointing_on_4_processes_trains_like_one_process(tmp_path,
                                                                                                 reference):
    # DualPipeV with ep=2 overlaps its paired F/B chunks (the default), here with activation checkpointing on
    run_dir = tmp_path / "run"
    train(run_dir, 4, "strategy.pp=2", "strategy.ep=2", "strategy.pipeline_schedule=dualpipe",
          "strategy.activation_checkpointing=true", f"trainer.max_steps={HALF}", *SAME, dp=2)
    _close(losses(run_dir), reference)


# Through the CLI on 2 processes: one error of the plan and one of the strategy. The plan's other checks are unit
# tests in test_pipeline.py (test_bad_plans_fail_with_a_clear_error).
@pytest.mark.parametrize("override, message", [
    ("strategy.pipeline_microbatches=3", "needs at least 4 microbatches"),
    ("trainer.accumulate_grad_batches=2", "use strategy.pipeline_microbatches instead"),
])
def test_bad_pipeline_configs_fail_with_one_line(tmp_path, override, message):
    import re

    proc = train(tmp_path / "bad", 2, "strategy.pp=2", "trainer.max_steps=1", "model.n_layers=4", override,
                 check=False, dp=1)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lightning-moe-train: error:")]
    assert errors and all(re.search(message, e) for e in errors), proc.stderr[-2000:]


def test_1f1b_pp2_with_mtp_trains_like_one_process(tmp_path):
    # MTP on the last stage; under 1F1B the last stage holds its own copy of the embedding, kept in sync
    mtp = ("model.mtp_depth=1", "model.mtp_lambda=0.3", f"trainer.max_steps={HALF}", *SAME)
    train(tmp_path / "ref", 1, "strategy.pp=1", *mtp)
    train(tmp_path / "pp", 2, "strategy.pp=2", "strategy.pipeline_schedule=1f1b", *mtp, dp=1)
    ref, got = _metrics(tmp_path / "ref"), _metrics(tmp_path / "pp")
    for key in ("train/loss", "train/mtp_loss"):
        assert len(got[key]) == HALF
        _close(got[key], ref[key])


def _metrics(run_dir) -> dict[str, dict[int, float]]:
    import csv

    out: dict[str, dict[int, float]] = {}
    for row in csv.DictReader(open(run_dir / "csv" / "version_0" / "metrics.csv")):
        for key, value in row.items():
            if value and key != "step":
                out.setdefault(key, {})[int(row["step"])] = float(value)
    return out
