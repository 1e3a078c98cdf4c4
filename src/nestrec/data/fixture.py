"""A small synthetic dataset for unit tests and smoke runs that need no download.

The rows are generated, not sampled from MovieLens, so they can be written anywhere. Users walk
a noisy Markov chain over the items (next item = previous + a small step), so a sequential model
has real signal to learn; timestamps increase per user with deliberate ties to exercise the
tie-breaking rule. The same dataset can be written in every supported on-disk format.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from nestrec.data.formats import ML100K_GENRES, RawDataset

__all__ = ["generate_fixture", "write_fixture"]

_GENRES = [g for g in ML100K_GENRES if g != "unknown"]


def generate_fixture(
    num_users: int = 120, num_items: int = 80, min_length: int = 6, max_length: int = 30, seed: int = 0
) -> RawDataset:
    rng = np.random.default_rng(seed)
    rows = []
    t0 = 956_703_932
    for u in range(1, num_users + 1):
        length = int(rng.integers(min_length, max_length + 1))
        item = int(rng.integers(1, num_items + 1))
        t = t0 + int(rng.integers(0, 10_000_000))
        seen = set()
        for _ in range(length):
            step = (
                int(rng.choice([1, 1, 1, 2, 3])) if rng.random() < 0.85 else int(rng.integers(1, num_items))
            )
            item = (item - 1 + step) % num_items + 1
            if item in seen:
                continue
            seen.add(item)
            t += int(rng.choice([0, 60, 3600, 86_400]))
            rows.append((str(u), str(item), float(rng.integers(1, 6)), t))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    inter["rating"] = inter["rating"].astype("float32")
    inter["timestamp"] = inter["timestamp"].astype("int64")
    item_ids = np.arange(1, num_items + 1)
    genres = [
        "|".join(sorted({_GENRES[(i * 7) % len(_GENRES)], _GENRES[(i * 3 + 1) % len(_GENRES)]}))
        for i in item_ids
    ]
    items = pd.DataFrame(
        {
            "item_id": item_ids.astype(str),
            "title": [f"Synthetic Movie {i} ({1950 + (i * 13) % 50})" for i in item_ids],
            "year": pd.array([1950 + (i * 13) % 50 for i in item_ids], dtype="Int64"),
            "genres": genres,
        }
    )
    users = pd.DataFrame(
        {
            "user_id": [str(u) for u in range(1, num_users + 1)],
            "age": [str(18 + u % 40) for u in range(1, num_users + 1)],
            "gender": ["MF"[u % 2] for u in range(1, num_users + 1)],
            "occupation": [str(u % 20) for u in range(1, num_users + 1)],
            "zip_code": [f"{10000 + u}" for u in range(1, num_users + 1)],
        }
    )
    return RawDataset(name="fixture", interactions=inter, items=items, users=users)


def write_fixture(
    directory: str | Path, fmt: str = "recbole", raw: RawDataset | None = None, **kwargs
) -> Path:
    """Write the fixture in ``fmt`` (recbole, ml-1m or ml-100k) under ``directory``; return it."""
    raw = raw or generate_fixture(**kwargs)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    inter, items, users = raw.interactions, raw.items, raw.users
    ratings = inter["rating"].astype(int).astype(str)
    if fmt == "recbole":
        lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
        lines += [
            f"{u}\t{i}\t{r}\t{t}"
            for u, i, r, t in zip(inter.user_id, inter.item_id, ratings, inter.timestamp)
        ]
        (out / f"{raw.name}.inter").write_text("\n".join(lines) + "\n")
        lines = ["item_id:token\tmovie_title:token\trelease_year:float\tgenre:token_seq"]
        lines += [
            f"{i}\t{t}\t{y}\t{g.replace('|', ' ')}"
            for i, t, y, g in zip(items.item_id, items.title, items.year, items.genres)
        ]
        (out / f"{raw.name}.item").write_text("\n".join(lines) + "\n")
        lines = ["user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token"]
        lines += [
            "\t".join(row)
            for row in users[["user_id", "age", "gender", "occupation", "zip_code"]].itertuples(index=False)
        ]
        (out / f"{raw.name}.user").write_text("\n".join(lines) + "\n")
    elif fmt == "ml-1m":
        rows = [
            f"{u}::{i}::{r}::{t}"
            for u, i, r, t in zip(inter.user_id, inter.item_id, ratings, inter.timestamp)
        ]
        (out / "ratings.dat").write_text("\n".join(rows) + "\n", encoding="latin-1")
        rows = [f"{i}::{t}::{g}" for i, t, g in zip(items.item_id, items.title, items.genres)]
        (out / "movies.dat").write_text("\n".join(rows) + "\n", encoding="latin-1")
        rows = [
            f"{u}::{g}::{a}::{o}::{z}"
            for u, a, g, o, z in users[["user_id", "age", "gender", "occupation", "zip_code"]].itertuples(
                index=False
            )
        ]
        (out / "users.dat").write_text("\n".join(rows) + "\n", encoding="latin-1")
    elif fmt == "ml-100k":
        rows = [
            f"{u}\t{i}\t{r}\t{t}"
            for u, i, r, t in zip(inter.user_id, inter.item_id, ratings, inter.timestamp)
        ]
        (out / "u.data").write_text("\n".join(rows) + "\n", encoding="latin-1")
        rows = []
        for i, title, year, genres in zip(items.item_id, items.title, items.year, items.genres):
            on = set(genres.split("|"))
            flags = "|".join("1" if g in on else "0" for g in ML100K_GENRES)
            rows.append(f"{i}|{title}|01-Jan-{year}||http://example.invalid/{i}|{flags}")
        (out / "u.item").write_text("\n".join(rows) + "\n", encoding="latin-1")
        rows = [f"{g}|{n}" for n, g in enumerate(ML100K_GENRES)]
        (out / "u.genre").write_text("\n".join(rows) + "\n", encoding="latin-1")
        rows = [
            "|".join(row)
            for row in users[["user_id", "age", "gender", "occupation", "zip_code"]].itertuples(index=False)
        ]
        (out / "u.user").write_text("\n".join(rows) + "\n", encoding="latin-1")
    else:
        raise ValueError(f"unknown fixture format {fmt!r}")
    return out
