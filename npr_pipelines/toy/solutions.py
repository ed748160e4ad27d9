"""Reference solutions of toy problems: sequential chain of thought and the parallel format.

Both end with a final line ``\\boxed{N}``. The parallel solution is a ``Trace`` (one block whose plans
are the independent sub-problems) rendered by ``npr_pipelines.structure.render``, kept short on purpose
(the parallel format is longer than the sequential one and learns slower; ``spec/toy-notes.md`` §1):

    sum_of_products                       candidate_search
    <guideline>                           <guideline>
    <plan>1: 3*14</plan>                  <plan>1: x=3</plan>
    <plan>2: 7*9</plan>                   <plan>2: x=11</plan>
    </guideline><step>1: 3*14=42</step>   </guideline><step>1: 7*3=21 21+5=26 no</step>
    <step>2: 7*9=63</step>                <step>2: 7*11=77>61 no</step> ...
    <takeaway>add the products</takeaway> <takeaway>x=8 fits</takeaway>
    42+63=105                             \\boxed{8}
    \\boxed{105}

(the step tags follow each other directly; they are shown on separate lines here for reading.)

A *noisy teacher* (``TeacherNoise``) makes one intermediate result wrong and carries the error through
honestly: a product off by a few units (``sum_of_products``) or a candidate whose product is
miscomputed so that it seems to fit (``candidate_search``; the first fitting candidate wins in both
formats, so the final answer is wrong when the false fit comes first). A *corruption* damages a
rendered parallel solution so that it fails the strict validator, as a model that half-knows the
format would.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from npr_pipelines.structure import Trace, render
from npr_pipelines.toy.problems import (
    CANDIDATE_SEARCH,
    SUM_OF_PRODUCTS,
    ToyProblem,
    products_of,
    search_parts,
)

SUM_TAKEAWAY = "add the products"

#: Ways of damaging a parallel solution; each one violates a different validator rule.
CORRUPTIONS: tuple[str, ...] = ("drop_step", "renumber", "no_takeaway", "stray_text", "no_boxed")


@dataclass(frozen=True)
class TeacherNoise:
    """One wrong intermediate result.

    ``sum_of_products``: product ``index`` is off by ``delta`` (non-zero).
    ``candidate_search``: candidate ``index`` (never the true answer) is miscomputed so that it fits.
    """

    index: int
    delta: int = 0


def sample_noise(problem: ToyProblem, rng: random.Random, max_delta: int = 10) -> TeacherNoise:
    """A random teacher error for ``problem``."""
    if problem.family == SUM_OF_PRODUCTS:
        index = rng.randrange(problem.k)
        a, b = products_of(problem.operands)[index]
        delta = 0
        while delta == 0 or a * b + delta < 0:
            delta = rng.randint(-max_delta, max_delta)
        return TeacherNoise(index, delta)
    if problem.family == CANDIDATE_SEARCH:
        _, _, _, x, cands = search_parts(problem.operands)
        wrong = [i for i, c in enumerate(cands) if c != x]
        return TeacherNoise(rng.choice(wrong))
    raise ValueError(f"unknown family {problem.family!r}")


def _boxed(value: int | str) -> str:
    return f"\\boxed{{{value}}}"


# --- sum_of_products ---------------------------------------------------------------------------------


def _products(problem: ToyProblem, noise: TeacherNoise | None) -> list[tuple[int, int, int]]:
    out = []
    for i, (a, b) in enumerate(products_of(problem.operands)):
        p = a * b + (noise.delta if noise is not None and noise.index == i else 0)
        out.append((a, b, p))
    return out


def _sum_lines(values: list[int]) -> tuple[list[str], int]:
    lines, total = [], values[0]
    for v in values[1:]:
        lines.append(f"{total}+{v}={total + v}")
        total += v
    return lines, total


# --- candidate_search --------------------------------------------------------------------------------


def _check(problem: ToyProblem, index: int, noise: TeacherNoise | None) -> tuple[str, bool]:
    """The test of candidate ``index``: ``"7*3=21 21+5=26 no"``, ``"7*11=77>61 no"`` or ``"... yes"``."""
    a, b, t, _, cands = search_parts(problem.operands)
    c = cands[index]
    p = t - b if noise is not None and noise.index == index else a * c
    if p > t:
        return f"{a}*{c}={p}>{t} no", False
    s = p + b
    fits = s == t
    return f"{a}*{c}={p} {p}+{b}={s} " + ("yes" if fits else "no"), fits


def _search_checks(problem: ToyProblem, noise: TeacherNoise | None) -> list[tuple[str, bool]]:
    return [_check(problem, i, noise) for i in range(problem.k)]


def _first_fit(problem: ToyProblem, checks: list[tuple[str, bool]]) -> int:
    cands = search_parts(problem.operands)[4]
    for (_, fits), c in zip(checks, cands, strict=True):
        if fits:
            return c
    raise AssertionError("a search problem always has a fitting candidate")


# --- public API --------------------------------------------------------------------------------------


def teacher_answer(problem: ToyProblem, noise: TeacherNoise | None = None) -> str:
    """The final answer the (possibly noisy) teacher writes."""
    if problem.family == SUM_OF_PRODUCTS:
        return str(sum(p for _, _, p in _products(problem, noise)))
    return str(_first_fit(problem, _search_checks(problem, noise)))


def sequential_solution(problem: ToyProblem, noise: TeacherNoise | None = None) -> str:
    """Chain of thought, one result per line, ending with ``\\boxed{N}``."""
    if problem.family == SUM_OF_PRODUCTS:
        prods = _products(problem, noise)
        lines = [f"{a}*{b}={p}" for a, b, p in prods]
        sums, total = _sum_lines([p for _, _, p in prods])
        return "\n".join([*lines, *sums, _boxed(total)])
    if problem.family == CANDIDATE_SEARCH:
        cands = search_parts(problem.operands)[4]
        lines = []
        for c, (text, fits) in zip(cands, _search_checks(problem, noise), strict=True):
            lines.append(f"x={c}: {text}")
            if fits:
                return "\n".join([*lines, _boxed(c)])
        raise AssertionError("a search problem always has a fitting candidate")
    raise ValueError(f"unknown family {problem.family!r}")


def parallel_trace(problem: ToyProblem, noise: TeacherNoise | None = None) -> Trace:
    """One block: a plan per sub-problem, a step per plan, a takeaway that combines; then the answer."""
    if problem.family == SUM_OF_PRODUCTS:
        prods = _products(problem, noise)
        plans = [f"{a}*{b}" for a, b, _ in prods]
        steps = [f"{a}*{b}={p}" for a, b, p in prods]
        sums, total = _sum_lines([p for _, _, p in prods])
        return Trace.build([(plans, steps, SUM_TAKEAWAY)], "\n".join([*sums, _boxed(total)]))
    if problem.family == CANDIDATE_SEARCH:
        cands = search_parts(problem.operands)[4]
        checks = _search_checks(problem, noise)
        answer = _first_fit(problem, checks)
        plans = [f"x={c}" for c in cands]
        steps = [text for text, _ in checks]
        return Trace.build([(plans, steps, f"x={answer} fits")], _boxed(answer))
    raise ValueError(f"unknown family {problem.family!r}")


def parallel_solution(problem: ToyProblem, noise: TeacherNoise | None = None) -> str:
    """``render(parallel_trace(problem, noise))``."""
    return render(parallel_trace(problem, noise))


_STEP_RE = re.compile(r"<step>.*?</step>", re.DOTALL)
_TAKEAWAY_RE = re.compile(r"<takeaway>.*?</takeaway>", re.DOTALL)
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")


def corrupt(text: str, kind: str) -> str:
    """Damage a rendered parallel solution so that the strict validator rejects it.

    ``drop_step`` removes the last step (step count), ``renumber`` mislabels the last step (numbering),
    ``no_takeaway`` removes the takeaway (the block never closes), ``stray_text`` puts text between
    ``</guideline>`` and the first step, ``no_boxed`` unwraps the final ``\\boxed{}``.
    """
    if kind == "drop_step":
        last = list(_STEP_RE.finditer(text))[-1]
        return text[: last.start()] + text[last.end() :]
    if kind == "renumber":
        last = list(_STEP_RE.finditer(text))[-1]
        body = re.sub(r"^<step>(\d+):", lambda m: f"<step>{int(m.group(1)) + 1}:", last.group())
        return text[: last.start()] + body + text[last.end() :]
    if kind == "no_takeaway":
        return _TAKEAWAY_RE.sub("", text, count=1)
    if kind == "stray_text":
        return text.replace("</guideline>", "</guideline>\nso ", 1)
    if kind == "no_boxed":
        matches = list(_BOXED_RE.finditer(text))
        last = matches[-1]
        return text[: last.start()] + last.group(1) + text[last.end() :]
    raise ValueError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS}")
