"""The ``small`` profile's Dagster code location, loaded by file path by tests that need a workspace
(the backfill daemon and its run launcher): ``dagster dev -f tests/small_definitions.py`` works too."""

from npr_pipelines.definitions import build_definitions

defs = build_definitions("small")
