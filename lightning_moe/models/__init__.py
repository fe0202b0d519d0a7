"""Model definitions (plain ``nn.Module``s, no parallelism)."""

from lightning_moe.models.config import ConfigError, ModelConfig

__all__ = ["ConfigError", "ModelConfig", "MoETransformer", "TransformerBlock"]


def __getattr__(name: str):
    # Lazy, so that lightning_moe.moe can import the config without importing the transformer (which imports moe).
    if name in ("MoETransformer", "TransformerBlock"):
        from lightning_moe.models import transformer

        return getattr(transformer, name)
    raise AttributeError(name)
