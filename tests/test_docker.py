"""The docker files, checked without Docker or network: the compose file validates against the Compose
Specification's JSON schema (vendored in tests/data/, see its README), the Dockerfiles parse under a
strict parser, every pinned version in them comes from a lock file (requirements.lock, or the SGLang
image's docker/sglang.lock), and Dagster's instance config is a valid Postgres setup."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
COMPOSE = DOCKER / "compose.yaml"
#: Each Dockerfile and the lock its pins must come from.
DOCKERFILES = {"worker.Dockerfile": ROOT / "requirements.lock", "sglang.Dockerfile": DOCKER / "sglang.lock"}
#: Base images are pinned by tag (they are not Python packages, so no lock has them).
BASE_IMAGES = {"python:3.11-slim-bookworm"}
#: What compose needs in .env; fake values for the checks.
TEST_ENV = {
    "POSTGRES_PASSWORD": "pw",
    "MINIO_ROOT_USER": "user",
    "MINIO_ROOT_PASSWORD": "password",
    "RAY_AUTH_TOKEN": "token",
}
PIN = re.compile(r"(?<![\w.-])([A-Za-z0-9][A-Za-z0-9_.-]*)(?:\[[^\]]*\])?==([0-9][A-Za-z0-9_.+!-]*)")


# ----------------------------------------------------------------------------------------- Dockerfiles
INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip
EXEC_FORM = {"RUN", "CMD", "ENTRYPOINT", "SHELL", "VOLUME"}
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class DockerfileError(ValueError):
    pass


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str, context: Path | None = None) -> list[Instruction]:
    """A strict Dockerfile parser: known upper-case instructions only, backslash continuations (comment
    lines inside them skipped, as Docker does), no empty instruction, JSON exec forms that are lists of
    strings, well-formed FROM/ARG/ENV, FROM first (after ARGs), COPY/ADD sources present in ``context``."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        if not pending:
            start = n
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        pending.append(line)
        out.append(_instruction(" ".join(p.strip() for p in pending if p.strip()), start))
        pending = []
    if pending:
        raise DockerfileError(f"line {start}: the file ends inside a line continuation")
    _check_order(out)
    if context is not None:
        for ins in out:
            if ins.keyword in ("COPY", "ADD"):
                _check_sources(ins, context)
    return out


def _instruction(joined: str, line: int) -> Instruction:
    keyword, _, args = joined.partition(" ")
    if keyword not in INSTRUCTIONS:
        raise DockerfileError(f"line {line}: unknown instruction {keyword!r}")
    args = args.strip()
    if not args:
        raise DockerfileError(f"line {line}: {keyword} without arguments")
    if keyword in EXEC_FORM and args.startswith("["):
        try:
            form = json.loads(args)
        except ValueError as exc:
            raise DockerfileError(f"line {line}: {keyword} exec form is not JSON: {exc}") from exc
        if not form or not all(isinstance(x, str) and x for x in form):
            raise DockerfileError(f"line {line}: {keyword} exec form must be a non-empty list of strings")
    if keyword == "FROM" and not re.fullmatch(r"\S+(\s+AS\s+[a-z][a-z0-9_-]*)?", args):
        raise DockerfileError(f"line {line}: FROM image [AS name], got {args!r}")
    if keyword in ("ENV", "ARG", "LABEL"):
        for pair in shlex.split(args):
            key, eq, _ = pair.partition("=")
            if (keyword != "ARG" and not eq) or (keyword != "LABEL" and not NAME.match(key)):
                raise DockerfileError(f"line {line}: {keyword} needs NAME=value pairs, got {pair!r}")
    return Instruction(keyword, args, line)


def _check_order(instructions: list[Instruction]) -> None:
    for ins in instructions:
        if ins.keyword == "FROM":
            return
        if ins.keyword != "ARG":
            raise DockerfileError(f"line {ins.line}: {ins.keyword} before the first FROM")
    raise DockerfileError("no FROM instruction")


