"""MLflow lineage: one run per materialization, nested under a run per Dagster run."""

from __future__ import annotations

import dagster as dg

from npr_pipelines.tracking import Tracker, default_tracking_uri


class MlflowResource(dg.ConfigurableResource):
    """Tracking URI defaults to ``sqlite:///$NPR_HOME/mlflow.db``; a token, if the server needs one,
    comes from ``MLFLOW_TRACKING_TOKEN`` in the environment (MLflow reads it; we never log it)."""

    tracking_uri: str = ""
    experiment: str = "npr-pipelines"
    ui_url: str = "http://127.0.0.1:5000"

    def tracker(self) -> Tracker:
        return Tracker(self.tracking_uri or default_tracking_uri(), self.experiment, self.ui_url or None)
