"""Key-centric sample clustering: split a batch into equal micro-batches that share keys.

Frozen-window pipelining dedups ids *per micro-batch*, so a hot id that lands in every
micro-batch is shipped N times. Grouping samples that share ids into the same micro-batch
shrinks the sum of unique ids over micro-batches — the All2All volume — without changing what
is computed: it is only another partition of the same samples (the summed gradient is identical).

The paper's exact algorithm is not public (see the design brief §5, open question 1), so two
rank-local, deterministic options are offered, plus the identity split as the baseline:

``none``      identity order, cut into N equal chunks.
``signature`` sort samples by a MinHash of their *shared* ids and cut into N equal chunks:
              samples with equal MinHash share an id (probability = Jaccard similarity).
              O(B·L + B log B). The default.
``greedy``    samples with most shared ids first, each to the non-full micro-batch whose id set
              it overlaps most: O(B·L·N), usually tighter.

"Shared" ids are those in 2..ceil(B/N) samples of the batch: a singleton costs the same in any
micro-batch, and an id hotter than one micro-batch can hold is split whatever the assignment,
so neither should steer membership (measured: counting them made both methods no better than
a random split on the benchmark's topic-structured Zipf data).

Every option returns a permutation of the samples and N+1 offsets, with micro-batch sizes that
differ by at most one (samples, not tokens; token balancing for sequence models is future work).
A batch smaller than N (the last batch of an epoch) gets empty micro-batches rather than a
smaller N: every rank must issue the same number of collectives.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from nestrec.errors import ConfigError
from nestrec.sparse.jagged import JaggedFeatures

__all__ = ["CLUSTERING_METHODS", "MicroBatchPlan", "cluster_samples", "sample_keys"]

CLUSTERING_METHODS = ("none", "signature", "greedy")
_MIX = 0x9E3779B97F4A7C15 & ((1 << 61) - 1)


@dataclass(frozen=True)
class MicroBatchPlan:
    """``permutation[offsets[i]:offsets[i+1]]`` are the samples of micro-batch ``i``."""

    permutation: torch.Tensor
    offsets: torch.Tensor

    def micro_batches(self) -> list[torch.Tensor]:
        return [self.permutation[self.offsets[i] : self.offsets[i + 1]] for i in range(len(self.offsets) - 1)]

    def unique_keys(self, keys: list[list[int]]) -> list[int]:
        """Distinct ids per micro-batch: what its lookup must route and ship."""
        return [len({k for s in mb.tolist() for k in keys[s]}) for mb in self.micro_batches()]


def sample_keys(features: JaggedFeatures, feature_to_table: dict[str, str] | None = None) -> list[list[int]]:
    """Per-sample ids, namespaced by table (features sharing a table share ids)."""
    batch = features.batch_size
    tables: dict[str, int] = {}
    ids, owners = [], []
    for feature, (values, lengths) in features.split().items():
        table = (feature_to_table or {}).get(feature, feature)
        namespace = tables.setdefault(table, len(tables)) << 48
        ids.append(values.cpu().long() | namespace)
        owners.append(torch.repeat_interleave(torch.arange(batch), lengths.cpu()))
    if not ids:
        return [[] for _ in range(batch)]
    sample = torch.cat(owners)
    order = torch.argsort(sample, stable=True)
    counts = torch.bincount(sample, minlength=batch).tolist()
    flat = torch.cat(ids)[order].tolist()
    keys, offset = [], 0
    for count in counts:
        keys.append(flat[offset : offset + count])
        offset += count
    return keys


def _equal_offsets(batch: int, parts: int) -> torch.Tensor:
    base, extra = divmod(batch, parts)
    sizes = [base + (1 if i < extra else 0) for i in range(parts)]
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.long)


def _minhash(keys: list[int], seed: int) -> int:
    return min(((k * _MIX + seed) * _MIX) % ((1 << 61) - 1) for k in keys) if keys else 0


def cluster_samples(
    keys: list[list[int]], num_micro_batches: int, method: str = "signature", seed: int = 0
) -> MicroBatchPlan:
    """Partition samples (given their ids) into ``num_micro_batches`` equal micro-batches."""
    if method not in CLUSTERING_METHODS:
        raise ConfigError(f"unknown clustering {method!r}; expected one of {', '.join(CLUSTERING_METHODS)}")
    batch = len(keys)
    if num_micro_batches < 1:
        raise ConfigError(f"cannot split a batch into {num_micro_batches} micro-batches (need at least 1)")
    offsets = _equal_offsets(batch, num_micro_batches)
    if method == "none" or num_micro_batches == 1:
        return MicroBatchPlan(torch.arange(batch), offsets)
    freq = Counter(k for sample in keys for k in set(sample))
    # Only ids shared by 2..B/N samples steer membership: a singleton costs the same anywhere, and an
    # id in more samples than one micro-batch holds is shipped several times whatever we do.
    fits = -(-batch // num_micro_batches)
    shared = [{k for k in sample if 1 < freq[k] <= fits} for sample in keys]
    if method == "signature":

        def signature(s: int) -> tuple:
            return (_minhash(list(shared[s]), seed) if shared[s] else 1 << 62, s)

        return MicroBatchPlan(torch.tensor(sorted(range(batch), key=signature), dtype=torch.long), offsets)

    capacity = (offsets[1:] - offsets[:-1]).tolist()
    members: list[list[int]] = [[] for _ in range(num_micro_batches)]
    key_sets: list[set[int]] = [set() for _ in range(num_micro_batches)]
    for s in sorted(range(batch), key=lambda s: (-len(shared[s]), s)):
        best = max(
            (j for j in range(num_micro_batches) if len(members[j]) < capacity[j]),
            key=lambda j: (len(shared[s] & key_sets[j]), -len(members[j]), -j),
        )
        members[best].append(s)
        key_sets[best] |= shared[s]
    return MicroBatchPlan(torch.tensor([s for mb in members for s in mb], dtype=torch.long), offsets)
