"""Hostile and broken inputs (#11 item 2): each kind fails with an error that names the file, the row or
the field, and leaves everything that was there before as it was (nothing half written, nothing lost).

Kinds: problem rows (missing/empty answer, wrong types, duplicate ids, a repeated key, enormous fields,
a truncated JSONL line, a non-finite answer, a parquet column of the wrong type), benchmark files of the
wrong shape (also through the ``benchmarks`` asset), a corrupt published checkpoint, a truncated
checkpoint (weights and optimizer state), a checkpoint whose weights are pickles, a tokenizer without
a chat template, unreachable or unsupported storage URIs, invalid config values. Deeper per-module
cases live beside each module (``test_problems.py``, ``test_storage.py``, ``test_serve.py``, ...).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _support import byte_bpe_tokenizer, free_port

from npr_pipelines.data import Problem, ProblemDataError, load_problems, save_problems
from npr_pipelines.data.problems import MAX_ANSWER_CHARS, MAX_ID_CHARS, MAX_QUESTION_CHARS
from npr_pipelines.engine.testing import tiny_qwen3
from npr_pipelines.storage import ArtifactError, Storage, StorageUnreachable
from npr_pipelines.storage.weights import check_weights_dir

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD = {"question": "What is 6*7?", "answer": "42"}


def tree(root: Path) -> dict[str, str]:
    """Every file (content digest) and directory under ``root``: the 'nothing written or lost' probe."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


# -- problem rows ------------------------------------------------------------------------------------


def _json(rows: list) -> str:
    return json.dumps(rows)


def _jsonl(rows: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# (file name, content, expected (row, field) errors, a phrase of the first error's reason)
ROW_CASES = {
    "missing_answer": ("p.json", _json([GOOD, {"question": "q"}]), [(1, "answer")], "missing"),
    "empty_answer": ("p.jsonl", _jsonl([GOOD, GOOD | {"answer": "  "}]), [(1, "answer")], "empty"),
    "answer_wrong_type": ("p.json", _json([GOOD | {"answer": {"value": 4}}]), [(0, "answer")], "got dict"),
    "question_wrong_type": ("p.json", _json([GOOD, GOOD | {"question": 12}]), [(1, "question")], "string"),
    "duplicate_ids": (
        "p.jsonl",
        _jsonl([GOOD | {"id": "a"}, GOOD | {"id": "b"}, GOOD | {"id": "a"}]),
        [(2, "id")],
        "duplicate id 'a' (first at row 0)",
    ),
    "repeated_key": (
        "p.json",
        '[{"question": "q", "answer": "1", "answer": "2"}]',
        [(0, "answer")],
        "more than once",
    ),
    "enormous_question": (
        "p.jsonl",
        _jsonl([GOOD, GOOD | {"question": "x" * (MAX_QUESTION_CHARS + 1)}]),
        [(1, "question")],
        "more than the limit",
    ),
    "enormous_answer_and_id": (
        "p.json",
        _json([GOOD | {"answer": "9" * (MAX_ANSWER_CHARS + 1), "id": "i" * (MAX_ID_CHARS + 1)}]),
        [(0, "answer"), (0, "id")],
        "more than the limit",
    ),
    "truncated_jsonl": ("p.jsonl", _jsonl([GOOD, GOOD])[:-9], [(1, "<line>")], "not valid JSON"),
    "non_finite_answer": ("p.json", '[{"question": "q", "answer": NaN}]', [(0, "answer")], "finite"),
}


@pytest.mark.parametrize("kind", sorted(ROW_CASES))
def test_bad_problem_rows_are_named_and_nothing_is_overwritten(tmp_path: Path, kind: str) -> None:
    name, content, expected, phrase = ROW_CASES[kind]
    bad = tmp_path / "in" / name
    bad.parent.mkdir()
    bad.write_text(content)
    out = tmp_path / "out" / "problems.jsonl"  # what an earlier, good import left
    save_problems([Problem("0", "q", "1", "old")], str(out))
    before = tree(tmp_path)

    with pytest.raises(ProblemDataError) as info:
        save_problems(load_problems(str(bad)), str(out))

    err = info.value
    assert [(e.row, e.field) for e in err.errors] == expected
    assert phrase in err.errors[0].message
    message = str(err)
    assert message.startswith(f"{bad}: ")
    for row, field in expected:
        assert f"row {row}" in message and f"field '{field}'" in message
    assert len(message) < 2000  # an enormous field is described, never echoed
    assert tree(tmp_path) == before


def test_parquet_column_of_the_wrong_type_names_each_row(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"question": ["a", "b"], "answer": [[1], [2, 3]]}), path)
    before = tree(tmp_path)
    with pytest.raises(ProblemDataError, match=r"row 0, field 'answer': must be a string or a number"):
        load_problems(str(path))
    assert tree(tmp_path) == before


