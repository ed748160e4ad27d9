"""Parser, renderer and strict validator: round trips and corruptions, text and token level."""

from __future__ import annotations

import string

import pytest
from _support import CharCodec, byte_bpe_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npr_pipelines.structure import (
    TAGS,
    Block,
    Item,
    Tag,
    TagVocab,
    Trace,
    encode_trace,
    lex_text,
    parse_text,
    parse_tokens,
    render,
    validate,
)

ALPHABET = string.ascii_letters + string.digits + " +-*=/().,;:<>!?\n\\{}"
codec = CharCodec()


def _no_tags(s: str) -> bool:
    return not any(t in s for t in TAGS)


content = st.text(ALPHABET, min_size=1, max_size=30).map(str.strip).filter(lambda s: s and _no_tags(s))


@st.composite
def traces(draw, max_blocks: int = 3, max_plans: int = 5) -> Trace:
    blocks = []
    for _ in range(draw(st.integers(1, max_blocks))):
        k = draw(st.integers(1, max_plans))
        plans = tuple(Item(str(i + 1), draw(content)) for i in range(k))
        steps = tuple(Item(str(i + 1), draw(content)) for i in range(k))
        blocks.append(Block(plans, steps, draw(content)))
    boxed = draw(st.text(string.digits + "+-/", min_size=1, max_size=6))
    prefix = draw(st.text(string.ascii_letters + " ", max_size=12))
    answer = f"{prefix} \\boxed{{{boxed}}}".strip()
    return Trace(tuple(blocks), answer)


@settings(max_examples=200, deadline=None)
@given(traces())
def test_text_round_trip_and_valid(trace: Trace) -> None:
    table = parse_text(render(trace))
    assert table.violations == ()
    assert table.to_trace() == trace
    assert validate(table).valid


@settings(max_examples=150, deadline=None)
@given(traces())
def test_token_round_trip_matches_text_parse(trace: Trace) -> None:
    ids = encode_trace(trace, codec.vocab, codec.encode)
    table = parse_tokens(ids, codec.vocab, codec.decode)
    assert table.to_trace() == trace
    assert validate(table).valid
    # Every tag is one token, and the token parse's spans point at the right tokens.
    for block in table.blocks:
        for step in block.steps:
            assert ids[step.span.start] == codec.vocab[Tag.STEP]
            assert ids[step.span.end - 1] == codec.vocab[Tag.STEP_END]


@pytest.fixture(scope="module")
def bpe():
    return byte_bpe_tokenizer()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(trace=traces(max_blocks=2))
def test_token_round_trip_with_real_bpe_tokenizer(bpe, trace: Trace) -> None:
    vocab = TagVocab.from_tokenizer(bpe)
    ids = encode_trace(trace, vocab, lambda s: bpe.encode(s, add_special_tokens=False))
    decode = lambda x: bpe.decode(x, skip_special_tokens=False)  # noqa: E731
    assert decode(ids) == render(trace)
    table = parse_tokens(ids, vocab, decode, offset=7)
    assert table.to_trace() == trace
    assert table.blocks[0].guideline.start == 7


def test_offsets_are_character_or_token_indices() -> None:
    trace = Trace.build([(["p1", "p2"], ["s1", "s2 longer"], "merge")], "so \\boxed{3}")
    text = render(trace)
    table = parse_text(text)
    step2 = table.blocks[0].steps[1]
    assert text[step2.span.start : step2.span.end] == "<step>2: s2 longer</step>"
    assert text[table.answer.start :].strip() == "so \\boxed{3}"


# --- corruptions: each must be rejected with the named rule --------------------------------------


def _corrupt(rule: str, text: str, trace: Trace) -> str:
    """Apply one corruption to the rendered text of ``trace``."""
    b0 = trace.blocks[0]
    if rule == "step_count":  # remove the last step of block 1
        last = b0.steps[-1]
        return text.replace(f"<step>{last.number}: {last.text}</step>", "", 1) if len(b0.steps) > 0 else text
    if rule == "numbering":
        return text.replace("<step>1:", "<step>7:", 1)
    if rule == "empty_content":
        return text.replace(f"<plan>1: {b0.plans[0].text}</plan>", "<plan>1: </plan>", 1)
    if rule == "stray_text":
        return text.replace("</guideline>", "</guideline>oops", 1)
    if rule == "no_answer":
        return text[: text.rfind("\\boxed{")]
    if rule == "unclosed":
        return text[: text.find("</step>")]
    if rule == "nested_guideline":
        return text.replace("<step>1: ", "<step>1: <guideline>", 1)
    if rule == "unexpected_tag":
        return text.replace("<takeaway>", "<plan><takeaway>", 1)
    if rule == "no_blocks":
        return trace.answer
    if rule == "no_plans":
        start, end = text.find("<plan>"), text.find("</guideline>")
        return text[:start] + text[end:]
    raise AssertionError(rule)


RULES_TO_CORRUPT = [
    "step_count",
    "numbering",
    "empty_content",
    "stray_text",
    "no_answer",
    "unclosed",
    "nested_guideline",
    "unexpected_tag",
    "no_blocks",
    "no_plans",
]


@settings(max_examples=40, deadline=None)
@given(trace=traces(max_blocks=2), rule=st.sampled_from(RULES_TO_CORRUPT))
def test_corrupted_traces_fail_with_the_named_rule(trace: Trace, rule: str) -> None:
    bad = _corrupt(rule, render(trace), trace)
    verdict = validate(parse_text(bad))
    assert not verdict.valid
    assert rule in verdict.rules, (rule, verdict.reasons, bad)
    assert all(reason for reason in verdict.reasons)


def test_every_violation_is_reported_together() -> None:
    text = (
        "chat<guideline><plan>1: a</plan><plan>3: </plan></guideline>"
        "<step>1: x</step><takeaway></takeaway>\nno box here"
    )
    verdict = validate(parse_text(text))
    assert {"stray_text", "numbering", "empty_content", "step_count", "no_answer"} <= verdict.rules


def test_plan_limit_is_optional() -> None:
    trace = Trace.build([([f"p{i}" for i in range(6)], [f"s{i}" for i in range(6)], "all")], "\\boxed{1}")
    table = parse_text(render(trace))
    assert validate(table).valid
    assert "too_many_plans" in validate(table, max_plans=5).rules


def test_whitespace_between_structural_tags_is_allowed() -> None:
    text = (
        "\n<guideline>\n<plan>1: a</plan>\n</guideline>\n<step>\n1: b\n</step>\n"
        "<takeaway>\nc\n</takeaway>\n\nfinal \\boxed{2}\n"
    )
    table = parse_text(text)
    assert validate(table).valid
    assert table.to_trace() == Trace.build([(["a"], ["b"], "c")], "final \\boxed{2}")


def test_lexer_finds_every_tag() -> None:
    text = "".join(TAGS) + "x"
    lexemes = lex_text(text)
    assert [lex.tag for lex in lexemes[:-1]] == list(Tag)
    assert lexemes[-1].text == "x"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(TAGS), st.text(ALPHABET, max_size=5)), max_size=40))
def test_parser_never_raises_on_garbage(pieces: list[str]) -> None:
    text = "".join(pieces)
    table = parse_text(text)
    verdict = validate(table)
    assert verdict.valid == (not verdict.violations)
    ids = codec.encode_with_tags(text)
    assert parse_tokens(ids, codec.vocab, codec.decode).to_trace() == table.to_trace()
