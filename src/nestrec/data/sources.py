"""Where a data module's raw files come from: a fetchable dataset, the generated fixture, or a path.

Both data modules (sequences and click-through) resolve their source the same way, so the rules
— and the error for an unknown name — live here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nestrec.data.dataset import Dataset, load_dataset
from nestrec.data.fetch import SOURCES, data_root, dataset_dir, fetch
from nestrec.data.fixture import write_fixture
from nestrec.errors import ConfigError

__all__ = ["DataSource"]

FIXTURE = "fixture"


@dataclass(frozen=True)
class DataSource:
    """``dataset``: ``ml-1m``, ``ml-100k`` or ``fixture``; ``path`` (if set) wins over it."""

    dataset: str = "ml-1m"
    path: str | None = None
    format: str = "auto"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.path is None and self.dataset not in SOURCES and self.dataset != FIXTURE:
            raise ConfigError(
                f"unknown dataset {self.dataset!r}: use one of {', '.join([*SOURCES, FIXTURE])} or set data.path"
            )

    def directory(self) -> Path:
        if self.path is not None:
            return Path(self.path).expanduser()
        return dataset_dir(self.dataset)

    def ensure_available(self) -> None:
        """Fetch the dataset, or write the fixture, unless the user pointed at their own files."""
        if self.path is not None:
            return
        if self.dataset == FIXTURE:
            target = dataset_dir(FIXTURE)
            if not (target / "fixture.inter").exists():
                write_fixture(target, "recbole")
        else:
            fetch(self.dataset)

    def load(self, min_user_interactions: int = 5, min_item_interactions: int = 1) -> Dataset:
        cache = Path(self.cache_dir).expanduser() if self.cache_dir else data_root() / "processed"
        return load_dataset(
            self.directory(), self.format, None, cache, min_user_interactions, min_item_interactions
        )
