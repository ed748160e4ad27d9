"""The engine on CUDA: the same consistency checks as on the CPU (fp32 and bf16), plus a throughput
smoke test with many requests and free-running branches. Skips cleanly without a GPU."""

from __future__ import annotations

import random
import time

import pytest
import torch

from npr_pipelines.engine import Engine, EngineConfig, FinishReason, Request, SamplingParams
from npr_pipelines.engine.testing import CharCodec, ScriptHook, tiny_qwen3, trace_script
from npr_pipelines.structure import parallel_layout, parse_tokens

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 0.05)])
def test_cuda_teacher_forced_consistency(dtype: torch.dtype, tol: float) -> None:
    from test_engine_consistency import random_trace

    cc = CharCodec()
    model = tiny_qwen3(cc.vocab_size, seed=1, hidden=128, layers=2).to("cuda", dtype)
    engine = Engine(
        model, cc.codec(), cc.tags, EngineConfig(num_blocks=1024, block_size=16, check_invariants=True)
    )
    rng = random.Random(5)
    traces = [random_trace(rng, rng.randint(1, 3)) for _ in range(6)]
    requests = [
        Request(
            f"c{i}",
            cc.encode(f"cuda {i}\n"),
            SamplingParams(seed=i, max_tokens=2000, top_p=0.95),
            logits_hook=ScriptHook(trace_script(t, cc.tags, cc.encode)),
        )
        for i, t in enumerate(traces)
    ]
    worst = 0.0
    for req, out in zip(requests, engine.generate(requests), strict=True):
        assert out.finish_reason is FinishReason.EOS
        assert out.prefill_tokens == len(req.prompt_ids) + sum(out.inserted)
        full = list(req.prompt_ids) + out.response_ids
        layout = parallel_layout(
            parse_tokens(out.response_ids, cc.tags, cc.decode, offset=len(req.prompt_ids))
        )
        with torch.no_grad():
            logits = (
                model(
                    torch.tensor([full], device="cuda"),
                    attention_mask=layout.additive_mask(dtype).cuda(),
                    position_ids=torch.tensor([layout.position_ids], device="cuda"),
                )
                .logits[0]
                .float()
            )
        logp = torch.log_softmax(logits, -1).cpu()
        p = len(req.prompt_ids)
        for i in range(len(out.response_ids)):
            if not out.inserted[i]:
                worst = max(worst, abs(logp[p + i - 1, full[p + i]].item() - out.logprobs[i]))
    print(f"cuda {dtype}: max logprob diff {worst:.2e}")
    assert worst < tol


def test_cuda_many_requests_free_branches() -> None:
    cc = CharCodec()
    model = tiny_qwen3(cc.vocab_size, seed=2, hidden=256, layers=4).to("cuda", torch.bfloat16)
    engine = Engine(model, cc.codec(), cc.tags, EngineConfig(num_blocks=4096, block_size=16))
    guideline = "<guideline>" + "".join(f"\n<plan>{k + 1}: p</plan>" for k in range(4)) + "\n</guideline>"
    script = {(0,): cc.encode_with_tags(guideline)}
    params = SamplingParams(seed=0, max_tokens=256, max_branch_tokens=120, top_k=50)
    requests = [
        Request(f"g{i}", cc.encode(f"req {i}\n"), params, logits_hook=ScriptHook(script, after=None))
        for i in range(64)
    ]
    start = time.perf_counter()
    outputs = engine.generate(requests)
    elapsed = time.perf_counter() - start
    tokens = sum(o.total_tokens for o in outputs)
    print(f"{tokens} tokens in {elapsed:.2f}s ({tokens / elapsed:.0f} tok/s), {engine.stats}")
    assert all(o.triggered for o in outputs)
    engine.check()
    assert engine.pool.num_free == engine.pool.num_blocks
