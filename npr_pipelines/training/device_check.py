"""One parallel-SFT step and one PAPO step on a device, timed: ``python -m
npr_pipelines.training.device_check --device cuda`` (on CUDA the parallel layout trains through
FlexAttention). Prints JSON (and writes it with ``--out``).

The base model is the toy bootstrap (``--model-path`` for another local directory). SFT adds the tag
tokens and trains on the toy world's own parallel-format solutions; PAPO then starts from that
checkpoint with parallel rollouts. Both go through the library drivers (``run_sft``, ``run_papo``), so
checkpoint writing on the device is exercised too. A step's time is reported as measured, first step
included (it holds FlexAttention's compilation on CUDA), next to the mean of the steps after it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from npr_pipelines.storage import write_json_report
from npr_pipelines.tokenization import PromptConfig
from npr_pipelines.training.rl import papo_config, run_papo
from npr_pipelines.training.sft import SFTConfig, run_sft


def _toy_rows(n: int) -> tuple[list[dict[str, Any]], list[Any], PromptConfig]:
    from npr_pipelines.toy.problems import TRAIN, generate_problems
    from npr_pipelines.toy.solutions import parallel_solution
    from npr_pipelines.toy.tokenizer import TOY_PROMPT

    problems = generate_problems(TRAIN, n, seed=11)
    rows = [{"problem_id": p.id, "question": p.question, "text": parallel_solution(p)} for p in problems]
    return rows, [p.to_problem() for p in problems], TOY_PROMPT


def _timed_steps(history: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """SFT records carry cumulative ``elapsed_s``; RL records ``rollout_s`` and ``train_s`` per step."""
    out: dict[str, Any] = {"steps": len(history), "wall_s": wall, "loss": [h.get("loss") for h in history]}
    if history and "elapsed_s" in history[0]:
        elapsed = [h["elapsed_s"] for h in history]
        out["step_seconds"] = [b - a for a, b in zip([0.0, *elapsed[:-1]], elapsed, strict=True)]
    else:
        out["rollout_seconds"] = [h.get("rollout_s") for h in history]
        out["train_seconds"] = [h.get("train_s") for h in history]
        out["reward_mean"] = [h.get("reward_mean") for h in history]
    return out


def run_device_check(
    device: str, model_path: str | None = None, sft_steps: int = 40, papo_steps: int = 2
) -> dict[str, Any]:
    """SFT ``sft_steps`` steps then PAPO ``papo_steps`` steps on ``device``; the figures as a dict."""
    if model_path is None:
        from npr_pipelines.toy.bootstrap import BootstrapConfig, bootstrap_base_model

        model_path = str(bootstrap_base_model(BootstrapConfig()))
    rows, problems, prompt = _toy_rows(64)
    out: dict[str, Any] = {"device": device, "model_path": model_path}
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(0)
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        sft_cfg = SFTConfig(
            layout="parallel", lr=2e-3, batch_size=16, max_steps=sft_steps, epochs=10, max_length=512,
            save_every=0, prompt=prompt, device=device,
        )  # fmt: skip
        t0 = time.perf_counter()
        sft = run_sft(model_path, rows, sft_cfg, Path(tmp) / "sft")
        out["sft"] = _timed_steps(sft.history, time.perf_counter() - t0)
        papo_cfg = papo_config().replace(
            prompt=prompt, steps=papo_steps, prompts_per_step=8, group_size=4, max_new_tokens=256, lr=1e-5,
            device=device,
        )  # fmt: skip
        t0 = time.perf_counter()
        papo = run_papo(sft.final_dir, problems, Path(tmp) / "papo", config=papo_cfg)
        out["papo"] = _timed_steps(papo.history, time.perf_counter() - t0)
        out["papo"]["last_record"] = papo.history[-1]
        out["papo"]["metrics"] = {k: v for k, v in papo.metrics.items() if isinstance(v, int | float)}
    if device.startswith("cuda"):
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--sft-steps", type=int, default=40)
    ap.add_argument("--papo-steps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    result = run_device_check(args.device, args.model_path, args.sft_steps, args.papo_steps)
    print(json.dumps(result, indent=2, default=str))
    if args.out is not None:
        write_json_report(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
