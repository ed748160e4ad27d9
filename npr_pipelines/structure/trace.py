"""The parallel-trace data model and its canonical rendering (as text and as token ids).

A trace is a sequence of blocks (guideline with numbered plans, one step per plan, a takeaway) followed
by a final answer. The canonical rendering is also what the engine produces token for token:

    <guideline>\\n<plan>1: ...</plan>\\n<plan>2: ...</plan>\\n</guideline><step>1: ...</step><step>2: ...</step><takeaway>...</takeaway>\\n
    ... more blocks ...
    final answer text with \\boxed{...}

Steps follow ``</guideline>`` directly and each other directly, and ``<takeaway>`` follows the last
``</step>`` directly: those positions are where the engine forks and joins, so nothing is sampled there.
A step header (``<step>`` + ``"k:"``) and ``<takeaway>`` are engine-inserted at inference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from npr_pipelines.structure.tags import Tag, TagVocab

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class Item:
    """A numbered plan or step: ``<plan>{number}: {text}</plan>``."""

    number: str
    text: str


@dataclass(frozen=True)
class Block:
    plans: tuple[Item, ...]
    steps: tuple[Item, ...]
    takeaway: str


@dataclass(frozen=True)
class Trace:
    blocks: tuple[Block, ...]
    answer: str

    @classmethod
    def build(cls, blocks: Sequence[tuple[Sequence[str], Sequence[str], str]], answer: str) -> Trace:
        """Convenience constructor numbering plans and steps 1..n: ``[(plans, steps, takeaway), ...]``."""
        return cls(
            tuple(
                Block(
                    tuple(Item(str(i + 1), p) for i, p in enumerate(plans)),
                    tuple(Item(str(i + 1), s) for i, s in enumerate(steps)),
                    takeaway,
                )
                for plans, steps, takeaway in blocks
            ),
            answer,
        )


def render(trace: Trace) -> str:
    """The canonical text of a trace (parse(render(x)) == x for traces whose texts are stripped)."""
    out: list[str] = []
    for block in trace.blocks:
        out.append(Tag.GUIDELINE)
        out.extend(f"\n{Tag.PLAN}{p.number}: {p.text}{Tag.PLAN_END}" for p in block.plans)
        out.append(f"\n{Tag.GUIDELINE_END}")
        out.extend(f"{Tag.STEP}{s.number}: {s.text}{Tag.STEP_END}" for s in block.steps)
        out.append(f"{Tag.TAKEAWAY}{block.takeaway}{Tag.TAKEAWAY_END}\n")
    out.append(trace.answer)
    return "".join(out)


def step_header_ids(number: str, vocab: TagVocab, encode: Encode) -> list[int]:
    """The tokens the engine inserts at the start of branch ``number``: ``<step>`` then ``"{number}:"``."""
    return [vocab[Tag.STEP], *encode(f"{number}:")]


def encode_trace(trace: Trace, vocab: TagVocab, encode: Encode) -> list[int]:
    """Token ids of ``render(trace)`` split exactly where the engine splits them.

    Tags are single tokens; each step's header is encoded on its own (as the engine inserts it) and
    its body separately, so SFT data and engine rollouts of the same text have the same ids.
    ``encode`` must not add special tokens (BOS/EOS).
    """
    ids: list[int] = []
    for block in trace.blocks:
        ids.append(vocab[Tag.GUIDELINE])
        for p in block.plans:
            ids += encode("\n")
            ids.append(vocab[Tag.PLAN])
            ids += encode(f"{p.number}: {p.text}")
            ids.append(vocab[Tag.PLAN_END])
        ids += encode("\n")
        ids.append(vocab[Tag.GUIDELINE_END])
        for s in block.steps:
            ids += step_header_ids(s.number, vocab, encode)
            ids += encode(f" {s.text}")
            ids.append(vocab[Tag.STEP_END])
        ids.append(vocab[Tag.TAKEAWAY])
        ids += encode(block.takeaway)
        ids.append(vocab[Tag.TAKEAWAY_END])
        ids += encode("\n")
    ids += encode(trace.answer)
    return ids
