"""``npr serve`` under load (#11 item 3): the real command, started as a process on 127.0.0.1, takes 64
concurrent closed-loop clients for a fixed time (``npr_pipelines.serve.loadgen``) without an error,
and once the load ends holds no KV block, no attention view and no queued request; p50/p99 latency is
printed. The server's listening sockets are checked too: loopback only by default (#11 item 4)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from _support import free_port

from npr_pipelines.serve.loadgen import LoadResult, default_body, percentile, run_load

CLIENTS = 64
SECONDS = 5.0
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3 and a byte-level BPE tokenizer with the tags (as in ``test_serve.py``)."""
    from _support import byte_bpe_tokenizer

    from npr_pipelines.engine.testing import tiny_qwen3

    path = tmp_path_factory.mktemp("tiny-npr-load")
    tok = byte_bpe_tokenizer()
    tiny_qwen3(len(tok), seed=11).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def metrics(url: str) -> dict:
    with urllib.request.urlopen(url + "/metrics?format=json", timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """``npr serve`` with its default host and engine sizes (one torch thread), stopped with SIGTERM."""
    port = free_port()
    cmd = [sys.executable, "-m", "npr_pipelines.cli", "serve", "--model-path", str(model_dir)]
    cmd += ["--port", str(port), "--device", "cpu", "--threads", "1", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "npr serve did not come up"
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_npr_serve_listens_on_loopback_only(server: tuple[str, subprocess.Popen]) -> None:
    _, proc = server
    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    listening = [
        c.laddr for p in procs for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
    ]
    assert listening, "the server has no listening socket"
    assert all(addr.ip in LOOPBACK for addr in listening), listening


def test_64_clients_for_a_fixed_time_without_errors_or_cache_growth(
    server: tuple[str, subprocess.Popen],
) -> None:
    url, _ = server
    idle = metrics(url)
    assert idle["kv_blocks_in_use"] == 0 and idle["kv_view_tokens"] == 0

    result: LoadResult = run_load(url, clients=CLIENTS, seconds=SECONDS, body=default_body(16), timeout=120)
    summary = {
        "clients": CLIENTS,
        "seconds": SECONDS,
        "requests": result.requests,
        "errors": result.errors,
        "p50_s": round(result.latency_p50_s or 0, 4),
        "p99_s": round(result.latency_p99_s or 0, 4),
        "throughput_rps": round(result.throughput_rps, 2),
    }
    print(f"\nnpr serve load: {json.dumps(summary)}")

    assert result.errors == 0, result.error_samples
    assert result.status_counts == {"200": result.requests}
    assert result.requests >= CLIENTS  # every client completed requests
    assert 0 < result.latency_p50_s <= result.latency_p99_s <= result.latency_max_s
    assert result.wall_s < SECONDS + 60  # the tail (requests in flight at the deadline) is bounded

    after = result.server_after
    assert after is not None
    # Everything the load created is released: no block, no view token, nothing running or queued.
    assert after["kv_blocks_in_use"] == 0 and after["kv_view_tokens"] == 0
    assert after["requests_running"] == 0 and after["queue_depth"] == 0
    assert after["requests_finished"] - idle["requests_finished"] == result.requests
    assert after["requests_failed"] == idle["requests_failed"] and after["requests_rejected"] == 0
    # The views' memory goes back to what the idle server held (no growth that outlives the load).
    assert after["kv_view_bytes"] <= idle["kv_view_bytes"]


def test_loadgen_command_line_prints_json(server: tuple[str, subprocess.Popen]) -> None:
    url, _ = server
    args = ["--url", url, "--clients", "4", "--seconds", "1", "--max-new-tokens", "4"]
    done = subprocess.run(
        [sys.executable, "-m", "npr_pipelines.serve.loadgen", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["clients"] == 4 and out["errors"] == 0 and out["requests"] >= 4
    assert out["latency_p50_s"] <= out["latency_p99_s"]
    assert out["server_after"]["kv_blocks_in_use"] == 0


def test_percentile_interpolates_between_order_statistics() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 100) == 100.0
