"""PAPO's accuracy gain on the toy world, against a matched SFT control (issue #7's RL acceptance).

From one NPR-Beta checkpoint (by default the one the last ``make run`` published):

1. PAPO for ``papo_steps`` with the profile's settings; the checkpoint compared is the FINAL one,
   fixed in advance (no picking the best of several).
2. The matched control: NPR-Beta trained further by SFT on its own corpus for PAPO's wall time
   (constant lr = the SFT stage's final lr), so that a gain can be attributed to RL, not to more
   training.
3. NPR-Beta, NPR and the control evaluated with the profile's protocol (T, top-p, budget) on a
   held-out split, ``n_samples`` per problem, one fixed seed; gains with paired-bootstrap 95% intervals
   over problems.

``python -m npr_pipelines.training.papo_study`` writes ``.npr/reports/papo_study.json`` (about 40 min on
2 CPU cores with the defaults: 128 PAPO steps of 64 prompts x 8 rollouts, the control, three evaluations).
The ``make run`` PAPO stage uses the same settings with fewer steps, to fit its time budget.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from npr_pipelines.data import Problem
from npr_pipelines.eval.runner import EvalConfig, SampleRecord, evaluate_problems, summarize
from npr_pipelines.storage import Storage, write_json_report
from npr_pipelines.storage.checkpoints import INDEX_PREFIX, read_checkpoint
from npr_pipelines.training.rl import RLConfig, run_papo
from npr_pipelines.training.rl_stats import paired_bootstrap, paired_means
from npr_pipelines.training.sft import SFTConfig, run_sft

#: The evaluation seed, fixed so that every checkpoint is decoded with the same per-sample seeds.
EVAL_SEED = 1234


@dataclasses.dataclass(frozen=True)
class PAPOStudyConfig:
    """What the study runs (also what its report records)."""

    profile: str = "default"
    papo_steps: int = 128
    n_samples: int = 4
    eval_split: str = "test"
    eval_problems: int = 300
    control: bool = True
    bootstrap_resamples: int = 10_000
    seed: int = 0
    num_threads: int = 2


def evaluate_checkpoint(
    path: str | os.PathLike, problems: Sequence[Problem], config: EvalConfig, prompt, num_threads: int
) -> tuple[list[SampleRecord], dict[str, Any]]:
    """``(records, summary)`` of a saved checkpoint decoded with ``config`` on ``num_threads`` threads."""
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    old = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        with torch.no_grad():
            records, wall = evaluate_problems(model, tok, list(problems), config, prompt)
    finally:
        torch.set_num_threads(old)
    return records, {**summarize(records), "wall_s": round(wall, 1)}


class _OutOfTime(Exception):
    pass


def continue_sft_for(
    beta_dir: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    config: SFTConfig,
    workdir: str | os.PathLike,
    seconds: float,
) -> tuple[Path, int]:
    """The matched control: ``beta_dir`` trained further by SFT on ``rows`` (constant lr = the stage's
    final lr, a new data order) for ``seconds`` of wall time; ``(last checkpoint, its step)``."""
    cfg = dataclasses.replace(
        config,
        lr=config.lr * config.min_lr_ratio,
        warmup_ratio=0.0,
        min_lr_ratio=1.0,
        max_steps=None,
        epochs=1000,
        save_every=5,
        seed=config.seed + 1,
    )
    t0, last = time.perf_counter(), []

    def on_checkpoint(step: int, path: Path) -> None:
        last.append((step, path))
        if time.perf_counter() - t0 >= seconds:
            raise _OutOfTime

    with contextlib.suppress(_OutOfTime):
        run_sft(beta_dir, rows, cfg, workdir, on_checkpoint=on_checkpoint)
    if not last:
        raise RuntimeError(f"the control wrote no checkpoint under {workdir}")
    step, path = last[-1]
    return path, step


def _gain(base: list[SampleRecord], other: list[SampleRecord], resamples: int) -> dict[str, float]:
    result = paired_bootstrap(*paired_means(base, other), n=resamples)
    return {"diff": result.diff, "low": result.low, "high": result.high}


def run_papo_study(
    beta_dir: str | os.PathLike,
    corpus_rows: Sequence[Mapping[str, Any]],
    train_problems: Sequence[Problem],
    eval_problems: Sequence[Problem],
    papo: RLConfig,
    sft: SFTConfig,
    eval_config: EvalConfig,
    workdir: str | os.PathLike,
    study: PAPOStudyConfig,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the study (module doc) and return its report."""
    workdir = Path(workdir)
    papo = papo.replace(steps=study.papo_steps, num_threads=study.num_threads)
    t0 = time.perf_counter()
    result = run_papo(beta_dir, train_problems, workdir / "papo", papo)
    papo_wall = time.perf_counter() - t0
    log(f"PAPO: {result.final_step} steps in {papo_wall:.0f} s -> {result.final_dir}")
    checkpoints = {"npr_beta": Path(beta_dir), "npr": result.final_dir}
    control_steps = None
    if study.control:
        control_sft = dataclasses.replace(sft, num_threads=study.num_threads)
        checkpoints["control"], control_steps = continue_sft_for(
            beta_dir, corpus_rows, control_sft, workdir / "control", papo_wall
        )
        log(f"control: {control_steps} more SFT steps in PAPO's {papo_wall:.0f} s")
    prompt = papo.prompt
    records, summaries = {}, {}
    for name, path in checkpoints.items():
        records[name], summaries[name] = evaluate_checkpoint(
            path, eval_problems, eval_config, prompt, study.num_threads
        )
        log(f"{name}: accuracy {summaries[name]['accuracy']:.3f}, "
            f"format_valid_rate {summaries[name]['format_valid_rate']:.3f}")  # fmt: skip
    gains = {
        name: _gain(records["npr_beta"], records[name], study.bootstrap_resamples)
        for name in checkpoints
        if name != "npr_beta"
    }
    keys = ("accuracy", "format_valid_rate", "trigger_rate", "wall_s")
    return {
        "study": dataclasses.asdict(study),
        "papo_config": papo.to_dict(),
        "eval_config": dataclasses.asdict(eval_config),
        "eval_problems": len(eval_problems),
        "papo_wall_s": round(papo_wall, 1),
        "control_sft_steps": control_steps,
        "checkpoints": {k: str(v) for k, v in checkpoints.items()},
        "summaries": {k: {m: s.get(m) for m in keys} for k, s in summaries.items()},
        "gain_vs_npr_beta": gains,
    }


