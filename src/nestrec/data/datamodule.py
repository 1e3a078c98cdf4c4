"""LightningDataModule for next-item recommendation on real logs (or the synthetic fixture).

It owns the whole data path of a run: fetch (if needed) → parse or read the Parquet cache → split →
derive scenario samples → tensors. Batches are dicts of tensors so later models (OxygenREC,
NestPipe's sparse features) can read extra keys without changing the loader:

train: ``input`` / ``target`` ``[B, max_len]`` (left-padded with item 0), ``user`` ``[B]``.
eval:  ``history`` ``[B, max_len]``, ``target``, ``user``, ``scenario`` (index into
       :data:`~nestrec.data.scenarios.SCENARIO_KINDS`), ``trigger_item``, ``trigger_genre``, ``index``
       (row id, so metrics can drop the duplicates a distributed sampler pads with).
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from nestrec.data.dataset import Dataset as RecDataset
from nestrec.data.scenarios import SCENARIO_KINDS, ScenarioSamples, derive_scenarios
from nestrec.data.sources import DataSource
from nestrec.data.splits import EvalSamples, Split, make_split
from nestrec.errors import ConfigError

__all__ = ["SequenceDataModule", "left_pad"]


def left_pad(sequences: list[np.ndarray], length: int) -> np.ndarray:
    """Keep the last ``length`` items of each sequence, left-padded with 0 into one int64 matrix."""
    out = np.zeros((len(sequences), length), dtype=np.int64)
    for row, seq in enumerate(sequences):
        tail = seq[-length:]
        if len(tail):
            out[row, length - len(tail) :] = tail
    return out


class TensorDictDataset(Dataset):
    """Rows of a dict of equally long tensors; collated by the default collate into a dict batch."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"tensors differ in length: { {k: len(t) for k, t in tensors.items()} }")
        self.tensors = tensors
        self.length = lengths.pop()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: tensor[index] for key, tensor in self.tensors.items()}


