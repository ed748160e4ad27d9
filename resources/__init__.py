"""Dagster resources: storage, MLflow, Ray and pipeline settings (thin over ``npr_pipelines``)."""

from resources.mlflow import MlflowResource
from resources.ray import RayResource
from resources.settings import PipelineSettings
from resources.storage import StorageResource

__all__ = ["MlflowResource", "PipelineSettings", "RayResource", "StorageResource"]
