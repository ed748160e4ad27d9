"""The ``/generate`` contract: SGLang's native request/response shape plus the NPR structure record.

Request (JSON)::

    {"input_ids": [..] | [[..], ..]  or  "text": "..." | ["...", ..],
     "sampling_params": {"temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids", "seed"
                         (or "sampling_seed"), "repetition_penalty", and the NPR extras
                         "branch_repetition_penalty", "max_total_tokens", "max_plans",
                         "max_branch_tokens", "fork_reserve"},   (a dict, or one dict per prompt)
     "return_logprob": false, "rid": "..." | [..], "mode": "parallel" | "sequential"}

Response: one object per prompt (a list for a batch)::

    {"text": "...", "output_ids": [..],
     "meta_info": {"id", "finish_reason": {"type": "stop", "matched": id} | {"type": "length", ...},
                   "prompt_tokens", "completion_tokens", "cached_tokens", "e2e_latency",
                   "output_token_logprobs": [[logprob | null, id, null], ..]   (return_logprob),
                   and the NPR record: "npr_finish_reason", "finish_detail", "mode", "positions",
                   "inserted", "segments", "forks", "span_table", "total_tokens",
                   "critical_path_tokens", "triggered", "prefill_tokens", "decode_tokens",
                   "time_to_first_token"}}

``completion_tokens`` counts the flattened response (every branch); ``output_ids`` is that response
in layout order, ``positions[i]`` its RoPE position, ``inserted[i]`` whether the engine inserted it
(step headers, ``<takeaway>``; their log-prob is null). SGLang's ``top_k = -1`` means off, as 0 does.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from npr_pipelines.engine import EngineOutput, FinishReason, SamplingParams

DEFAULT_MAX_NEW_TOKENS = 128

_SAMPLING_KEYS = {
    "temperature",
    "top_p",
    "top_k",
    "max_new_tokens",
    "stop_token_ids",
    "seed",
    "sampling_seed",
    "repetition_penalty",
    "branch_repetition_penalty",
    "max_total_tokens",
    "max_plans",
    "max_branch_tokens",
    "fork_reserve",
}
#: SGLang sampling parameters this engine does not implement: rejected rather than silently ignored.
_UNSUPPORTED = {
    "stop",
    "regex",
    "json_schema",
    "ebnf",
    "frequency_penalty",
    "presence_penalty",
    "min_new_tokens",
    "n",
    "min_p",
    "logit_bias",
}


class BadRequest(ValueError):
    """The request cannot be served as sent (HTTP 400)."""


@dataclass(frozen=True)
class Prompt:
    """One prompt of a ``/generate`` call, ready for the engine."""

    rid: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool


def _as_list(value: Any, n: int, name: str) -> list:
    if isinstance(value, list):
        if len(value) != n:
            raise BadRequest(f"{name} has {len(value)} entries for {n} prompts")
        return value
    return [value] * n


def sampling_params(raw: dict[str, Any] | None, mode: str) -> SamplingParams:
    """SGLang-style ``sampling_params`` -> the engine's immutable ``SamplingParams``."""
    raw = dict(raw or {})
    unsupported = sorted(k for k in raw if k in _UNSUPPORTED and raw[k] not in (None, [], 0, 0.0, 1))
    if unsupported:
        raise BadRequest(f"unsupported sampling parameters: {unsupported}")
    unknown = sorted(k for k in raw if k not in _SAMPLING_KEYS and k not in _UNSUPPORTED)
    if unknown:
        raise BadRequest(f"unknown sampling parameters: {unknown}")
    top_k = raw.get("top_k", 0)
    seed = raw.get("seed", raw.get("sampling_seed"))
    try:
        return SamplingParams(
            mode=mode,  # type: ignore[arg-type]
            temperature=float(raw.get("temperature", 1.0)),
            top_p=float(raw.get("top_p", 1.0)),
            top_k=0 if top_k is None or int(top_k) < 0 else int(top_k),
            repetition_penalty=float(raw.get("repetition_penalty", 1.0)),
            branch_repetition_penalty=(
                None
                if raw.get("branch_repetition_penalty") is None
                else float(raw["branch_repetition_penalty"])
            ),
            seed=None if seed is None else int(seed),
            max_tokens=int(raw.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
            max_total_tokens=None if raw.get("max_total_tokens") is None else int(raw["max_total_tokens"]),
            max_plans=int(raw.get("max_plans", 5)),
            max_branch_tokens=None if raw.get("max_branch_tokens") is None else int(raw["max_branch_tokens"]),
            fork_reserve=int(raw.get("fork_reserve", 0)),
            stop_token_ids=tuple(int(t) for t in raw.get("stop_token_ids") or ()),
        )
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"invalid sampling_params: {exc}") from exc


