"""A bounded load generator for ``npr serve`` (or any server with SGLang's ``/generate``).

``clients`` closed-loop clients, each with its own keep-alive connection and at most one request in
flight, send ``/generate`` requests back to back for ``seconds``; requests already sent when the time
is up are awaited (each bounded by ``timeout``), so the load ends cleanly. Reported: completed
requests, errors (non-200 answers, unparseable bodies, connection failures) with a few samples,
client-side latency percentiles, throughput, and the server's ``/metrics?format=json`` before and
after (KV blocks in use, queue depth, ...), so a caller can check that nothing stays held.

    python -m npr_pipelines.serve.loadgen --url http://127.0.0.1:30000 --clients 64 --seconds 30

prints one JSON object (``LoadResult.to_dict``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

MAX_ERROR_SAMPLES = 5


@dataclass
class LoadResult:
    """What one load run measured (latencies in seconds, client side)."""

    url: str
    clients: int
    seconds: float
    wall_s: float
    requests: int
    errors: int
    status_counts: dict[str, int]
    latency_p50_s: float | None
    latency_p90_s: float | None
    latency_p99_s: float | None
    latency_max_s: float | None
    throughput_rps: float
    error_samples: list[str] = field(default_factory=list)
    server_before: dict[str, Any] | None = None
    server_after: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lo = int(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def default_body(max_new_tokens: int = 16, mode: str = "parallel") -> dict[str, Any]:
    """A small text request (the server tokenizes it)."""
    return {
        "text": "Compute 3*4+5*6. Think in parallel steps.",
        "sampling_params": {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": max_new_tokens},
        "mode": mode,
    }


def server_metrics(url: str, timeout: float = 10.0) -> dict[str, Any] | None:
    """``GET /metrics?format=json``, or None when the server does not answer it."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics?format=json", timeout=timeout) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


class _Tally:
    """Results shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.errors = 0
        self.samples: list[str] = []

    def ok(self, latency: float) -> None:
        with self.lock:
            self.latencies.append(latency)
            self.statuses["200"] += 1

    def error(self, status: str, detail: str) -> None:
        with self.lock:
            self.errors += 1
            self.statuses[status] += 1
            if len(self.samples) < MAX_ERROR_SAMPLES:
                self.samples.append(f"{status}: {detail[:300]}")


def _client(
    url: str,
    payload: bytes,
    start: threading.Barrier,
    deadline_box: list[float],
    timeout: float,
    tally: _Tally,
) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path.rstrip("/") or "") + "/generate"
    headers = {"Content-Type": "application/json"}
    conn: http.client.HTTPConnection | None = None
    start.wait()
    while time.perf_counter() < deadline_box[0]:
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        began = time.perf_counter()
        try:
            conn.request("POST", path, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            tally.error("connection", f"{type(exc).__name__}: {exc}")
            conn.close()
            conn = None
            continue
        latency = time.perf_counter() - began
        if resp.status != 200:
            tally.error(str(resp.status), raw.decode("utf-8", "replace"))
            continue
        try:
            json.loads(raw)
        except ValueError as exc:
            tally.error("bad_body", str(exc))
            continue
        tally.ok(latency)
    if conn is not None:
        conn.close()


def run_load(
    url: str,
    *,
    clients: int = 64,
    seconds: float = 30.0,
    body: dict[str, Any] | None = None,
    timeout: float = 120.0,
) -> LoadResult:
    """Drive ``url`` with ``clients`` closed-loop clients for ``seconds`` (see the module docstring)."""
    if clients < 1 or seconds <= 0:
        raise ValueError("clients must be >= 1 and seconds > 0")
    payload = json.dumps(body if body is not None else default_body()).encode()
    before = server_metrics(url)
    tally = _Tally()
    deadline_box = [float("inf")]  # set once every client is ready, so setup never eats the window
    start = threading.Barrier(clients + 1)
    threads = [
        threading.Thread(
            target=_client, args=(url, payload, start, deadline_box, timeout, tally), daemon=True
        )
        for _ in range(clients)
    ]
    for t in threads:
        t.start()
    began = time.perf_counter()
    deadline_box[0] = began + seconds
    start.wait()
    for t in threads:
        t.join(seconds + timeout + 30)
    wall = time.perf_counter() - began
    lat = tally.latencies
    return LoadResult(
        url=url,
        clients=clients,
        seconds=seconds,
        wall_s=wall,
        requests=len(lat),
        errors=tally.errors,
        status_counts=dict(tally.statuses),
        latency_p50_s=percentile(lat, 50),
        latency_p90_s=percentile(lat, 90),
        latency_p99_s=percentile(lat, 99),
        latency_max_s=max(lat) if lat else None,
        throughput_rps=len(lat) / wall if wall > 0 else 0.0,
        error_samples=tally.samples,
        server_before=before,
        server_after=server_metrics(url),
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m npr_pipelines.serve.loadgen", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--url", default="http://127.0.0.1:30000", help="the server's base URL")
    ap.add_argument("--clients", type=int, default=64, help="concurrent closed-loop clients")
    ap.add_argument("--seconds", type=float, default=30.0, help="how long new requests are sent")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--mode", choices=["parallel", "sequential"], default="parallel")
    ap.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (seconds)")
    args = ap.parse_args(argv)
    result = run_load(
        args.url,
        clients=args.clients,
        seconds=args.seconds,
        body=default_body(args.max_new_tokens, args.mode),
        timeout=args.timeout,
    )
    print(json.dumps(result.to_dict(), indent=2))
    return 0 if result.errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
