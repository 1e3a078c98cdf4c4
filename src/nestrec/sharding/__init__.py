"""Row-wise sharding of embedding tables: rules, All2All routing, shard stores, sparse optimizers."""

from nestrec.sharding.collection import ShardedEmbeddingCollection
from nestrec.sharding.optim import (
    RowWiseAdagrad,
    RowWiseAdam,
    RowWiseOptimizer,
    RowWiseSGD,
    build_row_optimizer,
)
from nestrec.sharding.rule import RowWiseSharding

__all__ = [
    "RowWiseAdagrad",
    "RowWiseAdam",
    "RowWiseOptimizer",
    "RowWiseSGD",
    "RowWiseSharding",
    "ShardedEmbeddingCollection",
    "build_row_optimizer",
]
