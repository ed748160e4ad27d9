"""The ``paper`` profile: stage configs carry the paper's values (``spec/method.md`` §2-5), inputs come
from Dagster config or the environment, and a missing input is an error naming its variable."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from assets.configs import profile_prompt, stage_configs
from npr_pipelines.compute.stage_job import config_json, get_driver
from npr_pipelines.profiles import (
    BASE_MODEL,
    BENCHMARK_ROOT,
    PAPER,
    TRAIN_PROBLEMS,
    MissingSettingError,
    PaperProfile,
    get_profile,
    is_real_model,
    profile_names,
    resolve,
)
from npr_pipelines.profiles.paper import PAPER_MODEL, RELEASE_SEED
from npr_pipelines.tokenization import NPR_INSTRUCTION
from resources import PipelineSettings


@pytest.fixture
def no_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    for source in (BASE_MODEL, TRAIN_PROBLEMS, BENCHMARK_ROOT):
        monkeypatch.delenv(source.env, raising=False)


def test_profile_registry() -> None:
    assert get_profile("paper") is PAPER and is_real_model(PAPER) and PAPER.model == PAPER_MODEL
    assert {"default", "small", "paper"} <= set(profile_names())
    assert not is_real_model(get_profile("default"))
    with pytest.raises(KeyError, match=r"unknown toy profile 'huge'.*'paper'"):
        get_profile("huge")


def test_npr_zero_is_dapo_with_the_papers_values() -> None:
    c = stage_configs("paper")["npr_zero"]
    # §2.1-2.2: DAPO, GRPO advantage, clip-higher 0.2/0.28, dual clip 10, token-mean, dynamic sampling
    assert (c.stage, c.loss, c.advantage, c.loss_agg, c.mode) == (
        "npr_zero", "dapo", "grpo", "token-mean", "sequential",
    )  # fmt: skip
    assert (c.clip_ratio_low, c.clip_ratio_high, c.clip_ratio_c) == (0.2, 0.28, 10.0)
    assert c.dynamic_sampling and c.max_gen_batches == 0  # no cap on generation batches
    assert (c.prompts_per_step, c.group_size, c.mini_batches_per_step) == (32, 16, 32)
    assert (c.lr, c.lr_schedule, c.warmup_steps, c.min_lr_ratio) == (1e-6, "cosine", 10, 1e-8)
    assert (c.betas, c.weight_decay, c.grad_clip) == ((0.9, 0.999), 0.1, 1.0)
    assert (c.temperature, c.top_p, c.max_new_tokens) == (1.0, 1.0, 30_000)
    assert (c.overlong_buffer, c.overlong_penalty_factor, c.truncate_multiple) == (10, 1.0, 8)
    assert c.reward == "format_gated_accuracy" and not c.drop_structural_failures  # §2.3
    assert c.steps == 90 and c.save_every == 10  # the release's NPR-Zero checkpoint name (§2.2, a hint)
    assert (c.device, c.dtype) == ("cuda", "bfloat16")


def test_rejection_sampling_and_sft_have_the_papers_values() -> None:
    configs = stage_configs("paper")
    r = configs["rejection"]
    assert (r.max_tries, r.temperature, r.top_p, r.max_new_tokens, r.batch_size) == (
        8,
        1.0,
        1.0,
        32_768,
        1024,
    )
    assert configs["rejection_problems"] == 65_536  # --max_problems 65536: all of ORZ-57k
    for name, layout in (("npr_beta", "parallel"), ("sr_beta", "sequential")):
        s = configs[name]
        assert s.layout == layout and s.sequential_share == 0.0 and s.plan_balance == 0.0
        assert (s.lr, s.warmup_ratio, s.min_lr_ratio) == (1e-6, 0.05, 0.0)
        assert (s.betas, s.weight_decay, s.grad_clip) == ((0.9, 0.95), 0.1, 1.0)
        assert (s.batch_size, s.micro_batch_size, s.epochs, s.max_length) == (8, 1, 1, 32_768)
        assert not s.shuffle and s.save_every == 1000 and s.max_steps is None and s.device == "cuda"
    assert configs["npr_beta"].seed == configs["rejection"].seed == RELEASE_SEED == 521


def test_papo_and_sr_have_the_papers_values() -> None:
    configs = stage_configs("paper")
    p = configs["npr"]
    assert (p.stage, p.loss, p.advantage, p.reward, p.mode) == (
        "papo",
        "papo",
        "papo",
        "accuracy",
        "parallel",
    )
    assert (p.prompts_per_step, p.group_size, p.mini_batches_per_step) == (16, 16, 16)
    assert (p.lr, p.lr_schedule, p.warmup_steps) == (1e-7, "constant", 0)
    assert (p.betas, p.weight_decay, p.grad_clip) == ((0.9, 0.999), 0.1, 1.0)
    assert (p.temperature, p.top_p, p.max_new_tokens, p.max_total_tokens) == (1.0, 1.0, 30_000, 30_000)
    assert p.branch_repetition_penalty == 1.02 and p.drop_structural_failures and not p.dynamic_sampling
    assert p.overlong_buffer == 0 and p.truncate_multiple == 8 and p.steps == 30 and p.save_every == 5
    sr = configs["sr"]
    assert (sr.stage, sr.mode, sr.branch_repetition_penalty) == ("sr", "sequential", None)
    same = {f.name for f in dataclasses.fields(p)} - {"stage", "mode", "branch_repetition_penalty",
                                                      "max_total_tokens"}  # fmt: skip
    assert all(getattr(sr, f) == getattr(p, f) for f in same)


def test_prompts_use_the_npr_instruction_with_the_releases_separators() -> None:
    configs = stage_configs("paper")
    assert configs["npr_zero"].prompt.instruction == NPR_INSTRUCTION
    assert configs["npr_zero"].prompt.separator == "\n"  # stage 1: question + "\n" + instruction
    for name in ("rejection", "npr_beta", "sr_beta", "npr", "sr"):
        assert (
            configs[name].prompt.instruction == NPR_INSTRUCTION and configs[name].prompt.separator == "\n\n"
        )
    assert profile_prompt(PAPER) == configs["npr"].prompt


def test_seeds() -> None:
    configs = stage_configs("paper", seed=3)
    assert configs["npr_zero"].seed == configs["npr"].seed == configs["sr"].seed == 3
    assert configs["npr_beta"].seed == configs["sr_beta"].seed == configs["rejection"].seed == 524


def test_eval_settings_and_compute() -> None:
    ev = PAPER.eval
    assert (ev.n_samples, ev.temperature, ev.top_p, ev.max_new_tokens, ev.seed) == (8, 1.0, 0.7, 30_000, 0)
    compute = PAPER.compute
    assert {s.gpus for s in compute.values()} == {8}
    for stage in ("npr_zero", "npr", "sr"):  # FSDP with parameter + optimizer offload
        ds = compute[stage].deepspeed
        assert ds is not None and (ds.zero_stage, ds.offload_optimizer, ds.offload_params, ds.bf16) == (
            3, True, True, True,
        )  # fmt: skip
    ds = compute["npr_beta"].deepspeed
    assert ds is not None and (ds.zero_stage, ds.offload_optimizer, ds.offload_params) == (3, False, False)
    assert (compute["npr"].engine_tp, compute["npr"].engine_replicas) == (4, 2)
    assert (compute["eval"].engine_tp, compute["eval"].engine_replicas) == (2, 4)


def test_configs_round_trip_through_the_stage_job() -> None:
    """A cluster stage job rebuilds each config from its JSON; the paper's must survive that."""
    configs = stage_configs("paper")
    for stage, driver in (("npr_zero", "npr_zero"), ("npr", "papo"), ("sr", "sr"), ("npr_beta", "sft")):
        assert get_driver(driver).make_config(config_json(configs[stage])) == configs[stage]


