"""``OxygenDataModule``: the sequence data module plus what the generative recommender needs.

On top of :class:`~nestrec.data.datamodule.SequenceDataModule` (same leak-free split, same
evaluation rows and scenarios as the SASRec baseline, so numbers compare), ``setup`` adds:

1. **Item content vectors**: "title (year) | genres" through the offline text encoder, cached.
2. **Semantic IDs**: RQ-KMeans over those vectors → :class:`SIDRegistry` (+ diagnostics), cached
   by content hash and settings and saved with every run.
3. **Training samples with scenarios**: for every user, the last ``samples_per_user`` positions
   of their *training* sequence become (history, next item) pairs; each pair gets one scenario
   from ``train_scenarios`` (a stable hash picks it; rows a scenario cannot form fall back to
   ``homepage``), with its trigger / query derived exactly as for evaluation rows.
4. **Instruction text vectors**: a search row's query string is encoded with the same text
   encoder and fed as the reasoning-instruction text ``I_r``, as the paper trains on search
   queries; rows without text get the learnable default.
5. **Profile**: categorical user fields (ML-1M: gender, age, occupation) as indices.
6. **Behaviour weights** (optional): MovieLens has no click/cart/order, so the target's rating is
   the behaviour proxy; ``behaviour_weights`` maps a rating to its weight in the next-token loss
   (e.g. ``{4: 1.5, 5: 2.0}``, others 1.0; CoffeeTau's view/cart/transaction proxy is
   1.2/1.5/2.0). Off by default: the README's numbers are unweighted.

Batches carry ``history [B, long_len + recent_len]``, ``target``, ``scenario``, ``trigger_item``,
``trigger_genre``, ``reasoning [B, text_dim]``, ``profile [B, fields]`` (+ ``index`` for eval).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import default_collate

from nestrec.data.datamodule import SequenceDataModule, left_pad
from nestrec.data.scenarios import SCENARIO_KINDS, derive_scenarios
from nestrec.errors import ConfigError
from nestrec.oxygen.sid import SIDRegistry, popularity_counts
from nestrec.oxygen.text import encode_cached, text_dim

__all__ = ["OxygenDataModule"]

PROFILE_FIELDS = ("gender", "age", "occupation")


class OxygenDataModule(SequenceDataModule):
    def __init__(
        self,
        *args,
        recent_len: int = 20,
        long_len: int = 100,
        samples_per_user: int = 16,
        train_scenarios: list[str] | tuple[str, ...] = SCENARIO_KINDS,
        text_encoder: str = "minilm",
        sid_levels: int = 3,
        sid_codebook: int = 32,
        sid_collisions: str = "disambiguate",
        sid_seed: int = 0,
        behaviour_weights: dict[int, float] | None = None,
        cri_cache: str | None = None,
        max_len: int | None = None,
        **kwargs,
    ):
        # max_len is derived (the encoder reads the recent and the long window); the parameter
        # exists so configs may carry it as null.
        kwargs["max_len"] = recent_len + long_len
        super().__init__(*args, **kwargs)
        unknown = [s for s in train_scenarios if s not in SCENARIO_KINDS]
        if unknown:
            raise ConfigError(f"unknown training scenario(s) {unknown}; known: {', '.join(SCENARIO_KINDS)}")
        text_dim(text_encoder)  # validates the name before any work
        self.save_hyperparameters()
        self.registry: SIDRegistry | None = None
        self.sid_diagnostics: dict = {}
        self.profile_sizes: list[int] = []
        self._text_table = torch.zeros(1, text_dim(text_encoder))
        self.cri_coverage: dict[str, float] = {}

    # ---------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.registry is not None:
            return
        super().setup(stage)
        hp = self.hparams
        cache = self.source.processed_dir() / "oxygen"
        items = self.data.items.sort_values("item")
        texts = [
            f"{t} | {g.replace('|', ', ')}" if g else str(t)
            for t, g in zip(items["title"].astype(str), items["genres"].astype(str))
        ]
        vectors = encode_cached(texts, hp.text_encoder, cache, progress=False)
        #: ``[num_items + 1, text_dim]`` item text vectors (row 0 = padding): reward relevance uses them
        self.item_text = torch.cat([torch.zeros(1, vectors.shape[1]), vectors.float()])
        popularity = popularity_counts(self.split.train_sequences, self.data.num_items)
        self.registry, self.sid_diagnostics = self._registry(vectors, popularity, cache)
        #: ``[num_users, fields]`` profile value indices by user id (0 = unknown): training rows and the
        #: serving export both read it
        self.user_profiles = self._profile_matrix()
        queries: dict[str, int] = {"": 0}
        self._tensors["train"] = self._oxygen_train_tensors(queries)
        for name in ("valid", "test"):
            rows = self.eval_scenarios[name]
            self._tensors[name]["query_index"] = torch.tensor(
                [queries.setdefault(q, len(queries)) for q in rows.query]
            )
            self._tensors[name]["profile"] = self.user_profiles[self._tensors[name]["user"]]
            samples = getattr(self.split, name)
            self._tensors[name]["time"] = torch.as_tensor(
                samples.timestamps[rows.source], dtype=torch.float64
            )
            self._tensors[name]["rating"] = self._ratings_of(
                self._tensors[name]["user"].numpy(), self._tensors[name]["target"].numpy()
            )
        table = (
            encode_cached(list(queries)[1:], hp.text_encoder, cache)
            if len(queries) > 1
            else torch.zeros(0, 1)
        )
        self._text_table = torch.cat(
            [torch.zeros(1, text_dim(hp.text_encoder)), table.reshape(-1, text_dim(hp.text_encoder))]
        )
        if hp.cri_cache:
            self.attach_instructions(hp.cri_cache)

    def attach_instructions(self, path: str) -> dict[str, float]:
        """Join a CRI cache into the prepared rows (once; the multi-stage runner calls it after the
        cri stage has filled the cache)."""
        if self.cri_coverage:
            raise RuntimeError("CRI instructions are already attached to this data module")
        self.cri_coverage = self._join_instructions(path)
        return self.cri_coverage

    def _join_instructions(self, path: str) -> dict[str, float]:
        """Point rec rows (not search: its query is its instruction) at their cached CRI vector.

        As-of join: a row at time ``t`` gets the newest instruction whose window started at or
        before ``t`` (the instruction only saw behaviour before that start); no row → the default.
        """
        from nestrec.oxygen.cri.cache import CRICache

        if not Path(path).exists():
            raise ConfigError(f"CRI cache {path} does not exist (run the cri stage first)")
        search = SCENARIO_KINDS.index("search")
        vectors: list[np.ndarray] = []
        slot: dict[tuple[int, int], int] = {}  # one table row per cached instruction, however many samples
        coverage = {}
        with CRICache(path) as cache:
            for name in ("train", "valid", "test"):
                tensors = self._tensors[name]
                records = cache.join(tensors["user"].tolist(), tensors["time"].tolist())
                index = tensors["query_index"].clone()
                joined = 0
                for row, record in enumerate(records):
                    if record is None or int(tensors["scenario"][row]) == search:
                        continue
                    if record.vector.shape[0] != self._text_table.shape[1]:
                        raise ConfigError(
                            f"CRI cache {path} holds {record.vector.shape[0]}-d vectors but the text "
                            f"encoder {self.hparams.text_encoder!r} gives {self._text_table.shape[1]}-d"
                        )
                    if record.key not in slot:
                        slot[record.key] = len(self._text_table) + len(vectors)
                        vectors.append(record.vector)
                    index[row] = slot[record.key]
                    joined += 1
                tensors["query_index"] = index
                coverage[name] = round(joined / max(1, len(index)), 5)
            if cache.corrupt:
                coverage["corrupt_rows_skipped"] = len(cache.corrupt)
        if vectors:
            self._text_table = torch.cat([self._text_table, torch.from_numpy(np.stack(vectors))])
        return coverage

    def _registry(
        self, vectors: torch.Tensor, popularity: torch.Tensor, cache: Path
    ) -> tuple[SIDRegistry, dict]:
        hp = self.hparams
        key = hashlib.sha256(vectors.numpy().tobytes())
        key.update(json.dumps([hp.sid_levels, hp.sid_codebook, hp.sid_collisions, hp.sid_seed]).encode())
        key.update(popularity.numpy().tobytes())
        path = cache / f"sid-{key.hexdigest()[:20]}.json"
        if path.exists():
            registry = SIDRegistry.load(path)
            diagnostics = json.loads(path.with_suffix(".diag.json").read_text())
            return registry, diagnostics
        registry, diagnostics = SIDRegistry.build(
            vectors, hp.sid_levels, hp.sid_codebook, hp.sid_collisions, popularity, seed=hp.sid_seed
        )
        registry.save(path)
        path.with_suffix(".diag.json").write_text(json.dumps(diagnostics))
        return registry, diagnostics

    def _profile_matrix(self) -> torch.Tensor:
        users = self.data.users.sort_values("user")
        fields = [f for f in PROFILE_FIELDS if f in users.columns]
        columns, self.profile_sizes = [], []
        for field in fields:
            values = users[field].astype(str).fillna("")
            vocab = {v: i + 1 for i, v in enumerate(sorted(set(values) - {"", "nan", "<NA>"}))}
            columns.append(np.array([vocab.get(v, 0) for v in values], dtype=np.int64))
            self.profile_sizes.append(len(vocab))
        matrix = np.stack(columns, 1) if columns else np.zeros((len(users), 0), dtype=np.int64)
        full = np.zeros((self.data.num_users, matrix.shape[1]), dtype=np.int64)
        full[users["user"].to_numpy()] = matrix
        return torch.from_numpy(full)

    def _user_ratings(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Per user, (items, ratings) in time order: training sequences are prefixes of these."""
        inter = self.data.interactions
        if "rating" not in inter.columns:
            return {}
        users = inter["user"].to_numpy()
        cuts = np.flatnonzero(np.diff(users)) + 1
        items = np.split(inter["item"].to_numpy(), cuts)
        ratings = np.split(pd.to_numeric(inter["rating"], errors="coerce").to_numpy(dtype=np.float64), cuts)
        return {int(u[0]): (i, r) for u, i, r in zip(np.split(users, cuts), items, ratings)}

    def _weight(self, rating: float) -> float:
        weights = self.hparams.behaviour_weights or {}
        if np.isnan(rating):
            return 1.0
        return float(weights.get(int(round(rating)), 1.0))

    def _oxygen_train_tensors(self, queries: dict[str, int]) -> dict[str, torch.Tensor]:
        hp = self.hparams
        per_user = self._user_ratings() if hp.behaviour_weights else {}
        users, histories, targets, weights = [], [], [], []
        times = []
        for user, seq, stamps in zip(
            self.split.train_users, self.split.train_sequences, self.split.train_timestamps
        ):
            items, ratings = per_user.get(int(user), (None, None))
            aligned = items is not None and np.array_equal(items[: len(seq)], seq)
            for t in range(max(1, len(seq) - hp.samples_per_user), len(seq)):
                users.append(int(user))
                times.append(float(stamps[t]))
                histories.append(seq[:t])
                targets.append(int(seq[t]))
                weights.append(self._weight(ratings[t]) if aligned else 1.0)
        users_a, targets_a = np.asarray(users, np.int64), np.asarray(targets, np.int64)
        rows = derive_scenarios(self.data, users_a, histories, targets_a, tuple(hp.train_scenarios))
        # One scenario per training pair: a stable hash picks among the kinds the pair can form.
        wanted = np.array([zlib.crc32(f"{u}:{i}".encode()) for i, u in enumerate(users_a)], np.int64)
        chosen = {}
        kinds_of: dict[int, list[int]] = {}
        for row, source in enumerate(rows.source.tolist()):
            kinds_of.setdefault(source, []).append(row)
        for source, candidates in kinds_of.items():
            chosen[source] = candidates[wanted[source] % len(candidates)]
        pick = np.array([chosen[s] for s in sorted(chosen)], np.int64)
        source = rows.source[pick]
        return {
            "history": torch.from_numpy(left_pad([histories[i] for i in source], hp.max_len)),
            "target": torch.from_numpy(targets_a[source]),
            "user": torch.from_numpy(users_a[source]),
            "scenario": torch.from_numpy(rows.kind[pick]),
            "trigger_item": torch.from_numpy(rows.trigger_item[pick]),
            "trigger_genre": torch.from_numpy(rows.trigger_genre[pick]),
            "query_index": torch.tensor(
                [queries.setdefault(rows.query[i], len(queries)) for i in pick.tolist()]
            ),
            "profile": self.user_profiles[torch.from_numpy(users_a[source])],
            "weight": torch.tensor(weights, dtype=torch.float32)[torch.from_numpy(source)],
            "time": torch.tensor(times, dtype=torch.float64)[torch.from_numpy(source)],
            "rating": self._ratings_of(users_a[source], targets_a[source]),
        }

    def _ratings_of(self, users: np.ndarray, items: np.ndarray) -> torch.Tensor:
        """The rating each (user, item) got (NaN where the data has none): the ranker's labels."""
        inter = self.data.interactions
        if "rating" not in inter.columns:
            return torch.full((len(users),), float("nan"))
        table = pd.Series(
            pd.to_numeric(inter["rating"], errors="coerce").to_numpy(dtype=np.float64),
            index=pd.MultiIndex.from_arrays([inter["user"].to_numpy(), inter["item"].to_numpy()]),
        )
        table = table[~table.index.duplicated(keep="last")]
        wanted = pd.MultiIndex.from_arrays([np.asarray(users), np.asarray(items)])
        return torch.from_numpy(table.reindex(wanted).to_numpy(dtype=np.float32))

    # ---------------------------------------------------------------------------------------------
    def collate_fn(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Default collate plus the instruction text vector of each row's query."""
        batch = default_collate(rows)
        batch["reasoning"] = self._text_table[batch["query_index"]]
        return batch

    def model_kwargs(self) -> dict:
        kwargs = super().model_kwargs()
        kwargs.pop("max_len")
        return {
            **kwargs,
            "registry_state": self.registry.state(),
            "text_dim": text_dim(self.hparams.text_encoder),
            "num_genres": len(self.data.genre_vocab),
            "profile_sizes": list(self.profile_sizes),
            "recent_len": self.hparams.recent_len,
            "long_len": self.hparams.long_len,
        }

    def describe(self) -> dict:
        self._require_setup()
        out = {
            "dataset": self.data.name,
            "users": self.data.num_users,
            "items": self.data.num_items,
            "interactions": len(self.data.interactions),
            "split": self.split.info,
            "train_samples": len(self._tensors["train"]["target"]),
            "valid_rows": len(self._tensors["valid"]["target"]),
            "test_rows": len(self._tensors["test"]["target"]),
        }
        out["sid"] = {k: v for k, v in self.sid_diagnostics.items() if k != "reconstruction_mse"}
        out["sid"]["reconstruction_mse"] = [
            round(v, 5) for v in self.sid_diagnostics.get("reconstruction_mse", [])
        ]
        out["train_scenarios"] = list(self.hparams.train_scenarios)
        if self.cri_coverage:
            out["cri_coverage"] = dict(self.cri_coverage)
        return out
