"""Splits are leak-free: no training item is later than any evaluation target of the same user."""

from __future__ import annotations

import numpy as np
import pytest

from nestrec.data.dataset import load_dataset, process
from nestrec.data.fetch import data_root
from nestrec.data.splits import leave_one_out, make_split, temporal_split


def _user_timestamps(ds):
    return {u: g["timestamp"].to_numpy() for u, g in ds.interactions.groupby("user")}


def _check_leave_one_out(ds):
    split = leave_one_out(ds)
    train = dict(zip(split.train_users.tolist(), zip(split.train_sequences, split.train_timestamps)))
    full = {u: g["item"].to_numpy() for u, g in ds.interactions.groupby("user")}
    assert len(split.test) == len(split.valid) == sum(len(s) >= 3 for s in full.values())
    for k, user in enumerate(split.test.users.tolist()):
        seq = full[user]
        train_items, train_ts = train[user]
        assert split.test.targets[k] == seq[-1] and split.valid.targets[k] == seq[-2]
        np.testing.assert_array_equal(train_items, seq[:-2])
        np.testing.assert_array_equal(split.test.histories[k], seq[:-1])
        # No future: every training interaction is at or before the validation target's time.
        assert train_ts.max(initial=0) <= split.valid.timestamps[k] <= split.test.timestamps[k]
    return split


def test_leave_one_out_fixture(fixture_raw):
    _check_leave_one_out(process(fixture_raw))


def test_temporal_split_fixture(fixture_raw):
    ds = process(fixture_raw)
    split = temporal_split(ds, 0.15, 0.15)
    t_valid, t_test = split.info["t_valid"], split.info["t_test"]
    assert all(ts.max() < t_valid for ts in split.train_timestamps)
    assert len(split.valid) > 0 and len(split.test) > 0
    assert np.all((split.valid.timestamps >= t_valid) & (split.valid.timestamps < t_test))
    assert np.all(split.test.timestamps >= t_test)
    stamps = _user_timestamps(ds)
    items = {u: g["item"].to_numpy() for u, g in ds.interactions.groupby("user")}
    for samples in (split.valid, split.test):
        for user, history, target, ts in zip(
            samples.users, samples.histories, samples.targets, samples.timestamps
        ):
            position = len(history)
            assert items[user][position] == target and stamps[user][position] == ts
            assert np.all(stamps[user][:position] <= ts)


def test_split_arguments_are_checked(fixture_raw):
    ds = process(fixture_raw)
    with pytest.raises(ValueError, match="unknown split protocol 'random'"):
        make_split(ds, "random")
    with pytest.raises(ValueError, match="fractions"):
        temporal_split(ds, 0.6, 0.5)


def test_leave_one_out_real_ml1m():
    from conftest import real_data_dir

    ds = load_dataset(real_data_dir("ml-1m"), cache_dir=data_root() / "processed")
    split = _check_leave_one_out(ds)
    assert len(split.test) == 6_040