def _check_sources(ins: Instruction, context: Path) -> None:
    words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
    if len(words) < 2:
        raise DockerfileError(f"line {ins.line}: {ins.keyword} needs a source and a destination")
    for src in words[:-1]:
        if not (context / src).exists():
            raise DockerfileError(
                f"line {ins.line}: {ins.keyword} source {src!r} is not in the build context"
            )


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfiles_parse(name: str) -> None:
    instructions = parse_dockerfile((DOCKER / name).read_text(), context=ROOT)
    keywords = [i.keyword for i in instructions]
    assert keywords.count("FROM") == 1 and "USER" in keywords  # one stage; never runs as root
    froms = [i.args for i in instructions if i.keyword == "FROM"]
    assert set(froms) <= BASE_IMAGES, froms
    for i in instructions:
        if i.keyword == "RUN":
            assert i.args.strip("&\\ ") and "&& &&" not in i.args


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("FROM python:3.11\nRUNN echo\n", "unknown instruction"),
        ("FROM python:3.11\nRUN\n", "without arguments"),
        ("FROM python:3.11\nRUN echo \\\n", "continuation"),
        ('FROM python:3.11\nCMD ["a", 1]\n', "list of strings"),
        ('FROM python:3.11\nCMD ["a",\n', "not JSON"),
        ("RUN echo\nFROM python:3.11\n", "before the first FROM"),
        ("FROM python:3.11\nENV A\n", "NAME=value"),
        ("FROM python:3.11\nCOPY no-such-file /x\n", "not in the build context"),
        ("FROM python:3.11 AS\n", "FROM image"),
        ("# only a comment\n", "no FROM"),
    ],
)
def test_the_dockerfile_parser_is_strict(text: str, why: str) -> None:
    with pytest.raises(DockerfileError, match=why):
        parse_dockerfile(text, context=ROOT)


def test_continuations_and_comments_inside_them() -> None:
    text = 'ARG V=1\nFROM python:3.11-slim-bookworm\n# c\nRUN a \\\n  # skipped\n  && b\nCMD ["x"]\n'
    ins = parse_dockerfile(text)
    assert [(i.keyword, i.args, i.line) for i in ins] == [
        ("ARG", "V=1", 1),
        ("FROM", "python:3.11-slim-bookworm", 2),
        ("RUN", "a && b", 4),
        ("CMD", '["x"]', 7),
    ]


# ----------------------------------------------------------------------------------------- pins
def read_lock(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9_.-]*)==(\S+)", line)
        assert m, f"{path.name}: not a name==version pin: {raw!r}"
        name = canonical(m.group(1))
        assert name not in pins, f"{path.name}: {name} pinned twice"
        pins[name] = m.group(2)
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins_in(text: str) -> Iterator[tuple[str, str]]:
    for m in PIN.finditer(text):
        yield canonical(m.group(1)), m.group(2)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_every_pin_in_a_dockerfile_comes_from_its_lock(name: str) -> None:
    lock_path = DOCKERFILES[name]
    lock = read_lock(lock_path)
    text = (DOCKER / name).read_text()
    for pkg, version in pins_in(text):
        assert lock.get(pkg) == version, f"{name}: {pkg}=={version} but {lock_path.name} has {lock.get(pkg)}"
    runs = [i.args for i in parse_dockerfile(text) if i.keyword == "RUN" and "pip install" in i.args]
    rel = lock_path.name
    # Everything is installed from the lock; a package named without a pin would float.
    installs = [part for run in runs for part in run.split("&&") if "pip install" in part]
    assert any(f"-r {rel}" in part for part in installs), installs
    for part in installs:
        words = shlex.split(part)
        named = [w for w in words[words.index("install") + 1 :] if not w.startswith("-") and "$" not in w]
        named = [w for w in named if w not in (rel, ".", "pip") and not w.startswith(("http", "/"))]
        assert named == [], f"{name}: unpinned packages {named} in {part!r}"


def test_the_worker_installs_torch_at_the_lock_version_from_a_chosen_index() -> None:
    text = (DOCKER / "worker.Dockerfile").read_text()
    assert "grep -E '^torch==' requirements.lock" in text  # the version is read, never written
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert '--index-url "$TORCH_INDEX_URL"' in text and "deepspeed" in read_lock(ROOT / "requirements.lock")


def test_pyproject_pins_match_the_locks() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    main, sglang = read_lock(ROOT / "requirements.lock"), read_lock(DOCKER / "sglang.lock")
    specs = list(project["dependencies"])
    extras = project["optional-dependencies"]
    for extra, deps in extras.items():
        if extra != "sglang":
            specs += deps
    for pkg, version in pins_in("\n".join(specs)):
        assert main.get(pkg) == version, f"pyproject pins {pkg}=={version}, requirements.lock {main.get(pkg)}"
    [(pkg, version)] = list(pins_in("\n".join(extras["sglang"])))
    assert sglang[pkg] == version and "sglang" not in main  # its own image, its own pins
    # Why it needs its own lock: SGLang pins other versions of what we lock.
    assert sglang["torch"] != main["torch"] and sglang["transformers"] != main["transformers"]
    assert project["requires-python"].startswith(">=3.11") and all("3.11" in image for image in BASE_IMAGES)