def test_configs_do_not_depend_on_where_inputs_live(monkeypatch: pytest.MonkeyPatch) -> None:
    before = json.dumps({k: config_json(v) if dataclasses.is_dataclass(v) else v
                         for k, v in stage_configs("paper").items()})  # fmt: skip
    monkeypatch.setenv(BASE_MODEL.env, "s3://models/qwen3-4b")
    after = json.dumps({k: config_json(v) if dataclasses.is_dataclass(v) else v
                        for k, v in stage_configs("paper").items()})  # fmt: skip
    assert before == after and isinstance(get_profile("paper"), PaperProfile)


# -- inputs -----------------------------------------------------------------------------------------


def test_resolve_accepts_local_and_s3_uris(tmp_path: Path) -> None:
    env = {BASE_MODEL.env: "s3://models/Qwen3-4B-Instruct-2507"}
    assert resolve(BASE_MODEL, environ=env) == "s3://models/Qwen3-4B-Instruct-2507"
    assert resolve(BASE_MODEL, str(tmp_path), environ=env) == str(tmp_path)  # config beats the environment
    assert resolve(BASE_MODEL, f"file://{tmp_path}", environ={}) == f"file://{tmp_path}"
    assert resolve(TRAIN_PROBLEMS, "s3a://data/orz.jsonl", environ={}) == "s3a://data/orz.jsonl"


