"""LightningDataModule over a flat token stream: fixed-length windows, shuffled per epoch, resumable mid-epoch.

A batch is ``[B, S + 1]`` token ids; the model reads ``[:, :-1]`` and predicts ``[:, 1:]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_moe.data.sources import stdlib_source
from lightning_moe.errors import ConfigError

Source = Callable[[], tuple[np.ndarray, np.ndarray]]


class WindowDataset(Dataset):
    """Item ``start`` is ``tokens[start : start + seq_len + 1]`` as int64 (indexed by start offset)."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len
        if len(tokens) < seq_len + 1:
            raise ConfigError(f"data: {len(tokens)} tokens are fewer than data.seq_len + 1 = {seq_len + 1}")

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, start: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64))


class WindowSampler(DistributedSampler):
    """Start offsets of non-overlapping windows, split across data-parallel ranks.

    With ``shuffle``, each epoch shifts the window grid by a random offset and permutes the windows, all from
    ``(seed, epoch)``, so every rank and every resumed run sees the same order. ``skip`` drops the first batches of
    the current epoch (set when resuming mid-epoch).
    """

    def __init__(self, dataset: WindowDataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.skip = 0

    def _starts(self) -> torch.Tensor:
        n_tokens, seq_len = len(self.dataset.tokens), self.dataset.seq_len
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        shift = int(torch.randint(seq_len, (1,), generator=g)) if self.shuffle else 0
        n = (n_tokens - 1 - shift) // seq_len
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        per_rank = n // self.num_replicas
        return shift + order[self.rank:per_rank * self.num_replicas:self.num_replicas] * seq_len

    def __len__(self) -> int:
        n = (len(self.dataset.tokens) - 1 - (self.dataset.seq_len - 1 if self.shuffle else 0)) // self.dataset.seq_len
        return n // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        starts = self._starts()[: len(self)]
        return iter(starts[self.skip:].tolist())


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position within the epoch is saved in checkpoints (Lightning's ``_Stateful`` protocol)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0

    def __iter__(self):
        sampler: WindowSampler = self.sampler
        self._yielded = sampler.skip // self.batch_size
        for batch in super().__iter__():
            self._yielded += 1
            yield batch
        sampler.skip = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(state["epoch"])
        self.sampler.skip = state["batches"] * self.batch_size


class TokenDataModule(pl.LightningDataModule):
    """Windows of ``seq_len + 1`` tokens from a source returning ``(train_tokens, val_tokens)``.

    Args:
        source: callable returning the two token arrays (Hydra: ``_target_`` + ``_partial_: true``).
        seq_len: tokens the model sees per sequence.
        batch_size: sequences per batch per data-parallel rank.
        num_workers: DataLoader worker processes.
        seed: shuffling seed.
    """

    def __init__(self, source: Source | None = None, seq_len: int = 256, batch_size: int = 16,
                 num_workers: int = 0, seed: int = 1234) -> None:
        super().__init__()
        if seq_len < 1 or batch_size < 1:
            raise ConfigError(f"data.seq_len={seq_len} and data.batch_size={batch_size} must be >= 1")
        self.source = source or stdlib_source
        self.seq_len, self.batch_size, self.num_workers, self.seed = seq_len, batch_size, num_workers, seed
        self.train_tokens: np.ndarray | None = None
        self.val_tokens: np.ndarray | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_tokens is None:
            self.train_tokens, self.val_tokens = self.source()

    def _replicas(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return 1, 0
        kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
        return kwargs.get("num_replicas", trainer.world_size), kwargs.get("rank", trainer.global_rank)

    def _loader(self, tokens: np.ndarray, shuffle: bool) -> ResumableDataLoader:
        dataset = WindowDataset(tokens, self.seq_len)
        replicas, rank = self._replicas()
        sampler = WindowSampler(dataset, replicas, rank, shuffle=shuffle, seed=self.seed)
        if len(sampler) < self.batch_size:
            raise ConfigError(
                f"data: {len(tokens)} tokens give {len(sampler)} windows of data.seq_len={self.seq_len} per rank, "
                f"fewer than data.batch_size={self.batch_size}"
            )
        return ResumableDataLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                                   num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> ResumableDataLoader:
        self.setup()
        return self._loader(self.train_tokens, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_tokens, shuffle=False)
