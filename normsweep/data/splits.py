"""The training, validation and test splits of a dataset: deterministic, with optional subsets for quick runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from normsweep.data.dataset import DataError, DataInfo, RawData


@dataclass
class Split:
    x: torch.Tensor  # uint8, (N, 3, H, W)
    y: torch.Tensor  # int64, (N,)
    index: torch.Tensor  # position of each image in its source set (train, val or test)

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device) -> "Split":
        return Split(self.x.to(device), self.y.to(device), self.index)


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
    info: DataInfo

    @property
    def classes(self) -> tuple[str, ...]:
        return self.info.classes


def make_splits(
    raw: RawData, val_size: int, train_size: int | None = None, test_size: int | None = None, split_seed: int = 0
) -> Splits:
    """Deterministic validation split carved from the training set (or the source's own, a folder's ``val/``,
    where it has one: then ``val_size`` is not used); optional subsets for quick runs."""
    n = len(raw.train_y)
    g = torch.Generator().manual_seed(split_seed)
    if raw.val_y is not None:
        train_idx = torch.randperm(n, generator=g)
        val = Split(raw.val_x, raw.val_y, torch.arange(len(raw.val_y)))
        after = "(the validation images are val/'s)"
    else:
        if val_size >= n:
            raise DataError(f"data.val_size={val_size} leaves no training images (the training set has {n})")
        perm = torch.randperm(n, generator=g)
        val_idx, train_idx = perm[:val_size], perm[val_size:]
        val = Split(raw.train_x[val_idx].contiguous(), raw.train_y[val_idx].contiguous(), val_idx)
        after = f"after data.val_size={val_size}"
    if train_size is not None:
        if train_size > len(train_idx):
            raise DataError(
                f"data.train_size={train_size} is more than the {len(train_idx)} training images left {after}; "
                f"lower it or pass data.train_size=null for all"
            )
        train_idx = train_idx[:train_size]
    test_idx = torch.arange(len(raw.test_y))
    if test_size is not None and test_size < len(test_idx):
        test_idx = torch.randperm(len(test_idx), generator=g)[:test_size].sort().values

    def take(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> Split:
        return Split(x[idx].contiguous(), y[idx].contiguous(), idx)

    return Splits(take(raw.train_x, raw.train_y, train_idx), val, take(raw.test_x, raw.test_y, test_idx), raw.info)
