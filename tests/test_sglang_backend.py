"""The SGLang backend against ``npr serve`` (same native ``/generate`` protocol, on 127.0.0.1):
sequential records equal the in-process engine's seed for seed, requests spread over two servers,
parallel mode forks/joins with the same structure but is marked approximate (its post-join log-probs
really differ), the RL rollout path refuses approximate traces unless opted in, and
``/update_weights_from_disk`` swaps the served weights (and refuses what it must)."""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from _support import free_port

from npr_pipelines.data import Problem
from npr_pipelines.engine import EngineConfig, EngineOutput, FinishReason, Request, SamplingParams, TokenCodec
from npr_pipelines.engine.sglang_backend import BackendError, SGLangBackend, SGLangConfig, WeightUpdateError
from npr_pipelines.engine.testing import ScriptHook, tiny_qwen3, trace_script
from npr_pipelines.serve import Prompt, ServerThread, build_state, create_app, load_engine
from npr_pipelines.structure import TagVocab, Trace
from npr_pipelines.training.rl import RLConfig, _Run, papo_config, take_problems
from npr_pipelines.training.rl_rollout import ApproximateRolloutError, generate_rollouts

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = EngineConfig(num_blocks=256, block_size=8, max_running=8)
ROLLOUT_ID = re.compile(r"^s\d+-b\d+-p\d+-r\d+$")  # generate_rollouts' request ids


def _save_model(path: Path, seed: int, hidden: int = 64) -> Path:
    from _support import byte_bpe_tokenizer

    tok = byte_bpe_tokenizer()
    tiny_qwen3(len(tok), seed=seed, hidden=hidden).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _save_model(tmp_path_factory.mktemp("tiny-a"), seed=11)


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory) -> Path:
    """Same architecture and tokenizer, other weights: what a training step would publish."""
    return _save_model(tmp_path_factory.mktemp("tiny-b"), seed=12)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def tags(tokenizer) -> TagVocab:
    return TagVocab.from_tokenizer(tokenizer)


@pytest.fixture(scope="module")
def codec(tokenizer) -> TokenCodec:
    return TokenCodec.from_tokenizer(tokenizer)


@pytest.fixture(scope="module")
def prompt(tokenizer) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "sum of products?"}], add_generation_prompt=True
    )
    return list(ids["input_ids"])


#: Server-side scripts for parallel-mode requests: base request id (or "rollouts") -> stream path ->
#: the tokens that stream samples. Filled by the tests; read by the servers' hook factory.
SCRIPTS: dict[str, dict[tuple[int, ...], list[int]]] = {}


def _script_hook(p: Prompt) -> ScriptHook | None:
    """The backend's calls are ``<request id>/<stream path>/<call>``: force each call's single stream to
    sample what the in-process engine's stream at that path samples under the full script."""
    parts = p.rid.rsplit("/", 2)
    if len(parts) != 3:
        return None
    base, path = parts[0], tuple(int(x) for x in parts[1].split("."))
    script = SCRIPTS.get(base) or (SCRIPTS.get("rollouts") if ROLLOUT_ID.match(base) else None)
    if script is None or path not in script:
        return None
    return ScriptHook({(0,): script[path]}, after=None)


@contextmanager
def serving(
    model_dir: Path, hook: Callable[[Prompt], ScriptHook | None] | None = None
) -> Iterator[ServerThread]:
    engine, tok = load_engine(model_dir, config=SMALL)
    state = build_state(engine, tok, max_queue=64, model_path=str(model_dir), hook_factory=hook)
    try:
        with ServerThread(create_app(state)) as server:
            assert server.host == "127.0.0.1"
            yield server
    finally:
        state.worker.close()


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ServerThread]:
    with serving(model_dir, _script_hook) as s:
        yield s


@pytest.fixture(scope="module")
def second_server(model_dir: Path) -> Iterator[ServerThread]:
    with serving(model_dir, _script_hook) as s:
        yield s


