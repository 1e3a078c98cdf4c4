"""``JaggedFeatures``: several variable-length id features of one batch, in one flat tensor.

The layout follows TorchRec's KeyedJaggedTensor: ``values`` holds every id of feature 0 for all
samples, then feature 1, ...; ``lengths[f * batch + i]`` is how many ids sample ``i`` has in
feature ``f``. One flat tensor is what the pipelines move (H2D, key routing) in a single copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["JaggedFeatures"]


@dataclass
class JaggedFeatures:
    keys: list[str]
    values: torch.Tensor  # int64 [total ids]
    lengths: torch.Tensor  # int64 [len(keys) * batch_size]

    def __post_init__(self) -> None:
        if self.lengths.numel() % max(1, len(self.keys)):
            raise ValueError(
                f"lengths ({self.lengths.numel()}) is not a multiple of the {len(self.keys)} keys"
            )
        if int(self.lengths.sum()) != self.values.numel():
            raise ValueError(
                f"lengths sum to {int(self.lengths.sum())} but there are {self.values.numel()} values"
            )

    @classmethod
    def from_dict(cls, features: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> JaggedFeatures:
        """Build from ``{name: (values, lengths)}``; every feature must have the same batch size."""
        keys = list(features)
        sizes = {len(lengths) for _, lengths in features.values()}
        if len(sizes) > 1:
            raise ValueError(f"features have different batch sizes: {sorted(sizes)}")
        values = (
            torch.cat([v.reshape(-1).long() for v, _ in features.values()])
            if keys
            else torch.zeros(0, dtype=torch.long)
        )
        lengths = (
            torch.cat([ln.reshape(-1).long() for _, ln in features.values()])
            if keys
            else torch.zeros(0, dtype=torch.long)
        )
        return cls(keys, values, lengths)

    @classmethod
    def from_dense(cls, features: dict[str, torch.Tensor]) -> JaggedFeatures:
        """One id per sample per feature (``{name: ids[B]}``)."""
        return cls.from_dict(
            {k: (v.reshape(-1), torch.ones(v.numel(), dtype=torch.long)) for k, v in features.items()}
        )

    @classmethod
    def from_kjt(cls, kjt: Any) -> JaggedFeatures:
        """From TorchRec's ``KeyedJaggedTensor`` (the same key-major layout), so an existing TorchRec
        data pipeline feeds nestrec unchanged. Per-id weights have no place here and are refused."""
        if kjt.weights_or_none() is not None:
            raise ValueError("a weighted KeyedJaggedTensor cannot become JaggedFeatures (ids only)")
        return cls(list(kjt.keys()), kjt.values().long(), kjt.lengths().long())

    def to_kjt(self) -> Any:
        """This batch as a TorchRec ``KeyedJaggedTensor`` (needs ``torchrec``: ``make torchrec-venv``)."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        return KeyedJaggedTensor(keys=list(self.keys), values=self.values, lengths=self.lengths)

    @property
    def batch_size(self) -> int:
        return self.lengths.numel() // max(1, len(self.keys))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> JaggedFeatures:
        return JaggedFeatures(
            self.keys,
            self.values.to(device, non_blocking=non_blocking),
            self.lengths.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> JaggedFeatures:
        return JaggedFeatures(self.keys, self.values.pin_memory(), self.lengths.pin_memory())

    def split(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{name: (values, lengths)}`` views, in key order."""
        per_key = self.lengths.view(len(self.keys), -1) if self.keys else self.lengths.view(0, 0)
        counts = per_key.sum(dim=1).tolist()
        values = torch.split(self.values, counts)
        return {k: (values[i], per_key[i]) for i, k in enumerate(self.keys)}

    def select_samples(self, index: torch.Tensor) -> JaggedFeatures:
        """The same features for a subset (or permutation) of the samples: micro-batches, clustering.

        Vectorised (one gather per feature): the pipelines call this for every micro-batch.
        """
        index = index.to(self.lengths.device).long()
        out = {}
        for key, (values, lengths) in self.split().items():
            starts = torch.cumsum(lengths, 0) - lengths
            picked = lengths[index]
            total = int(picked.sum())
            # position of every selected id = its sample's start + its rank within the sample
            first = torch.cumsum(picked, 0) - picked
            positions = torch.repeat_interleave(starts[index] - first, picked, output_size=total)
            positions += torch.arange(total, device=values.device)
            out[key] = (values[positions], picked)
        return JaggedFeatures.from_dict(out)
