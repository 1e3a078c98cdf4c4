"""Semantic-ID tokenizer variants on ML-1M: collisions, utilisation, purity (docs/oxygenrec.md).

Each variant builds the data module's registry (cached on disk by content and settings, so a
second run is instant) and prints its diagnostics: the share of items whose 3-token SID collides,
the largest collision group, the level-1 genre purity and how often consecutive training items
share their level-1 code (against chance for codes of the same sizes).

    python bench/sid_variants.py          # ~8 min on 2 CPUs the first time
"""

from __future__ import annotations

import json
import time

from nestrec.oxygen.data import OxygenDataModule

VARIANTS = [  # (source, balanced, collision token, codebook)
    ("text", False, "popularity", 32),
    ("text", True, "residual", 32),
    ("collaborative", True, "residual", 32),
    ("fused", False, "popularity", 32),
    ("fused", True, "residual", 16),
    ("fused", True, "residual", 32),
    ("fused", True, "residual", 64),
]
KEYS = (
    "collision_rate",
    "max_collision_group",
    "genre_purity_l1",
    "cooccurrence_l1",
    "cooccurrence_l1_chance",
)


def main() -> None:
    for source, balanced, token, codebook in VARIANTS:
        started = time.perf_counter()
        dm = OxygenDataModule(dataset="ml-1m", sid_source=source, sid_balanced=balanced, sid_collision_token=token,
                              sid_codebook=codebook, teacher_forcing="single", samples_per_user=1)  # fmt: skip
        dm.prepare_data()
        dm.setup()
        row = {"source": source, "balanced": balanced, "collision_token": token, "codebook": codebook}
        row.update({k: dm.sid_diagnostics[k] for k in KEYS}, vocab=dm.registry.vocab_sizes)
        row["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
