"""Problem sets: the training problems and the held-out benchmarks (toy splits by default; under a
real-model profile, the training file and the benchmark files named by ``PipelineSettings`` or the
environment, ``npr_pipelines.profiles.sources``)."""

import hashlib
from dataclasses import asdict

import dagster as dg
import pandas as pd
from dagster import AssetExecutionContext

from npr_pipelines.data import load_problems
from npr_pipelines.eval.benchmarks import REGISTRY, benchmark_uri, load_benchmark
from npr_pipelines.profiles import BENCHMARK_ROOT, TRAIN_PROBLEMS, PaperProfile, get_profile, resolve
from npr_pipelines.toy.problems import DEV, TEST, TRAIN, generate_problems
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
    """Training problems (id, question, answer, source): the toy train split, or under a real-model
    profile the file at ``train_problems_uri`` / ``NPR_TRAIN_PROBLEMS`` (JSON, JSONL or parquet)."""
    profile = get_profile(settings.profile)
    metadata = {}
    if isinstance(profile, PaperProfile):
        uri = resolve(TRAIN_PROBLEMS, settings.train_problems_uri)
        problems = load_problems(uri)[: profile.train_problems]
        df = pd.DataFrame([asdict(p) for p in problems], columns=["id", "question", "answer", "source"])
        metadata["source_uri"] = dg.MetadataValue.path(uri)
    else:
        df = _problems_frame(TRAIN, profile.train_problems, settings.seed, profile)
    return dg.Output(
        df,
        data_version=dg.DataVersion(frame_version(df)),
        metadata={
            "n_problems": len(df),
            "preview": dg.MetadataValue.md(df.head(5).to_markdown(index=False)),
            **metadata,
        },
    )


@dg.asset(group_name="data", kinds={"parquet"}, code_version="1")
def benchmarks(context: AssetExecutionContext, settings: PipelineSettings) -> dg.Output[pd.DataFrame]:
    """Held-out problems with a ``benchmark`` column: the toy held-out splits, plus every registered
    benchmark whose file exists under ``settings.benchmark_root`` (local directory or ``s3://``). A
    real-model profile has no toy splits and needs the root (``NPR_BENCHMARK_DIR``) and at least one
    benchmark file under it."""
    profile = get_profile(settings.profile)
    real = isinstance(profile, PaperProfile)
    root = resolve(BENCHMARK_ROOT, settings.benchmark_root) if real else settings.benchmark_root
    frames = [] if real else [
        _problems_frame(split, profile.eval.n_problems, settings.seed, profile).assign(benchmark=name)
        for name, split in TOY_SPLITS.items()
    ]  # fmt: skip
    missing = []
    if root:
        import fsspec

        for name, spec in sorted(REGISTRY.items()):
            if spec.file is None:
                continue
            uri = benchmark_uri(name, root)
            fs, path = fsspec.core.url_to_fs(uri)
            if not fs.exists(path):
                missing.append(name)
                continue
            problems = load_benchmark(name, uri=uri)
            frames.append(pd.DataFrame([asdict(p) for p in problems]).assign(benchmark=name))
    if not frames:
        raise FileNotFoundError(
            f"no benchmark file under {root} ({BENCHMARK_ROOT.env}); expected some of "
            f"{sorted(REGISTRY[n].file for n in missing)}"
        )
    if real and missing:
        context.log.warning(f"benchmarks without a file under {root}: {missing}")
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