def metrics(url: str) -> dict:
    with urllib.request.urlopen(url + "/metrics?format=json", timeout=30) as resp:
        return json.loads(resp.read())


def reference(model_dir: Path, requests: list[Request]) -> list[EngineOutput]:
    """The same requests, one at a time, in a fresh in-process engine."""
    engine, _ = load_engine(model_dir, config=SMALL)
    return [engine.generate([r])[0] for r in requests]


def assert_same_record(got: EngineOutput, ref: EngineOutput, tol: float = 1e-5) -> None:
    a, b = got.to_dict(), ref.to_dict()
    for key in (
        "response_ids",
        "positions",
        "inserted",
        "finish_reason",
        "finish_detail",
        "forks",
        "segments",
    ):
        assert a[key] == b[key], (got.request_id, key)
    assert a["span_table"] == b["span_table"] and a["prompt_ids"] == b["prompt_ids"]
    assert (got.prefill_tokens, got.decode_tokens) == (ref.prefill_tokens, ref.decode_tokens)
    assert all((x is None) == (y is None) for x, y in zip(got.logprobs, ref.logprobs, strict=True))
    assert (
        max((abs(x - y) for x, y in zip(got.logprobs, ref.logprobs, strict=True) if x is not None), default=0)
        < tol
    )


def _sequential_requests(prompt: list[int]) -> list[Request]:
    settings = [
        dict(temperature=1.0, seed=1, max_tokens=24),
        dict(temperature=0.7, top_p=0.9, seed=2, max_tokens=24),
        dict(temperature=1.0, top_k=20, seed=3, max_tokens=24, repetition_penalty=1.1),
        dict(temperature=0.0, max_tokens=16),
        dict(temperature=1.0, seed=5, max_tokens=40, stop_token_ids=tuple(range(40, 140))),  # ends early
        dict(temperature=1.0, seed=6, max_tokens=40, max_total_tokens=9),
    ]
    return [
        Request(f"q{i}", prompt[: 6 + i], SamplingParams(mode="sequential", **kw))
        for i, kw in enumerate(settings)
    ]


def test_sequential_records_equal_the_in_process_engine(model_dir, server, codec, tags, prompt) -> None:
    requests = _sequential_requests(prompt)
    with SGLangBackend([server.url], codec, tags) as backend:
        got = backend.generate(requests)
    refs = reference(model_dir, requests)
    for g, r in zip(got, refs, strict=True):
        assert_same_record(g, r)
        assert g.metadata["backend"] == "sglang" and g.metadata["server"] == server.url
        assert not g.approximate and g.metadata["http_calls"] == 1
    reasons = {g.finish_reason for g in got}
    assert {FinishReason.LENGTH, FinishReason.STOP, FinishReason.TOTAL_BUDGET} <= reasons, reasons
    assert got[5].total_tokens == 9  # the flattened budget is the flow's, not the server's


def test_data_parallel_dispatch_over_two_servers(
    model_dir, server, second_server, codec, tags, prompt
) -> None:
    before = {s.url: metrics(s.url)["requests_finished"] for s in (server, second_server)}
    requests = [
        Request(f"dp{i}", prompt[: 5 + i], SamplingParams(mode="sequential", seed=40 + i, max_tokens=12))
        for i in range(8)
    ]
    with SGLangBackend(
        [server.url, second_server.url], codec, tags, SGLangConfig(max_concurrency=4)
    ) as backend:
        got = backend.generate(requests[:6])
        for r in requests[6:]:  # the streaming interface (rejection sampling uses it)
            backend.add_request(r)
        streamed: list[EngineOutput] = []
        while backend.has_unfinished():
            streamed += backend.step()
        assert backend.step() == []
        counts = {s.url: s.requests for s in backend.servers}
    got += sorted(streamed, key=lambda o: o.request_id)
    for g, r in zip(got, reference(model_dir, requests), strict=True):
        assert_same_record(g, r)
    served = {s.url: metrics(s.url)["requests_finished"] - before[s.url] for s in (server, second_server)}
    assert sum(served.values()) == 8 and min(served.values()) >= 2, served
    assert served == counts
    assert {g.metadata["server"] for g in got} == {server.url, second_server.url}


