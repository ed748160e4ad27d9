"""The engine's flow control driving SGLang servers (or ``npr serve``) over HTTP.

Why: on a GPU cluster, sequential-mode work (NPR-Zero rollouts, rejection sampling, sequential
evaluation) is served by stock SGLang (DESIGN.md, "SGLang"). This backend keeps the engine's
contract: it takes the same ``Request`` objects and returns the same ``EngineOutput`` records, and it
drives the same ``RequestFlow`` state machine, so finish reasons, budgets and (in parallel mode) the
fork/join bookkeeping are decided here exactly as in the in-process engine. The servers only sample
tokens: each HTTP call is one stream continued from its context, through SGLang's native
``/generate`` with ``input_ids``, ``stop_token_ids`` and ``return_logprob``.

* **Sequential mode is exact**: one call per request, the raw request seed as ``sampling_seed``; the
  server's tokens are replayed through the flow, so the record equals the in-process engine's when the
  server samples like it (``npr serve`` does, seed for seed; stock SGLang only with its deterministic
  inference mode, otherwise greedy decoding agrees).
* **Parallel mode is approximate**: the trunk stops at ``</guideline>``, one call per branch forks from
  the shared prefix (SGLang's radix cache shares its KV, and a branch's context and positions are the
  native ones), but stock SGLang cannot concatenate branch KV, so after a join the next trunk segment
  is sampled by *re-prefilling* the flattened text: sequential positions where the native join uses
  ``max(branch end) + 1``, and later branches attending to earlier siblings. Every trace sampled after
  such a join carries ``metadata["approximate"] = True``; RL refuses those for PAPO unless the user
  opts in (``RLConfig.allow_approximate_rollouts``).
* **Log-probs** are the server's ``output_token_logprobs``. They match the engine's contract
  (``log_softmax(logits / T)``, before top-k/top-p and penalties) with ``top_p = 1`` and ``top_k`` off
  and SGLang's default settings (``SGLANG_RETURN_ORIGINAL_LOGPROB`` unset; set, it returns
  pre-temperature log-probs).
* **Data parallel**: a request goes, with all its calls (so the radix cache sees its prefix), to the
  server with the fewest requests outstanding.
* **Weights**: ``update_weights_from_disk(dir)`` posts SGLang's ``/update_weights_from_disk`` to every
  server (a checkpoint directory with ``config.json`` and ``model*.safetensors``, readable by them).

Logits hooks cannot cross HTTP: a request carrying one is refused.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from npr_pipelines.engine.flow import Event, RequestFlow, Stream, StreamKind, stream_seed
from npr_pipelines.engine.types import EngineOutput, FinishReason, Request, TokenCodec
from npr_pipelines.structure import Tag, TagVocab

#: ``metadata["approximation"]`` of a trace sampled after a re-prefilled join.
REPREFILL_JOIN = "join re-prefilled as flattened text: sequential positions and sibling-visible attention"


class BackendError(RuntimeError):
    """A server refused or failed a call (the message names the server and what it said)."""


class WeightUpdateError(BackendError):
    """At least one server did not load the new weights (the message lists which and why)."""


@dataclass(frozen=True)
class SGLangConfig:
    """HTTP behaviour of the backend.

    ``max_concurrency`` bounds requests in flight across all servers (each holds one thread; its
    branches run on a second pool of the same size). 503 answers (a full queue) and connection errors
    are retried ``retries`` times, waiting ``Retry-After`` or ``retry_backoff_s`` doubling.
    """

    timeout_s: float = 3600.0  # one call may decode a 30k-token response
    connect_timeout_s: float = 10.0
    max_concurrency: int = 64
    retries: int = 5
    retry_backoff_s: float = 0.5

    def __post_init__(self) -> None:
        if self.max_concurrency < 1 or self.retries < 0 or self.timeout_s <= 0:
            raise ValueError("need max_concurrency >= 1, retries >= 0 and timeout_s > 0")


@dataclass
class _Server:
    """One server URL, its flavour and counters (guarded by the backend's lock)."""

    url: str
    npr: bool | None = None  # ``npr serve`` (accepts the NPR "mode" field); None: not probed yet
    outstanding: int = 0
    requests: int = 0
    calls: int = 0


@dataclass
class _Call:
    """What one ``/generate`` call returned, as the flow needs it."""

    ids: list[int]
    logprobs: list[float]
    finish: dict[str, Any]
    prefilled: int  # prompt tokens the server ran (its radix cache hits excluded)


@dataclass
class _Progress:
    """Per-request bookkeeping of a flow driven over HTTP."""

    server: _Server
    seed: int
    calls: int = 0
    prefill: int = 0
    decode: int = 0
    approximate_calls: int = 0
    aborted: bool = False
    stream_calls: dict[tuple[int, ...], int] = field(default_factory=dict)
    in_flight: set[str] = field(default_factory=set)  # server-side request ids of the running calls


class SGLangBackend:
    """``Engine``-compatible (``generate``; ``add_request``/``step``/``has_unfinished``/``abort``)
    decoding on SGLang-protocol servers at ``urls``.

    ``codec`` must carry every EOS id the servers stop at (SGLang also stops at the model's
    ``generation_config`` EOS ids: pass them as ``extra_eos_ids``); a server stop on an id the flow
    does not know still ends the request (``STOP``). ``tags`` enable parallel mode (approximate).
    """

    def __init__(
        self,
        urls: Sequence[str],
        codec: TokenCodec,
        tags: TagVocab | None = None,
        config: SGLangConfig | None = None,
    ) -> None:
        if not urls:
            raise ValueError("give at least one server URL")
        self.codec = codec
        self.tags = tags
        self.config = config or SGLangConfig()
        self.servers = [_Server(u.rstrip("/")) for u in urls]
        self._lock = threading.Lock()
        self._local = threading.local()
        self._flows = ThreadPoolExecutor(self.config.max_concurrency, thread_name_prefix="sglang-flow")
        self._branches = ThreadPoolExecutor(self.config.max_concurrency, thread_name_prefix="sglang-branch")
        self._pending: dict[str, Future[EngineOutput]] = {}
        self._progress: dict[str, _Progress] = {}

    # ----------------------------------------------------------------- Engine-compatible API
    def generate(self, requests: Sequence[Request]) -> list[EngineOutput]:
        """Decode all ``requests`` to the end (concurrently, over the servers); outputs in input order."""
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be unique")
        futures = [self._submit(r) for r in requests]
        return [f.result() for f in futures]

    def add_request(self, request: Request) -> None:
        """Start ``request``; its output comes back from a later ``step()``."""
        if request.request_id in self._pending:
            raise ValueError(f"request id {request.request_id!r} is already in flight")
        self._pending[request.request_id] = self._submit(request)

    def step(self) -> list[EngineOutput]:
        """Wait until at least one added request finished; return every finished one."""
        if not self._pending:
            return []
        wait(self._pending.values(), return_when=FIRST_COMPLETED)
        done = [rid for rid, f in self._pending.items() if f.done()]
        return [self._pending.pop(rid).result() for rid in done]

    def has_unfinished(self) -> bool:
        return bool(self._pending)

    def abort(self, request_id: str) -> None:
        """End ``request_id`` as ``ABORTED`` after its current call (also aborted on the server)."""
        with self._lock:
            progress = self._progress.get(request_id)
            if progress is None:
                return
            progress.aborted = True
            running = sorted(progress.in_flight)
        for rid in running:
            self._post(progress.server, "/abort_request", {"rid": rid}, check=False)

    def close(self) -> None:
        self._flows.shutdown(wait=True, cancel_futures=True)
        self._branches.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> SGLangBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- weights
    def update_weights_from_disk(self, model_path: str, **extra: Any) -> list[dict[str, Any]]:
        """Load the checkpoint directory ``model_path`` on every server (SGLang's
        ``/update_weights_from_disk``; ``extra`` e.g. ``abort_all_requests=True``).

        The path is read by the servers, so it must be visible to them (a shared volume). Servers
        finish (or abort) what they run before swapping. Raises ``WeightUpdateError`` naming every
        server that refused; the answers otherwise, in server order.
        """
        body = {"model_path": str(model_path), **extra}
        with ThreadPoolExecutor(len(self.servers)) as pool:
            answers = list(pool.map(lambda s: self._update_one(s, body), self.servers))
        failed = [
            f"{s.url}: {a.get('message', a)}"
            for s, a in zip(self.servers, answers, strict=True)
            if not a.get("success")
        ]
        if failed:
            raise WeightUpdateError(f"weight update from {model_path} failed on " + "; ".join(failed))
        return answers

    def _update_one(self, server: _Server, body: dict[str, Any]) -> dict[str, Any]:
        try:
            status, answer = self._post(server, "/update_weights_from_disk", body, check=False)
        except BackendError as exc:
            return {"success": False, "message": str(exc)}
        if not isinstance(answer, dict):
            return {"success": False, "message": f"HTTP {status}: {answer!r}"}
        return answer if status == 200 else {**answer, "success": False}

    # ----------------------------------------------------------------- dispatch
    def _submit(self, request: Request) -> Future[EngineOutput]:
        if request.logits_hook is not None:
            raise ValueError(f"request {request.request_id!r}: logits hooks cannot be sent to a server")
        flow = RequestFlow(request, self.codec, self.tags)  # validates mode/tags before any call
        server = self._acquire()
        seed = request.params.seed
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        progress = _Progress(server, seed)
        with self._lock:
            self._progress[request.request_id] = progress
        return self._flows.submit(self._run, flow, progress)

    def _acquire(self) -> _Server:
        """The server with the fewest requests outstanding (the first of equals)."""
        with self._lock:
            server = min(self.servers, key=lambda s: s.outstanding)
            server.outstanding += 1
            server.requests += 1
            return server

    def _run(self, flow: RequestFlow, progress: _Progress) -> EngineOutput:
        start = time.perf_counter()
        try:
            self._probe(progress.server)
            self._drive(flow, progress)
        finally:
            with self._lock:
                progress.server.outstanding -= 1
                self._progress.pop(flow.request.request_id, None)
        return self._output(flow, progress, time.perf_counter() - start)

    # ----------------------------------------------------------------- the flow over HTTP
    def _drive(self, flow: RequestFlow, progress: _Progress) -> None:
        """Advance ``flow`` with server calls until it ends: one call for a trunk segment, one per
        branch (concurrently), each replayed token by token through the flow's own rules."""
        while not flow.finished:
            if progress.aborted:
                flow.abort()
                return
            if flow.check_budgets() is Event.FINISHED:
                return
            live = flow.live_streams()
            if not live:  # cannot happen for a consistent flow; never spin
                raise BackendError(f"request {flow.request.request_id!r}: no live stream and not finished")
            if len(live) == 1 and live[0].kind is StreamKind.TRUNK:
                calls = [self._call(flow, live[0], progress)]
            else:
                futures = [self._branches.submit(self._call, flow, s, progress) for s in live]
                calls = [f.result() for f in futures]
            self._replay(flow, live, calls)

    def _replay(self, flow: RequestFlow, live: list[Stream], calls: list[_Call]) -> None:
        """Hand the calls' tokens to the flow in lockstep (token i of every stream, then i + 1), with
        the budget check before each round, as the engine's batched steps do."""
        longest = max(len(c.ids) for c in calls)
        for i in range(longest):
            if flow.check_budgets() is Event.FINISHED:
                return
            for stream, call in zip(live, calls, strict=True):
                if i < len(call.ids) and stream.live and not flow.finished:
                    event = flow.accept(stream, call.ids[i], call.logprobs[i])
                    if event is Event.FINISHED:
                        return
        for stream, call in zip(live, calls, strict=True):
            if stream.live and not flow.finished:
                self._server_ended(flow, stream, call)

    def _server_ended(self, flow: RequestFlow, stream: Stream, call: _Call) -> None:
        """The server stopped a stream the flow still considers live: follow the server where the
        flow has no rule of its own, so a request never loops on a server that will not continue."""
        kind = call.finish.get("type")
        if kind == "abort":
            flow.end_request(FinishReason.ABORTED, f"the server aborted: {call.finish.get('message', '')}")
        elif kind == "stop" and stream.kind is StreamKind.TRUNK:
            flow.end_request(FinishReason.STOP, f"server stop on {call.finish.get('matched')!r}")
        elif not call.ids:
            if kind == "length":
                flow.end_request(FinishReason.LENGTH, "the server generated nothing (its context length?)")
            else:
                raise BackendError(f"stream {stream.path}: the server returned no token ({call.finish})")
        # otherwise ("length" below our own budgets): the next round continues the stream

    def _call(self, flow: RequestFlow, stream: Stream, progress: _Progress) -> _Call:
        context, approximate = self._context(flow, stream)
        rid = flow.request.request_id
        path = stream.path
        with self._lock:
            n = progress.stream_calls.get(path, 0)
            progress.stream_calls[path] = n + 1
            progress.calls += 1
            progress.approximate_calls += approximate
            progress.server.calls += 1
        # The first call of the first trunk segment gets the request's own seed, so a sequential
        # request samples exactly as the in-process engine would (the server derives the stream seed).
        seed = progress.seed if path == (0,) and n == 0 else stream_seed(progress.seed, (*path, n))
        sub_rid = f"{rid}/{'.'.join(map(str, path))}/{n}"
        body: dict[str, Any] = {
            "input_ids": context,
            "sampling_params": self._sampling(flow, stream, seed),
            "return_logprob": True,
            "rid": sub_rid,
        }
        if progress.server.npr:
            body["mode"] = "sequential"  # the backend forks; `npr serve` must not fork on its own
        with self._lock:
            progress.in_flight.add(sub_rid)
        try:
            _, answer = self._post(progress.server, "/generate", body)
        finally:
            with self._lock:
                progress.in_flight.discard(sub_rid)
        call = _parse_generate(answer, progress.server.url)
        with self._lock:
            progress.prefill += call.prefilled
            progress.decode += max(0, len(call.ids) - 1)  # the last sampled token is never run
        return call

    def _context(self, flow: RequestFlow, stream: Stream) -> tuple[list[int], bool]:
        """The ids a stream continues: every earlier stream in flattened order except its own
        siblings (a branch sees the prefix only), then its own tokens. True when a finished block's
        branches are in it, i.e. the context is a re-prefilled join, not the native KV row."""
        ids: list[int] = []
        rejoined = False
        for s in flow.streams:
            if s is stream:
                break
            if s.kind is StreamKind.BRANCH:
                if stream.kind is StreamKind.BRANCH and s.path[0] == stream.path[0]:
                    continue
                rejoined = True
            ids += s.tokens
        return ids + stream.tokens, rejoined

    def _sampling(self, flow: RequestFlow, stream: Stream, seed: int) -> dict[str, Any]:
        """SGLang ``sampling_params`` for one call: the request's settings, the stop ids the flow acts
        on for this kind of stream, and at most the tokens its budgets still allow."""
        p = flow.params
        stops = set(self.codec.eos_token_ids)
        penalty = p.repetition_penalty
        room = p.max_tokens - (stream.positions[-1] + 1 - flow.prompt_len)
        if p.max_total_tokens is not None:
            room = min(room, p.max_total_tokens - flow.response_len)
        if stream.kind is StreamKind.BRANCH:
            assert self.tags is not None
            stops |= {self.tags[Tag.STEP_END], self.tags[Tag.GUIDELINE]}
            if p.branch_repetition_penalty is not None:
                penalty = p.branch_repetition_penalty
            if p.max_branch_tokens is not None:
                room = min(room, p.max_branch_tokens - len(stream.tokens))
        else:
            stops |= set(p.stop_token_ids)
            if p.mode == "parallel":
                assert self.tags is not None
                stops.add(self.tags[Tag.GUIDELINE_END])
        return {
            "max_new_tokens": max(1, room),
            "temperature": p.temperature,
            "top_p": p.top_p,
            "top_k": p.top_k if p.top_k > 0 else -1,
            "repetition_penalty": penalty,
            "stop_token_ids": sorted(stops),
            "sampling_seed": seed,
        }

    # ----------------------------------------------------------------- the record
    def _output(self, flow: RequestFlow, progress: _Progress, latency: float) -> EngineOutput:
        """The engine's record of ``flow`` (``RequestFlow.output``), plus where it came from."""
        metadata: dict[str, Any] = {
            "backend": "sglang",
            "server": progress.server.url,
            "http_calls": progress.calls,
            "approximate": progress.approximate_calls > 0,
        }
        if progress.approximate_calls:
            metadata["approximation"] = REPREFILL_JOIN
            metadata["approximate_calls"] = progress.approximate_calls
        return flow.output(
            self.tags,
            self.codec,
            prefill_tokens=progress.prefill,
            decode_tokens=progress.decode,
            time_to_first_token_s=None,  # not observable without streaming
            latency_s=latency,
            metadata=metadata,
        )

    # ----------------------------------------------------------------- HTTP
    def _probe(self, server: _Server) -> None:
        """Learn once whether ``server`` is ``npr serve`` (its model info lists the decoding modes)."""
        if server.npr is not None:
            return
        status, info = self._get(server, "/get_model_info")
        if status != 200 or not isinstance(info, dict):
            raise BackendError(f"{server.url}/get_model_info answered HTTP {status}: {info!r}")
        server.npr = "modes" in info

    def _session(self) -> Any:
        """One ``requests.Session`` per thread (sessions are not documented as thread-safe)."""
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _get(self, server: _Server, route: str) -> tuple[int, Any]:
        return self._send(server, "GET", route, None)

    def _post(self, server: _Server, route: str, body: Any, *, check: bool = True) -> tuple[int, Any]:
        status, answer = self._send(server, "POST", route, body)
        if check and status != 200:
            raise BackendError(f"{server.url}{route} answered HTTP {status}: {_message(answer)}")
        return status, answer

    def _send(self, server: _Server, method: str, route: str, body: Any) -> tuple[int, Any]:
        """One request with retries on 503 and connection errors; (status, decoded JSON or text)."""
        import requests

        cfg = self.config
        delay = cfg.retry_backoff_s
        for attempt in range(cfg.retries + 1):
            last = attempt == cfg.retries
            try:
                resp = self._session().request(
                    method, server.url + route, json=body, timeout=(cfg.connect_timeout_s, cfg.timeout_s)
                )
            except requests.ConnectionError as exc:
                if last:
                    raise BackendError(f"{server.url}{route}: cannot connect ({exc})") from exc
                time.sleep(delay)
                delay *= 2
                continue
            except requests.RequestException as exc:
                raise BackendError(f"{server.url}{route}: {exc}") from exc
            if resp.status_code == 503 and not last:
                time.sleep(_retry_after(resp.headers.get("Retry-After"), delay))
                delay *= 2
                continue
            try:
                return resp.status_code, resp.json()
            except ValueError:
                return resp.status_code, resp.text
        raise AssertionError("unreachable")  # the last attempt returns or raises


def _retry_after(header: str | None, default: float) -> float:
    try:
        return max(0.0, float(header)) if header is not None else default
    except ValueError:
        return default


def _message(answer: Any) -> str:
    """The error text of an SGLang or ``npr serve`` error body."""
    if isinstance(answer, dict):
        err = answer.get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))
        if "message" in answer:
            return str(answer["message"])
    return str(answer)[:500]


