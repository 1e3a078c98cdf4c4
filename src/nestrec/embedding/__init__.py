"""Embedding table configs and the plain (unsharded) reference collection."""

from nestrec.embedding.collection import EmbeddingCollection, pool
from nestrec.embedding.config import EmbeddingTableConfig

__all__ = ["EmbeddingCollection", "EmbeddingTableConfig", "pool"]
