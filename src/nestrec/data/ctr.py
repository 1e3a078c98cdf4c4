"""Click-through-style data from MovieLens: one sample per rating, label ``rating >= threshold``.

Sparse features (one table each): ``user``, ``item``, ``genre`` (multi-hot, mean-pooled) and the
user-profile columns the source has (ML-1M: ``age``, ``gender``, ``occupation``). One dense feature:
the movie's release year, standardised with training-split statistics. The default split is
temporal (train on the past, evaluate on the future), as CTR models are deployed.

``batch_size`` is the **global** batch: each of W ranks gets ``batch_size / W`` samples, and
Lightning's ``DistributedSampler`` hands the ranks disjoint slices of one shuffled order, so a run
on 1 or W processes sees the same global batches — what makes their loss curves comparable.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from nestrec.data.sources import DataSource
from nestrec.errors import ConfigError
from nestrec.sparse.jagged import JaggedFeatures

__all__ = ["CTRDataModule"]

PROFILE_COLUMNS = ("age", "gender", "occupation")


class _IndexDataset(Dataset):
    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


class _Collate:
    """Turns a list of sample indices into ``{"features", "dense", "label", "index"}``."""

    def __init__(self, arrays: dict[str, np.ndarray], sparse_names: list[str]):
        self.arrays = arrays
        self.sparse_names = sparse_names

    def __call__(self, indices: list[int]) -> dict:
        idx = np.asarray(indices, dtype=np.int64)
        features = {}
        for name in self.sparse_names:
            values = self.arrays[name][idx]
            if values.ndim == 1:
                features[name] = (torch.from_numpy(values), torch.ones(len(idx), dtype=torch.long))
            else:  # padded multi-hot with -1
                mask = values >= 0
                features[name] = (torch.from_numpy(values[mask]), torch.from_numpy(mask.sum(1)))
        return {
            "features": JaggedFeatures.from_dict(features),
            "dense": torch.from_numpy(self.arrays["dense"][idx]),
            "label": torch.from_numpy(self.arrays["label"][idx]),
            "index": torch.from_numpy(idx),
        }


class CTRDataModule(pl.LightningDataModule):
    def __init__(
        self,
        dataset: str = "ml-1m",
        path: str | None = None,
        format: str = "auto",
        split: str = "temporal",
        valid_fraction: float = 0.1,
        test_fraction: float = 0.1,
        label_threshold: float = 4.0,
        batch_size: int = 2048,
        eval_batch_size: int = 8192,
        num_workers: int = 0,
        max_users: int | None = None,
        cache_dir: str | None = None,
    ):
        super().__init__()
        self.source = DataSource(dataset, path, format, cache_dir)
        if split not in ("temporal", "random"):
            raise ConfigError(f"unknown CTR split {split!r}; expected temporal or random")
        self.save_hyperparameters()
        self.arrays: dict[str, dict[str, np.ndarray]] = {}
        self.table_sizes: dict[str, int] = {}
        self.info: dict = {}

    def prepare_data(self) -> None:
        self.source.ensure_available()

    def setup(self, stage: str | None = None) -> None:
        if self.arrays:
            return
        hp = self.hparams
        data = self.source.load(min_user_interactions=1)
        inter = data.interactions
        if hp.max_users is not None:
            inter = inter[inter["user"] < hp.max_users]
        n = len(inter)

        genre_index = {g: i for i, g in enumerate(data.genre_vocab)}
        item_genres = np.full(
            (data.num_items + 1, max(1, max(len(g.split("|")) for g in data.items["genres"]))), -1, np.int64
        )
        for item, genres in zip(data.items["item"].to_numpy(), data.items["genres"].to_numpy()):
            ids = [genre_index[g] for g in genres.split("|") if g]
            item_genres[item, : len(ids)] = ids
        years = np.zeros(data.num_items + 1, np.float32)
        years[data.items["item"].to_numpy()] = (
            data.items["year"].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
        )

        users = inter["user"].to_numpy().astype(np.int64)
        items = inter["item"].to_numpy().astype(np.int64)
        columns = {"user": users, "item": items, "genre": item_genres[items]}
        self.table_sizes = {
            "user": data.num_users,
            "item": data.num_items + 1,
            "genre": max(1, len(data.genre_vocab)),
        }
        for col in PROFILE_COLUMNS:
            if col in data.users.columns:
                _, codes = np.unique(data.users[col].astype(str).to_numpy(), return_inverse=True)
                columns[col] = codes.astype(np.int64)[users]
                self.table_sizes[col] = int(codes.max()) + 1
        label = (inter["rating"].to_numpy() >= hp.label_threshold).astype(np.float32)

        if hp.split == "temporal":
            order = np.argsort(inter["timestamp"].to_numpy(), kind="stable")
        else:
            order = np.random.default_rng(0).permutation(n)
        n_test, n_valid = int(n * hp.test_fraction), int(n * hp.valid_fraction)
        parts = {
            "train": order[: n - n_valid - n_test],
            "valid": order[n - n_valid - n_test : n - n_test],
            "test": order[n - n_test :],
        }
        year_values = years[items]
        train_years = year_values[parts["train"]]
        train_years = train_years[~np.isnan(train_years)]
        mean = float(train_years.mean()) if len(train_years) else 0.0
        std = float(train_years.std()) if len(train_years) and train_years.std() > 0 else 1.0
        dense = np.nan_to_num((year_values - mean) / std).astype(np.float32).reshape(-1, 1)
        for name, rows in parts.items():
            self.arrays[name] = {k: v[rows] for k, v in columns.items()} | {
                "dense": dense[rows],
                "label": label[rows],
            }
        self.info = {
            "dataset": data.name, "samples": n, "positive_rate": round(float(label.mean()), 4), "split": hp.split,
            **{f"{k}_samples": len(v) for k, v in parts.items()}, "tables": dict(self.table_sizes),
        }  # fmt: skip

    def describe(self) -> dict:
        return dict(self.info)

    def model_kwargs(self) -> dict:
        return {"table_sizes": dict(self.table_sizes), "num_dense": 1}

    def _per_rank(self, batch_size: int, exact: bool = True) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        if not exact:  # evaluation: results do not depend on the batch split
            return -(-batch_size // world)
        if batch_size % world:
            raise ConfigError(f"global batch size {batch_size} is not divisible by the world size {world}")
        return batch_size // world

    def _loader(self, name: str, batch_size: int, shuffle: bool) -> DataLoader:
        arrays = self.arrays[name]
        return DataLoader(
            _IndexDataset(len(arrays["label"])),
            batch_size=self._per_rank(batch_size, exact=name == "train"),
            shuffle=shuffle,
            collate_fn=_Collate(arrays, [k for k in arrays if k not in ("dense", "label")]),
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.hparams.batch_size, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", self.hparams.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.hparams.eval_batch_size, False)
