"""Engine benchmark: ``python -m npr_pipelines.bench`` (``make bench``) writes ``.npr/bench/engine.json``.

One run on the toy model (the bootstrapped base model of ``npr_pipelines.toy`` with the tags added as
tokens; a random-init model of the same shape when the toy world is unavailable):

1. **Record.** The engine decodes synthetic traces of realistic structure (2-5 plans, 20-60-token
   steps, 1-3 rounds, toy-like arithmetic text) from toy prompts, all requests at once (continuous
   batching); the structure is scripted (``trace_script``), so every trace is well formed.
2. **Replay** each recorded trace alone (concurrency 1) with a logits hook forcing the recorded tokens,
   in parallel mode and in sequential mode (the same flattened tokens, one stream): the two runs do the
   same work except for the parallel structure. ``parallel_speedup`` = sequential / parallel
   wall-clock; ``critical_path_ratio`` = total / critical-path tokens; ``efficiency`` = their ratio.
3. **Against ``transformers.generate``**: the engine in sequential mode vs ``generate`` on the same
   model, greedy, the same prompts and number of new tokens (EOS disabled in both), batch 16 and 1.
4. **KV memory**: peak KV tokens held (whole blocks) / peak the same live streams would hold as private
   copies (no prefix sharing), over the recording run.
5. **Consistency**: the engine's log-probs against one teacher-forced trainer forward
   (``parallel_layout`` mask and positions) over every recorded trace.

Timings are repeated (modes interleaved) and the median is reported; process CPU time is reported
next to wall-clock, because on a shared machine it is the steadier of the two.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from npr_pipelines.engine import Engine, EngineConfig, EngineOutput, Request, SamplingParams, TokenCodec
from npr_pipelines.engine.testing import CharCodec, ScriptHook, replay_script, trace_script
from npr_pipelines.machine import machine_info
from npr_pipelines.storage import write_json_report
from npr_pipelines.structure import TagVocab, Trace, parallel_layout, parse_tokens

DEFAULT_OUT = Path(".npr/bench/engine.json")


# --------------------------------------------------------------------------- the model
@dataclass
class BenchModel:
    model: torch.nn.Module
    codec: TokenCodec
    tags: TagVocab
    prompts: list[list[int]]  # token ids of toy prompts
    source: str
    detail: dict[str, Any]


def toy_model(n_prompts: int, path: str | Path | None = None) -> BenchModel:
    """The bootstrapped toy base model (trained on the first call, cached) with the tags as tokens;
    or the model saved at ``path`` (any local ``from_pretrained`` directory), with toy prompts."""
    from transformers import AutoTokenizer

    from npr_pipelines.tokenization import add_tag_tokens, prompt_ids
    from npr_pipelines.toy.bootstrap import BootstrapConfig, bootstrap_base_model
    from npr_pipelines.toy.model import load_model
    from npr_pipelines.toy.problems import TEST, generate_problems
    from npr_pipelines.toy.tokenizer import TOY_PROMPT

    config = BootstrapConfig()
    path = bootstrap_base_model(config) if path is None else Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = load_model(path)
    tags = add_tag_tokens(tokenizer, model)
    problems = generate_problems(TEST, n_prompts, seed=1)
    prompts = [prompt_ids(tokenizer, p.question, TOY_PROMPT) for p in problems]
    return BenchModel(
        model.eval(),
        TokenCodec.from_tokenizer(tokenizer),
        tags,
        prompts,
        "toy",
        {
            "path": str(path),
            "bootstrap_key": config.key if path == config.path() else None,
            "vocab": len(tokenizer),
        },
    )


#: Random-init shapes: ``toy`` matches the toy world; ``large`` (~0.2B parameters) is for GPUs, where
#: a toy-sized model measures nothing but Python overhead.
RANDOM_SHAPES: dict[str, dict[str, int]] = {
    "toy": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 32},
    "large": {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 16,
              "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64},
}  # fmt: skip


def random_model(n_prompts: int, seed: int = 0, shape: str = "toy") -> BenchModel:
    """A random-init Qwen3 (``RANDOM_SHAPES``); characters are tokens and the tags single tokens."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cc = CharCodec()
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=576, max_position_embeddings=4096, tie_word_embeddings=True, **RANDOM_SHAPES[shape]
    )
    model = Qwen3ForCausalLM(cfg).eval()
    rng = random.Random(seed)
    prompts = [
        cc.encode(
            f"user\n{rng.randint(2, 19)}*{rng.randint(2, 19)}+{rng.randint(2, 19)}*{rng.randint(2, 19)}=?\n"
            "Answer in the parallel format.\nassistant\n"
        )
        for _ in range(n_prompts)
    ]
    n_params = sum(p.numel() for p in model.parameters())
    return BenchModel(
        model,
        cc.codec(),
        cc.tags,
        prompts,
        "random",
        {"vocab": cfg.vocab_size, "shape": shape, "params": n_params},
    )


