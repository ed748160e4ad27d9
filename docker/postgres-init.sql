-- Run once by the postgres image on a fresh volume: Dagster uses the default database, MLflow its own.
CREATE DATABASE mlflow;