def _parallel_request(
    rid: str, tok, tags: TagVocab, codec: TokenCodec, prompt: list[int], trace: Trace
) -> Request:
    SCRIPTS[rid] = trace_script(trace, tags, codec.encode, end=[tok.eos_token_id])
    return Request(rid, prompt, SamplingParams(mode="parallel", temperature=0.8, seed=9, max_tokens=300))


TWO_BLOCKS = Trace.build(
    [(["one", "two", "three"], ["1+1=2", "2+2=4", "3+3=6"], "add"), (["last"], ["12"], "ok")], "\\boxed{12}"
)


def test_parallel_mode_forks_joins_and_is_marked_approximate(
    model_dir, server, tokenizer, codec, tags, prompt
) -> None:
    forked = _parallel_request("par", tokenizer, tags, codec, prompt, TWO_BLOCKS)
    plain = _parallel_request("par-noblock", tokenizer, tags, codec, prompt, Trace.build([], "\\boxed{3}"))
    with SGLangBackend([server.url], codec, tags) as backend:
        got, no_block = backend.generate([forked, plain])
    engine, _ = load_engine(model_dir, config=SMALL)
    [ref] = engine.generate(
        [Request(forked.request_id, prompt, forked.params, logits_hook=ScriptHook(SCRIPTS["par"]))]
    )

    # The flow is the engine's: same ids, positions, forks, segments; the trainer's layout agrees.
    assert ref.finish_reason is FinishReason.EOS and len(ref.forks) == 2
    for key in ("response_ids", "positions", "inserted", "finish_reason", "forks", "segments"):
        assert got.to_dict()[key] == ref.to_dict()[key], key
    assert got.structure_errors(tags, codec.decode) == []
    # ... but everything sampled after the first join came from a re-prefilled context.
    first_join = ref.forks[0].takeaway - ref.prompt_len
    before = [
        (a, b)
        for a, b in zip(got.logprobs[:first_join], ref.logprobs[:first_join], strict=True)
        if a is not None
    ]
    after = [
        (a, b)
        for a, b in zip(got.logprobs[first_join:], ref.logprobs[first_join:], strict=True)
        if a is not None
    ]
    assert max(abs(a - b) for a, b in before) < 1e-5
    assert max(abs(a - b) for a, b in after) > 1e-3
    assert got.approximate and got.to_dict()["metadata"]["approximate"] is True
    assert "re-prefilled" in got.metadata["approximation"]
    # 1 + 3 branches + 1 + 1 branch + 1 calls; the last three contexts hold joined branches
    assert got.metadata["http_calls"] == 7 and got.metadata["approximate_calls"] == 3
    # A parallel request that never joined was sampled in native contexts: exact.
    assert no_block.finish_reason is FinishReason.EOS and not no_block.forks and not no_block.approximate


def _problems(n: int) -> list[Problem]:
    return [Problem(f"p{i}", f"question {i}", "12", "test") for i in range(n)]


