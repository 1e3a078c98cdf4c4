"""Semantic IDs: RQ-KMeans codes for items, the versioned item ↔ SID registry, and its prefix trie.

**RQ-KMeans** (OxygenREC §2, as in OneRec): k-means on the item vectors gives level-1 codes; the
residuals (vector − its centroid) are clustered again for level 2, and so on. Each level lowers
the reconstruction error; the SID is the tuple of codes, coarse → fine.

**Collisions** (items with equal codes) are kept or disambiguated, by config:

``keep``          a SID maps to a *set* of items; decoding a SID recommends all of them (ranked by
                  popularity, most popular first, deterministic).
``disambiguate``  TIGER-style extra level: the item's index inside its collision group, so every
                  item has a unique SID of ``levels + 1`` tokens.

**Registry version** = hash of the codes and settings: a model trained on one registry refuses
to load with another (the tokens would mean different items).

**Prefix trie**: node 0 is the root; ``child[node, token]`` is the next node or −1. Decoding only
ever follows existing edges, so an illegal SID cannot be produced. ``node_items`` (sparse
``[nodes, items]``) says which items sit under a node, so per-request candidate pools (a genre
channel, business rules) become masks over the same trie.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nestrec.errors import ConfigError, UserInputError

log = logging.getLogger(__name__)

__all__ = ["PrefixTrie", "SIDRegistry", "kmeans", "rq_kmeans"]

# Part of every cached registry's key: bump it whenever the same settings would give other codes
# (2: scikit-learn's k-means with restarts replaced the hand-written Lloyd), so a cache written by
# older code is never reused on one machine while a fresh one builds different SIDs.
TOKENIZER_VERSION = 2
COLLISION_POLICIES = ("keep", "disambiguate")
COLLISION_TOKENS = ("popularity", "residual")


# Above this many items, mini-batch k-means (memory and time linear in a batch, not the catalogue).
MINIBATCH_ABOVE = 200_000


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 25,
    generator: torch.Generator | None = None,
    balanced: bool = False,
    n_init: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of ``x`` ``[n, d]`` into ``k`` codes: (centroids [k, d], assignment [n]).

    scikit-learn's k-means does the clustering (k-means++ seeding, ``n_init`` restarts keeping the
    lowest inertia; ``MiniBatchKMeans`` above :data:`MINIBATCH_ABOVE` items, so a large catalogue
    never needs an ``n x k`` distance matrix at once). ``balanced``: then up to ``iters`` Lloyd
    steps in which every cluster holds at most ``ceil(n / k)`` points (:func:`balanced_assignment`;
    scikit-learn has no capacity constraint), so no code becomes a catch-all that the decoder must
    then split with long collision tails. Empty codes are re-seeded with the points farthest from
    their centroids, so every code stays usable (codebook utilisation is one of the diagnostics).
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    n = x.shape[0]
    k = min(k, n)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    data = x.detach().cpu().double().numpy()
    # OpenMP / BLAS threads only pay on large problems; on a catalogue the size of ML-1M they mostly
    # spin-wait, which on a shared box (2 gloo ranks, a data loader) slows everything else down
    # (measured: 300 x 384 points, 32 codes: 37 ms on one thread, 0.2-0.6 s on two busy cores).
    threads = torch.get_num_threads() if n * k * x.shape[1] > 200_000_000 else 1
    with threadpool_limits(limits=threads):  # OpenMP and BLAS
        if n > MINIBATCH_ABOVE:
            fitted = MiniBatchKMeans(k, n_init=n_init, random_state=seed, batch_size=4096).fit(data)
        else:
            fitted = KMeans(k, n_init=n_init, max_iter=max(iters, 1) * 4, random_state=seed).fit(data)
    c = torch.from_numpy(fitted.cluster_centers_).to(x.dtype)
    if not balanced:
        return c, torch.from_numpy(fitted.labels_).long()

    def assign_to(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = torch.cdist(x, c)
        return d, balanced_assignment(d, -(-n // k))

    for _ in range(iters):
        d, assign = assign_to(c)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        new = sums / counts.clamp(min=1).unsqueeze(1).to(x.dtype)
        empty = counts == 0
        if bool(empty.any()):
            far = d.gather(1, assign.unsqueeze(1)).squeeze(1).argsort(descending=True)
            new[empty] = x[far[: int(empty.sum())]]
        if torch.allclose(new, c):
            c = new
            break
        c = new
    return c, assign_to(c)[1]


def balanced_assignment(distances: torch.Tensor, capacity: int) -> torch.Tensor:
    """Point → cluster with at most ``capacity`` points per cluster, greedily by distance: the
    closest (point, cluster) pairs are taken first, skipping full clusters and placed points.

    ``O(n·k·log(n·k))``: fine for catalogues of up to a few hundred thousand items per level.
    """
    n, k = distances.shape
    if capacity * k < n:
        raise ConfigError(f"{k} clusters of capacity {capacity} cannot hold {n} points")
    order = distances.flatten().argsort().numpy()
    points, clusters = np.divmod(order, k)
    assign = np.full(n, -1, dtype=np.int64)
    load = np.zeros(k, dtype=np.int64)
    placed = 0
    for point, cluster in zip(points.tolist(), clusters.tolist()):
        if assign[point] < 0 and load[cluster] < capacity:
            assign[point] = cluster
            load[cluster] += 1
            placed += 1
            if placed == n:
                break
    return torch.from_numpy(assign)


def rq_kmeans(
    vectors: torch.Tensor,
    levels: int = 3,
    codebook_size: int = 32,
    iters: int = 25,
    seed: int = 0,
    balanced: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor], list[float], torch.Tensor]:
    """Residual-quantise ``vectors`` → (codes [n, levels], codebooks, reconstruction MSE after each
    level, the final residuals [n, d])."""
    if vectors.ndim != 2 or len(vectors) == 0:
        raise UserInputError(
            f"rq_kmeans needs a non-empty [items, dim] matrix, got shape {tuple(vectors.shape)}"
        )
    generator = torch.Generator().manual_seed(seed)
    residual = vectors.double().clone()
    codes, books, errors = [], [], []
    for level in range(levels):
        started = time.perf_counter()
        centroids, assign = kmeans(residual, codebook_size, iters, generator, balanced)
        codes.append(assign)
        books.append(centroids.float())
        residual = residual - centroids[assign]
        errors.append(float((residual**2).sum(1).mean()))
        log.info(
            "RQ-KMeans level %d/%d: %d items -> %d codes used of %d, residual MSE %.4f (%.1f s)",
            level + 1, levels, len(vectors), len(torch.unique(assign)), codebook_size, errors[-1],
            time.perf_counter() - started,
        )  # fmt: skip
    return torch.stack(codes, 1), books, errors, residual


@dataclass
class SIDRegistry:
    """Item ↔ SID mapping (item ids are 1..N; 0 is padding and has no SID)."""

    codes: torch.Tensor  # [N + 1, L] int64, row 0 unused (-1)
    codebook_size: int
    levels: int
    policy: str = "keep"
    popularity: torch.Tensor | None = None  # [N + 1] training counts, orders collision sets

    def __post_init__(self) -> None:
        if self.policy not in COLLISION_POLICIES:
            raise ConfigError(
                f"unknown collision policy {self.policy!r}; expected one of {', '.join(COLLISION_POLICIES)}"
            )
        if self.popularity is None:
            self.popularity = torch.zeros(len(self.codes), dtype=torch.long)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        item_vectors: torch.Tensor,
        levels: int = 3,
        codebook_size: int = 32,
        policy: str = "keep",
        popularity: torch.Tensor | None = None,
        iters: int = 25,
        seed: int = 0,
        balanced: bool = False,
        collision_token: str = "popularity",
    ) -> tuple[SIDRegistry, dict]:
        """Tokenise ``item_vectors`` (row i = item i + 1). Returns the registry and its diagnostics.

        ``collision_token`` (``disambiguate`` only) is what the extra token says: ``popularity``,
        the item's popularity rank inside its collision group; ``residual``, the nearest free code
        of one shared codebook over the last level's residuals, so a token means the same
        direction in every group (TIGER's index is arbitrary; this one can be learned).
        """
        if collision_token not in COLLISION_TOKENS:
            raise ConfigError(
                f"unknown collision_token {collision_token!r}; expected one of {', '.join(COLLISION_TOKENS)}"
            )
        codes, _, errors, residual = rq_kmeans(item_vectors, levels, codebook_size, iters, seed, balanced)
        full = torch.full((len(codes) + 1, levels), -1, dtype=torch.long)
        full[1:] = codes
        pop = popularity if popularity is not None else torch.zeros(len(full), dtype=torch.long)
        if policy == "disambiguate":
            full = (
                _residual_collision_level(full, residual, seed)
                if collision_token == "residual"
                else _add_disambiguation_level(full, pop)
            )
        registry = cls(full, codebook_size, levels, policy, pop)
        diagnostics = registry.diagnostics()
        diagnostics["reconstruction_mse"] = errors
        return registry, diagnostics

    # -- queries -------------------------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        return len(self.codes) - 1

    @property
    def sid_length(self) -> int:
        return self.codes.shape[1]

    @property
    def vocab_sizes(self) -> list[int]:
        """Tokens per level (the disambiguation level is as wide as the largest collision group)."""
        sizes = [self.codebook_size] * self.levels
        if self.sid_length > self.levels:
            sizes.append(int(self.codes[1:, -1].max()) + 1)
        return sizes

    @property
    def version(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([self.codebook_size, self.levels, self.policy]).encode())
        h.update(self.codes.numpy().tobytes())
        return h.hexdigest()[:16]

    def sid(self, item: int) -> tuple[int, ...]:
        if not 1 <= item <= self.num_items:
            raise UserInputError(f"item {item} is not in the SID registry (items 1..{self.num_items})")
        return tuple(int(c) for c in self.codes[item])

    def items_of(self, sid: tuple[int, ...]) -> list[int]:
        match = (self.codes[1:] == torch.tensor(sid)).all(1).nonzero().flatten() + 1
        return sorted(match.tolist(), key=lambda i: (-int(self.popularity[i]), i))

    def diagnostics(self) -> dict:
        """Collision rate, largest collision group, per-level codebook utilisation."""
        codes = self.codes[1:, : self.levels]
        _, counts = torch.unique(codes, dim=0, return_counts=True)
        return {
            "items": self.num_items,
            "distinct_sids": len(counts),
            "collision_rate": float(1 - len(counts) / max(1, self.num_items)),
            "max_collision_group": int(counts.max()) if len(counts) else 0,
            "p99_collision_group": float(torch.quantile(counts.double(), 0.99)) if len(counts) else 0.0,
            "utilisation": [
                len(torch.unique(codes[:, level])) / self.codebook_size for level in range(self.levels)
            ],
            "version": self.version,
            "policy": self.policy,
        }

    # -- persistence ---------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "codes": self.codes.tolist(),
            "codebook_size": self.codebook_size,
            "levels": self.levels,
            "policy": self.policy,
            "popularity": self.popularity.tolist(),
            "version": self.version,
        }

    @classmethod
    def from_state(cls, state: dict) -> SIDRegistry:
        registry = cls(
            torch.tensor(state["codes"], dtype=torch.long),
            int(state["codebook_size"]),
            int(state["levels"]),
            state["policy"],
            torch.tensor(state["popularity"], dtype=torch.long),
        )
        if registry.version != state["version"]:
            raise UserInputError(
                f"SID registry is corrupted: stored version {state['version']} != {registry.version}"
            )
        return registry

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state()))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SIDRegistry:
        path = Path(path)
        if not path.exists():
            raise UserInputError(f"SID registry not found: {path}")
        try:
            return cls.from_state(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError) as err:
            raise UserInputError(f"SID registry {path} is malformed: {err}") from None

    def check_version(self, expected: str) -> None:
        if expected != self.version:
            raise UserInputError(
                f"SID registry version mismatch: the model was trained with registry {expected}, "
                f"this one is {self.version}; rebuild the model or load the registry it was trained with"
            )

    def trie(self) -> PrefixTrie:
        return PrefixTrie.build(self.codes[1:], self.vocab_sizes, self.popularity[1:])


def _add_disambiguation_level(codes: torch.Tensor, popularity: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(len(codes), codes.shape[1] + 1, dtype=torch.long)
    out[:, :-1] = codes
    out[0] = -1
    groups: dict[tuple, list[int]] = {}
    for item in range(1, len(codes)):
        groups.setdefault(tuple(codes[item].tolist()), []).append(item)
    for members in groups.values():
        for rank, item in enumerate(sorted(members, key=lambda i: (-int(popularity[i]), i))):
            out[item, -1] = rank
    return out


def _residual_collision_level(codes: torch.Tensor, residual: torch.Tensor, seed: int) -> torch.Tensor:
    """The extra level from one codebook of ``m`` residual centroids (``m`` = the largest collision
    group): inside each group, items take distinct codes, closest (item, code) pairs first."""
    groups: dict[tuple, list[int]] = {}
    for item in range(1, len(codes)):
        groups.setdefault(tuple(codes[item].tolist()), []).append(item)
    width = max(len(members) for members in groups.values())
    out = torch.zeros(len(codes), codes.shape[1] + 1, dtype=torch.long)
    out[:, :-1] = codes
    out[0] = -1
    if width == 1:
        return out
    centroids, _ = kmeans(residual.double(), width, generator=torch.Generator().manual_seed(seed))
    distances = torch.cdist(residual.double(), centroids)  # row i = item i + 1
    for members in groups.values():
        if len(members) > 1:
            rows = torch.tensor(members) - 1
            out[members, -1] = balanced_assignment(distances[rows], 1)[: len(members)]
    return out


@dataclass
class PrefixTrie:
    """Legal SIDs as a node-transition table; leaves point to the items they decode to."""

    child: torch.Tensor  # [nodes, max_vocab] int64, -1 = no edge
    depth: int
    leaf_items: list[list[int]]  # per node (empty unless a leaf): items, most popular first
    node_items: torch.Tensor  # sparse [nodes, items + 1] float: 1 where the item is under the node
    _spans: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def build(cls, codes: torch.Tensor, vocab_sizes: list[int], popularity: torch.Tensor) -> PrefixTrie:
        depth, width = codes.shape[1], max(vocab_sizes)
        edges: dict[tuple[int, int], int] = {}
        items_under: list[list[int]] = [[]]
        leaf_of: list[int] = []
        for row in codes.tolist():
            node = 0
            items_under[0].append(len(leaf_of) + 1)
            for token in row:
                if (node, token) not in edges:
                    edges[(node, token)] = len(items_under)
                    items_under.append([])
                node = edges[(node, token)]
                items_under[node].append(len(leaf_of) + 1)
            leaf_of.append(node)
        nodes = len(items_under)
        child = torch.full((nodes, width), -1, dtype=torch.long)
        for (parent, token), node in edges.items():
            child[parent, token] = node
        leaf_items: list[list[int]] = [[] for _ in range(nodes)]
        for item, node in enumerate(leaf_of, start=1):
            leaf_items[node].append(item)
        pop = torch.cat([torch.zeros(1, dtype=popularity.dtype), popularity])
        for members in leaf_items:
            members.sort(key=lambda i: (-int(pop[i]), i))
        rows = [n for n, members in enumerate(items_under) for _ in members]
        cols = [i for members in items_under for i in members]
        node_items = torch.sparse_coo_tensor(
            torch.tensor([rows, cols]), torch.ones(len(rows)), (nodes, len(codes) + 1), check_invariants=True
        ).coalesce()
        return cls(child, depth, leaf_items, node_items)

    @property
    def num_nodes(self) -> int:
        return self.child.shape[0]

    def item_spans(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(order [items], span [nodes, 2])``: the items in SID order (depth first, tokens
        ascending; collisions in leaf order) and, per node, the ``[start, end)`` range of that
        order holding the items below it.

        Why: the items under any node are contiguous in SID order, so a per-row cumulative sum
        over that order gives every node's probability mass with two gathers (the distillation
        targets of every level, without an ``[N, nodes]`` product)."""
        if self._spans is None:
            child = self.child.tolist()
            order: list[int] = []
            span = [[0, 0] for _ in child]

            def visit(node: int) -> None:
                span[node][0] = len(order)
                order.extend(self.leaf_items[node])
                for next_node in child[node]:
                    if next_node >= 0:
                        visit(next_node)
                span[node][1] = len(order)

            visit(0)
            self._spans = (torch.tensor(order, dtype=torch.long), torch.tensor(span, dtype=torch.long))
        return self._spans

    def allowed_nodes(self, item_mask: torch.Tensor) -> torch.Tensor:
        """``[B, nodes]`` bool: nodes with at least one allowed item under them (``item_mask [B, items+1]``)."""
        return torch.sparse.mm(self.node_items, item_mask.float().t()).t() > 0

    def all_sids(self) -> set[tuple[int, ...]]:
        out, stack = set(), [(0, ())]
        while stack:
            node, prefix = stack.pop()
            if len(prefix) == self.depth:
                out.add(prefix)
                continue
            for token in (self.child[node] >= 0).nonzero().flatten().tolist():
                stack.append((int(self.child[node, token]), (*prefix, token)))
        return out


def popularity_counts(sequences: list[np.ndarray], num_items: int) -> torch.Tensor:
    counts = np.zeros(num_items + 1, dtype=np.int64)
    for seq in sequences:
        np.add.at(counts, seq, 1)
    counts[0] = 0
    return torch.from_numpy(counts)