@pytest.mark.parametrize("source", [BASE_MODEL, TRAIN_PROBLEMS, BENCHMARK_ROOT])
def test_a_missing_input_names_its_variable(source) -> None:
    with pytest.raises(MissingSettingError) as info:
        resolve(source, "", environ={source.env: "  "})
    assert source.env in str(info.value) and f"PipelineSettings.{source.field}" in str(info.value)


def test_unsupported_schemes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"NPR_BASE_MODEL_URI='hf://Qwen/x': unsupported scheme 'hf'"):
        resolve(BASE_MODEL, "hf://Qwen/x", environ={})
    with pytest.raises(ValueError, match="names no bucket"):
        resolve(BASE_MODEL, "s3://", environ={})


def test_base_model_asset_without_a_model_uri_names_the_variable(tmp_path: Path, no_sources) -> None:
    from assets.base import base_model
    from resources import MlflowResource, RayResource, StorageResource

    with pytest.raises(MissingSettingError, match="NPR_BASE_MODEL_URI is not set"):
        base_model(
            dg.build_asset_context(),
            settings=PipelineSettings(profile="paper", home=str(tmp_path)),
            storage=StorageResource(base_uri=str(tmp_path / "artifacts")),
            mlflow=MlflowResource(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", ui_url=""),
            ray=RayResource(num_cpus=1),
        )


def test_train_problems_asset_reads_the_file(tmp_path: Path, no_sources, monkeypatch) -> None:
    from assets.data import train_problems

    with pytest.raises(MissingSettingError, match="NPR_TRAIN_PROBLEMS is not set"):
        train_problems(dg.build_asset_context(), PipelineSettings(profile="paper", home=str(tmp_path)))
    path = tmp_path / "orz.jsonl"
    rows = [{"id": f"orz-{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv(TRAIN_PROBLEMS.env, str(path))
    out = train_problems(dg.build_asset_context(), PipelineSettings(profile="paper", home=str(tmp_path)))
    df: pd.DataFrame = out.value
    assert list(df.columns) == ["id", "question", "answer", "source"] and list(df.id) == [
        "orz-0",
        "orz-1",
        "orz-2",
    ]
    assert out.metadata["source_uri"].value == str(path)


def test_benchmarks_asset_reads_only_the_files(tmp_path: Path, no_sources) -> None:
    from assets.data import benchmarks

    with pytest.raises(MissingSettingError, match="NPR_BENCHMARK_DIR is not set"):
        benchmarks(dg.build_asset_context(), PipelineSettings(profile="paper", home=str(tmp_path)))
    root = tmp_path / "bench"
    root.mkdir()
    with pytest.raises(FileNotFoundError, match="no benchmark file under"):
        benchmarks(dg.build_asset_context(), PipelineSettings(profile="paper", benchmark_root=str(root)))
    (root / "aime25.json").write_text(json.dumps([{"id": 1, "problem": "Find x.", "answer": "7"}]))
    out = benchmarks(dg.build_asset_context(), PipelineSettings(profile="paper", benchmark_root=str(root)))
    assert out.value.benchmark.tolist() == ["aime25"]  # no toy splits under a real-model profile
    assert "math500" in out.metadata["not_found"].value


def test_checkpoint_sensor_evaluates_the_file_benchmarks_on_the_shared_store(
    tmp_path: Path, monkeypatch
) -> None:
    from assets.automation import checkpoint_sensor, profile_benchmarks
    from npr_pipelines.eval.benchmarks import REGISTRY
    from npr_pipelines.storage import Storage
    from npr_pipelines.storage.checkpoints import checkpoint_ref, record_checkpoint

    monkeypatch.setenv("NPR_PROFILE", "paper")
    monkeypatch.setenv("NPR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NPR_STORAGE_URI", str(tmp_path / "shared"))
    assert (
        set(profile_benchmarks()) == {n for n, spec in REGISTRY.items() if spec.file}
        and "aime25" in profile_benchmarks()
    )
    ref = checkpoint_ref(stage="base", step=0, uri="/x/base", data_version="v", run_id=None)
    record_checkpoint(Storage(str(tmp_path / "shared")), ref)
    result = checkpoint_sensor(dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral()))
    benches = {r.partition_key.keys_by_dimension["benchmark"] for r in result.run_requests}
    assert benches == set(profile_benchmarks()) and "toy_test" not in benches
