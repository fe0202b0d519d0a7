"""Auxiliary-loss-free balancing: expert-load imbalance with and without the router bias update (CPU, a minute).

    python benchmarks/balance.py [--steps 400] [--gamma 0.01]

Trains the same small sigmoid-routed model twice on the embedded data (same seed, no auxiliary loss), once with
``model.bias_update_speed=0`` and once with ``gamma``, and reports ``moe/imbalance`` (max / mean tokens per expert,
averaged over MoE layers) along training. Writes docs/aux_free_balancing.md.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path, steps: int, gamma: float) -> dict[int, dict[str, float]]:
    cmd = [sys.executable, "-m", "lightning_moe.train", "recipe=tiny", "logger=csv", f"hydra.run.dir={out}",
           f"trainer.max_steps={steps}", "trainer.val_check_interval=100", "trainer.log_every_n_steps=20",
           "trainer.enable_progress_bar=false", "model.score_func=sigmoid", "model.num_experts=16", "model.top_k=2",
           "model.n_layers=3", "model.aux_loss_coef=0", f"model.bias_update_speed={gamma}",
           "~callbacks.model_checkpoint"]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    rows = csv.DictReader(open(out / "csv" / "version_0" / "metrics.csv"))
    curve: dict[int, dict[str, float]] = {}
    for r in rows:
        for key in ("moe/imbalance", "train/loss", "val/loss"):
            if r.get(key):
                curve.setdefault(int(r["step"]), {})[key] = float(r[key])
    return curve


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--gamma", type=float, default=0.01)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        off = run(Path(tmp) / "off", args.steps, 0.0)
        on = run(Path(tmp) / "on", args.steps, args.gamma)
    steps = sorted(s for s in off if "moe/imbalance" in off[s] and "moe/imbalance" in on.get(s, {}))
    lines = [f"| step | imbalance, no balancing | imbalance, bias gamma={args.gamma:g} | train loss off | "
             "train loss on |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for s in steps:
        lines.append(f"| {s} | {off[s]['moe/imbalance']:.3f} | {on[s]['moe/imbalance']:.3f} | "
                     f"{off[s].get('train/loss', float('nan')):.3f} | {on[s].get('train/loss', float('nan')):.3f} |")
    val_off = [v["val/loss"] for v in off.values() if "val/loss" in v][-1]
    val_on = [v["val/loss"] for v in on.values() if "val/loss" in v][-1]
    table = "\n".join(lines)
    summary = (f"final imbalance (max/mean tokens per expert): {off[steps[-1]]['moe/imbalance']:.3f} without, "
               f"{on[steps[-1]]['moe/imbalance']:.3f} with auxiliary-loss-free balancing; "
               f"final val/loss {val_off:.3f} without, {val_on:.3f} with")
    print(table + "\n\n" + summary)
    doc = (f"# Auxiliary-loss-free balancing\n\nReproduce (CPU): `python benchmarks/balance.py --steps {args.steps} "
           f"--gamma {args.gamma}`\n\nSigmoid router, 16 experts, top-2, 3 layers (2 MoE), no auxiliary loss, "
           f"same seed and data; `moe/imbalance` = max/mean tokens per expert per optimizer step, mean over "
           f"MoE layers.\n\n{table}\n\n{summary}.\n")
    (ROOT / "docs" / "aux_free_balancing.md").write_text(doc)


if __name__ == "__main__":
    main()
