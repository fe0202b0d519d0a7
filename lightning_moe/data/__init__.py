"""Data: token sources (embedded stdlib text, text files, token memmaps) and the LightningDataModule."""

from lightning_moe.data.datamodule import TokenDataModule
from lightning_moe.data.sources import decode_bytes, encode_bytes, stdlib_source, text_files_source, tokens_source

__all__ = ["TokenDataModule", "decode_bytes", "encode_bytes", "stdlib_source", "text_files_source", "tokens_source"]
