import numpy as np
import pytest
import torch

from lightning_moe.data import (
    TokenDataModule,
    decode_bytes,
    encode_bytes,
    stdlib_source,
    text_files_source,
    tokens_source,
)
from lightning_moe.data.datamodule import ResumableDataLoader, WindowDataset, WindowSampler
from lightning_moe.errors import ConfigError


def test_stdlib_source_is_deterministic_and_split():
    train, val = stdlib_source(max_bytes=2_000_000)
    train2, val2 = stdlib_source(max_bytes=2_000_000)
    assert np.array_equal(train, train2) and np.array_equal(val, val2)
    assert len(train) > 10 * len(val) > 0
    assert b"def " in train[:200_000].tobytes()
    assert train[:200_000].tobytes() not in val.tobytes()


def test_text_files_and_tokens_sources(tmp_path):
    for i in range(20):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i}\n" * 50)
    train, val = text_files_source(str(tmp_path / "*.txt"), val_fraction=0.2)
    assert len(train) and len(val)
    assert "document number" in decode_bytes(train[:40])
    with pytest.raises(FileNotFoundError, match="matches no files"):
        text_files_source(str(tmp_path / "*.nope"))
    ids = np.arange(1000, dtype=np.uint16) % 300
    ids.tofile(tmp_path / "train.bin")
    train, val = tokens_source(str(tmp_path / "train.bin"), val_fraction=0.1)
    assert len(train) == 900 and int(val[0]) == 900 % 300
    train, val = tokens_source(str(tmp_path / "train.bin"), val_fraction=0.1, max_bytes=401)  # 200 uint16 ids
    assert len(train) == 180 and list(val) == list(range(180, 200))
    with pytest.raises(ConfigError, match="data.source.max_bytes"):
        tokens_source(str(tmp_path / "train.bin"), max_bytes=1)
    with pytest.raises(ConfigError, match="data.source.path"):  # also a FileNotFoundError
        tokens_source(str(tmp_path / "missing.bin"))


def test_text_files_split_is_stable_across_locations_and_never_empty(tmp_path):
    for where in ("a", "b/c"):
        for i in range(12):
            (tmp_path / where / "sub").mkdir(parents=True, exist_ok=True)
            (tmp_path / where / "sub" / f"f{i}.txt").write_text(f"file {i}\n" * (i + 3))
    split_a = text_files_source(str(tmp_path / "a" / "**" / "*.txt"), val_fraction=0.3)
    split_b = text_files_source(str(tmp_path / "b/c" / "**" / "*.txt"), val_fraction=0.3)
    assert all(np.array_equal(x, y) for x, y in zip(split_a, split_b))
    # every file lands on exactly one side
    texts = [decode_bytes(part).split("\0")[:-1] for part in split_a]
    assert sorted(texts[0] + texts[1]) == sorted(f"file {i}\n" * (i + 3) for i in range(12))
    for fraction in (1e-9, 1 - 1e-9):  # hashing alone would leave one side empty
        train, val = text_files_source(str(tmp_path / "a" / "sub" / "*.txt"), val_fraction=fraction)
        n_val = len(decode_bytes(val).split("\0")) - 1
        assert n_val == (1 if fraction < 0.5 else 11) and len(train)
    for fraction in (0.0, 1.0):
        with pytest.raises(ConfigError, match="val_fraction"):
            text_files_source(str(tmp_path / "a" / "sub" / "*.txt"), val_fraction=fraction)
    with pytest.raises(ConfigError, match="at least two files"):
        text_files_source(str(tmp_path / "a" / "sub" / "f0.txt"))


def test_encode_decode_roundtrip():
    text = "héllo wörld"
    assert decode_bytes(encode_bytes(text)) == text


def test_sampler_shards_ranks_disjointly_and_reshuffles(seed):
    tokens = np.arange(10_000) % 256
    ds = WindowDataset(tokens, 16)
    per_rank = [list(WindowSampler(ds, 3, r, shuffle=True, seed=seed)) for r in range(3)]
    assert len({len(p) for p in per_rank}) == 1
    flat = sum(per_rank, [])
    assert len(flat) == len(set(flat))
    s = WindowSampler(ds, 1, 0, shuffle=True, seed=seed)
    e0 = list(s)
    s.set_epoch(1)
    assert list(s) != e0


def test_batches_are_windows_of_seq_len_plus_one():
    tokens = np.arange(5000) % 256
    dm = TokenDataModule(source=lambda: (tokens, tokens[:1000]), seq_len=32, batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 33) and batch.dtype == torch.int64
    assert torch.all((batch[:, 1:] - batch[:, :-1]) % 256 == 1)  # consecutive tokens


def test_loader_resumes_mid_epoch(seed):
    tokens = np.arange(20_000) % 256
    dm = TokenDataModule(source=lambda: (tokens, tokens[:2000]), seq_len=16, batch_size=4, seed=seed)
    loader = dm.train_dataloader()
    it = iter(loader)
    seen = [next(it) for _ in range(7)]
    state = loader.state_dict()
    rest = list(it)
    resumed = dm.train_dataloader()
    assert isinstance(resumed, ResumableDataLoader)
    resumed.load_state_dict(state)
    resumed_batches = list(resumed)
    assert len(resumed_batches) == len(rest)
    assert all(torch.equal(a, b) for a, b in zip(resumed_batches, rest))
    assert len(seen) + len(rest) == len(loader)


def test_too_little_data_is_a_config_error():
    tokens = np.arange(100) % 256
    dm = TokenDataModule(source=lambda: (tokens, tokens), seq_len=32, batch_size=8)
    with pytest.raises(ConfigError, match="data.batch_size=8"):
        dm.train_dataloader()
