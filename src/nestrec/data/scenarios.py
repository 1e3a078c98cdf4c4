"""Recommendation scenarios derived, honestly, from logs that have none.

OxygenREC serves many scenarios (home feed, channels, item-to-item, search) with one model that is
told the scenario by an instruction. MovieLens records only (user, movie, rating, time), so nestrec
derives scenario samples from each real (history, next item) pair. What each one assumes:

``homepage``
    Plain next-item prediction: no trigger, ranked over the whole catalogue.
``channel``
    The user is browsing a genre feed, ``channel:<genre>``. The genre is one of the *target's*
    genres (chosen by a stable hash of user and item, so it is reproducible and spread across the
    target's genres) and candidates are restricted to that genre's items, as a genre feed would be.
    The trigger reveals one genre of the target; that is the point of a channel.
``related``
    An item-detail page: the trigger is the last item the user watched (no target information).
``search``
    A query string made of the target's genre words and release decade ("comedy romance 1990s"),
    standing in for a typed query. It reveals the target's genres and decade, as a real query would
    reveal intent; candidates are the whole catalogue.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from nestrec.data.dataset import Dataset
from nestrec.errors import ConfigError

__all__ = ["SCENARIO_KINDS", "ScenarioSamples", "derive_scenarios", "scenario_name"]

SCENARIO_KINDS = ("homepage", "channel", "related", "search")
NO_TRIGGER = 0
NO_GENRE = -1


@dataclass
class ScenarioSamples:
    """One row per (evaluation sample, scenario); ``source[i]`` indexes the underlying sample."""

    source: np.ndarray  # int64 index into the EvalSamples / training pair the row was derived from
    kind: np.ndarray  # int64 index into SCENARIO_KINDS
    trigger_item: np.ndarray  # int64 item, NO_TRIGGER when the scenario has none
    trigger_genre: np.ndarray  # int64 genre index, NO_GENRE when the scenario has none
    query: list[str]  # "" when the scenario has no query
    names: list[str]  # e.g. "homepage", "channel:Comedy"

    def __len__(self) -> int:
        return len(self.source)


def scenario_name(kind: str, genre: str | None = None) -> str:
    return f"channel:{genre}" if kind == "channel" else kind


def _decade(year) -> str:
    if pd.isna(year):
        return ""
    return f"{int(year) // 10 * 10}s"


def derive_scenarios(
    ds: Dataset,
    users: np.ndarray,
    histories: list[np.ndarray],
    targets: np.ndarray,
    kinds: list[str] | tuple[str, ...] = SCENARIO_KINDS,
) -> ScenarioSamples:
    """Expand each (user, history, target) into one row per applicable scenario kind.

    ``related`` needs a non-empty history and ``channel`` / ``search`` need the target to have
    genres; rows that do not apply are skipped rather than invented.
    """
    unknown = [k for k in kinds if k not in SCENARIO_KINDS]
    if unknown:
        raise ConfigError(f"unknown scenario kind(s) {unknown}; known: {', '.join(SCENARIO_KINDS)}")
    genre_index = {g: i for i, g in enumerate(ds.genre_vocab)}
    items = ds.items.set_index("item")
    item_genres = {int(i): [g for g in gs.split("|") if g] for i, gs in zip(items.index, items["genres"])}
    item_years = dict(zip(items.index.astype(int), items["year"]))

    source, kind_ids, trig_items, trig_genres, queries, names = [], [], [], [], [], []

    def add(
        i: int, kind: str, item: int = NO_TRIGGER, genre: int = NO_GENRE, query: str = "", name: str = ""
    ):
        source.append(i)
        kind_ids.append(SCENARIO_KINDS.index(kind))
        trig_items.append(item)
        trig_genres.append(genre)
        queries.append(query)
        names.append(name or kind)

    for i, (user, history, target) in enumerate(zip(users, histories, targets)):
        target = int(target)
        genres = item_genres.get(target, [])
        for kind in kinds:
            if kind == "homepage":
                add(i, kind)
            elif kind == "related" and len(history):
                add(i, kind, item=int(history[-1]))
            elif kind == "channel" and genres:
                genre = genres[zlib.crc32(f"{int(user)}:{target}".encode()) % len(genres)]
                add(i, kind, genre=genre_index[genre], name=scenario_name("channel", genre))
            elif kind == "search" and genres:
                words = [g.lower() for g in genres] + [_decade(item_years.get(target))]
                add(i, kind, query=" ".join(w for w in words if w))
    return ScenarioSamples(
        source=np.asarray(source, np.int64),
        kind=np.asarray(kind_ids, np.int64),
        trigger_item=np.asarray(trig_items, np.int64),
        trigger_genre=np.asarray(trig_genres, np.int64),
        query=queries,
        names=names,
    )
