"""The release's two text-level format scores, V1 (stage-1 reward) and V2 (acceptance filter and
evaluation "format score"), as ``method.md`` §1.4 defines them. 0.0 is perfect; deductions are
negative. Both work on the decoded response with all whitespace deleted.

``return`` cases end the scoring at once with that value; the others add up.
"""

from __future__ import annotations

import re

from npr_pipelines.structure.tags import TAGS

_WS = re.compile(r"\s+")
_PLAN = re.compile(r"<plan>(.*?)</plan>", re.DOTALL)
_STEP = re.compile(r"<step>(.*?)</step>", re.DOTALL)
_BOXED_V1 = re.compile(r"\\boxed\{(.*?)\}", re.DOTALL)
_BLOCK_V1 = re.compile(
    r"<guideline>(.*?)</guideline>((?:(?!<guideline>).)*?)<takeaway>(.*?)</takeaway>", re.DOTALL
)
_BLOCK_V2 = re.compile(
    r"<guideline>(.*?)</guideline>((?:<step>.*?</step>)+)<takeaway>(.*?)</takeaway>", re.DOTALL
)


def _has_tag(text: str) -> bool:
    return any(t in text for t in TAGS)


def _score_blocks(
    text: str, block_re: re.Pattern[str], *, v2: bool, release_bug: bool
) -> tuple[float, int] | float:
    """Shared per-block scoring; returns (accumulated score, end of last block) or an early value."""
    blocks = list(block_re.finditer(text))
    if not blocks:
        return -1.5
    score, prev_end = 0.0, 0
    for m in blocks:
        if _has_tag(text[prev_end : m.start()]):
            return -1.5
        prev_end = m.end()
        guideline, steps_text, takeaway = m.group(1), m.group(2), m.group(3)
        plans = _PLAN.findall(guideline)
        if not plans:
            return -1.0
        if guideline != "".join(f"<plan>{p}</plan>" for p in plans):
            score -= 0.4
        if _PLAN.sub("", guideline):
            score -= 0.2
        steps = _STEP.findall(steps_text)
        if len(steps) != len(plans):
            return -1.0
        if _STEP.sub("", steps_text):
            score -= 0.2
        for plan in plans:
            if len(plan) < 3 or _has_tag(plan):
                score -= 0.4
        for step in steps:
            # The release's V1 tests the LAST PLAN for tags here instead of the step.
            tagged = _has_tag(plans[-1]) if release_bug else _has_tag(step)
            if len(step) < 6 or tagged:
                score -= 0.4
        if v2:
            if len(takeaway) < 6:
                score -= 0.4
        else:
            tagged = _has_tag(plans[-1]) if release_bug else _has_tag(takeaway)
            if len(takeaway) < 6 or tagged:
                score -= 0.4
    return score, prev_end


def format_score_v1(response: str, *, release_bug: bool = False) -> float:
    """Stage-1 format score (the reward's format part). ``release_bug`` reproduces the release's
    tag test on the last plan instead of each step/takeaway."""
    text = _WS.sub("", response)
    result = _score_blocks(text, _BLOCK_V1, v2=False, release_bug=release_bug)
    if isinstance(result, float):
        return result
    score, end = result
    rest = text[end:]
    if rest:
        if _has_tag(rest):
            return -1.0
        boxed = _BOXED_V1.findall(rest)
        if not boxed or any(not b for b in boxed):
            return -1.0
    return round(score, 10)


def format_score_v2(response: str) -> float:
    """Stage-2 acceptance / evaluation format score: a trace is accepted iff this is exactly 0."""
    text = _WS.sub("", response)
    result = _score_blocks(text, _BLOCK_V2, v2=True, release_bug=False)
    if isinstance(result, float):
        return result
    score, end = result
    if _has_tag(text[end:]):
        return -1.0
    if any(not b for b in _BOXED_V1.findall(text)):
        score -= 1.0
    return round(score, 10)
