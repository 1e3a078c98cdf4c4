"""Processing and the Parquet cache: dense ids, time order with stable ties, cache reuse and keys."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

import nestrec.data.dataset as dataset_module
from nestrec.data.dataset import load_dataset, process
from nestrec.data.fetch import data_root
from nestrec.data.formats import DataFormatError, RawDataset


def test_process_indexes_densely_and_sorts_by_time(fixture_raw):
    ds = process(fixture_raw, min_user_interactions=1)
    inter = ds.interactions
    assert inter["user"].min() == 0 and inter["user"].max() == ds.num_users - 1
    assert sorted(inter["item"].unique()) == list(range(1, ds.num_items + 1))
    for _, group in inter.groupby("user"):
        assert np.all(np.diff(group["timestamp"].to_numpy()) >= 0)
    assert set(ds.items["item"]) == set(range(1, ds.num_items + 1))


def test_timestamp_ties_keep_file_order():
    inter = pd.DataFrame(
        {"user_id": ["u"] * 4, "item_id": ["c", "a", "b", "d"], "rating": np.ones(4, np.float32),
         "timestamp": np.array([5, 5, 5, 1], np.int64)}
    )  # fmt: skip
    items = pd.DataFrame(
        {
            "item_id": list("abcd"),
            "title": list("abcd"),
            "year": pd.array([None] * 4, dtype="Int64"),
            "genres": "",
        }
    )
    ds = process(RawDataset("t", inter, items, pd.DataFrame()), min_user_interactions=1)
    titles = ds.items.set_index("item")["title"]
    assert [titles[i] for i in ds.interactions["item"]] == ["d", "c", "a", "b"]


def test_k_core_filter_and_empty_result(fixture_raw):
    ds = process(fixture_raw, min_user_interactions=20)
    assert ds.interactions.groupby("user").size().min() >= 20
    with pytest.raises(DataFormatError, match="no interactions left"):
        process(fixture_raw, min_user_interactions=10_000)


def test_cache_is_reused_and_keyed(fixture_dirs, tmp_path, monkeypatch):
    source = fixture_dirs["recbole"]
    first = load_dataset(source, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*/interactions.parquet"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(dataset_module, "load_raw", fail)
    again = load_dataset(source, cache_dir=tmp_path)
    pd.testing.assert_frame_equal(first.interactions, again.interactions)
    pd.testing.assert_frame_equal(first.items, again.items)
    assert first.genre_vocab == again.genre_vocab
    monkeypatch.undo()

    # Other filter settings or a changed source file must not be served from the old entry.
    load_dataset(source, cache_dir=tmp_path, min_user_interactions=10)
    assert len(list(tmp_path.glob("*/meta.json"))) == 2
    inter = source / "fixture.inter"
    stat = inter.stat()
    os.utime(inter, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))
    load_dataset(source, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*/meta.json"))) == 3
    assert not list(tmp_path.glob(".staging-*"))


def test_real_movielens_counts():
    from conftest import real_data_dir

    ml1m = load_dataset(real_data_dir("ml-1m"), cache_dir=data_root() / "processed")
    assert (len(ml1m.interactions), ml1m.num_users, ml1m.num_items) == (1_000_209, 6_040, 3_706)
    assert len(ml1m.genre_vocab) == 18
    ml100k = load_dataset(real_data_dir("ml-100k"))
    assert (len(ml100k.interactions), ml100k.num_users, ml100k.num_items) == (100_000, 943, 1_682)
