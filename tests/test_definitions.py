"""The Dagster code location loads, from the module and from workspace.yaml."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import yaml

from npr_pipelines.definitions import build_definitions, defs

ROOT = Path(__file__).resolve().parents[1]


def test_definitions_load_and_hold_the_graph() -> None:
    dg.Definitions.validate_loadable(defs)
    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    assert {"train_problems", "benchmarks", "base_model", "benchmark_scores"} <= keys
    assert {job.name for job in defs.jobs} >= {"main", "evaluate"}
    assert build_definitions("small").resources["settings"].profile == "small"


def test_workspace_yaml_names_the_definitions_module() -> None:
    workspace = yaml.safe_load((ROOT / "workspace.yaml").read_text())
    module = workspace["load_from"][0]["python_module"]["module_name"]
    assert module == "npr_pipelines.definitions"
    __import__(module)
