"""Reliability tooling: the crash-safety driver (``python -m npr_pipelines.reliability.crash``) and the
artifact digests and work-state checks it compares runs with."""