# --------------------------------------------------------------------------- traces
def _chain(rng: random.Random, encode: Callable[[str], list[int]], lo: int, hi: int) -> str:
    """Toy-like arithmetic (``3*14=42 42+7=49 ...``) of about ``randint(lo, hi)`` tokens."""
    want = rng.randint(lo, hi)
    acc = rng.randint(2, 19)
    text = ""
    while len(encode(text)) < want:
        op = rng.choice("+*")
        b = rng.randint(2, 19)
        res = acc * b if op == "*" else acc + b
        nxt = f"{text} {acc}{op}{b}={res}".strip()
        if len(encode(nxt)) > hi and text:
            break
        text, acc = nxt, res % 1000
    return text


def make_traces(
    n: int, encode: Callable[[str], list[int]], seed: int = 0, step_tokens: tuple[int, int] = (20, 60)
) -> list[Trace]:
    """``n`` traces: 1-3 rounds of 2-5 plans; steps of ``step_tokens`` tokens; short plans and takeaways."""
    rng = random.Random(seed)
    traces = []
    for _ in range(n):
        blocks = []
        for _ in range(rng.randint(1, 3)):
            k = rng.randint(2, 5)
            plans = [f"{rng.randint(2, 19)}*{rng.randint(2, 19)}" for _ in range(k)]
            steps = [_chain(rng, encode, *step_tokens) for _ in range(k)]
            blocks.append((plans, steps, "add the products"))
        traces.append(Trace.build(blocks, f"{rng.randint(10, 999)}\n\\boxed{{{rng.randint(10, 999)}}}"))
    return traces


# --------------------------------------------------------------------------- measurements
def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _clock() -> tuple[float, float]:
    _sync()
    return time.perf_counter(), time.process_time()


def _since(t0: tuple[float, float]) -> tuple[float, float]:
    _sync()
    return time.perf_counter() - t0[0], time.process_time() - t0[1]


def record(bm: BenchModel, traces: Sequence[Trace], config: EngineConfig) -> tuple[list[EngineOutput], dict]:
    """All traces decoded at once with scripted structure (temperature 1 inside the script's forcing)."""
    engine = Engine(bm.model, bm.codec, bm.tags, config)
    eos = sorted(bm.codec.eos_token_ids)[0]
    requests = [
        Request(
            f"t{i}",
            bm.prompts[i % len(bm.prompts)],
            SamplingParams(temperature=1.0, seed=i, max_tokens=4096),
            logits_hook=ScriptHook(trace_script(tr, bm.tags, bm.codec.encode, end=[eos])),
        )
        for i, tr in enumerate(traces)
    ]
    t0 = _clock()
    outputs = engine.generate(requests)
    wall, cpu = _since(t0)
    st = engine.stats
    tokens = sum(o.total_tokens for o in outputs)
    for o in outputs:
        if o.finish_reason.value != "eos" or not o.triggered:
            raise RuntimeError(f"recording {o.request_id} ended with {o.finish_reason}: {o.finish_detail}")
    return outputs, {
        "requests": len(requests),
        "steps": st.steps,
        "tokens": tokens,
        "wall_s": wall,
        "cpu_s": cpu,
        "tokens_per_s": tokens / wall,
        "peak_kv_tokens_held": st.peak_kv_tokens_held,
        "peak_kv_tokens_unshared": st.peak_kv_tokens_unshared,
        "peak_view_tokens": st.peak_view_tokens,
        "preemptions": st.preemptions,
    }


def replay(
    bm: BenchModel, outputs: Sequence[EngineOutput], mode: str, config: EngineConfig
) -> tuple[float, float, dict]:
    """Replay every output alone (concurrency 1) in ``mode``; (wall, cpu) seconds summed over traces."""
    engine = Engine(bm.model, bm.codec, bm.tags, config)
    wall = cpu = 0.0
    steps = 0
    for o in outputs:
        params = SamplingParams(mode=mode, temperature=0.0, max_tokens=4096)  # type: ignore[arg-type]
        req = Request(o.request_id, o.prompt_ids, params, logits_hook=ScriptHook(replay_script(o, mode)))  # type: ignore[arg-type]
        before = engine.stats.steps
        t0 = _clock()
        [got] = engine.generate([req])
        w, c = _since(t0)
        wall += w
        cpu += c
        steps += engine.stats.steps - before
        if got.response_ids != o.response_ids:
            raise RuntimeError(f"{mode} replay of {o.request_id} produced other tokens")
    return wall, cpu, {"steps": steps}