def test_rollouts_refuse_approximate_traces_unless_opted_in(server, tokenizer, codec, tags, prompt) -> None:
    SCRIPTS["rollouts"] = trace_script(TWO_BLOCKS, tags, codec.encode, end=[tokenizer.eos_token_id])
    problems = _problems(2)
    params = SamplingParams(mode="parallel", temperature=1.0, max_tokens=300)
    common = dict(group_size=2, seed=0, step=0, gen_batch=0, group_offset=0, drop_structural_failures=True)
    with SGLangBackend([server.url], codec, tags) as backend:
        with pytest.raises(ApproximateRolloutError, match="allow_approximate_rollouts=True"):
            generate_rollouts(backend, codec, tags, problems, [prompt] * 2, params, **common)
        rollouts = generate_rollouts(
            backend, codec, tags, problems, [prompt] * 2, params, allow_approximate=True, **common
        )
        assert len(rollouts) == 4 and all(r.output.approximate for r in rollouts)
        assert all(r.dropped is None and r.record.correct for r in rollouts)  # structure exact, answer right
        # Sequential rollouts through SGLang are exact, hence accepted by default.
        seq = generate_rollouts(
            backend,
            codec,
            tags,
            problems,
            [prompt] * 2,
            SamplingParams(mode="sequential", max_tokens=8),
            **common,
        )
        assert len(seq) == 4 and not any(r.output.approximate for r in seq)

        # The RL driver's collect() path, with the backend as its engine: refused by default.
        assert (
            RLConfig().allow_approximate_rollouts is False
            and papo_config().allow_approximate_rollouts is False
        )
        for allow in (False, True):
            run = _collect_only_run(backend, codec, tags, problems, prompt, allow)
            if not allow:
                with pytest.raises(ApproximateRolloutError):
                    run.collect(step=1)
            else:
                kept, generated, _ = run.collect(step=1)
                assert len(generated) == 4 and len(kept) == 4 and all(r.output.approximate for r in kept)


def _collect_only_run(backend, codec, tags, problems, prompt, allow: bool) -> _Run:
    """An RL run with just what ``_Run.collect`` reads (no model: rollouts come from the servers)."""
    config = papo_config(
        prompts_per_step=2, group_size=2, truncate_multiple=1, allow_approximate_rollouts=allow
    )
    run = object.__new__(_Run)
    run.config, run.problems, run.cursor, run.logits_hook = config, problems, 0, None
    run.engine, run.codec, run.tags = backend, codec, tags
    run.prompt_cache = {i: prompt for i in take_problems(len(problems), config.seed, 0, 2)}
    run.params = SamplingParams(mode="parallel", temperature=1.0, max_tokens=300)
    return run


def _greedy(prompt: list[int]) -> list[Request]:
    return [
        Request(
            f"w{i}", prompt[: 6 + 2 * i], SamplingParams(mode="sequential", temperature=0.0, max_tokens=12)
        )
        for i in range(3)
    ]


def test_weight_update_from_disk_changes_outputs(
    model_dir, other_weights, codec, tags, prompt, tmp_path
) -> None:
    requests = _greedy(prompt)
    with serving(model_dir) as srv, SGLangBackend([srv.url], codec, tags) as backend:
        before = backend.generate(requests)
        [answer] = backend.update_weights_from_disk(str(other_weights))
        assert answer["success"] is True and "loaded" in answer["message"]
        after = backend.generate(requests)
        with urllib.request.urlopen(srv.url + "/get_model_info", timeout=30) as resp:
            assert json.loads(resp.read())["model_path"] == str(other_weights)
        assert [o.response_ids for o in before] != [o.response_ids for o in after]
        for got, ref in zip(after, reference(other_weights, requests), strict=True):
            assert_same_record(got, ref)

        # Refused, and the server keeps serving the weights it has.
        pickled = tmp_path / "pickled"
        pickled.mkdir()
        shutil.copy(other_weights / "config.json", pickled)
        torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
        narrow = _save_model(tmp_path / "narrow", seed=3, hidden=32)
        for bad, why in [
            (tmp_path / "missing", "not a model directory"),
            (pickled, "pickles"),
            (narrow, "not the served architecture"),
        ]:
            with pytest.raises(WeightUpdateError, match=why):
                backend.update_weights_from_disk(str(bad))
        assert [o.response_ids for o in backend.generate(requests)] == [o.response_ids for o in after]

        # A directory carrying a MANIFEST.json is verified against it.
        from npr_pipelines.storage.api import publish_dir

        published = tmp_path / "published"
        publish_dir(model_dir, str(published))
        backend.update_weights_from_disk(str(published))
        assert [o.response_ids for o in backend.generate(requests)] == [o.response_ids for o in before]
        weights = published / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF  # a tensor byte: the header still parses
        weights.write_bytes(bytes(data))
        with pytest.raises(WeightUpdateError, match="MANIFEST"):
            backend.update_weights_from_disk(str(published))