# -- benchmark files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file", "content", "match"),
    [
        ("aime25.json", json.dumps({"problems": [GOOD]}), "expected a JSON list of objects, got dict"),
        # GPQA's own column names instead of the question/answer fields the loader reads
        (
            "gpqa_diamond.jsonl",
            _jsonl([{"Question": "Which?", "Correct Answer": "B"}]),
            r"row 0 \(line 1\), field 'question': missing",
        ),
        ("math500.json", "\x00\x01 binary junk", "not valid JSON"),
    ],
)
def test_benchmark_file_of_the_wrong_shape(tmp_path: Path, file: str, content: str, match: str) -> None:
    from npr_pipelines.eval.benchmarks import load_benchmark

    (tmp_path / file).write_text(content)
    with pytest.raises(ProblemDataError, match=match) as info:
        load_benchmark(file.split(".")[0], root=str(tmp_path))
    assert str(tmp_path / file) in str(info.value)


def test_benchmarks_asset_fails_naming_the_file_and_keeps_the_stored_value(
    tmp_path: Path, monkeypatch
) -> None:
    import dagster as dg

    from assets.data import benchmarks
    from assets.io_manager import NprIOManager
    from resources import PipelineSettings

    monkeypatch.setenv("NPR_HOME", str(tmp_path / "home"))
    store = tmp_path / "artifacts"
    root = tmp_path / "bench"
    root.mkdir()

    def materialize(benchmark_root: str) -> dg.ExecuteInProcessResult:
        settings = PipelineSettings(profile="small", benchmark_root=benchmark_root)
        resources = {"settings": settings, "io_manager": NprIOManager(base_uri=str(store))}
        return dg.materialize([benchmarks], resources=resources, raise_on_error=False)

    assert materialize(str(root)).success  # no files under the root yet: the toy splits only
    stored = store / "io" / "benchmarks.parquet"
    before = tree(store)
    assert stored.is_file()

    (root / "amc23.json").write_text(json.dumps([GOOD, {"question": "no answer"}]))
    result = materialize(str(root))
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.cause.message  # the asset's own error, under Dagster's
    assert str(root / "amc23.json") in message and "row 1, field 'answer': missing" in message
    assert tree(store) == before  # the last good value is still what downstream reads