def engine_vs_generate(bm: BenchModel, batch: int, new_tokens: int, reps: int, config: EngineConfig) -> dict:
    """Greedy tokens/s of the engine (sequential mode) and of ``model.generate``, same prompts."""
    length = min(len(p) for p in bm.prompts)
    prompts = [p[-length:] for p in (bm.prompts * batch)[:batch]]  # equal lengths: no padding for generate
    no_eos = TokenCodec(encode=bm.codec.encode, decode=bm.codec.decode, eos_token_ids=frozenset({-1}))
    engine = Engine(bm.model, no_eos, None, config)
    ids = torch.tensor(prompts, device=_device(bm))
    gen_config = copy.deepcopy(bm.model.generation_config)
    gen_config.eos_token_id = None  # both sides decode exactly new_tokens tokens
    gen_config.pad_token_id = 0
    gen_config.do_sample = False
    gen_config.max_new_tokens = new_tokens
    gen_config.min_new_tokens = None
    gen_kwargs = {"attention_mask": torch.ones_like(ids), "generation_config": gen_config}

    def run_engine() -> tuple[float, float, list[list[int]]]:
        reqs = [
            Request(f"g{i}", p, SamplingParams(mode="sequential", temperature=0.0, max_tokens=new_tokens))
            for i, p in enumerate(prompts)
        ]
        t0 = _clock()
        outs = engine.generate(reqs)
        w, c = _since(t0)
        return w, c, [o.response_ids for o in outs]

    def run_hf() -> tuple[float, float, list[list[int]]]:
        # generate() refills unset (None) fields from model.generation_config, EOS included: swap it.
        saved, bm.model.generation_config = bm.model.generation_config, gen_config
        try:
            t0 = _clock()
            with torch.no_grad():
                out = bm.model.generate(ids, **gen_kwargs)
            w, c = _since(t0)
        finally:
            bm.model.generation_config = saved
        if out.shape[1] != length + new_tokens:
            raise RuntimeError(f"generate stopped after {out.shape[1] - length} of {new_tokens} tokens")
        return w, c, out[:, length:].tolist()

    run_engine()  # warm-up (allocations, caches)
    run_hf()
    e_runs, h_runs = [], []
    for _ in range(reps):
        e_runs.append(run_engine())
        h_runs.append(run_hf())
    same = sum(a == b for a, b in zip(e_runs[-1][2], h_runs[-1][2], strict=True))
    tokens = batch * new_tokens
    e_wall = statistics.median(r[0] for r in e_runs)
    h_wall = statistics.median(r[0] for r in h_runs)
    e_cpu = statistics.median(r[1] for r in e_runs)
    h_cpu = statistics.median(r[1] for r in h_runs)
    return {
        "batch": batch,
        "new_tokens": new_tokens,
        "prompt_tokens": length,
        "engine_tokens_per_s": tokens / e_wall,
        "hf_tokens_per_s": tokens / h_wall,
        "ratio": h_wall / e_wall,
        "ratio_cpu": h_cpu / e_cpu,
        "engine_wall_s": [r[0] for r in e_runs],
        "hf_wall_s": [r[0] for r in h_runs],
        "greedy_sequences_identical": f"{same}/{batch}",
    }


def teacher_forced_diff(bm: BenchModel, outputs: Sequence[EngineOutput]) -> float:
    """Max |engine log-prob - trainer log-prob| over every sampled token of ``outputs``."""
    worst = 0.0
    dev = _device(bm)
    for o in outputs:
        full = list(o.prompt_ids) + o.response_ids
        table = parse_tokens(o.response_ids, bm.tags, bm.codec.decode, offset=o.prompt_len)
        layout = parallel_layout(table)
        with torch.no_grad():
            logits = bm.model(
                torch.tensor([full], device=dev),
                attention_mask=layout.additive_mask(bm.model.dtype).to(dev),
                position_ids=torch.tensor([layout.position_ids], device=dev),
            ).logits[0]
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        p = o.prompt_len
        for i, lp in enumerate(o.logprobs):
            if lp is not None:
                worst = max(worst, abs(logp[p + i - 1, full[p + i]].item() - lp))
    return worst