def test_weight_swap_waits_for_running_requests(model_dir, prompt) -> None:
    """``run_exclusive`` (the swap) runs only when nothing is running; requests queued meanwhile start
    after it, so no request decodes with two models."""
    engine, _ = load_engine(model_dir, config=SMALL)
    state = build_state(engine, None)
    worker = state.worker
    try:
        long = worker.submit(
            Request("long", prompt, SamplingParams(mode="sequential", temperature=0, max_tokens=200))
        )
        deadline = time.time() + 30
        while worker.snapshot()["requests_running"] == 0 and not long.done():
            assert time.time() < deadline
            time.sleep(0.002)
        seen: dict[str, bool] = {}
        later: list = []

        def job(eng) -> str:
            seen.update(
                idle=not eng.has_unfinished(), long_done=long.done(), later_started=later[0].running()
            )
            return "swapped"

        with worker.paused():  # both registered before the engine thread looks again
            swap = worker.run_exclusive(job)
            later.append(
                worker.submit(Request("later", prompt[:5], SamplingParams(mode="sequential", max_tokens=4)))
            )
        assert swap.result(timeout=120) == "swapped"
        assert seen == {"idle": True, "long_done": True, "later_started": False}
        assert later[0].result(timeout=60).finish_reason in (FinishReason.LENGTH, FinishReason.EOS)
    finally:
        worker.close()


def test_refusals_are_explicit(server, codec, tags, prompt) -> None:
    hooked = Request("h", prompt, SamplingParams(mode="sequential"), logits_hook=ScriptHook({(0,): [5]}))
    with SGLangBackend([server.url], codec, tags) as backend:
        with pytest.raises(ValueError, match="logits hooks"):
            backend.generate([hooked])
        with pytest.raises(BackendError, match="HTTP 400"):  # the server's own validation, passed on
            backend.generate([Request("oov", [10**6], SamplingParams(mode="sequential"))])
    with (
        SGLangBackend([server.url], codec, None) as untagged,
        pytest.raises(ValueError, match="parallel mode"),
    ):
        untagged.generate([Request("p", prompt, SamplingParams(mode="parallel"))])
    with (
        socket_closed_port() as url,
        SGLangBackend([url], codec, tags, SGLangConfig(retries=1, retry_backoff_s=0.01)) as dead,
        pytest.raises(BackendError, match="cannot connect"),
    ):
        dead.generate([Request("d", prompt, SamplingParams(mode="sequential"))])


@contextmanager
def socket_closed_port() -> Iterator[str]:
    """A loopback URL nothing listens on."""
    yield f"http://127.0.0.1:{free_port()}"


def test_full_server_queue_is_retried(model_dir, codec, tags, prompt) -> None:
    """``npr serve`` (like SGLang) answers 503 with Retry-After when its queue is full: the backend
    waits and retries instead of failing the request."""
    requests = [
        Request(f"r{i}", prompt[: 5 + i], SamplingParams(mode="sequential", seed=i, max_tokens=6))
        for i in range(3)
    ]
    engine, tok = load_engine(model_dir, config=SMALL)
    state = build_state(engine, tok, max_queue=1)
    worker = state.worker
    try:
        with ServerThread(create_app(state)) as srv, SGLangBackend([srv.url], codec, tags) as backend:
            with worker.paused():
                for r in requests:
                    backend.add_request(r)
                deadline = time.time() + 30
                while worker.snapshot()["requests_rejected"] < 2:  # two of three bounced off the full queue
                    assert time.time() < deadline, worker.snapshot()
                    time.sleep(0.01)
            got: list[EngineOutput] = []
            while backend.has_unfinished():
                got += backend.step()
            snap = worker.snapshot()
    finally:
        worker.close()
    assert sorted(o.request_id for o in got) == ["r0", "r1", "r2"]
    assert snap["requests_finished"] == 3 and snap["requests_rejected"] >= 2
    for g, r in zip(sorted(got, key=lambda o: o.request_id), reference(model_dir, requests), strict=True):
        assert_same_record(g, r)
