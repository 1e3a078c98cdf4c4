"""NestPipe pipelines. So far: key-centric sample clustering for micro-batches (FWP's input)."""

from nestrec.pipeline.clustering import CLUSTERING_METHODS, MicroBatchPlan, cluster_samples, sample_keys

__all__ = ["CLUSTERING_METHODS", "MicroBatchPlan", "cluster_samples", "sample_keys"]
