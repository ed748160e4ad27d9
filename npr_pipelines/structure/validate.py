"""The strict validator: the one definition of ``format_valid`` (DESIGN.md, "Validity").

A trace is valid when the parse succeeds with no structural violation, every block has as many steps
as plans, plans are numbered 1..n and step k carries plan k's number, no plan/step/takeaway is empty,
nothing but whitespace stands outside the structure, and the final answer holds a non-empty
``\\boxed{}``. Every violated rule is reported, each with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from npr_pipelines.structure.parser import SpanTable, Violation

#: Every rule the validator can report, with what it means.
RULES: dict[str, str] = {
    "no_blocks": "the trace has no complete guideline/steps/takeaway block",
    "stray_text": "non-whitespace text outside the structure (before, between or inside blocks)",
    "unexpected_tag": "a tag where the grammar does not allow one",
    "nested_guideline": "a guideline opened inside a guideline, plan or step (nesting is not supported)",
    "unclosed": "the trace ended inside an open element",
    "no_plans": "a guideline without plans",
    "too_many_plans": "a guideline with more plans than the limit",
    "step_count": "a block whose number of steps differs from its number of plans",
    "numbering": "plans not numbered 1..n, or a step whose number differs from its plan's",
    "empty_content": "an empty plan, step or takeaway",
    "no_answer": "no final answer with a non-empty \\boxed{} after the last block",
}


@dataclass(frozen=True)
class Verdict:
    valid: bool
    violations: tuple[Violation, ...]

    @property
    def rules(self) -> set[str]:
        return {v.rule for v in self.violations}

    @property
    def reasons(self) -> list[str]:
        return [str(v) for v in self.violations]


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with brace matching; None when absent or unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def validate(table: SpanTable, *, max_plans: int | None = None) -> Verdict:
    """Check a parsed trace against every rule; ``max_plans`` (e.g. the engine's 5) is optional."""
    out = list(table.violations)
    for b_idx, block in enumerate(table.blocks):
        where = f"block {b_idx + 1}"
        if max_plans is not None and len(block.plans) > max_plans:
            out.append(
                Violation(
                    "too_many_plans",
                    f"{where}: {len(block.plans)} plans > {max_plans}",
                    block.guideline.start,
                )
            )
        if len(block.steps) != len(block.plans):
            out.append(
                Violation(
                    "step_count",
                    f"{where}: {len(block.steps)} steps for {len(block.plans)} plans",
                    block.guideline.start,
                )
            )
        for k, plan in enumerate(block.plans):
            if plan.number != str(k + 1):
                out.append(
                    Violation(
                        "numbering", f"{where}: plan {k + 1} is labelled {plan.number!r}", plan.span.start
                    )
                )
            if not plan.text:
                out.append(Violation("empty_content", f"{where}: plan {k + 1} is empty", plan.span.start))
        for k, step in enumerate(block.steps):
            expected = block.plans[k].number if k < len(block.plans) else None
            if step.number is None or step.number != expected:
                out.append(
                    Violation(
                        "numbering",
                        f"{where}: step {k + 1} is labelled {step.number!r}, its plan {expected!r}",
                        step.span.start,
                    )
                )
            if not step.text:
                out.append(Violation("empty_content", f"{where}: step {k + 1} is empty", step.span.start))
        if not block.takeaway.text:
            out.append(Violation("empty_content", f"{where}: takeaway is empty", block.takeaway.span.start))
    if table.blocks:
        boxed = last_boxed(table.answer_text)
        at = table.answer.start if table.answer else table.length
        if boxed is None:
            out.append(Violation("no_answer", "no \\boxed{} in the final answer", at))
        elif not boxed.strip():
            out.append(Violation("no_answer", "the final \\boxed{} is empty", at))
    return Verdict(not out, tuple(out))