def _device(bm: BenchModel) -> torch.device:
    return next(bm.model.parameters()).device


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# --------------------------------------------------------------------------- main
def run(
    model: str = "auto",
    threads: int = 1,
    n_traces: int = 12,
    reps: int = 5,
    new_tokens: int = 128,
    seed: int = 0,
    block_size: int = 16,
    step_tokens: tuple[int, int] = (20, 60),
    model_path: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict:
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    load_before = _load()
    fallback = None
    bm = None
    if model_path is not None:
        bm = toy_model(max(n_traces, 16), model_path)
    elif model in ("auto", "toy"):
        try:
            bm = toy_model(max(n_traces, 16))
        except (ImportError, AttributeError, FileNotFoundError) as exc:
            if model == "toy":
                raise
            fallback = f"toy model unavailable ({type(exc).__name__}: {exc}); random-init toy-shaped model"
    if bm is None:
        bm = random_model(max(n_traces, 16), seed, "large" if model == "large" else "toy")
    bm.model.to(device=device, dtype=getattr(torch, dtype))
    config = EngineConfig(num_blocks=4096, block_size=block_size)
    traces = make_traces(n_traces, bm.codec.encode, seed, step_tokens)

    outputs, rec = record(bm, traces, config)
    total = sum(o.total_tokens for o in outputs)
    critical = sum(o.critical_path_tokens for o in outputs)

    replay(bm, outputs[:2], "parallel", config)  # warm-up
    replay(bm, outputs[:2], "sequential", config)
    par, seq = [], []
    steps = {}
    for _ in range(reps):  # interleaved, so slow phases of a shared machine hit both modes
        w, c, info = replay(bm, outputs, "sequential", config)
        seq.append((w, c))
        steps["sequential"] = info["steps"]
        w, c, info = replay(bm, outputs, "parallel", config)
        par.append((w, c))
        steps["parallel"] = info["steps"]
    seq_wall = statistics.median(w for w, _ in seq)
    par_wall = statistics.median(w for w, _ in par)
    seq_cpu = statistics.median(c for _, c in seq)
    par_cpu = statistics.median(c for _, c in par)
    cpr = total / critical
    speedup = seq_wall / par_wall

    b16 = engine_vs_generate(bm, 16, new_tokens, reps, config)
    b1 = engine_vs_generate(bm, 1, new_tokens, reps, config)
    kv_ratio = rec["peak_kv_tokens_held"] / rec["peak_kv_tokens_unshared"]
    tf = teacher_forced_diff(bm, outputs)

    return {
        "critical_path_ratio": cpr,
        "parallel_speedup": speedup,
        "efficiency": speedup / cpr,
        "vs_hf_generate": b16["ratio"],
        "vs_hf_generate_b1": b1["ratio"],
        "kv_blocks_peak_ratio": kv_ratio,
        "teacher_forced_max_abs_logprob_diff": tf,
        "parallel_speedup_cpu": seq_cpu / par_cpu,
        "efficiency_cpu": seq_cpu / par_cpu / cpr,
        "machine": machine_info(threads, device),
        "dtype": dtype,
        "model": {"source": bm.source, "fallback": fallback, **bm.detail},
        "traces": {
            "n": len(outputs),
            "total_tokens": total,
            "critical_path_tokens": critical,
            "blocks": sum(len(o.forks) for o in outputs),
            "branches": sum(len(o.branches) for o in outputs),
            "prompt_tokens": sum(o.prompt_len for o in outputs),
        },
        "replay": {
            "repetitions": reps,
            "sequential_wall_s": [w for w, _ in seq],
            "parallel_wall_s": [w for w, _ in par],
            "sequential_cpu_s": [c for _, c in seq],
            "parallel_cpu_s": [c for _, c in par],
            "steps": steps,
        },
        "continuous_batching": rec,
        "hf_generate": {"batch16": b16, "batch1": b1},
        "engine_config": {"num_blocks": config.num_blocks, "block_size": config.block_size},
        "trace_shape": {"rounds": [1, 3], "plans": [2, 5], "step_tokens": list(step_tokens)},
        "load_average": {"before": load_before, "after": _load()},
        "bench_seconds": time.perf_counter() - t_start,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["auto", "toy", "random", "large"], default="auto",
                    help="large: a random-init ~0.2B Qwen3 (for GPUs)")  # fmt: skip
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--model-path", default=None, help="a saved model directory instead of the toy bootstrap")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("NPR_BENCH_THREADS", "1")))
    ap.add_argument("--traces", type=int, default=12)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step-tokens", type=int, nargs=2, default=(20, 60), metavar=("MIN", "MAX"))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    result = run(
        args.model,
        args.threads,
        args.traces,
        args.reps,
        args.new_tokens,
        args.seed,
        step_tokens=tuple(args.step_tokens),
        model_path=args.model_path,
        device=args.device,
        dtype=args.dtype,
    )
    write_json_report(args.out, result)
    keys = (
        "critical_path_ratio",
        "parallel_speedup",
        "efficiency",
        "vs_hf_generate",
        "vs_hf_generate_b1",
        "kv_blocks_peak_ratio",
        "teacher_forced_max_abs_logprob_diff",
    )
    for k in keys:
        print(f"{k:40s} {result[k]:.4g}")
    print(f"model: {result['model']['source']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
