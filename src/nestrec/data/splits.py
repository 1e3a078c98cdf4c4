"""Leak-free train / valid / test splits for next-item recommendation.

* ``leave_one_out`` (the SASRec / HSTU ML-1M protocol): per user, sorted by time, the last item is
  the test target, the second-last the validation target, the rest is training. Test histories
  include the validation item (it happened before the test item); training never sees either.
* ``temporal``: one global time cut. Interactions before ``t_valid`` train; each user's first
  interaction in ``[t_valid, t_test)`` is a validation target and the first at or after ``t_test``
  a test target, each with every earlier interaction of that user as history. No training row is
  later than any evaluation target, for any user.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nestrec.data.dataset import Dataset
from nestrec.errors import ConfigError

__all__ = ["EvalSamples", "Split", "leave_one_out", "temporal_split", "make_split"]


@dataclass
class EvalSamples:
    """Evaluation targets: ``histories[i]`` (time-ordered items) precede ``targets[i]`` for ``users[i]``."""

    users: np.ndarray
    histories: list[np.ndarray]
    targets: np.ndarray
    timestamps: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)


@dataclass
class Split:
    """Training sequences per user plus validation and test targets."""

    train_users: np.ndarray
    train_sequences: list[np.ndarray]
    train_timestamps: list[np.ndarray]
    valid: EvalSamples
    test: EvalSamples
    info: dict = field(default_factory=dict)


def _user_sequences(ds: Dataset) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    inter = ds.interactions
    users = inter["user"].to_numpy()
    items = inter["item"].to_numpy()
    stamps = inter["timestamp"].to_numpy()
    boundaries = np.flatnonzero(np.diff(users)) + 1
    starts = np.concatenate([[0], boundaries])
    return users[starts], np.split(items, boundaries), np.split(stamps, boundaries)


def _empty_eval() -> EvalSamples:
    return EvalSamples(np.zeros(0, np.int64), [], np.zeros(0, np.int64), np.zeros(0, np.int64))


def leave_one_out(ds: Dataset) -> Split:
    """Per-user leave-one-out by time; users with fewer than 3 interactions only train."""
    users, seqs, stamps = _user_sequences(ds)
    train_seqs, train_stamps = [], []
    valid_u, valid_h, valid_t, valid_ts = [], [], [], []
    test_u, test_h, test_t, test_ts = [], [], [], []
    for user, seq, ts in zip(users, seqs, stamps):
        if len(seq) < 3:
            train_seqs.append(seq)
            train_stamps.append(ts)
            continue
        train_seqs.append(seq[:-2])
        train_stamps.append(ts[:-2])
        valid_u.append(user), valid_h.append(seq[:-2]), valid_t.append(seq[-2]), valid_ts.append(ts[-2])
        test_u.append(user), test_h.append(seq[:-1]), test_t.append(seq[-1]), test_ts.append(ts[-1])
    return Split(
        train_users=users.astype(np.int64),
        train_sequences=train_seqs,
        train_timestamps=train_stamps,
        valid=EvalSamples(
            np.asarray(valid_u, np.int64),
            valid_h,
            np.asarray(valid_t, np.int64),
            np.asarray(valid_ts, np.int64),
        ),
        test=EvalSamples(
            np.asarray(test_u, np.int64), test_h, np.asarray(test_t, np.int64), np.asarray(test_ts, np.int64)
        ),
        info={"protocol": "leave_one_out"},
    )


def temporal_split(ds: Dataset, valid_fraction: float = 0.1, test_fraction: float = 0.1) -> Split:
    """Global time cut at the (1 - valid - test) and (1 - test) quantiles of all timestamps."""
    if not (0 < valid_fraction < 1 and 0 < test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise ConfigError(
            f"temporal split fractions must be in (0, 1) and sum below 1, got {valid_fraction}, {test_fraction}"
        )
    all_ts = ds.interactions["timestamp"].to_numpy()
    t_valid = int(np.quantile(all_ts, 1 - valid_fraction - test_fraction, method="lower"))
    t_test = int(np.quantile(all_ts, 1 - test_fraction, method="lower"))
    if t_test <= t_valid:
        t_test = t_valid + 1
    users, seqs, stamps = _user_sequences(ds)
    train_users, train_seqs, train_stamps = [], [], []
    buckets = {"valid": ([], [], [], []), "test": ([], [], [], [])}
    for user, seq, ts in zip(users, seqs, stamps):
        n_train = int(np.searchsorted(ts, t_valid, side="left"))
        if n_train:
            train_users.append(user)
            train_seqs.append(seq[:n_train])
            train_stamps.append(ts[:n_train])
        for name, lo, hi in (("valid", t_valid, t_test), ("test", t_test, None)):
            first = int(np.searchsorted(ts, lo, side="left"))
            if first < len(seq) and (hi is None or ts[first] < hi) and first > 0:
                u, h, t, s = buckets[name]
                u.append(user), h.append(seq[:first]), t.append(seq[first]), s.append(ts[first])

    def samples(name: str) -> EvalSamples:
        u, h, t, s = buckets[name]
        return EvalSamples(np.asarray(u, np.int64), h, np.asarray(t, np.int64), np.asarray(s, np.int64))

    return Split(
        train_users=np.asarray(train_users, np.int64),
        train_sequences=train_seqs,
        train_timestamps=train_stamps,
        valid=samples("valid"),
        test=samples("test"),
        info={"protocol": "temporal", "t_valid": t_valid, "t_test": t_test},
    )


def make_split(ds: Dataset, protocol: str = "leave_one_out", **kwargs) -> Split:
    """Dispatch on the configured protocol name (``leave_one_out`` or ``temporal``)."""
    if protocol == "leave_one_out":
        return leave_one_out(ds)
    if protocol == "temporal":
        return temporal_split(ds, **kwargs)
    raise ConfigError(f"unknown split protocol {protocol!r}; expected leave_one_out or temporal")
