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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch.utils.data import default_collate

from nestrec.data.datamodule import SequenceDataModule, left_pad
from nestrec.data.scenarios import SCENARIO_KINDS, ScenarioSamples, derive_scenarios
from nestrec.errors import ConfigError
from nestrec.oxygen.item_vectors import sid_vectors
from nestrec.oxygen.sid import TOKENIZER_VERSION, SIDRegistry, popularity_counts
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
        teacher_forcing: Literal["dense", "single"] = "dense",
        window_len: int = 200,
        dense_windows: int | None = None,
        sid_source: Literal["text", "collaborative", "fused"] = "text",
        sid_text_weight: float = 0.5,
        sid_balanced: bool = False,
        sid_collision_token: Literal["popularity", "residual"] = "popularity",
        **kwargs,
    ):
        # max_len is derived (the encoder reads the recent/causal window and the long window IGR
        # picks from); the parameter exists so configs may carry it as null.
        if teacher_forcing not in ("dense", "single"):
            raise ConfigError(f"unknown teacher_forcing {teacher_forcing!r}; expected dense or single")
        if teacher_forcing == "dense" and window_len < 1:
            raise ConfigError(f"teacher_forcing=dense needs window_len >= 1, got {window_len}")
        if dense_windows is not None and dense_windows < 1:
            raise ConfigError(f"dense_windows must be >= 1 or null (every window), got {dense_windows}")
        kwargs["max_len"] = (window_len if teacher_forcing == "dense" else recent_len) + long_len
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
        # One-target pairs always exist: the ranker and the alignment stage train on them.
        self._tensors["train_pairs"] = self._oxygen_train_tensors(queries)
        self._tensors["train"] = (
            self._dense_train_tensors(queries)
            if hp.teacher_forcing == "dense"
            else self._tensors["train_pairs"]
        )
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
            names = ["train_pairs", "valid", "test"] + (
                ["train"] if "targets" in self._tensors["train"] else []
            )
            for name in names:
                tensors = self._tensors[name]
                dense = "targets" in tensors  # one as-of join per row, at its first target's time
                times = tensors["first_time"] if dense else tensors["time"]
                records = cache.join(tensors["user"].tolist(), times.tolist())
                index = tensors["query_index"].clone()
                joined = 0
                for row, record in enumerate(records):
                    if record is None:
                        continue
                    if record.vector.shape[0] != self._text_table.shape[1]:
                        raise ConfigError(
                            f"CRI cache {path} holds {record.vector.shape[0]}-d vectors but the text "
                            f"encoder {self.hparams.text_encoder!r} gives {self._text_table.shape[1]}-d"
                        )
                    rec_rows = (tensors["scenario"][row] != search) & (
                        tensors["targets"][row] > 0 if dense else True
                    )
                    if not bool(rec_rows.any()):
                        continue
                    if record.key not in slot:
                        slot[record.key] = len(self._text_table) + len(vectors)
                        vectors.append(record.vector)
                    if dense:
                        index[row][rec_rows] = slot[record.key]
                        joined += int(rec_rows.sum())
                    else:
                        index[row] = slot[record.key]
                        joined += 1
                tensors["query_index"] = index
                total = int((tensors["targets"] > 0).sum()) if dense else len(index)
                single = name == "train_pairs" and "train" not in names  # the same rows as "train"
                coverage["train" if single else name] = round(joined / max(1, total), 5)
            if cache.corrupt:
                coverage["corrupt_rows_skipped"] = len(cache.corrupt)
        if vectors:
            self._text_table = torch.cat([self._text_table, torch.from_numpy(np.stack(vectors))])
        return coverage

    def _registry(
        self, vectors: torch.Tensor, popularity: torch.Tensor, cache: Path
    ) -> tuple[SIDRegistry, dict]:
        hp = self.hparams
        vectors = sid_vectors(
            hp.sid_source, vectors, self.split.train_sequences, hp.sid_text_weight, hp.sid_seed
        )
        key = hashlib.sha256(vectors.numpy().tobytes())
        settings = [hp.sid_levels, hp.sid_codebook, hp.sid_collisions, hp.sid_seed, hp.sid_balanced]
        key.update(json.dumps(settings + [hp.sid_collision_token, TOKENIZER_VERSION]).encode())
        key.update(popularity.numpy().tobytes())
        path = cache / f"sid-{key.hexdigest()[:20]}.json"
        if path.exists():
            registry = SIDRegistry.load(path)
            diagnostics = json.loads(path.with_suffix(".diag.json").read_text())
            return registry, diagnostics
        registry, diagnostics = SIDRegistry.build(
            vectors, hp.sid_levels, hp.sid_codebook, hp.sid_collisions, popularity, seed=hp.sid_seed,
            balanced=hp.sid_balanced, collision_token=hp.sid_collision_token,
        )  # fmt: skip
        diagnostics.update(self._sid_purity(registry))
        diagnostics["source"] = hp.sid_source
        registry.save(path)
        path.with_suffix(".diag.json").write_text(json.dumps(diagnostics))
        return registry, diagnostics

    def _sid_purity(self, registry: SIDRegistry) -> dict[str, float]:
        """How much of what users do the first SID token already says (higher = an easier first
        decoding step): ``genre_purity_l1``, the mean share of a level-1 code's items that carry the
        code's most common genre; ``cooccurrence_l1``, the share of consecutive training pairs
        whose two items share a level-1 code, next to ``cooccurrence_l1_chance`` for random codes
        of the same sizes."""
        first = registry.codes[1:, 0].numpy()
        genres = self.data.item_genre_matrix()[:, 1:].T  # [items, genres] bool
        purity, sizes = [], np.bincount(first)
        for code in np.flatnonzero(sizes):
            purity.append(genres[first == code].sum(0).max() / sizes[code])
        pairs = [(seq[:-1], seq[1:]) for seq in self.split.train_sequences if len(seq) > 1]
        a = np.concatenate([p[0] for p in pairs]) - 1
        b = np.concatenate([p[1] for p in pairs]) - 1
        share = sizes / sizes.sum()
        return {
            "genre_purity_l1": round(float(np.mean(purity)), 4),
            "cooccurrence_l1": round(float((first[a] == first[b]).mean()), 4),
            "cooccurrence_l1_chance": round(float((share**2).sum()), 4),
        }

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
        keys = [f"{u}:{i}" for i, u in enumerate(users_a)]
        rows, pick = self._pick_scenarios(users_a, histories, targets_a, keys)
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

    def _pick_scenarios(
        self, users: np.ndarray, histories: list[np.ndarray], targets: np.ndarray, keys: list[str]
    ) -> tuple[ScenarioSamples, np.ndarray]:
        """One scenario per training pair: a stable hash of ``keys[i]`` picks among the kinds pair
        ``i`` can form. Returns the derived rows and, for every pair that can form one (in order),
        the index of its row (``rows.source[pick]`` are those pairs)."""
        rows = derive_scenarios(self.data, users, histories, targets, tuple(self.hparams.train_scenarios))
        wanted = np.array([zlib.crc32(key.encode()) for key in keys], np.int64)
        counts = np.bincount(rows.source, minlength=len(targets))
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # rows are grouped by pair, in order
        formable = np.flatnonzero(counts)  # a pair no enabled scenario can form is left out
        return rows, first[formable] + wanted[formable] % counts[formable]

    def _dense_train_tensors(self, queries: dict[str, int]) -> dict[str, torch.Tensor]:
        """Dense rows: each training sequence cut (from its end) into windows of ``window_len``
        targets; row = the items before the window's targets (left-padded to ``max_len``, so the
        long behaviour before a full window is IGR's pool), ``targets [L]`` right-aligned with the
        window slots (target ``j`` follows slot ``j``; 0 = no target), and every target's scenario,
        trigger and query chosen as for one-target pairs. Every training target appears in exactly
        one row, once per epoch; ``dense_windows = k`` keeps only each user's ``k`` newest windows
        (1 = SASRec's protocol: the last ``window_len`` positions)."""
        hp = self.hparams
        window = hp.window_len
        per_user = self._user_ratings() if hp.behaviour_weights else {}
        row_users, row_history, row_span = [], [], []
        pair_users, pair_last, pair_targets, keys, pair_weights = [], [], [], [], []
        for user, seq in zip(self.split.train_users, self.split.train_sequences):
            user = int(user)
            items, ratings = per_user.get(user, (None, None))
            aligned = items is not None and np.array_equal(items[: len(seq)], seq)
            end, windows = len(seq), 0
            while end > 1 and (hp.dense_windows is None or windows < hp.dense_windows):
                windows += 1  # targets seq[start:end] follow inputs seq[start-1:end-1]
                start = max(1, end - window)
                row_users.append(user)
                row_history.append(seq[max(0, start - 1 - hp.long_len) : end - 1])
                row_span.append((start, end))
                for t in range(start, end):
                    pair_users.append(user)
                    pair_last.append(seq[t - 1 : t])
                    pair_targets.append(int(seq[t]))
                    keys.append(f"{user}:t{t}")
                    pair_weights.append(self._weight(ratings[t]) if aligned else 1.0)
                end = start
        users_a, targets_a = np.asarray(pair_users, np.int64), np.asarray(pair_targets, np.int64)
        rows, pick = self._pick_scenarios(users_a, pair_last, targets_a, keys)
        kept = rows.source[pick]
        values = {
            "targets": np.zeros(len(targets_a), np.int64),
            "scenario": np.zeros(len(targets_a), np.int64),
            "trigger_item": np.zeros(len(targets_a), np.int64),
            "trigger_genre": np.full(len(targets_a), -1, np.int64),
            "query_index": np.zeros(len(targets_a), np.int64),
            "weight": np.zeros(len(targets_a), np.float32),
        }
        values["targets"][kept] = targets_a[kept]
        values["scenario"][kept] = rows.kind[pick]
        values["trigger_item"][kept] = rows.trigger_item[pick]
        values["trigger_genre"][kept] = rows.trigger_genre[pick]
        values["query_index"][kept] = [queries.setdefault(rows.query[i], len(queries)) for i in pick.tolist()]
        values["weight"][kept] = np.asarray(pair_weights, np.float32)[kept]
        n_rows = len(row_users)
        grid = {key: np.zeros((n_rows, window), v.dtype) for key, v in values.items()}
        grid["trigger_genre"][:] = -1
        offset = 0
        for r, (start, end) in enumerate(row_span):
            n = end - start
            for key, grid_values in grid.items():
                grid_values[r, window - n :] = values[key][offset : offset + n]
            offset += n
        users_t = torch.as_tensor(np.asarray(row_users, np.int64))
        out = {key: torch.from_numpy(value) for key, value in grid.items()}
        if not hp.behaviour_weights:
            del out["weight"]
        return {
            "history": torch.from_numpy(left_pad(row_history, hp.max_len)),
            "user": users_t,
            "profile": self.user_profiles[users_t],
            "first_time": torch.tensor(
                [float(stamps[span[0]]) for stamps, span in zip(self._row_stamps(row_users), row_span)],
                dtype=torch.float64,
            ),
            **out,
        }

    def _row_stamps(self, row_users: list[int]) -> list[np.ndarray]:
        stamps = dict(zip((int(u) for u in self.split.train_users), self.split.train_timestamps))
        return [stamps[u] for u in row_users]

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
            # the module's name differs from the data's: Lightning merges both hparams for logging,
            # and a one-target run has data.window_len 200 but a non-causal encoder (0)
            "encoder_window": self.hparams.window_len if self.hparams.teacher_forcing == "dense" else 0,
        }

    #: which training tensors ``train_dataloader`` serves: the configured rows (``train``) or the
    #: one-target pairs (``train_pairs``; see :meth:`one_target_training`)
    train_rows = "train"

    def train_dataloader(self):
        return self._loader(self.train_rows, True, self.hparams.batch_size)

    @contextmanager
    def one_target_training(self, batch_size: int | None = None) -> Iterator[None]:
        """Serve one (history, next item) pair per training row while the block runs: the
        alignment stage samples a group of SIDs per request, which needs one target per row."""
        previous = self.train_rows, self.hparams.batch_size
        self.train_rows = "train_pairs"
        if batch_size is not None:
            self.hparams.batch_size = batch_size
        try:
            yield
        finally:
            self.train_rows, self.hparams.batch_size = previous

    def describe(self) -> dict:
        self._require_setup()
        out = {
            "dataset": self.data.name,
            "users": self.data.num_users,
            "items": self.data.num_items,
            "interactions": len(self.data.interactions),
            "split": self.split.info,
            "teacher_forcing": self.hparams.teacher_forcing,
            "train_rows": len(self._tensors["train"]["history"]),
            "train_targets": int(
                (self._tensors["train"]["targets"] > 0).sum()
                if "targets" in self._tensors["train"]
                else len(self._tensors["train"]["target"])
            ),
            "train_samples": len(self._tensors["train_pairs"]["target"]),
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
