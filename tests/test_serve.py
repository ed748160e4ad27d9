"""``npr serve``: concurrent HTTP clients get exactly what the in-process engine gives for the same
seeds (scripted parallel structure and free sampling), all KV memory is free afterwards, a full queue
answers 503, and malformed requests answer 400."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _support import free_port

from npr_pipelines.engine import EngineConfig, FinishReason, Request
from npr_pipelines.engine.testing import ScriptHook, tiny_qwen3, trace_script
from npr_pipelines.serve import Prompt, ServerThread, build_state, create_app, load_engine
from npr_pipelines.serve.api import sampling_params
from npr_pipelines.structure import TagVocab, Trace

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen3 and a byte-level BPE tokenizer with the tags, saved like any HF checkpoint."""
    from _support import byte_bpe_tokenizer

    path = tmp_path_factory.mktemp("tiny-npr")
    tok = byte_bpe_tokenizer()
    model = tiny_qwen3(len(tok), seed=11)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def post(url: str, body: object) -> tuple[int, object]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _traces() -> list[Trace]:
    return [
        Trace.build(
            [(["compute a*b", "compute c*d"], ["a*b=12", "c*d=30"], "sum")], "the answer \\boxed{42}"
        ),
        Trace.build(
            [(["one", "two", "three"], ["1+1=2", "2+2=4", "3+3=6"], "add"), (["last"], ["12"], "ok")],
            "\\boxed{12}",
        ),
    ]


def test_concurrent_clients_match_the_in_process_engine(model_dir: Path) -> None:
    engine, tok = load_engine(model_dir, config=EngineConfig(num_blocks=256, block_size=8, max_running=4))
    tags = TagVocab.from_tokenizer(tok)
    encode = engine.codec.encode
    scripts = {
        f"s{i}": trace_script(tr, tags, encode, end=[tok.eos_token_id]) for i, tr in enumerate(_traces() * 2)
    }

    def hooks(p: Prompt):
        script = scripts.get(p.rid)
        return None if script is None else ScriptHook(script)

    state = build_state(engine, tok, max_queue=64, model_path=str(model_dir), hook_factory=hooks)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "sum of products?"}], add_generation_prompt=True
    )
    prompt = list(prompt["input_ids"])
    bodies = []
    for i, rid in enumerate(scripts):  # scripted parallel structure (forks and joins through the server)
        sp = {"temperature": 0.8, "top_p": 0.95, "seed": i, "max_new_tokens": 300}
        bodies.append({"input_ids": prompt, "sampling_params": sp, "rid": rid, "return_logprob": True})
    for i in range(6):  # free sampling, both modes, with and without top-k
        sp = {"temperature": 1.0, "top_k": 20 if i % 2 else -1, "seed": 100 + i, "max_new_tokens": 40}
        bodies.append(
            {
                "input_ids": prompt[: 5 + i],
                "sampling_params": sp,
                "rid": f"f{i}",
                "mode": "sequential" if i % 3 == 0 else "parallel",
                "return_logprob": True,
            }
        )
    with ServerThread(create_app(state)) as server:
        assert server.host == "127.0.0.1"
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda b: post(server.url + "/generate", b), bodies))
        status, text = get(server.url + "/metrics")
        _, json_metrics = get(server.url + "/metrics?format=json")
    state.worker.close()

    assert all(code == 200 for code, _ in answers), answers
    metrics = json.loads(json_metrics)
    assert status == 200 and "npr_kv_blocks_in_use 0\n" in text
    assert (
        metrics["kv_blocks_in_use"] == 0 and metrics["requests_running"] == 0 and metrics["queue_depth"] == 0
    )
    assert metrics["kv_view_tokens"] == 0
    assert metrics["requests_finished"] == len(bodies) and metrics["requests_failed"] == 0
    engine.check()  # invariants: nothing held

    # The same requests, one at a time, in a fresh in-process engine on a freshly loaded model.
    ref_engine, _ = load_engine(model_dir, config=EngineConfig(num_blocks=256, block_size=8))
    for body, (_, got) in zip(bodies, answers, strict=True):
        params = sampling_params(body["sampling_params"], body.get("mode", "parallel"))
        script = scripts.get(body["rid"])
        hook = None if script is None else ScriptHook(script)
        [ref] = ref_engine.generate([Request(body["rid"], body["input_ids"], params, logits_hook=hook)])
        meta = got["meta_info"]
        assert got["output_ids"] == ref.response_ids, body["rid"]
        assert meta["npr_finish_reason"] == ref.finish_reason.value
        assert meta["positions"] == ref.positions and meta["inserted"] == ref.inserted
        assert meta["forks"] == ref.to_dict()["forks"] and meta["segments"] == ref.to_dict()["segments"]
        assert meta["completion_tokens"] == ref.total_tokens and meta["prompt_tokens"] == len(
            body["input_ids"]
        )
        assert meta["critical_path_tokens"] == ref.critical_path_tokens
        lps = [x[0] for x in meta["output_token_logprobs"]]
        assert [x[1] for x in meta["output_token_logprobs"]] == ref.response_ids
        assert all((a is None) == (b is None) for a, b in zip(lps, ref.logprobs, strict=True))
        assert (
            max((abs(a - b) for a, b in zip(lps, ref.logprobs, strict=True) if a is not None), default=0)
            < 1e-5
        )
        assert got["text"] == tok.decode(ref.response_ids, skip_special_tokens=False)
        if script is not None:
            assert ref.finish_reason is FinishReason.EOS and ref.triggered
            assert meta["finish_reason"] == {"type": "stop", "matched": tok.eos_token_id}
            assert meta["span_table"] is not None


