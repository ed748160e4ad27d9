"""Problem sets: the training problems and the held-out benchmarks (toy splits by default)."""

import hashlib
from dataclasses import asdict

import dagster as dg
import pandas as pd
from dagster import AssetExecutionContext

from npr_pipelines.toy.problems import TEST, TRAIN, generate_problems
from npr_pipelines.toy.profiles import get_profile
from resources import PipelineSettings

#: Benchmarks the pipeline knows (static partitions of ``benchmark_scores``). The toy held-out split is
#: what the embedded default evaluates on.
TOY_BENCHMARK = "toy_test"
BENCHMARKS = dg.StaticPartitionsDefinition([TOY_BENCHMARK])


def frame_version(df: pd.DataFrame) -> str:
    return hashlib.sha256(pd.util.hash_pandas_object(df, index=False).values.tobytes()).hexdigest()[:24]


def _problems_frame(split: str, n: int, seed: int, profile) -> pd.DataFrame:
    problems = generate_problems(split, n, seed=seed, config=profile.bootstrap.problems)
    return pd.DataFrame([asdict(p.to_problem()) for p in problems])


@dg.asset(group_name="data", kinds={"parquet"}, code_version="1")
def train_problems(context: AssetExecutionContext, settings: PipelineSettings) -> dg.Output[pd.DataFrame]:
    """Training problems (id, question, answer, source) of the toy train split."""
    profile = get_profile(settings.profile)
    df = _problems_frame(TRAIN, profile.train_problems, settings.seed, profile)
    return dg.Output(
        df,
        data_version=dg.DataVersion(frame_version(df)),
        metadata={"n_problems": len(df), "preview": dg.MetadataValue.md(df.head(5).to_markdown(index=False))},
    )


@dg.asset(group_name="data", kinds={"parquet"}, code_version="1")
def benchmarks(context: AssetExecutionContext, settings: PipelineSettings) -> dg.Output[pd.DataFrame]:
    """Held-out benchmark problems, one ``benchmark`` column per registered benchmark."""
    profile = get_profile(settings.profile)
    df = _problems_frame(TEST, profile.eval.n_problems, settings.seed, profile)
    df.insert(0, "benchmark", TOY_BENCHMARK)
    return dg.Output(
        df,
        data_version=dg.DataVersion(frame_version(df)),
        metadata={"n_problems": len(df), "benchmarks": dg.MetadataValue.json(sorted(df.benchmark.unique()))},
    )
