"""Loaders: every on-disk format reads to the same dataset; bad input names the file and line."""

from __future__ import annotations

import pandas as pd
import pytest

from nestrec.data.formats import DataFormatError, detect_format, load_raw


@pytest.mark.parametrize("fmt", ["recbole", "ml-1m", "ml-100k"])
def test_every_format_reads_the_same_rows(fixture_dirs, fixture_raw, fmt):
    assert detect_format(fixture_dirs[fmt]) == fmt
    raw = load_raw(fixture_dirs[fmt])
    expected = fixture_raw.interactions
    pd.testing.assert_frame_equal(raw.interactions.reset_index(drop=True), expected.reset_index(drop=True))
    items = raw.items.set_index("item_id").loc[fixture_raw.items["item_id"]]
    assert list(items["genres"]) == list(fixture_raw.items["genres"])
    assert list(items["year"]) == list(fixture_raw.items["year"])
    assert len(raw.users) == len(fixture_raw.users)


def test_recbole_crlf_and_utf8_titles(tmp_path):
    (tmp_path / "tiny.inter").write_bytes(
        b"user_id:token\titem_id:token\trating:float\ttimestamp:float\r\n"
        b"1m_1\tCaf\xc3\xa9 Society (1995)\t5\t978300760\r\n1m_1\tHeat (1995)\t3\t978300761\r\n"
    )
    (tmp_path / "tiny.item").write_bytes(
        b"item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\r\n"
        b"Caf\xc3\xa9 Society (1995)\tCaf\xc3\xa9 Society\t1995\tComedy Romance\r\nHeat (1995)\tHeat\t1995\tAction\r\n"
    )
    raw = load_raw(tmp_path)
    assert list(raw.interactions["item_id"]) == ["Café Society (1995)", "Heat (1995)"]
    assert raw.items.set_index("item_id").loc["Café Society (1995)", "genres"] == "Comedy|Romance"
    assert raw.interactions["timestamp"].dtype == "int64"


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_malformed_recbole_line_is_named(fixture_dirs, tmp_path):
    src = fixture_dirs["recbole"] / "fixture.inter"
    lines = src.read_text().splitlines()
    lines[4] = lines[4] + "\textra"
    (tmp_path / "fixture.inter").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError) as excinfo:
        load_raw(tmp_path)
    message = _one_line_error(excinfo)
    assert "fixture.inter:5" in message and "expected 4 fields" in message


def test_bad_timestamp_is_named(fixture_dirs, tmp_path):
    lines = (fixture_dirs["ml-1m"] / "ratings.dat").read_text().splitlines()
    u, i, r, _ = lines[9].split("::")
    lines[9] = f"{u}::{i}::{r}::yesterday"
    (tmp_path / "ratings.dat").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError) as excinfo:
        load_raw(tmp_path)
    message = _one_line_error(excinfo)
    assert "ratings.dat:10" in message and "'yesterday'" in message and "timestamp" in message


def test_wrong_separator_in_u_data(fixture_dirs, tmp_path):
    lines = (fixture_dirs["ml-100k"] / "u.data").read_text().splitlines()
    lines[2] = lines[2].replace("\t", ",")
    (tmp_path / "u.data").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError) as excinfo:
        load_raw(tmp_path)
    assert "u.data:3" in _one_line_error(excinfo)


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(DataFormatError, match="does not exist"):
        load_raw(tmp_path / "nope")
    with pytest.raises(DataFormatError, match="no known data files"):
        load_raw(tmp_path)
    with pytest.raises(DataFormatError, match="missing data file .*ratings.dat"):
        load_raw(tmp_path, fmt="ml-1m")
    (tmp_path / "empty.inter").write_text("")
    with pytest.raises(DataFormatError, match="empty.inter: file is empty"):
        load_raw(tmp_path)
    with pytest.raises(DataFormatError, match="unknown data format 'csv'"):
        load_raw(tmp_path, fmt="csv")


def test_missing_required_column(tmp_path):
    (tmp_path / "x.inter").write_text("user_id:token\titem_id:token\trating:float\n1\t2\t3\n")
    with pytest.raises(DataFormatError, match=r"x.inter: header has no timestamp field"):
        load_raw(tmp_path)
