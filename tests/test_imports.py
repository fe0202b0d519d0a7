import subprocess
import sys


def test_import_pulls_in_no_optional_services():
    code = (
        "import sys, lightning_moe, lightning_moe.models, lightning_moe.moe, lightning_moe.data, "
        "lightning_moe.callbacks, lightning_moe.loggers, lightning_moe.parallel\n"
        "print(sorted(m for m in ('hydra', 'wandb', 'megablocks', 'omegaconf') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
