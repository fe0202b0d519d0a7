"""Token sources: where the training and validation token streams come from.

Each source returns ``(train, val)`` as 1-D numpy arrays of token ids. Text is tokenized as raw UTF-8 bytes
(vocabulary 256), so nothing needs to be downloaded.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import sysconfig
from pathlib import Path

import numpy as np

from lightning_moe.errors import ConfigError, PathNotFoundError

BYTE_VOCAB_SIZE = 256


def encode_bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def decode_bytes(tokens) -> str:
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def _key_hash(key: str) -> float:
    """A file's place in [0, 1) for the file-level split, from its stable key."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def _glob_root(pattern: str) -> str:
    """The leading directories of a glob pattern that hold no wildcard."""
    parts = []
    for part in Path(pattern).parts[:-1]:
        if any(c in part for c in "*?["):
            break
        parts.append(part)
    return os.path.abspath(os.path.join(*parts)) if parts else os.getcwd()


def _read_files(files: list[tuple[str, Path]], max_bytes: int | None,
                val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """files: (stable key, path) pairs, read in key order. Files are separated by a NUL byte.

    A file goes to validation when its key hashes below ``val_fraction``. Where that leaves one side empty (a few
    files, or a fraction near 0 or 1), the file whose hash is nearest to the boundary moves across, so any two or
    more files give a split, and the same keys always give the same split.
    """
    read, total = [], 0
    for key, path in sorted(files):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if not data:
            continue
        read.append((_key_hash(key), data + b"\0"))
        total += len(data) + 1
        if max_bytes is not None and total >= max_bytes:
            break
    if len(read) < 2 or not 0 < val_fraction < 1:
        raise ConfigError(
            f"data: found {len(read)} readable non-empty files and val_fraction={val_fraction}; a split needs at "
            "least two files and 0 < val_fraction < 1 (add files, or change data.source.val_fraction)"
        )
    is_val = [h < val_fraction for h, _ in read]
    if not any(is_val):
        is_val[min(range(len(read)), key=lambda i: read[i][0])] = True
    elif all(is_val):
        is_val[max(range(len(read)), key=lambda i: read[i][0])] = False
    train = [data for (_, data), v in zip(read, is_val) if not v]
    val = [data for (_, data), v in zip(read, is_val) if v]
    return (np.frombuffer(b"".join(train), dtype=np.uint8), np.frombuffer(b"".join(val), dtype=np.uint8))


def stdlib_source(max_bytes: int | None = 16_000_000, val_fraction: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """The embedded default: the Python standard library's own ``.py`` sources, present wherever Python is.

    Files are keyed by their path relative to the stdlib root, so the split is the same on every machine with the
    same Python version. Test suites and site-packages are excluded.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/", "test/", "idlelib/idle_test/")) or "/tests/" in rel:
            continue
        files.append((rel, path))
    if not files:
        raise FileNotFoundError(f"data=stdlib: no .py files under the standard library at {root}")
    return _read_files(files, max_bytes, val_fraction)


def text_files_source(pattern: str, max_bytes: int | None = None,
                      val_fraction: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 text files matching a glob (``data.source.pattern='corpus/**/*.txt'``), split file by file.

    Files are keyed by their path below the pattern's fixed leading directories, so the split does not change when
    the corpus moves.
    """
    pattern = os.path.expanduser(pattern)
    paths = [p for p in globlib.glob(pattern, recursive=True) if os.path.isfile(p)]
    if not paths:
        raise PathNotFoundError(f"data.source.pattern={pattern!r} matches no files")
    root = _glob_root(pattern)
    files = [(Path(os.path.relpath(os.path.abspath(p), root)).as_posix(), Path(p)) for p in paths]
    return _read_files(files, max_bytes, val_fraction)


def tokens_source(path: str, dtype: str = "uint16", val_path: str | None = None, val_fraction: float = 0.05,
                  max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pre-tokenized ids in a flat binary file read through ``np.memmap`` (nanoGPT's ``train.bin`` format).

    Without ``val_path`` the last ``val_fraction`` of the stream is held out. ``max_bytes`` keeps the first that many
    bytes of each file (as for the text sources: a quick run on part of a corpus).
    """
    if not os.path.isfile(path):
        raise PathNotFoundError(f"data.source.path={path!r} does not exist")
    token = np.dtype(dtype)
    if max_bytes is not None and max_bytes < token.itemsize:
        raise ConfigError(f"data.source.max_bytes={max_bytes}: must hold at least one {dtype} token")
    limit = None if max_bytes is None else max_bytes // token.itemsize
    train = np.memmap(path, dtype=token, mode="r")[:limit]
    if val_path is not None:
        if not os.path.isfile(val_path):
            raise PathNotFoundError(f"data.source.val_path={val_path!r} does not exist")
        return train, np.memmap(val_path, dtype=token, mode="r")[:limit]
    split = int(len(train) * (1 - val_fraction))
    if split <= 0 or split >= len(train):
        raise ConfigError(f"data.source.path={path!r}: {len(train)} tokens cannot be split with "
                          f"data.source.val_fraction={val_fraction}")
    return train[:split], train[split:]
