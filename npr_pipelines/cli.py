"""``npr``: the command line (``npr run`` is what ``make run`` calls).

The Dagster side (assets, jobs) is imported only inside the commands that need it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DAGSTER_YAML = """\
telemetry:
  enabled: false
concurrency:
  pools:
    default_limit: 1
"""


def prepare_home(home: Path) -> Path:
    """Create ``home`` and a persistent ``DAGSTER_HOME`` under it; export both for child processes."""
    home = home.resolve()
    dagster_home = home / "dagster"
    dagster_home.mkdir(parents=True, exist_ok=True)
    cfg = dagster_home / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text(DAGSTER_YAML)
    os.environ["NPR_HOME"] = str(home)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    return home


def cmd_run(args: argparse.Namespace) -> int:
    home = prepare_home(Path(args.home))
    os.environ["NPR_PROFILE"] = args.profile
    import dagster as dg

    from assets.jobs import run_main
    from npr_pipelines.definitions import build_definitions

    defs = build_definitions(args.profile)
    with dg.DagsterInstance.get() as instance:
        summary = run_main(defs, instance, home)
    print(json.dumps(summary, indent=2))
    print(f"wrote {home / 'summary.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="npr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="materialize the whole pipeline and write summary.json")
    run.add_argument("--profile", default=os.environ.get("NPR_PROFILE", "default"))
    run.add_argument("--home", default=os.environ.get("NPR_HOME", ".npr"))
    run.set_defaults(func=cmd_run)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