class SequenceDataModule(pl.LightningDataModule):
    """Real-log sequential recommendation data with leak-free splits and derived scenarios.

    Args:
        dataset: a fetchable name (``ml-1m``, ``ml-100k``) or ``fixture`` (generated, no download).
        path: read this directory instead (RecBole atomic or GroupLens files); overrides ``dataset``.
        format: ``auto``, ``recbole``, ``ml-1m`` or ``ml-100k``.
        split: ``leave_one_out`` or ``temporal`` (then ``temporal`` holds its fractions).
        max_len: history length fed to models (older items are dropped).
        max_users: keep only the first N users (debug slices); ``None`` keeps all.
        scenarios: scenario kinds evaluated (see :mod:`nestrec.data.scenarios`).
        cache_dir: Parquet cache; defaults to ``<data root>/processed``.
    """

    def __init__(
        self,
        dataset: str = "ml-1m",
        path: str | None = None,
        format: str = "auto",
        split: Literal["leave_one_out", "temporal"] = "leave_one_out",
        temporal: dict | None = None,
        max_len: int = 200,
        min_user_interactions: int = 5,
        min_item_interactions: int = 1,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        max_users: int | None = None,
        scenarios: list[str] | tuple[str, ...] = ("homepage",),
        cache_dir: str | None = None,
    ):
        super().__init__()
        unknown = [s for s in scenarios if s not in SCENARIO_KINDS]
        if unknown:
            raise ConfigError(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIO_KINDS)}")
        self.source = DataSource(dataset, path, format, cache_dir)
        self.save_hyperparameters()
        self.data: RecDataset | None = None
        self.split: Split | None = None
        self.eval_scenarios: dict[str, ScenarioSamples] = {}
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}

    # ---------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self.source.ensure_available()

    def setup(self, stage: str | None = None) -> None:
        if self.split is not None:
            return
        hp = self.hparams
        data = self.source.load(hp.min_user_interactions, hp.min_item_interactions)
        if hp.max_users is not None and hp.max_users < data.num_users:
            data = _first_users(data, hp.max_users)
        self.data = data
        self.split = make_split(data, hp.split, **(dict(hp.temporal or {}) if hp.split == "temporal" else {}))
        self._tensors["train"] = self._train_tensors(self.split)
        for name, samples in (("valid", self.split.valid), ("test", self.split.test)):
            scenario_rows = derive_scenarios(
                data, samples.users, samples.histories, samples.targets, hp.scenarios
            )
            self.eval_scenarios[name] = scenario_rows
            self._tensors[name] = self._eval_tensors(samples, scenario_rows)

    # ---------------------------------------------------------------------------------------------
    def _train_tensors(self, split: Split) -> dict[str, torch.Tensor]:
        keep = [i for i, seq in enumerate(split.train_sequences) if len(seq) >= 2]
        seqs = [split.train_sequences[i] for i in keep]
        length = self.hparams.max_len
        return {
            "input": torch.from_numpy(left_pad([s[:-1] for s in seqs], length)),
            "target": torch.from_numpy(left_pad([s[1:] for s in seqs], length)),
            "user": torch.as_tensor(split.train_users[keep], dtype=torch.int64),
        }

    def _eval_tensors(self, samples: EvalSamples, rows: ScenarioSamples) -> dict[str, torch.Tensor]:
        histories = left_pad([samples.histories[i] for i in rows.source], self.hparams.max_len)
        return {
            "history": torch.from_numpy(histories),
            "target": torch.as_tensor(samples.targets[rows.source]),
            "user": torch.as_tensor(samples.users[rows.source]),
            "scenario": torch.as_tensor(rows.kind),
            "trigger_item": torch.as_tensor(rows.trigger_item),
            "trigger_genre": torch.as_tensor(rows.trigger_genre),
            "index": torch.arange(len(rows), dtype=torch.int64),
        }

    # ---------------------------------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        self._require_setup()
        return self.data.num_items

    def genre_item_mask(self) -> torch.Tensor:
        """``[num_genres, num_items + 1]`` bool: which items a ``channel:<genre>`` feed may show."""
        self._require_setup()
        return torch.from_numpy(self.data.item_genre_matrix())

    def model_kwargs(self) -> dict:
        """What a model needs to know about the data to be built (passed by ``nestrec.run``)."""
        return {
            "num_items": self.num_items,
            "max_len": self.hparams.max_len,
            "genre_item_mask": self.genre_item_mask(),
        }

    def describe(self) -> dict:
        self._require_setup()
        return {
            "dataset": self.data.name,
            "users": self.data.num_users,
            "items": self.data.num_items,
            "interactions": len(self.data.interactions),
            "split": self.split.info,
            "train_sequences": len(self._tensors["train"]["input"]),
            "valid_rows": len(self._tensors["valid"]["target"]),
            "test_rows": len(self._tensors["test"]["target"]),
        }

    def _require_setup(self) -> None:
        if self.data is None:
            raise RuntimeError("SequenceDataModule.setup() has not run yet")

    def _loader(self, name: str, shuffle: bool, batch_size: int) -> DataLoader:
        self._require_setup()
        return DataLoader(
            TensorDictDataset(self._tensors[name]),
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
            collate_fn=self.collate_fn,
        )

    #: how rows become a batch; ``None`` is torch's default collate (subclasses add derived keys)
    collate_fn = None

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", False, self.hparams.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.hparams.eval_batch_size)


def _first_users(data: RecDataset, count: int) -> RecDataset:
    """A debug slice: the first ``count`` users and every item they touched, re-indexed densely."""
    inter = data.interactions[data.interactions["user"] < count]
    items_kept = np.sort(inter["item"].unique())
    remap = np.zeros(data.num_items + 1, dtype=np.int32)
    remap[items_kept] = np.arange(1, len(items_kept) + 1, dtype=np.int32)
    inter = inter.assign(item=remap[inter["item"].to_numpy()])
    items = data.items[data.items["item"].isin(items_kept)].copy()
    items["item"] = remap[items["item"].to_numpy()]
    users = data.users[data.users["user"] < count]
    return RecDataset(
        data.name,
        inter.reset_index(drop=True),
        items.reset_index(drop=True),
        users.reset_index(drop=True),
        data.genre_vocab,
    )
