"""``python -m lightning_moe.train`` (same as the ``lightning-moe-train`` console script)."""

from lightning_moe.cli.train import main

if __name__ == "__main__":
    main()