# ----------------------------------------------------------------------------------------------- CLI
def _latest_beta(storage, partition: str | None) -> str:
    """The index partition to start from: ``partition``, or the highest-step ``npr_beta-*``."""
    if partition:
        return partition
    names = sorted(Path(n).stem for n in storage.ls(INDEX_PREFIX) if Path(n).stem.startswith("npr_beta-"))
    if not names:
        raise FileNotFoundError(
            f"no npr_beta checkpoint is recorded under {storage.uri(INDEX_PREFIX)}: run `make run` first, "
            "or pass --beta DIR"
        )
    return names[-1]


def _resolve_beta(arg: str | None, home: Path, workdir: Path) -> Path:
    """A local checkpoint directory: ``arg`` if it is one, else a partition key (or the latest
    ``npr_beta``) resolved through the checkpoint index under ``home`` (fetched if remote)."""
    if arg and Path(arg).is_dir():
        return Path(arg)
    storage = Storage(str(home / "artifacts"))
    ref = read_checkpoint(storage, _latest_beta(storage, arg))
    uri = str(ref["uri"])
    if Path(uri).is_dir():
        return Path(uri)
    local = workdir / "npr_beta"
    storage.fetch_dir(uri, local, overwrite=True)
    return local


def main(argv: Sequence[str] | None = None) -> int:
    from assets.configs import stage_configs
    from npr_pipelines.toy.problems import generate_problems
    from npr_pipelines.toy.profiles import get_profile

    parser = argparse.ArgumentParser(prog="python -m npr_pipelines.training.papo_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("NPR_HOME", ".npr")))
    parser.add_argument("--beta", help="NPR-Beta: a checkpoint directory or partition key "
                        "(default: the latest npr_beta the last `make run` recorded)")  # fmt: skip
    parser.add_argument("--corpus", type=Path, help="the self-distilled corpus (parquet; default: the "
                        "self_distilled_corpus asset under --home)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, help="default: <home>/work/papo_study")
    parser.add_argument("--out", type=Path, help="default: <home>/reports/papo_study.json")
    parser.add_argument("--profile", default=PAPOStudyConfig.profile, help="the toy profile of the run")
    parser.add_argument("--steps", type=int, default=PAPOStudyConfig.papo_steps)
    parser.add_argument("--samples", type=int, default=PAPOStudyConfig.n_samples)
    parser.add_argument("--problems", type=int, default=PAPOStudyConfig.eval_problems)
    parser.add_argument("--split", default=PAPOStudyConfig.eval_split, choices=("dev", "test"))
    parser.add_argument("--no-control", action="store_true", help="skip the matched SFT control")
    parser.add_argument("--threads", type=int, default=PAPOStudyConfig.num_threads)
    args = parser.parse_args(argv)

    study = PAPOStudyConfig(profile=args.profile, papo_steps=args.steps, n_samples=args.samples,
                            eval_split=args.split, eval_problems=args.problems, control=not args.no_control,
                            num_threads=args.threads)  # fmt: skip
    workdir = args.workdir or args.home / "work" / "papo_study"
    if workdir.exists() and any(workdir.iterdir()):
        raise SystemExit(f"{workdir} is not empty: a study starts from a fresh working directory")
    workdir.mkdir(parents=True, exist_ok=True)
    corpus_path = args.corpus or args.home / "artifacts" / "io" / "self_distilled_corpus.parquet"
    if not corpus_path.is_file():
        raise SystemExit(
            f"{corpus_path}: no self-distilled corpus there; run `make run` first, or pass --corpus"
        )
    import pandas as pd

    rows = pd.read_parquet(corpus_path).to_dict("records")
    beta_dir = _resolve_beta(args.beta, args.home, workdir)

    profile = get_profile(study.profile)
    configs = stage_configs(study.profile, seed=study.seed)
    pc = profile.bootstrap.problems
    train = [p.to_problem() for p in generate_problems("train", profile.train_problems, study.seed, pc)]
    held_out = [
        p.to_problem() for p in generate_problems(study.eval_split, study.eval_problems, study.seed, pc)
    ]
    ev = profile.eval
    eval_config = ev.runner_config(mode="parallel", n_samples=study.n_samples, seed=EVAL_SEED)
    report = run_papo_study(beta_dir, rows, train, held_out, configs["npr"], configs["npr_beta"], eval_config,
                            workdir, study)  # fmt: skip
    report["npr_beta"] = str(beta_dir)
    out = args.out or args.home / "reports" / "papo_study.json"
    write_json_report(out, report)
    for name, g in report["gain_vs_npr_beta"].items():
        print(f"{name} - npr_beta: {g['diff']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}]")
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
