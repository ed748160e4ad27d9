"""Problem sets: the training problems and the held-out benchmarks (toy splits by default)."""

import hashlib
from dataclasses import asdict

import dagster as dg
import pandas as pd
from dagster import AssetExecutionContext

from npr_pipelines.eval.benchmarks import REGISTRY, benchmark_uri, load_benchmark
from npr_pipelines.toy.problems import DEV, TEST, TRAIN, generate_problems
from npr_pipelines.toy.profiles import get_profile
from resources import PipelineSettings

#: Every registered benchmark is a static partition of ``benchmark_scores``; the toy held-out test split
#: is what the embedded default evaluates on.
TOY_BENCHMARK = "toy_test"
#: The built-in benchmarks: the toy world's held-out splits (disjoint from train and from each other).
TOY_SPLITS = {TOY_BENCHMARK: TEST, "toy_dev": DEV}
BENCHMARKS = dg.StaticPartitionsDefinition(sorted(REGISTRY))


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
    """Held-out problems with a ``benchmark`` column: the toy held-out splits, plus every registered
    benchmark whose file exists under ``settings.benchmark_root`` (local directory or ``s3://``)."""
    profile = get_profile(settings.profile)
    frames = [
        _problems_frame(split, profile.eval.n_problems, settings.seed, profile).assign(benchmark=name)
        for name, split in TOY_SPLITS.items()
    ]
    missing = []
    if settings.benchmark_root:
        import fsspec

        for name, spec in sorted(REGISTRY.items()):
            if spec.file is None:
                continue
            uri = benchmark_uri(name, settings.benchmark_root)
            fs, path = fsspec.core.url_to_fs(uri)
            if not fs.exists(path):
                missing.append(name)
                continue
            problems = load_benchmark(name, uri=uri)
            frames.append(pd.DataFrame([asdict(p) for p in problems]).assign(benchmark=name))
    df = pd.concat(frames, ignore_index=True)[["benchmark", "id", "question", "answer", "source"]]
    counts = df.benchmark.value_counts().to_dict()
    return dg.Output(
        df,
        data_version=dg.DataVersion(frame_version(df)),
        metadata={
            "n_problems": len(df),
            "benchmarks": dg.MetadataValue.json(counts),
            "not_found": dg.MetadataValue.json(missing),
        },
    )
