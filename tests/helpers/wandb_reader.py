"""Read an offline W&B run (``run-<id>.wandb``) back from disk, for tests.

The file is a LevelDB-style log: a 7-byte header (b":W&B", magic 0xBEE1 little-endian, version 0), then 32 KiB
blocks of records, each with a 7-byte header (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last);
a block tail shorter than a header is padding. Payloads are ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def isolate_wandb(tmp_path: Path, monkeypatch) -> None:
    """W&B offline and silent, with its staging area and cache under ``tmp_path`` and no API key."""
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
                       "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def iter_payloads(path: str | Path) -> Iterator[bytes]:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B" or struct.unpack("<H", data[4:6])[0] != 0xBEE1:
        raise ValueError(f"{path} is not a W&B transaction log")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind == 1:
            yield payload
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            yield pending + payload
            pending = b""


def read_run(run_dir: str | Path) -> dict:
    """{'history': [row dicts], 'config': {key: value}, 'summary': {...}} of an offline run folder."""
    from wandb.proto import wandb_internal_pb2

    files = list(Path(run_dir).glob("run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one run-*.wandb in {run_dir}, found {files}")
    history, config, summary = [], {}, {}
    for payload in iter_payloads(files[0]):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {}
            for item in rec.history.item:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                row[key] = json.loads(item.value_json)
            history.append(row)
        elif kind in ("run", "config"):
            items = rec.run.config.update if kind == "run" else rec.config.update
            for item in items:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                config[key] = json.loads(item.value_json)
        elif kind == "summary":
            for item in rec.summary.update:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                summary[key] = json.loads(item.value_json)
    return {"history": history, "config": config, "summary": summary}
