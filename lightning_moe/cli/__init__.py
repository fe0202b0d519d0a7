"""Command-line entry points (import Hydra; not imported by ``lightning_moe`` itself)."""
