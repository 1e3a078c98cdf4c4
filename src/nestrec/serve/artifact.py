"""The serving artifact: one directory that holds everything a request needs, checked on load.

Layout (written by :mod:`nestrec.export`, read here)::

    manifest.json        format + version, model config, serving config, SHA-256 of every file
    weights.safetensors  the ``OxygenModel`` state dict (no pickle: loading runs no code)
    registry.json        the item <-> SID registry (its version is what the weights were trained on)
    trie.safetensors     the prefix trie of legal SIDs (edges, leaf items, items under each node)
    catalogue.json       item ids, titles, years, genres; the genre vocabulary
    users.safetensors    each known user's latest history (the model's window), every item they
                         interacted with (for exclude_history), and profile, at export time
    users.json           original user ids and the profile field names
    cri.sqlite           optional: a copy of the slow-thinking instruction cache

Why a separate format instead of the Lightning checkpoint: a checkpoint needs the training code
(the LightningModule, its data module and the dataset on disk) to be rebuilt; the artifact needs
only :class:`~nestrec.oxygen.model.OxygenModel`, so a serving host carries no training data and a
refactor of the training stack cannot break a deployed model. Loading refuses, with one line,
anything it cannot serve faithfully: another format version, a file whose digest changed, a
registry that is not the one the weights were trained with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from nestrec.errors import UserInputError
from nestrec.fileio import sha256_file
from nestrec.oxygen.model import OxygenModel
from nestrec.oxygen.sid import PrefixTrie, SIDRegistry

__all__ = [
    "ARTIFACT_FORMAT",
    "ARTIFACT_FORMAT_VERSION",
    "Artifact",
    "ArtifactError",
    "CatalogueItem",
    "load_artifact",
    "trie_tensors",
]

ARTIFACT_FORMAT = "nestrec-oxygenrec-serving"
#: Bumped whenever a reader of the previous version would misread the files.
ARTIFACT_FORMAT_VERSION = 1

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
REGISTRY = "registry.json"
TRIE = "trie.safetensors"
CATALOGUE = "catalogue.json"
USERS = "users.safetensors"
USER_IDS = "users.json"
CRI = "cri.sqlite"
#: Files every artifact has (the CRI copy is optional and not checksummed: it is refreshed in place).
REQUIRED_FILES = (WEIGHTS, REGISTRY, TRIE, CATALOGUE, USERS, USER_IDS)


class ArtifactError(UserInputError):
    """The artifact cannot be served as it is; the message says what and how to fix it."""


@dataclass(frozen=True)
class CatalogueItem:
    item: int  # nestrec's dense index (1..N), what the model emits
    item_id: str  # the dataset's own id
    title: str
    year: int | None
    genres: tuple[str, ...]


@dataclass
class Artifact:
    """A loaded artifact: the model in eval mode plus the tables a request is resolved against."""

    path: Path
    manifest: dict
    model: OxygenModel
    registry: SIDRegistry
    trie: PrefixTrie
    items: list[CatalogueItem]  # index i holds item i; index 0 is a padding placeholder
    genres: list[str]
    genre_item_mask: torch.Tensor  # [genres, items + 1] bool
    histories: torch.Tensor  # [users, history_length] int64, left-padded with 0 (export.history_length)
    profiles: torch.Tensor  # [users, fields] int64, 0 = unknown value
    user_ids: list[str]
    cri_path: Path | None
    # Every item each known user interacted with (CSR: user u's are seen_items[off[u]:off[u + 1]]);
    # None in an artifact exported before these were stored: then ``seen`` is the stored history.
    seen_offsets: np.ndarray | None = None
    seen_items: np.ndarray | None = None

    @property
    def num_items(self) -> int:
        return len(self.items) - 1

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def scenarios(self) -> list[str]:
        return list(self.manifest["scenarios"])

    @property
    def serving(self) -> dict:
        return self.manifest["serving"]

    @property
    def text_encoder(self) -> str:
        return self.manifest["text_encoder"]

    @property
    def text_dim(self) -> int:
        return int(self.manifest["text_dim"])

    @property
    def model_version(self) -> str:
        return self.manifest["model_version"]

    @property
    def history_len(self) -> int:
        return int(self.histories.shape[1])

    def seen(self, user: int) -> np.ndarray:
        """Every item known user ``user`` interacted with before export (what exclude_history removes)."""
        if self.seen_offsets is None or self.seen_items is None:
            stored = self.histories[user]
            return stored[stored > 0].cpu().numpy()
        return self.seen_items[self.seen_offsets[user] : self.seen_offsets[user + 1]]

    def to(self, device: torch.device) -> Artifact:
        """Move what decoding touches (the model, the trie, the genre mask) to ``device``."""
        self.model.to(device)
        self.trie.child = self.trie.child.to(device)
        self.trie.node_items = self.trie.node_items.to(device)
        self.genre_item_mask = self.genre_item_mask.to(device)
        return self


def trie_tensors(trie: PrefixTrie) -> dict[str, torch.Tensor]:
    """The trie as flat tensors (leaf item lists in CSR form) for ``safetensors``."""
    lengths = torch.tensor([len(items) for items in trie.leaf_items], dtype=torch.int64)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    flat = [item for items in trie.leaf_items for item in items]
    node_items = trie.node_items.coalesce()
    return {
        "child": trie.child.contiguous(),
        "depth": torch.tensor([trie.depth], dtype=torch.int64),
        "leaf_offsets": offsets,
        "leaf_items": torch.tensor(flat, dtype=torch.int64),
        "node_items_index": node_items.indices().contiguous(),
        "node_items_shape": torch.tensor(list(node_items.shape), dtype=torch.int64),
    }


def _trie_from_tensors(tensors: dict[str, torch.Tensor]) -> PrefixTrie:
    offsets, flat = tensors["leaf_offsets"].tolist(), tensors["leaf_items"].tolist()
    leaf_items = [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    index = tensors["node_items_index"]
    node_items = torch.sparse_coo_tensor(
        index, torch.ones(index.shape[1]), tuple(tensors["node_items_shape"].tolist()), check_invariants=True
    ).coalesce()
    return PrefixTrie(tensors["child"], int(tensors["depth"][0]), leaf_items, node_items)


def read_manifest(path: Path) -> dict:
    """Parse and version-check ``manifest.json``; every refusal is one line naming the fix."""
    file = path / MANIFEST
    if not path.is_dir():
        raise ArtifactError(
            f"serving artifact {path} does not exist (create one with `python -m nestrec.export`)"
        )
    if not file.exists():
        raise ArtifactError(f"{path} is not a serving artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{file} is not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(
            f"{path} is not a nestrec OxygenREC serving artifact ({MANIFEST} holds a JSON "
            f"{type(manifest).__name__}, not an object); re-export it"
        )
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(
            f"{path} is not a nestrec OxygenREC serving artifact (format {manifest.get('format')!r})"
        )
    version = manifest.get("format_version")
    if version != ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(
            f"artifact {path} has format version {version}, this nestrec reads version {ARTIFACT_FORMAT_VERSION}: "
            f"re-export the checkpoint with this nestrec (`python -m nestrec.export`)"
        )
    return manifest


def verify_files(path: Path, manifest: dict) -> None:
    """Every required file is present with the size and SHA-256 the manifest recorded."""
    recorded = manifest.get("files", {})
    for name in REQUIRED_FILES:
        file, expected = path / name, recorded.get(name)
        if expected is None:
            raise ArtifactError(f"artifact {path}: the manifest does not list {name}; re-export it")
        if not file.exists():
            raise ArtifactError(f"artifact {path}: {name} is missing")
        if file.stat().st_size != expected["bytes"] or sha256_file(file) != expected["sha256"]:
            raise ArtifactError(
                f"artifact {path}: {name} does not match its manifest digest (corrupted or replaced); re-export it"
            )


def _load_catalogue(path: Path) -> tuple[list[CatalogueItem], list[str], torch.Tensor]:
    data = json.loads((path / CATALOGUE).read_text())
    genres = list(data["genres"])
    items = [CatalogueItem(0, "", "<padding>", None, ())]
    for row in data["items"]:
        items.append(
            CatalogueItem(
                int(row["item"]), str(row["item_id"]), str(row["title"]), row["year"], tuple(row["genres"])
            )
        )
    if [it.item for it in items[1:]] != list(range(1, len(items))):
        raise ArtifactError(f"artifact {path}: {CATALOGUE} items are not numbered 1..{len(items) - 1}")
    index = {g: i for i, g in enumerate(genres)}
    mask = np.zeros((len(genres), len(items)), dtype=bool)
    for it in items[1:]:
        for genre in it.genres:
            mask[index[genre], it.item] = True
    return items, genres, torch.from_numpy(mask)


def load_artifact(path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> Artifact:
    """Load and check an artifact; the model is in eval mode on ``device``.

    ``verify=False`` skips the SHA-256 pass over the files (the version checks always run).
    """
    path = Path(path).expanduser()
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    registry = SIDRegistry.from_state(json.loads((path / REGISTRY).read_text()))
    if registry.version != manifest["registry_version"]:
        raise ArtifactError(
            f"artifact {path}: registry.json is version {registry.version} but the model was trained with "
            f"{manifest['registry_version']}; re-export the checkpoint"
        )
    config = dict(manifest["model"])
    model = OxygenModel(registry.codes, registry.vocab_sizes, **config)
    state = load_file(str(path / WEIGHTS))
    if not torch.equal(state.get("sid_codes", torch.empty(0)), registry.codes.clamp(min=0)):
        raise ArtifactError(
            f"artifact {path}: the weights' SID codes differ from registry.json; re-export it"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ArtifactError(
            f"artifact {path}: weights do not fit the manifest's model config ({first})"
        ) from None
    model.eval()
    trie = _trie_from_tensors(load_file(str(path / TRIE)))
    if trie.num_nodes != manifest["trie_nodes"] or trie.depth != registry.sid_length:
        raise ArtifactError(f"artifact {path}: trie.safetensors does not match the registry; re-export it")
    items, genres, genre_mask = _load_catalogue(path)
    if len(items) - 1 != registry.num_items:
        raise ArtifactError(
            f"artifact {path}: catalogue has {len(items) - 1} items, the registry {registry.num_items}"
        )
    users = load_file(str(path / USERS))
    user_meta = json.loads((path / USER_IDS).read_text())
    if "seen_offsets" in users and len(users["seen_offsets"]) != len(user_meta["user_ids"]) + 1:
        raise ArtifactError(
            f"artifact {path}: {USERS} and {USER_IDS} disagree on the user count; re-export it"
        )
    cri = path / CRI if manifest.get("cri") and (path / CRI).exists() else None
    artifact = Artifact(
        path=path,
        manifest=manifest,
        model=model,
        registry=registry,
        trie=trie,
        items=items,
        genres=genres,
        genre_item_mask=genre_mask,
        histories=users["history"].long(),
        profiles=users["profile"].long(),
        user_ids=[str(u) for u in user_meta["user_ids"]],
        cri_path=cri,
        seen_offsets=users["seen_offsets"].numpy() if "seen_offsets" in users else None,
        seen_items=users["seen_items"].numpy().astype(np.int64) if "seen_items" in users else None,
    )
    return artifact.to(torch.device(device))