def parse_generate(
    body: dict[str, Any], tokenize: Callable[[str], list[int]] | None, vocab_size: int
) -> tuple[list[Prompt], bool]:
    """The prompts of a ``/generate`` body and whether it was a batch (list in, list out)."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    if body.get("stream"):
        raise BadRequest("streaming is not supported")
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise BadRequest("give exactly one of 'text' and 'input_ids'")
    if ids is not None:
        batch = bool(ids) and isinstance(ids[0], list)
        prompts = ids if batch else [ids]
        for p in prompts:
            if (
                not isinstance(p, list)
                or not p
                or not all(isinstance(t, int) and 0 <= t < vocab_size for t in p)
            ):
                raise BadRequest(f"input_ids must be non-empty lists of token ids in [0, {vocab_size})")
    else:
        if tokenize is None:
            raise BadRequest("this server has no tokenizer: send input_ids")
        batch = isinstance(text, list)
        texts = text if batch else [text]
        if not all(isinstance(t, str) and t for t in texts):
            raise BadRequest("text must be a non-empty string or a list of them")
        prompts = [tokenize(t) for t in texts]
    n = len(prompts)
    mode = body.get("mode", "parallel")
    if mode not in ("parallel", "sequential"):
        raise BadRequest(f"mode must be 'parallel' or 'sequential', got {mode!r}")
    raw_params = _as_list(body.get("sampling_params"), n, "sampling_params")
    logprob = _as_list(bool(body.get("return_logprob", False)), n, "return_logprob")
    rids = body.get("rid")
    if rids is None:
        rids = [uuid.uuid4().hex for _ in range(n)]
    rids = _as_list(rids, n, "rid")
    if len(set(rids)) != n:
        raise BadRequest("rid values must be unique")
    out = [
        Prompt(str(r), list(p), sampling_params(sp, mode), bool(lp))
        for r, p, sp, lp in zip(rids, prompts, raw_params, logprob, strict=True)
    ]
    return out, batch


#: How the engine's finish reasons map onto SGLang's ``finish_reason.type``.
_LENGTH = {FinishReason.LENGTH, FinishReason.TOTAL_BUDGET, FinishReason.FORK_BUDGET, FinishReason.BRANCH_CAP}
_ABORT = {FinishReason.ABORTED, FinishReason.KV_CAPACITY}


def finish_reason(out: EngineOutput) -> dict[str, Any]:
    """SGLang's ``{"type": "stop"|"length"|"abort", ...}``; structure failures are ``"structure"``."""
    r = out.finish_reason
    last = out.response_ids[-1] if out.response_ids else None
    if r in (FinishReason.EOS, FinishReason.STOP):
        return {"type": "stop", "matched": last}
    if r in _LENGTH:
        return {"type": "length", "length": out.total_tokens, "reason": r.value}
    if r in _ABORT:
        return {"type": "abort", "message": out.finish_detail}
    return {"type": "structure", "reason": r.value, "message": out.finish_detail}


def format_output(
    out: EngineOutput,
    return_logprob: bool,
    detokenize: Callable[[Sequence[int]], str] | None,
) -> dict[str, Any]:
    record = out.to_dict()
    meta: dict[str, Any] = {
        "id": out.request_id,
        "finish_reason": finish_reason(out),
        "prompt_tokens": out.prompt_len,
        "completion_tokens": out.total_tokens,
        "cached_tokens": 0,
        "e2e_latency": out.latency_s,
        "npr_finish_reason": out.finish_reason.value,
        "finish_detail": out.finish_detail,
        "mode": out.mode,
        "positions": record["positions"],
        "inserted": record["inserted"],
        "segments": record["segments"],
        "forks": record["forks"],
        "span_table": record["span_table"],
        "total_tokens": out.total_tokens,
        "critical_path_tokens": out.critical_path_tokens,
        "triggered": out.triggered,
        "prefill_tokens": out.prefill_tokens,
        "decode_tokens": out.decode_tokens,
        "time_to_first_token": out.time_to_first_token_s,
        "preemptions": out.preemptions,
    }
    if return_logprob:
        meta["output_token_logprobs"] = [
            [lp, tok, None] for lp, tok in zip(record["logprobs"], out.response_ids, strict=True)
        ]
    return {
        "text": detokenize(out.response_ids) if detokenize is not None else None,
        "output_ids": list(out.response_ids),
        "meta_info": meta,
    }
