"""The sparse-feature batch type shared by embedding modules and the NestPipe pipelines."""

from nestrec.sparse.jagged import JaggedFeatures

__all__ = ["JaggedFeatures"]
