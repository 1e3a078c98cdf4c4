"""The processed, integer-indexed dataset and its versioned Parquet cache.

Parsing ML-1M's text files takes seconds; every later run reads a Parquet cache instead. The cache
key covers the preprocessing version, the source files (size and mtime) and the filter settings,
so changing any of them rebuilds it rather than serving stale rows. Writes go to a temporary
directory that is renamed into place, so concurrent ranks or a killed run never leave a torn cache.

Indexing conventions used everywhere downstream:
* users are ``0 .. num_users-1``;
* items are ``1 .. num_items``; ``0`` is the padding item, so sequence tensors can be left-padded;
* genres are ``0 .. num_genres-1`` (``genre_vocab``).
Only items that occur in the (filtered) interactions form the catalogue, which is the set that
full-ranking evaluation ranks over (ML-1M: 3,706 items).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from nestrec.data.formats import DataFormatError, RawDataset, detect_format, load_raw

__all__ = ["PREPROCESS_VERSION", "Dataset", "load_dataset", "process"]

PREPROCESS_VERSION = 1


@dataclass
class Dataset:
    """Integer-indexed interactions plus item side information."""

    name: str
    interactions: pd.DataFrame  # user, item, rating, timestamp; sorted by (user, timestamp, file order)
    items: pd.DataFrame  # item (1..I), item_id, title, year, genres ('|'-joined)
    users: pd.DataFrame  # user (0..U-1), user_id, profile columns
    genre_vocab: list[str]

    @property
    def num_users(self) -> int:
        return len(self.users)

    @property
    def num_items(self) -> int:
        return len(self.items)

    def item_genre_matrix(self) -> np.ndarray:
        """Boolean ``[num_genres, num_items + 1]`` membership matrix (column 0 is padding)."""
        matrix = np.zeros((len(self.genre_vocab), self.num_items + 1), dtype=bool)
        index = {g: i for i, g in enumerate(self.genre_vocab)}
        for item, genres in zip(self.items["item"].to_numpy(), self.items["genres"].to_numpy()):
            for genre in filter(None, genres.split("|")):
                matrix[index[genre], item] = True
        return matrix


def process(raw: RawDataset, min_user_interactions: int = 5, min_item_interactions: int = 1) -> Dataset:
    """Filter, re-index and time-sort raw interactions.

    Ties in timestamp (common in ML-1M, which records seconds) keep the source file order, so the
    sequence order and thus the leave-one-out split are deterministic.
    """
    inter = raw.interactions.reset_index(drop=True).copy()
    inter["order"] = np.arange(len(inter), dtype=np.int64)
    # Iterate the k-core filter to a fixed point: dropping items can push users below the bar.
    while True:
        before = len(inter)
        if min_item_interactions > 1:
            counts = inter["item_id"].map(inter["item_id"].value_counts())
            inter = inter[counts >= min_item_interactions]
        if min_user_interactions > 1:
            counts = inter["user_id"].map(inter["user_id"].value_counts())
            inter = inter[counts >= min_user_interactions]
        if len(inter) == before:
            break
    if inter.empty:
        raise DataFormatError(
            f"{raw.name}: no interactions left after filtering (min_user_interactions={min_user_interactions})"
        )

    items_meta = raw.items.drop_duplicates("item_id").set_index("item_id")
    item_ids = np.sort(inter["item_id"].unique())
    user_ids = inter["user_id"].unique()
    user_ids = user_ids[
        np.argsort(
            pd.to_numeric(pd.Series(user_ids).str.extract(r"(\d+)$")[0], errors="coerce")
            .fillna(-1)
            .to_numpy(),
            kind="stable",
        )
    ]

    item_index = pd.Series(np.arange(1, len(item_ids) + 1, dtype=np.int32), index=item_ids)
    user_index = pd.Series(np.arange(len(user_ids), dtype=np.int32), index=user_ids)
    inter = inter.assign(
        user=inter["user_id"].map(user_index).astype(np.int32),
        item=inter["item_id"].map(item_index).astype(np.int32),
    )
    inter = inter.sort_values(["user", "timestamp", "order"], kind="stable")
    interactions = inter[["user", "item", "rating", "timestamp"]].reset_index(drop=True)

    meta = items_meta.reindex(item_ids)
    items = pd.DataFrame(
        {
            "item": item_index.to_numpy(),
            "item_id": item_ids,
            "title": meta["title"].fillna(pd.Series(item_ids, index=item_ids)).to_numpy(),
            "year": meta["year"].astype("Int64").array,
            "genres": meta["genres"].fillna("").to_numpy(),
        }
    )
    genre_vocab = sorted({g for gs in items["genres"] for g in gs.split("|") if g})

    users = pd.DataFrame({"user": user_index.to_numpy(), "user_id": user_ids})
    if len(raw.users):
        profile = (
            raw.users.drop_duplicates("user_id").set_index("user_id").reindex(user_ids).reset_index(drop=True)
        )
        users = pd.concat([users, profile.astype(str)], axis=1)
    return Dataset(
        name=raw.name, interactions=interactions, items=items, users=users, genre_vocab=genre_vocab
    )


def _fingerprint(path: Path, fmt: str, name: str | None, settings: dict) -> str:
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    parts = [f"v{PREPROCESS_VERSION}", fmt, str(name), json.dumps(settings, sort_keys=True)]
    parts += [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def load_dataset(
    path: str | Path,
    fmt: str = "auto",
    name: str | None = None,
    cache_dir: str | Path | None = None,
    min_user_interactions: int = 5,
    min_item_interactions: int = 1,
) -> Dataset:
    """Load a processed dataset, from the Parquet cache when it is current, else parse and cache it."""
    path = Path(path).expanduser()
    fmt = detect_format(path) if fmt == "auto" else fmt
    settings = {"min_user": min_user_interactions, "min_item": min_item_interactions}
    if cache_dir is None:
        return process(load_raw(path, fmt, name), min_user_interactions, min_item_interactions)

    key = _fingerprint(path, fmt, name, settings)
    target = Path(cache_dir).expanduser() / f"{name or path.name}-{key}"
    if (target / "meta.json").exists():
        return _read_cache(target)
    dataset = process(load_raw(path, fmt, name), min_user_interactions, min_item_interactions)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        dataset.interactions.to_parquet(staging / "interactions.parquet", index=False)
        dataset.items.to_parquet(staging / "items.parquet", index=False)
        dataset.users.to_parquet(staging / "users.parquet", index=False)
        meta = {
            "version": PREPROCESS_VERSION, "name": dataset.name, "source": str(path), "format": fmt,
            "settings": settings, "genre_vocab": dataset.genre_vocab,
            "num_users": dataset.num_users, "num_items": dataset.num_items,
            "num_interactions": len(dataset.interactions),
        }  # fmt: skip
        (staging / "meta.json").write_text(json.dumps(meta, indent=2))
        # If another rank won the race the rename fails; its cache is equivalent.
        with contextlib.suppress(OSError):
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dataset


def _read_cache(target: Path) -> Dataset:
    meta = json.loads((target / "meta.json").read_text())
    if meta.get("version") != PREPROCESS_VERSION:
        raise DataFormatError(f"{target}: cache version {meta.get('version')} != {PREPROCESS_VERSION}")
    items = pd.read_parquet(target / "items.parquet")
    items["year"] = items["year"].astype("Int64")
    return Dataset(
        name=meta["name"],
        interactions=pd.read_parquet(target / "interactions.parquet"),
        items=items,
        users=pd.read_parquet(target / "users.parquet"),
        genre_vocab=list(meta["genre_vocab"]),
    )