def test_text_batch_health_info_and_bad_requests(model_dir: Path) -> None:
    engine, tok = load_engine(model_dir, config=EngineConfig(num_blocks=128, block_size=8))
    state = build_state(engine, tok, max_queue=8, model_path=str(model_dir))
    with ServerThread(create_app(state)) as server:
        url = server.url
        assert get(url + "/health") == (200, '{"status":"ok"}')
        code, info = get(url + "/get_model_info")
        info = json.loads(info)
        assert code == 200 and info["is_generation"] and info["modes"] == ["parallel", "sequential"]
        assert info["model_path"] == str(model_dir) and info["tags"]["</step>"] == tok.convert_tokens_to_ids(
            "</step>"
        )

        sp = {"temperature": 0, "max_new_tokens": 8}
        code, by_text = post(url + "/generate", {"text": "the answer", "sampling_params": sp})
        assert code == 200
        ids = tok("the answer")["input_ids"]
        code, by_ids = post(url + "/generate", {"input_ids": [ids, ids[:3]], "sampling_params": sp})
        assert code == 200 and isinstance(by_ids, list) and len(by_ids) == 2
        assert by_text["output_ids"] == by_ids[0]["output_ids"]  # greedy: same prompt, same tokens
        assert "output_token_logprobs" not in by_text["meta_info"]
        assert by_text["meta_info"]["finish_reason"]["type"] in ("stop", "length", "structure")

        bad = [
            {"sampling_params": sp},  # no prompt
            {"text": "a", "input_ids": [1], "sampling_params": sp},  # both
            {"input_ids": [], "sampling_params": sp},
            {"input_ids": [10**9]},  # out of the vocabulary
            {"input_ids": [1, 2], "sampling_params": {"temperature": -1}},
            {"input_ids": [1, 2], "sampling_params": {"regex": "a+"}},  # not implemented: refused
            {"input_ids": [1, 2], "sampling_params": {"no_such_param": 1}},
            {"input_ids": [1, 2], "mode": "beam"},
            {"input_ids": [1, 2], "stream": True},
            {"input_ids": [[1], [2]], "rid": ["x", "x"]},
        ]
        for body in bad:
            code, err = post(url + "/generate", body)
            assert code == 400 and err["error"]["type"] == "bad_request", (body, err)
        code, _ = post(url + "/abort_request", {"rid": "nothing"})
        assert code == 200
    state.worker.close()
    assert not state.worker.alive


def test_full_queue_answers_503_and_recovers(model_dir: Path) -> None:
    engine, tok = load_engine(model_dir, config=EngineConfig(num_blocks=128, block_size=8))
    state = build_state(engine, tok, max_queue=3)
    body = {"input_ids": [5, 6, 7], "sampling_params": {"temperature": 0, "max_new_tokens": 4}}
    with ServerThread(create_app(state)) as server:
        results: list = []
        with state.worker.paused():
            threads = [
                threading.Thread(target=lambda: results.append(post(server.url + "/generate", body)))
                for _ in range(3)
            ]
            for t in threads:
                t.start()
            deadline = time.time() + 30
            while state.worker.queue_depth < 3:
                assert time.time() < deadline, "requests never reached the queue"
                time.sleep(0.01)
            code, err = post(server.url + "/generate", body)
            assert code == 503 and err["error"]["type"] == "queue_full"
            code, err = post(server.url + "/generate", {**body, "input_ids": [[1, 2], [3, 4]]})
            assert code == 503  # a batch is all or nothing
        for t in threads:
            t.join(60)
        assert [c for c, _ in results] == [200, 200, 200]
        _, snap = get(server.url + "/metrics?format=json")
        snap = json.loads(snap)
        assert snap["requests_rejected"] == 2 and snap["requests_finished"] == 3
        assert snap["kv_blocks_in_use"] == 0 and snap["queue_depth"] == 0
    state.worker.close()


def test_command_line_server_process(model_dir: Path) -> None:
    """``python -m npr_pipelines.serve`` loads the directory, binds 127.0.0.1 and answers; SIGTERM stops it."""
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    cmd = [sys.executable, "-m", "npr_pipelines.serve", "--model-path", str(model_dir), "--port", str(port)]
    cmd += [
        "--num-blocks",
        "64",
        "--block-size",
        "8",
        "--threads",
        "1",
        "--log-level",
        "warning",
        "--device",
        "cpu",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if get(url + "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "the server did not come up"
            time.sleep(0.2)
        code, out = post(
            url + "/generate",
            {"text": "the answer", "sampling_params": {"temperature": 0, "max_new_tokens": 4}},
        )
        assert code == 200 and out["meta_info"]["prompt_tokens"] > 0 and len(out["output_ids"]) <= 4
        _, info = get(url + "/get_model_info")
        assert json.loads(info)["engine"]["num_blocks"] == 64
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode is not None
