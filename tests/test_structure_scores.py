"""V1 and V2 format scores against hand-computed deductions, one rule at a time."""

from __future__ import annotations

import pytest

from npr_pipelines.structure import format_score_v1, format_score_v2

# A perfect block: plans >= 3 chars, steps and takeaway >= 6 chars (whitespace is deleted first).
G = "<guideline><plan>1: aaa</plan><plan>2: bbb</plan></guideline>"
S = "<step>1: xxxxx</step><step>2: yyyyy</step>"
T = "<takeaway>merged it</takeaway>"
PERFECT = G + S + T + "so \\boxed{5}"


def both(text: str) -> tuple[float, float]:
    return format_score_v1(text), format_score_v2(text)


def test_perfect_trace_scores_zero_in_both() -> None:
    assert both(PERFECT) == (0.0, 0.0)
    assert both("\n".join([G, S, T, "so \\boxed{5}"])) == (0.0, 0.0)  # whitespace is irrelevant


@pytest.mark.parametrize(
    ("text", "v1", "v2"),
    [
        # No block at all.
        ("just \\boxed{5}", -1.5, -1.5),
        # A tag between blocks (here a stray <plan> before the first block).
        ("<plan>" + PERFECT, -1.5, -1.5),
        # Guideline without plans: immediate -1.0.
        ("<guideline>xx</guideline>" + S + T + "\\boxed{5}", -1.0, -1.0),
        # Stray text in the guideline: -0.4 (not the concatenation) and -0.2 (residue).
        (G.replace("</guideline>", "zz</guideline>") + S + T + "\\boxed{5}", -0.6, -0.6),
        # Step count differs from plan count: immediate -1.0.
        (G + "<step>1: xxxxx</step>" + T + "\\boxed{5}", -1.0, -1.0),
        # Residue between steps: V1 -0.2; V2 absorbs it into the block's steps text, also -0.2.
        (G + "<step>1: xxxxx</step>qq<step>2: yyyyy</step>" + T + "\\boxed{5}", -0.2, -0.2),
        # A short plan (< 3 chars once whitespace is gone: "1:a"... is 3, so use "1:").
        (G.replace("1: aaa", "1:") + S + T + "\\boxed{5}", -0.4, -0.4),
        # Two short steps (< 6 chars): -0.4 each.
        (G + "<step>1:x</step><step>2:y</step>" + T + "\\boxed{5}", -0.8, -0.8),
        # Short takeaway: -0.4.
        (G + S + "<takeaway>ok</takeaway>\\boxed{5}", -0.4, -0.4),
        # Text after the last block without \boxed: V1 -1.0; V2 does not require a box.
        (G + S + T + "five", -1.0, 0.0),
        # An empty box after the last block: V1 -1.0; V2 -1.0 (additive).
        (G + S + T + "\\boxed{}", -1.0, -1.0),
        # Nothing after the last block: no boxed check in V1; V2 neither.
        (G + S + T, 0.0, 0.0),
        # A tag after the last block: -1.0 in both.
        (G + S + T + "<step>\\boxed{5}", -1.0, -1.0),
        # Deductions add up across blocks: short takeaway in block 1, short plan in block 2.
        (
            G + S + "<takeaway>ok</takeaway>" + G.replace("2: bbb", "2") + S + T + "\\boxed{5}",
            -0.8,
            -0.8,
        ),
    ],
)
def test_deductions(text: str, v1: float, v2: float) -> None:
    assert both(text) == (pytest.approx(v1), pytest.approx(v2))


def test_tag_inside_step_v1_intended_vs_release_bug() -> None:
    # A tag inside a step: the intended V1 deducts -0.4 for that step; the release's V1 tests the last
    # plan instead (clean here), so it deducts nothing. V2 checks each step correctly.
    text = G + "<step>1: xx<plan>xxx</step><step>2: yyyyy</step>" + T + "\\boxed{5}"
    assert format_score_v1(text) == pytest.approx(-0.4)
    assert format_score_v1(text, release_bug=True) == pytest.approx(0.0)
    assert format_score_v2(text) == pytest.approx(-0.4)


def test_v2_requires_steps_in_the_block_regex() -> None:
    # No steps at all: V1 finds the block (0 steps != 2 plans -> -1.0); V2 finds no block (-1.5).
    text = G + T + "\\boxed{5}"
    assert both(text) == (-1.0, -1.5)


def test_v2_checks_every_box_in_the_whole_text() -> None:
    text = G.replace("aaa", "a\\boxed{}a") + S + T + "\\boxed{5}"
    assert format_score_v1(text) == 0.0  # V1 only checks boxes after the last block
    assert format_score_v2(text) == pytest.approx(-1.0)
