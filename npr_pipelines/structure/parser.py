"""Parsers from a trace (token ids or text) to a span table.

One grammar, two lexers: ``lex_tokens`` (tags are single tokens, stages 2-3 and the engine) and
``lex_text`` (tags are character sequences, stage 1). Both produce the same lexeme stream, and
``parse_lexemes`` turns it into a ``SpanTable``: every complete block with the offsets (in tokens or
characters) of its guideline, plans, steps and takeaway, the final answer, and every structural
violation found. The parser never raises on malformed input: it records a violation and goes on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from npr_pipelines.structure.tags import Tag, TagVocab
from npr_pipelines.structure.trace import Block, Item, Trace

Decode = Callable[[Sequence[int]], str]

_NUMBERED = re.compile(r"\s*(\d+(?:\.\d+)*)\s*:(.*)\Z", re.DOTALL)
_TAG_PATTERN = re.compile("|".join(re.escape(t.value) for t in Tag))


@dataclass(frozen=True)
class Lexeme:
    """A tag (``tag`` set) or a run of text (``tag`` None) covering units ``[start, end)``."""

    tag: Tag | None
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class Violation:
    rule: str
    message: str
    at: int | None = None  # offset (token or character) where it was found, if any

    def __str__(self) -> str:
        return f"{self.rule}: {self.message}" + (f" (at {self.at})" if self.at is not None else "")


@dataclass(frozen=True)
class Span:
    start: int
    end: int  # exclusive


@dataclass(frozen=True)
class ItemSpan:
    """A plan, step or takeaway: ``span`` runs from its opening tag through its closing tag."""

    span: Span
    content: str  # raw text between the tags
    number: str | None  # the "k:" label (plans and steps), None when absent
    text: str  # content after the label, stripped


@dataclass(frozen=True)
class BlockSpans:
    guideline: Span  # <guideline> .. </guideline>
    plans: tuple[ItemSpan, ...]
    steps: tuple[ItemSpan, ...]
    takeaway: ItemSpan


@dataclass(frozen=True)
class SpanTable:
    blocks: tuple[BlockSpans, ...]
    answer: Span | None  # text after the last complete block
    answer_text: str
    length: int
    violations: tuple[Violation, ...] = field(default=())

    @property
    def structurally_valid(self) -> bool:
        return not self.violations

    def to_trace(self) -> Trace:
        """The data model of the parsed blocks (numbers missing from items become '')."""
        return Trace(
            tuple(
                Block(
                    tuple(Item(p.number or "", p.text) for p in b.plans),
                    tuple(Item(s.number or "", s.text) for s in b.steps),
                    b.takeaway.text,
                )
                for b in self.blocks
            ),
            self.answer_text.strip(),
        )


def lex_text(text: str) -> list[Lexeme]:
    """Lexemes of a text whose tags are character sequences (offsets are character indices)."""
    out: list[Lexeme] = []
    pos = 0
    for m in _TAG_PATTERN.finditer(text):
        if m.start() > pos:
            out.append(Lexeme(None, text[pos : m.start()], pos, m.start()))
        out.append(Lexeme(Tag(m.group()), m.group(), m.start(), m.end()))
        pos = m.end()
    if pos < len(text):
        out.append(Lexeme(None, text[pos:], pos, len(text)))
    return out


def lex_tokens(ids: Sequence[int], vocab: TagVocab, decode: Decode, offset: int = 0) -> list[Lexeme]:
    """Lexemes of token ids whose tags are single tokens (offsets are token indices + ``offset``)."""
    by_id = vocab.by_id
    out: list[Lexeme] = []
    run_start = 0
    for i, tok in enumerate(ids):
        tag = by_id.get(int(tok))
        if tag is None:
            continue
        if i > run_start:
            out.append(Lexeme(None, decode(ids[run_start:i]), run_start + offset, i + offset))
        out.append(Lexeme(tag, tag.value, i + offset, i + 1 + offset))
        run_start = i + 1
    if run_start < len(ids):
        out.append(Lexeme(None, decode(ids[run_start:]), run_start + offset, len(ids) + offset))
    return out


def parse_text(text: str) -> SpanTable:
    return parse_lexemes(lex_text(text), length=len(text))


def parse_tokens(ids: Sequence[int], vocab: TagVocab, decode: Decode, offset: int = 0) -> SpanTable:
    return parse_lexemes(lex_tokens(ids, vocab, decode, offset), length=len(ids) + offset, start=offset)


def split_number(content: str) -> tuple[str | None, str]:
    """``" 2: foo "`` -> ``("2", "foo")``; content without a label -> ``(None, stripped content)``."""
    m = _NUMBERED.match(content)
    if m is None:
        return None, content.strip()
    return m.group(1), m.group(2).strip()


# Parser states.
_OUTSIDE, _GUIDELINE, _PLAN, _STEPS, _STEP, _TAKEAWAY = range(6)
_STATE_NAMES = {
    _OUTSIDE: "outside a block",
    _GUIDELINE: "inside <guideline>",
    _PLAN: "inside <plan>",
    _STEPS: "between steps",
    _STEP: "inside <step>",
    _TAKEAWAY: "inside <takeaway>",
}


class _Parser:
    def __init__(self, start: int) -> None:
        self.state = _OUTSIDE
        self.blocks: list[BlockSpans] = []
        self.violations: list[Violation] = []
        self.pending: list[Lexeme] = []  # text outside blocks since the last block
        self.item_open: Lexeme | None = None
        self.item_text: list[str] = []
        self.guideline_start = start
        self.guideline: Span | None = None
        self.plans: list[ItemSpan] = []
        self.steps: list[ItemSpan] = []

    def flag(self, rule: str, message: str, at: int | None) -> None:
        self.violations.append(Violation(rule, message, at))

    def open_item(self, lex: Lexeme, state: int) -> None:
        self.item_open, self.item_text, self.state = lex, [], state

    def close_item(self, lex: Lexeme, numbered: bool) -> ItemSpan:
        assert self.item_open is not None
        content = "".join(self.item_text)
        number, text = split_number(content) if numbered else (None, content.strip())
        item = ItemSpan(Span(self.item_open.start, lex.end), content, number, text)
        self.item_open = None
        return item

    def feed(self, lex: Lexeme) -> None:
        s, tag = self.state, lex.tag
        if tag is None:
            if s in (_PLAN, _STEP, _TAKEAWAY):
                self.item_text.append(lex.text)
            elif s == _OUTSIDE:
                self.pending.append(lex)
            elif lex.text.strip():
                self.flag("stray_text", f"text {_STATE_NAMES[s]}: {lex.text.strip()[:40]!r}", lex.start)
            return
        if s == _OUTSIDE and tag is Tag.GUIDELINE:
            for p in self.pending:
                if p.text.strip():
                    self.flag("stray_text", f"text outside a block: {p.text.strip()[:40]!r}", p.start)
            self.pending = []
            self.guideline_start, self.plans, self.steps = lex.start, [], []
            self.state = _GUIDELINE
        elif s == _GUIDELINE and tag is Tag.PLAN:
            self.open_item(lex, _PLAN)
        elif s == _GUIDELINE and tag is Tag.GUIDELINE_END:
            if not self.plans:
                self.flag("no_plans", "guideline without any <plan>", lex.start)
            self.guideline = Span(self.guideline_start, lex.end)
            self.state = _STEPS
        elif s == _PLAN and tag is Tag.PLAN_END:
            self.plans.append(self.close_item(lex, numbered=True))
            self.state = _GUIDELINE
        elif s == _STEPS and tag is Tag.STEP:
            self.open_item(lex, _STEP)
        elif s == _STEPS and tag is Tag.TAKEAWAY:
            self.open_item(lex, _TAKEAWAY)
        elif s == _STEP and tag is Tag.STEP_END:
            self.steps.append(self.close_item(lex, numbered=True))
            self.state = _STEPS
        elif s == _TAKEAWAY and tag is Tag.TAKEAWAY_END:
            takeaway = self.close_item(lex, numbered=False)
            assert self.guideline is not None
            self.blocks.append(BlockSpans(self.guideline, tuple(self.plans), tuple(self.steps), takeaway))
            self.state = _OUTSIDE
        elif tag is Tag.GUIDELINE and s in (_GUIDELINE, _PLAN, _STEP):
            self.flag("nested_guideline", f"<guideline> opened {_STATE_NAMES[s]}", lex.start)
        elif tag is Tag.STEP and s == _STEP:
            self.flag("unexpected_tag", "<step> opened inside an open <step>", lex.start)
        else:
            self.flag("unexpected_tag", f"{tag.value} {_STATE_NAMES[s]}", lex.start)

    def finish(self, length: int, start: int) -> SpanTable:
        if self.state != _OUTSIDE:
            self.flag("unclosed", f"trace ended {_STATE_NAMES[self.state]}", length)
        answer = None
        answer_text = ""
        if self.state == _OUTSIDE and self.pending:
            answer = Span(self.pending[0].start, length)
            answer_text = "".join(p.text for p in self.pending)
        if not self.blocks:
            self.flag("no_blocks", "no complete guideline/step/takeaway block", start)
        return SpanTable(tuple(self.blocks), answer, answer_text, length, tuple(self.violations))


def parse_lexemes(lexemes: Sequence[Lexeme], length: int, start: int = 0) -> SpanTable:
    parser = _Parser(start)
    for lex in lexemes:
        parser.feed(lex)
    return parser.finish(length, start)
