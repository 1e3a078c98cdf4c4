"""NestPipe pipelines: the engine and its schedules, the Lightning module base, clustering.

``Trainer(strategy="nestpipe_nested")`` (or ``NestPipeStrategy(pipeline="nested", micro_batches=4)``)
runs a model built on :class:`PipelinedLightningModule` under a pipelined schedule.
"""

from nestrec.pipeline.clustering import CLUSTERING_METHODS, MicroBatchPlan, cluster_samples, sample_keys
from nestrec.pipeline.engine import PIPELINE_MODES, NestPipeEngine, PipelineConfig, PipelinedModel, StepResult
from nestrec.pipeline.lightning import PipelinedLightningModule

__all__ = [
    "CLUSTERING_METHODS",
    "PIPELINE_MODES",
    "MicroBatchPlan",
    "NestPipeEngine",
    "PipelineConfig",
    "PipelinedLightningModule",
    "PipelinedModel",
    "StepResult",
    "cluster_samples",
    "sample_keys",
]
