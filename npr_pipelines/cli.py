"""``npr``: the command line (``npr run`` is what ``make run`` calls).

The Dagster side (assets, jobs) is imported only inside the commands that need it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
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


def cmd_ui(args: argparse.Namespace) -> int:
    """Dagster's UI (webserver + daemon) and MLflow's, on 127.0.0.1, over the same ``.npr`` state."""
    import subprocess

    home = prepare_home(Path(args.home))
    os.environ["NPR_PROFILE"] = args.profile
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow_cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", args.host, "--port", str(args.mlflow_port),
        "--workers", "1", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
        "--artifacts-destination", str(home / "mlartifacts"),
    ]  # fmt: skip
    dagster_cmd = [
        sys.executable, "-m", "dagster", "dev", "-w", str(Path(__file__).resolve().parents[1] / "workspace.yaml"),
        "-h", args.host, "-p", str(args.dagster_port),
    ]  # fmt: skip
    # SIGTERM must run the cleanup below too (its default action would skip it and orphan the servers).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # A command started in the background by a non-interactive shell (`make ui &` in a script) inherits
    # SIGINT ignored, and so would the servers; `dagster dev` maps SIGTERM onto SIGINT's handler, so it
    # would ignore the terminate below. A handled SIGINT here is reset to the default in the children.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    procs = [subprocess.Popen(mlflow_cmd, env=env, start_new_session=True)]
    print(
        f"MLflow UI: http://{args.host}:{args.mlflow_port}  Dagster UI: http://{args.host}:{args.dagster_port}"
    )
    try:
        procs.append(subprocess.Popen(dagster_cmd, env=env, start_new_session=True))
        return procs[-1].wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                # its own process group (start_new_session): the webserver, daemon and code servers too
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def cmd_serve(args: argparse.Namespace) -> int:
    """``npr serve``: the NPR engine over HTTP (``npr_pipelines.serve``), on 127.0.0.1 by default."""
    from npr_pipelines.serve.cli import serve

    return serve(args)


def build_parser() -> argparse.ArgumentParser:
    """Every ``npr`` command and its arguments (servers default to ``--host 127.0.0.1``)."""
    from npr_pipelines.serve.cli import add_arguments as add_serve_arguments

    parser = argparse.ArgumentParser(prog="npr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="materialize the whole pipeline and write summary.json")
    run.add_argument("--profile", default=os.environ.get("NPR_PROFILE", "default"))
    run.add_argument("--home", default=os.environ.get("NPR_HOME", ".npr"))
    run.set_defaults(func=cmd_run)
    ui = sub.add_parser("ui", help="start the Dagster and MLflow UIs on 127.0.0.1")
    ui.add_argument("--profile", default=os.environ.get("NPR_PROFILE", "default"))
    ui.add_argument("--home", default=os.environ.get("NPR_HOME", ".npr"))
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--dagster-port", type=int, default=3000)
    ui.add_argument("--mlflow-port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)
    serve = sub.add_parser("serve", help="serve a model with the NPR engine over HTTP on 127.0.0.1")
    add_serve_arguments(serve).set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
