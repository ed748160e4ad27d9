"""Helpers to drive the engine with scripted structure: a compact character codec whose tags are
single tokens, a tiny random Qwen3, and a logits hook that forces scripted tokens.

The hook only edits the logits a token is *sampled* from; the engine records log-probs from the
model's own logits, so a teacher-forced forward over the result can check them exactly.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping, Sequence

import torch

from npr_pipelines.engine.flow import Stream
from npr_pipelines.engine.types import EngineOutput, Mode, TokenCodec
from npr_pipelines.structure import Tag, TagVocab, Trace, lex_text

EOS_ID = 1
_SPECIALS = ["<pad>", "<eos>", *(t.value for t in Tag)]
_CHARS = string.digits + string.ascii_letters + " \n:.,;!?+-*/=(){}[]\\<>_'\"#"


class CharCodec:
    """One id per character of a small alphabet; id 1 is EOS and ids 2..9 are the eight tags."""

    def __init__(self) -> None:
        self.vocab_size = len(_SPECIALS) + len(_CHARS)
        self.tags = TagVocab({t: 2 + i for i, t in enumerate(Tag)})
        self._char_id = {c: len(_SPECIALS) + i for i, c in enumerate(_CHARS)}
        self._id_str = {**dict(enumerate(_SPECIALS)), **{i: c for c, i in self._char_id.items()}}

    def encode(self, text: str) -> list[int]:
        """Characters only (tag strings become several character tokens, as for a base model)."""
        return [self._char_id[c] for c in text]

    def encode_with_tags(self, text: str) -> list[int]:
        """Tag strings become single tag tokens."""
        out: list[int] = []
        for lex in lex_text(text):
            out += [self.tags[lex.tag]] if lex.tag is not None else self.encode(lex.text)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self._id_str[int(i)] for i in ids)

    def codec(self) -> TokenCodec:
        return TokenCodec(encode=self.encode, decode=self.decode, eos_token_ids=frozenset({EOS_ID}))


def tiny_qwen3(vocab_size: int, *, seed: int = 0, layers: int = 2, hidden: int = 64, attn: str = "sdpa"):
    """A random-init ``Qwen3ForCausalLM`` small enough for CPU tests (float32)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        attn_implementation=attn,
    )
    model = Qwen3ForCausalLM(cfg).eval()
    # A random init gives near-uniform logits; widen them (entropy ~3.5-4 nats instead of ~4.6) so
    # log-probs differ visibly between contexts. Untied: tied rows would make every token predict itself.
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10.0)
        model.get_output_embeddings().weight.mul_(10.0)
    return model


Script = Mapping[tuple[int, ...], Sequence[int]]


def trace_script(
    trace: Trace, tags: TagVocab, encode: Callable[[str], list[int]], *, end: Sequence[int] = (EOS_ID,)
) -> dict[tuple[int, ...], list[int]]:
    """The tokens each stream must SAMPLE for the engine to produce ``encode_trace(trace) + end``.

    Keys are stream paths: ``(r,)`` trunk segment r, ``(r, k)`` branch k of block r. Engine-inserted
    tokens (step headers, ``<takeaway>``) are not in the script.
    """
    enc = encode
    script: dict[tuple[int, ...], list[int]] = {}
    trunk: list[int] = []
    for r, block in enumerate(trace.blocks):
        trunk.append(tags[Tag.GUIDELINE])
        for p in block.plans:
            trunk += [*enc("\n"), tags[Tag.PLAN], *enc(f"{p.number}: {p.text}"), tags[Tag.PLAN_END]]
        trunk += [*enc("\n"), tags[Tag.GUIDELINE_END]]
        script[(r,)] = trunk
        for k, s in enumerate(block.steps):
            script[(r, k)] = [*enc(f" {s.text}"), tags[Tag.STEP_END]]
        trunk = [*enc(block.takeaway), tags[Tag.TAKEAWAY_END], *enc("\n")]
    script[(len(trace.blocks),)] = [*trunk, *enc(trace.answer), *end]
    return script


class ScriptHook:
    """Force each stream to sample its scripted tokens, then ``after`` (EOS by default) forever.

    Streams whose path is not in the script sample freely from the model.
    """

    def __init__(self, script: Script, after: int | None = EOS_ID) -> None:
        self.script = script
        self.after = after

    def forced_token(self, stream: Stream) -> int | None:
        """The token ``stream`` must sample next (None: sample freely)."""
        tokens = self.script.get(stream.path)
        if tokens is None:
            return None
        n = stream.n_sampled
        return tokens[n] if n < len(tokens) else self.after

    def __call__(self, stream: Stream, logits: torch.Tensor) -> torch.Tensor:
        forced = self.forced_token(stream)
        if forced is None:
            return logits
        out = torch.full_like(logits, float("-inf"))
        out[forced] = 0.0
        return out


def replay_script(out: EngineOutput, mode: Mode = "parallel") -> dict[tuple[int, ...], list[int]]:
    """The script that makes the engine sample exactly ``out``'s response again (for ``ScriptHook``).

    ``parallel``: per stream, the tokens it sampled (engine-inserted ones are inserted again);
    ``sequential``: one stream sampling the whole flattened response, inserted tokens included.
    """
    p = out.prompt_len
    if mode == "sequential":
        return {(0,): list(out.response_ids)}
    script: dict[tuple[int, ...], list[int]] = {}
    trunk = 0
    for seg in out.segments:
        if seg.block is None:
            path: tuple[int, ...] = (trunk,)
            trunk += 1
        else:
            path = (seg.block, seg.branch)
        lo, hi = max(seg.start, p) - p, seg.end - p
        script[path] = [
            t for t, ins in zip(out.response_ids[lo:hi], out.inserted[lo:hi], strict=True) if not ins
        ]
    return script