# ----------------------------------------------------------------------------------------- compose
_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable interpolation over the parsed file: ``$$``, ``$VAR``, ``${VAR}``,
    ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?error}``, ``${VAR?error}``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        have = env.get(name)
        missing = have is None or (op is not None and op.startswith(":") and have == "")
        if op in (":?", "?") and missing:
            raise ValueError(f"required variable {name}: {arg}")
        if op in (":-", "-") and missing:
            return arg
        return have or ""

    return _VAR.sub(sub, value)


def load_compose(env: Mapping[str, str] = TEST_ENV) -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env)


def compose_errors(doc: Any) -> list[str]:
    from jsonschema import Draft202012Validator

    schema = json.loads(SCHEMA.read_text())
    return [
        f"{'/'.join(map(str, e.path))}: {e.message}" for e in Draft202012Validator(schema).iter_errors(doc)
    ]


def test_compose_file_validates_against_the_compose_specification() -> None:
    doc = load_compose()
    assert compose_errors(doc) == []
    broken = load_compose()
    broken["services"]["mlflow"]["imagee"] = "typo"
    broken["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] = [1]
    assert len(compose_errors(broken)) >= 2  # the validator is live: it catches what compose would


def test_compose_needs_its_secrets_and_defaults_the_rest() -> None:
    with pytest.raises(ValueError, match="POSTGRES_PASSWORD"):
        load_compose({k: v for k, v in TEST_ENV.items() if k != "POSTGRES_PASSWORD"})
    example = dict(
        line.split("=", 1)
        for line in (DOCKER / "example.env").read_text().splitlines()
        if re.match(r"^\w+=", line)
    )
    assert set(TEST_ENV) <= set(example)  # every required variable is in the example file
    env = load_compose()["x-npr-env"]
    assert env["AWS_SECRET_ACCESS_KEY"] == "password" and env["NPR_STORAGE_URI"] == "s3://npr-artifacts/npr"


def test_compose_services_are_wired() -> None:
    doc = load_compose()
    services = doc["services"]
    expected = {"postgres", "minio", "buckets", "mlflow", "dagster-webserver", "dagster-daemon", "ray-head"}
    assert expected | {"worker", "sglang"} <= set(services)
    header = COMPOSE.read_text().split("\nname:", 1)[0]
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
        for mount in svc.get("volumes", []):
            src = mount.split(":", 1)[0]
            assert src in doc["volumes"] or (COMPOSE.parent / src).exists(), (name, mount)
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond the host's loopback"
        if "build" in svc:
            assert (ROOT / svc["build"]["dockerfile"]).is_file() and svc["image"].startswith("npr-")
        else:  # a service image outside the locks: pinned by tag and documented in the header
            image = svc["image"]
            repo, _, tag = image.rpartition(":")
            assert repo and re.search(r"\d", tag) and tag != "latest" and image in header, image
    for gpu in ("worker", "sglang"):
        devices = services[gpu]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
    assert services["worker"]["build"]["args"]["TORCH_INDEX_URL"] == "https://pypi.org/simple"  # CUDA torch
    assert "--backend-store-uri" in " ".join(services["mlflow"]["command"])
    assert "postgresql://" in " ".join(services["mlflow"]["command"])
    assert "s3://" in " ".join(services["mlflow"]["command"])
    for pkg, version in pins_in(COMPOSE.read_text()):
        assert read_lock(ROOT / "requirements.lock").get(pkg) == version, (pkg, version)


def test_dagster_instance_config_is_postgres_from_the_environment(monkeypatch, tmp_path) -> None:
    from dagster._config import process_config
    from dagster._core.instance.config import dagster_instance_config
    from dagster_postgres import DagsterPostgresStorage

    for key, value in load_compose()["x-npr-env"].items():
        monkeypatch.setenv(key, value)
    (tmp_path / "dagster.yaml").write_text((DOCKER / "dagster.yaml").read_text())
    config, _ = dagster_instance_config(str(tmp_path))
    storage = process_config(DagsterPostgresStorage.config_type(), config["storage"]["postgres"])
    assert storage.success, storage.errors
    db = storage.value["postgres_db"]
    assert (db["hostname"], db["db_name"], db["password"]) == ("postgres", "dagster", "pw")
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
