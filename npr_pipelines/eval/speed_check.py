"""A checkpoint's speedups on a chosen device: ``python -m npr_pipelines.eval.speed_check CKPT``.

Decodes the toy world's held-out problems in both modes exactly as ``benchmark_scores`` does (the
profile's T / top-p / budget, chunks of problems with all their samples in flight, then the first
``--latency-problems`` one request at a time) and prints the throughput and latency speedups with what
explains them: engine decode steps, tokens per step and milliseconds per step in each mode. ``--chunk`` varies
the number of problems in flight. Use it to see how the same checkpoint's speedups move with the
hardware (``--device cuda``) or the CPU thread count, without re-running the pipeline.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from npr_pipelines.eval.runner import build_engine, evaluate_problems, measure_latency, summarize
from npr_pipelines.eval.speedup import latency_speedup, median_latency, throughput_speedup, tokens_per_second
from npr_pipelines.storage import write_json_report

#: The summary keys reported per mode (the rest of ``summarize`` is noise for a speed check).
_REPORTED = (
    "accuracy",
    "format_valid_rate",
    "trigger_rate",
    "mean_total_tokens",
    "mean_critical_path_tokens",
)


def speed_check(
    model_path: str,
    device: str = "cpu",
    n_problems: int = 300,
    chunk: int = 64,
    latency_problems: int = 32,
    profile: str = "default",
    threads: int | None = None,
) -> dict[str, Any]:
    """Both modes of the checkpoint at ``model_path`` on ``device``; the figures as a dict."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from npr_pipelines.toy.problems import TEST, generate_problems
    from npr_pipelines.toy.profiles import get_profile
    from npr_pipelines.toy.tokenizer import TOY_PROMPT

    if threads:
        torch.set_num_threads(threads)
    toy = get_profile(profile)
    problems = [
        p.to_problem() for p in generate_problems(TEST, n_problems, seed=0, config=toy.bootstrap.problems)
    ]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).eval()
    ev = toy.eval
    out: dict[str, Any] = {
        "model_path": model_path, "device": device, "torch_threads": torch.get_num_threads(),
        "n_problems": len(problems), "chunk": chunk, "latency_problems": latency_problems,
    }  # fmt: skip
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(0)
    modes: dict[str, dict[str, Any]] = {}
    latencies: dict[str, list[float]] = {}
    with torch.no_grad():
        for mode in ("sequential", "parallel"):
            cfg = ev.runner_config(mode=mode)
            engine = build_engine(model, tokenizer, cfg)
            evaluate_problems(model, tokenizer, problems[:4], cfg, TOY_PROMPT, engine)  # warm-up
            steps0 = engine.stats.steps
            records, wall = evaluate_problems(
                model, tokenizer, problems, cfg, TOY_PROMPT, engine, chunk=chunk
            )
            steps = engine.stats.steps - steps0
            tokens = sum(r.total_tokens for r in records)
            latencies[mode] = measure_latency(
                model, tokenizer, problems[:latency_problems], cfg, TOY_PROMPT, engine
            )
            summary = summarize(records)
            modes[mode] = {
                **{k: summary.get(k) for k in _REPORTED},
                "tokens": tokens,
                "wall_s": wall,
                "tokens_per_s": tokens_per_second(tokens, wall),
                "engine_steps": steps,
                "tokens_per_step": tokens / steps if steps else None,
                "ms_per_step": 1000 * wall / steps if steps else None,
                "latency_median_s": median_latency(latencies[mode]),
            }
    seq, par = modes["sequential"], modes["parallel"]
    out["throughput_speedup"] = throughput_speedup(par["tokens_per_s"], seq["tokens_per_s"])
    out["latency_speedup"] = latency_speedup(latencies["sequential"], latencies["parallel"])
    out["step_ratio"] = seq["engine_steps"] / par["engine_steps"] if par["engine_steps"] else None
    out["modes"] = modes
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_path")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--problems", type=int, default=300)
    ap.add_argument(
        "--chunk", type=int, nargs="+", default=[64], help="problems in flight (several: one run each)"
    )
    ap.add_argument("--latency-problems", type=int, default=32)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    results = [
        speed_check(
            args.model_path, args.device, args.problems, c, args.latency_problems, args.profile, args.threads
        )
        for c in args.chunk
    ]
    report = results if len(results) > 1 else results[0]
    print(json.dumps(report, indent=2, default=str))
    if args.out is not None:
        write_json_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