def _parse_generate(answer: Any, url: str) -> _Call:
    """Token ids, log-probs and finish reason of a single-prompt ``/generate`` answer.

    SGLang puts the sampled ids in ``output_ids`` and ``output_token_logprobs`` (``[logprob, id,
    text]``), the matched stop id included; both must agree, or the record would pair log-probs with
    the wrong tokens.
    """
    if not isinstance(answer, dict) or not isinstance(answer.get("meta_info"), dict):
        raise BackendError(f"{url}/generate: unexpected answer {str(answer)[:300]}")
    meta = answer["meta_info"]
    entries = meta.get("output_token_logprobs")
    if not isinstance(entries, list):
        raise BackendError(f"{url}/generate: no output_token_logprobs (return_logprob ignored?)")
    if any(not isinstance(e, list | tuple) or len(e) < 2 or e[0] is None for e in entries):
        raise BackendError(f"{url}/generate: an output token without a log-prob")
    ids = [int(e[1]) for e in entries]
    lps = [float(e[0]) for e in entries]
    output_ids = answer.get("output_ids")
    if output_ids is not None and list(output_ids) != ids:
        raise BackendError(f"{url}/generate: output_ids and output_token_logprobs disagree")
    finish = meta.get("finish_reason") or {}
    if not isinstance(finish, dict):
        finish = {"type": str(finish)}
    matched = finish.get("matched")
    if finish.get("type") == "stop" and isinstance(matched, int) and (not ids or ids[-1] != matched):
        raise BackendError(f"{url}/generate: the stop id {matched} is missing from the output ids")
    prefilled = int(meta.get("prompt_tokens", 0)) - int(meta.get("cached_tokens", 0) or 0)
    return _Call(ids, lps, finish, prefilled)


def servers_from_env(value: str | None = None) -> list[str]:
    """Server URLs from a comma-separated list (default: ``$NPR_SGLANG_URLS``)."""
    raw = os.environ.get("NPR_SGLANG_URLS", "") if value is None else value
    return [u.strip() for u in raw.split(",") if u.strip()]


def approximate_ids(outputs: Iterable[EngineOutput]) -> list[str]:
    """Request ids of the approximate traces among ``outputs``."""
    return [o.request_id for o in outputs if o.approximate]