# -- checkpoints -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3 with its tokenizer, saved the way every checkpoint is (safetensors)."""
    path = tmp_path_factory.mktemp("tiny-model")
    tok = byte_bpe_tokenizer()
    tiny_qwen3(len(tok), layers=1, hidden=16).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def copy_dir(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_published_checkpoint_is_refused_and_nothing_is_fetched(
    model_dir: Path, tmp_path: Path
) -> None:
    storage = Storage(str(tmp_path / "artifacts"))
    uri = storage.uri("checkpoints", "npr", "step-000010")
    storage.publish_dir(model_dir, uri)
    weights = Path(uri) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped bit pattern in the last tensor
    weights.write_bytes(bytes(data))
    (tmp_path / "local").mkdir()
    before = tree(tmp_path)

    with pytest.raises(ArtifactError, match=r"model\.safetensors: sha256 mismatch") as info:
        storage.fetch_dir(uri, tmp_path / "local" / "npr")
    assert info.value.file == "model.safetensors" and uri in str(info.value)
    assert tree(tmp_path) == before  # no partial download, no staging directory
    with pytest.raises(ArtifactError, match=r"model\.safetensors"):
        check_weights_dir(uri)  # the copy on disk carries its manifest: checked before loading


@pytest.mark.parametrize("load", ["serve", "resume"])
def test_truncated_weights_are_named(model_dir: Path, tmp_path: Path, load: str) -> None:
    from npr_pipelines.serve import load_engine
    from npr_pipelines.training.checkpoint import weights_digest
    from npr_pipelines.training.strategy import OptimizerConfig, TorchStrategy

    ckpt = copy_dir(model_dir, tmp_path / "step-000004")
    truncate(ckpt / "model.safetensors")
    before = tree(tmp_path)
    if load == "serve":
        with pytest.raises(ArtifactError, match="truncated or corrupt") as info:
            load_engine(ckpt)
    else:
        strategy = TorchStrategy()
        model = tiny_qwen3(300, layers=1, hidden=16, seed=5)
        strategy.setup(model, OptimizerConfig())
        digest = weights_digest(model)
        with pytest.raises(ArtifactError, match="truncated or corrupt") as info:
            strategy.load(ckpt, weights_only=True)
        assert weights_digest(model) == digest  # the model in memory is untouched
    assert str(ckpt / "model.safetensors") in str(info.value)
    assert tree(tmp_path) == before


def test_truncated_optimizer_state_is_named(tmp_path: Path) -> None:
    from npr_pipelines.training.checkpoint import load_optimizer_state, save_checkpoint

    model = tiny_qwen3(64, layers=1, hidden=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    ckpt = save_checkpoint(tmp_path, 1, model, None, opt, data_cursor=1, config={})
    truncate(ckpt / "optimizer.safetensors")
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.raises(ArtifactError, match=r"optimizer\.safetensors: not a readable safetensors file"):
        load_optimizer_state(ckpt, fresh)
    assert fresh.state_dict()["state"] == {}  # nothing half restored


class _Payload:
    """Unpickling this creates ``marker``: proof that a pickle was (not) executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable, tuple]:
        return Path.touch, (self.marker,)


def test_pickled_weights_are_refused_without_being_read(model_dir: Path, tmp_path: Path) -> None:
    from npr_pipelines.serve import load_engine

    ckpt = copy_dir(model_dir, tmp_path / "pickled")
    (ckpt / "model.safetensors").unlink()
    marker = tmp_path / "UNPICKLED"
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps({"lm_head.weight": _Payload(marker)}))
    pickle.loads((ckpt / "pytorch_model.bin").read_bytes())  # the payload is live ...
    assert marker.exists()
    marker.unlink()
    before = tree(tmp_path)

    with pytest.raises(
        ArtifactError, match=r"weights only as pickles \(pytorch_model.bin\); refused"
    ) as info:
        load_engine(ckpt)
    assert str(ckpt) in str(info.value)
    assert not marker.exists()  # ... and was never unpickled
    assert tree(tmp_path) == before


# -- tokenizer ---------------------------------------------------------------------------------------


def test_tokenizer_without_chat_template_names_the_directory(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from npr_pipelines.tokenization import TokenizerError, prompt_ids

    tok = byte_bpe_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    before = tree(tmp_path)
    with pytest.raises(TokenizerError, match="has no chat template") as info:
        prompt_ids(loaded, "What is 6*7?")
    assert str(tmp_path / "tok") in str(info.value)
    assert tree(tmp_path) == before


# -- storage -----------------------------------------------------------------------------------------


@pytest.fixture
def dead_endpoint(monkeypatch: pytest.MonkeyPatch) -> str:
    """An S3 endpoint URL on 127.0.0.1 where nothing listens (fake credentials, no metadata lookups)."""
    port = free_port()
    for var, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(var, value)
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    return f"http://127.0.0.1:{port}"


def fail_fast(endpoint: str) -> dict:
    """One attempt per call (botocore's default retries would take ~10 s to give up)."""
    return {
        "client_kwargs": {"endpoint_url": endpoint},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2},
    }


def test_unreachable_storage_is_named_and_never_mistaken_for_absence(
    dead_endpoint: str, model_dir: Path, tmp_path: Path
) -> None:
    storage = Storage("s3://npr-bucket/base", fail_fast(dead_endpoint))
    before = tree(model_dir)
    calls = {
        "s3://npr-bucket/base/checkpoints/base": lambda: storage.is_published("checkpoints/base"),
        "s3://npr-bucket/base/checkpoints/new": lambda: storage.publish_dir(model_dir, "checkpoints/new"),
        "s3://npr-bucket/base/index/base.json": lambda: storage.read_json("index/base.json"),
        "s3://npr-bucket/base/x": lambda: storage.fetch_dir("x", tmp_path / "fetched"),
    }
    for uri, call in calls.items():
        with pytest.raises(StorageUnreachable, match="storage unreachable") as info:
            call()
        assert info.value.uri == uri and str(info.value).startswith(uri), str(info.value)
        assert "127.0.0.1" in str(info.value)  # the endpoint it tried
    assert tree(model_dir) == before and not (tmp_path / "fetched").exists()

    with pytest.raises(ProblemDataError, match=r"s3://npr-bucket/train\.jsonl: cannot read"):
        load_problems("s3://npr-bucket/train.jsonl", storage_options=fail_fast(dead_endpoint))


@pytest.mark.parametrize("uri", ["gs://bucket/artifacts", "nosuchscheme://bucket/artifacts"])
def test_unsupported_storage_uri_is_named(uri: str) -> None:
    with pytest.raises(ValueError, match=f"{uri}: unsupported storage URI"):
        Storage(uri)


# -- config values -----------------------------------------------------------------------------------


def _rl(**kw):
    from npr_pipelines.training.rl import RLConfig

    return RLConfig(**kw)


def _sft(**kw):
    from npr_pipelines.training.sft import SFTConfig

    return SFTConfig(**kw)


def _rejection(**kw):
    from npr_pipelines.training.distill import RejectionConfig

    return RejectionConfig(**kw)


def _sampling(**kw):
    from npr_pipelines.engine import SamplingParams

    return SamplingParams(**kw)


def _profile(name: str):
    from assets.configs import stage_configs

    return stage_configs(name)


def _settings(**kw):
    from resources import PipelineSettings

    return PipelineSettings(**kw)


def _benchmark(**kw):
    from npr_pipelines.eval.benchmarks import BenchmarkSpec

    return BenchmarkSpec(**{"name": "x", "title": "X", "file": "x.json", "answer_type": "math", **kw})


CONFIG_CASES = {
    "rl_mode": (lambda: _rl(mode="beam"), ValueError, r"mode must be .* got 'beam'"),
    "rl_loss": (lambda: _rl(loss="ppo2"), ValueError, r"unknown policy loss 'ppo2'; valid names"),
    "rl_schedule": (lambda: _rl(lr_schedule="linear"), ValueError, r"lr_schedule .* got 'linear'"),
    "rl_group_size": (lambda: _rl(group_size=0), ValueError, r"group_size"),
    "sft_layout": (lambda: _sft(layout="diagonal"), ValueError, r"layout .* got 'diagonal'"),
    "sft_share": (lambda: _sft(sequential_share=1.5), ValueError, r"sequential_share"),
    "rejection_tries": (lambda: _rejection(max_tries=0), ValueError, r"max_tries"),
    "sampling_top_p": (lambda: _sampling(top_p=0.0), ValueError, r"top_p"),
    "profile": (lambda: _profile("huge"), KeyError, r"unknown toy profile 'huge'"),
    "settings_seed": (lambda: _settings(seed="abc"), ValueError, r"PipelineSettings\nseed\n .*valid integer"),
    "benchmark_answer_type": (lambda: _benchmark(answer_type="essay"), ValueError, r"'x': answer_type"),
}


@pytest.mark.parametrize("kind", sorted(CONFIG_CASES))
def test_invalid_config_value_names_the_field(kind: str) -> None:
    make, error, match = CONFIG_CASES[kind]
    with pytest.raises(error, match=match):
        make()
