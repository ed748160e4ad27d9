"""``python -m npr_pipelines.serve --model-path DIR``."""

from npr_pipelines.serve.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
