"""Answer extraction and equivalence, on hand-written cases and on every reference answer of the
shared benchmark files (equivalent spellings must grade correct, perturbed ones wrong)."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest

from npr_pipelines.eval import grading
from npr_pipelines.eval.grading import (
    answers_equal,
    extract_answer,
    extract_raw_answer,
    grade,
    normalize_answer,
    response_only,
)

BENCH_DIR = Path(__file__).resolve().parents[2] / "shared/data/benchmarks"
# File -> the answer type the benchmark registry uses for it (method.md §5.1).
BENCH_FILES = {
    "aime25.json": "math",
    "amc23.json": "math",
    "hmmt_feb_2025.json": "list",
    "math500.json": "math",
}

# Shaped like the NPR instruction (prompts/npr.txt): it carries a literal "\\boxed{...}" and tag examples.
NPR_INSTRUCTION = (
    "You must write your answer strictly following the XML-like format below; otherwise the response is "
    "invalid.\n<guideline><plan>1: ...</plan><plan>2: ...</plan></guideline>\n<step>1: ...</step>"
    "<step>2: ...</step>\n<takeaway>...</takeaway>\n... more rounds ...\nFinally, give a conclusion for "
    "the user with \\\\boxed{...} holding only the final result."
)


def full_text(completion_tail: str, question: str = "Compute the value of 12 + 30.") -> str:
    """Prompt (chat template, NPR instruction) + a parallel-format completion ending in ``completion_tail``."""
    prompt = f"<|im_start|>user\n{question.strip()}\n\n{NPR_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    completion = (
        "<guideline><plan>1: Compute directly.</plan><plan>2: Check with a second method.</plan></guideline>"
        "<step>1: A first estimate gives 12345 and 6.5.</step><step>2: Cross-check: 777.</step>"
        "<takeaway>Both approaches agree.</takeaway>\n"
        f"{completion_tail}<|im_end|>"
    )
    return prompt + completion


def boxed(content: str) -> str:
    return full_text(f"Therefore, the final answer is \\boxed{{{content}}}.")


# --------------------------------------------------------------------------------------------------
# Extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the final answer is $\\frac{1}{2}$. I hope it is correct. \\boxed{7}", "\\frac{1}{2}"),
        ("first \\boxed{3}, then \\boxed{\\frac{\\sqrt{2}}{2}} done", "\\frac{\\sqrt{2}}{2}"),
        ("$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$", "(3,\\frac{\\pi}{2})"),
        ("we get \\boxed 5$ and more", "5"),
        ("\\boxed{x = 5}", "5"),
        ("The answer is 42.", "42"),
        ("The answer is $\\dfrac{3}{4}$.\nMore text 99", "\\frac{3}{4}"),
        ("Hence the final answer is 17", "17"),
        ("所以答案是 12\n\n其他 5", "12"),
        ("values 1,234 and then -3.5 at the end", "-3.5"),
        ("totals 1,234,567", "1234567"),
        ("no numbers here", None),
        ("\\boxed{}", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_unclosed_box_default_is_no_answer_paper_takes_rest():
    assert extract_answer("the answer \\boxed{12") is None
    assert extract_answer("the answer \\boxed{12", paper_compatible=True) == "12"


def test_response_only_cuts_prompt_and_end_tokens():
    text = full_text("Thus 41.")
    out = response_only(text)
    assert out.startswith("<guideline>") and "<|im_end|>" not in out and "NPR" not in out
    assert response_only("plain completion 3") == "plain completion 3"


def test_prompt_box_paper_mode_vs_default():
    """The NPR prompt contains \\boxed{...}: the paper grades prompt+completion, so a completion
    without a box extracts "..." from the prompt (wrong); by default the prompt is cut off."""
    text = full_text("Thus the total is 42.")
    assert extract_raw_answer(text) == "..."  # on the full text, as the paper does
    assert extract_answer(text) is None
    paper = grade(text, "42", paper_compatible=True)
    assert paper.extracted is None and not paper.correct
    default = grade(text, "42")
    assert default.extracted == "42" and default.correct


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("\\dfrac12", "\\frac{1}{2}"),
        ("\\tfrac{3}{4}", "\\frac{3}{4}"),
        ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}"),
        ("x = 5", "5"),
        ("x=1, y=2", "1,2"),
        ("x \\in [-2, 7]", "[-2,7]"),
        ("50\\%", "50"),
        ("10^\\circ", "10"),
        ("10^{\\circ}", "10"),
        ("\\$18.90", "18.90"),
        ("5 \\text{ cm}", "5"),
        ("864 \\mbox{ inches}^2", "864"),
        ("12 square feet", "12"),
        ("\\text{east}", "east"),
        ("\\text{(C)}", "C"),
        ("2/3", "\\frac{2}{3}"),
        ("-2/3", "\\frac{-2}{3}"),
        ("11\\sqrt2", "11\\sqrt{2}"),
        ("3.000", "3"),
        ("27.0", "27"),
        (".5", "0.5"),
        ("10,\\!080", "10,080"),
        ("\\left( 1, 2 \\right]", "(1,2]"),
        ("\\cot x", "\\cot x"),
        ("2 \\cdot x", "2\\cdot x"),
        ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
        ("five", "5"),
        ("1 and 2", "1,2"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected
    assert normalize_answer(expected) == expected  # idempotent


# --------------------------------------------------------------------------------------------------
# Equivalence


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ("ABC", "abc", True),
        ("27.0", "27", True),
        ("10080", "10,\\!080", True),
        ("0.333333", "\\frac{1}{3}", True),
        ("0.3333", "\\frac{1}{3}", True),  # within 1e-4 relative
        ("0.333", "\\frac{1}{3}", False),
        ("50\\%", "0.5", True),  # "x%" -> x/100
        ("50\\%", "50", True),
        ("0.5", "50", False),  # percent variants only in paper mode
        ("3,5,7", "357", False),
        ("\\frac{1}{\\sqrt{3}}", "\\frac{\\sqrt{3}}{3}", True),
        ("x^2+2x+1", "(x+1)^2", True),
        ("\\{1, -2\\}", "1, -2", True),
        ("-2, 1", "1,-2", True),
        ("(1, 2]", "(1,2]", True),
        ("[1, 2]", "(1,2]", False),
        ("(2, 1)", "(1,2)", False),
        ("1+2\\sqrt3", "1+2\\sqrt{3}", True),
        ("Nevlye", "\\text{Evelyn}", False),  # a word is not a product of symbols
        (None, "1", False),
        ("", "1", False),
    ],
)
def test_answers_equal_math(pred, ref, expected):
    assert answers_equal(pred, ref) is expected


def test_integer_references_are_exact_by_default_tolerant_in_paper_mode():
    assert not answers_equal("10081", "10080")
    assert answers_equal("10081", "10080", paper_compatible=True)  # |diff|/ref < 1e-4
    assert answers_equal("27.00001", "27", paper_compatible=True)
    assert not answers_equal("27.00001", "27")


def test_paper_mode_percent_variants_and_commas():
    assert answers_equal("0.5", "50", paper_compatible=True)
    assert answers_equal("5000", "50", paper_compatible=True)
    assert answers_equal("357", "3,5,7", paper_compatible=True)
    assert answers_equal("[1, 2]", "(1,2]", paper_compatible=True)


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ("B", "B", True),
        ("(B)", "B", True),
        ("\\text{(B)}", "B", True),
        ("The correct option is C.", "C", True),
        ("A or maybe D", "D", True),
        ("b", "B", True),
        ("A or maybe D", "A", False),
        ("E", "B", False),
        ("a dog", "A", False),
    ],
)
def test_answers_equal_letter(pred, ref, expected):
    assert answers_equal(pred, ref, answer_type="letter") is expected


def test_letter_paper_mode_uppercases():
    assert answers_equal("a dog", "A", answer_type="letter", paper_compatible=True)


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ("[1, 2, 3]", "(1,2,3)", True),
        ("(3, 1)", "1, 3", True),
        (
            "\\frac{-1-\\sqrt{17}}{2}, \\frac{-1+\\sqrt{17}}{2}",
            "\\frac{-1+\\sqrt{17}}{2}, \\frac{-1-\\sqrt{17}}{2}",
            True,
        ),
        ("(1, 2)", "(2, 1)", False),
        ("1, 2", "1, 2, 3", False),
        ("\\frac{1}{576}", "\\frac{1}{576}", True),
    ],
)
def test_answers_equal_list(pred, ref, expected):
    assert answers_equal(pred, ref, answer_type="list") is expected


def test_unknown_answer_type_raises():
    with pytest.raises(ValueError, match="answer_type"):
        answers_equal("1", "1", answer_type="code")
    with pytest.raises(ValueError, match="answer_type"):
        grade("\\boxed{1}", "1", answer_type="code")


def test_math_verify_failures_are_false(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("sympy exploded")

    monkeypatch.setattr(grading, "_mv_parse", boom)
    assert answers_equal("x^2+2x+1", "(x+1)^2") is False
    assert answers_equal("1", "1") is True  # decided before math_verify


def test_pathological_input_times_out_false(monkeypatch):
    monkeypatch.setattr(grading, "MATH_VERIFY_TIMEOUT_S", 1)
    start = time.monotonic()
    assert answers_equal("9^{9^{9^{9}}}", "x+1") is False
    assert time.monotonic() - start < 15
    assert answers_equal("\\frac{" * 400, "1") is False
    assert answers_equal("x" * 5000, "x" * 5000) is True  # string equality, no sympy
    assert answers_equal("x+" * 2000 + "1", "1+" + "x+" * 2000) is False  # over the sympy length cap


def test_works_off_the_main_thread():
    """signal.alarm is main-thread only: elsewhere math_verify must run without it, not crash."""
    result: dict[str, bool] = {}
    thread = threading.Thread(target=lambda: result.update(ok=answers_equal("x^2+2x+1", "(x+1)^2")))
    thread.start()
    thread.join(60)
    assert result == {"ok": True}


def test_grade_dataclass():
    g = grade(boxed("\\dfrac{1}{2}"), "0.5")
    assert g.extracted == "\\frac{1}{2}" and g.reference == "0.5" and g.correct
    g = grade(full_text("I cannot solve this."), "3")
    assert g.extracted == "777" and not g.correct  # the completion's last number
    g = grade("I cannot solve this.", "3")
    assert g.extracted is None and not g.correct


# --------------------------------------------------------------------------------------------------
# Every reference answer of the shared benchmark files


def _bench_refs(name: str) -> list[str]:
    path = BENCH_DIR / name
    if not path.exists():
        pytest.skip(
            f"benchmark file {path} not found: these tests need ../shared/data/benchmarks beside the repo"
        )
    refs: list[str] = []
    for row in json.loads(path.read_text()):
        ans = row["answer"]
        forms = [str(ans)]  # amc23 stores floats: "27.0" as written in the file ...
        if isinstance(ans, float) and ans.is_integer():
            forms.append(str(int(ans)))  # ... and "27" as load_problems gives it
        refs.extend(forms)
    return refs


_INT_RE = re.compile(r"-?\d+")
_DEC_RE = re.compile(r"-?(\d+\.\d*|\.\d+)")


def equivalent_forms(ref: str) -> list[str]:
    """Box contents that state ``ref`` in another, equivalent spelling."""
    forms = [ref, f"${ref}$", " " + re.sub(r"\s*([+=,]|(?<![{^])-)\s*", r" \1 ", ref) + " "]
    if "\\dfrac" in ref:
        forms.append(ref.replace("\\dfrac", "\\frac"))
    elif "\\frac" in ref:
        forms.append(ref.replace("\\frac", "\\dfrac"))
    if _INT_RE.fullmatch(ref):
        forms.append(ref + ".0")
    elif _DEC_RE.fullmatch(ref):
        value = float(ref)
        forms.append(str(int(value)) if value.is_integer() else ref + "00")
        if ref.startswith("."):
            forms.append("0" + ref)
    if "\\left" in ref:
        forms.append(re.sub(r"\\(left|right)(?![A-Za-z])", "", ref))
    elif ref[:1] in "([" and ref[-1:] in ")]":
        forms.append(f"\\left{ref[0]} {ref[1:-1]} \\right{ref[-1]}")
    return list(dict.fromkeys(forms))


# References without a digit to change: a hand-picked wrong answer for each.
NO_DIGIT_PERTURBATIONS = {
    "p - q": "q - p",
    "\\pi": "2\\pi",
    "\\cot x": "\\tan x",
    "\\text{Evelyn}": "\\text{Navin}",
    "\\text{Navin}": "\\text{Evelyn}",
    "\\text{east}": "\\text{west}",
    "\\text{even}": "\\text{odd}",
    "\\text{ellipse}": "\\text{parabola}",
    "\\text{(B)}": "\\text{(C)}",
    "\\text{(C)}": "\\text{(D)}",
    "\\text{(E)}": "\\text{(A)}",
}


def perturbed_forms(ref: str) -> list[str]:
    """Wrong answers close to ``ref``: integer + 1, the first digit changed, the sign flipped."""
    out: list[str] = []
    m = re.search(r"\d", ref)
    if m is None:
        assert ref in NO_DIGIT_PERTURBATIONS, (
            f"no perturbation for {ref!r}: add one to NO_DIGIT_PERTURBATIONS"
        )
        return [NO_DIGIT_PERTURBATIONS[ref]]
    d = int(m.group())
    out.append(ref[: m.start()] + str(d + 1 if d < 9 else 8) + ref[m.end() :])
    if _INT_RE.fullmatch(ref) or (_DEC_RE.fullmatch(ref) and float(ref).is_integer()):
        out.append(str(int(float(ref)) + 1))
    if ref.startswith("-"):
        out.append(ref[1:])
    elif ref.startswith("\\frac") or ((_INT_RE.fullmatch(ref) or _DEC_RE.fullmatch(ref)) and float(ref) != 0):
        out.append("-" + ref)
    assert all(p != ref for p in out)
    return out


def _wrong_plus_one_ok_in_paper_mode(ref: str, wrong: str) -> bool:
    """The paper's 1e-4 relative tolerance also covers integers, so n+1 equals n for n >= 10^4."""
    try:
        r, w = float(normalize_answer(ref).replace(",", "")), float(wrong)
    except ValueError:
        return False
    return abs(w - r) == 1 and abs(r) >= 1e4


@pytest.mark.parametrize("name", sorted(BENCH_FILES))
def test_benchmark_references_equivalent_forms_grade_correct(name):
    answer_type = BENCH_FILES[name]
    failures = []
    n_checked = 0
    for ref in _bench_refs(name):
        for form in equivalent_forms(ref):
            responses = [boxed(form), full_text(f"So we get $\\boxed{{{form}}}$.")]
            for response in responses:
                for paper in (False, True):
                    g = grade(response, ref, answer_type=answer_type, paper_compatible=paper)
                    n_checked += 1
                    if not g.correct:
                        failures.append((ref, form, paper, g.extracted))
    assert n_checked > 0
    assert not failures, f"{len(failures)} equivalent forms graded wrong: {failures[:20]}"


@pytest.mark.parametrize("name", sorted(BENCH_FILES))
def test_benchmark_references_perturbed_forms_grade_wrong(name):
    answer_type = BENCH_FILES[name]
    failures = []
    for ref in _bench_refs(name):
        for wrong in perturbed_forms(ref):
            response = boxed(wrong)
            if grade(response, ref, answer_type=answer_type).correct:
                failures.append((ref, wrong, "default"))
            paper = grade(response, ref, answer_type=answer_type, paper_compatible=True).correct
            if paper != _wrong_plus_one_ok_in_paper_mode(ref, wrong):
                failures.append((ref, wrong, f"paper graded it {'correct' if paper else 'wrong'}"))
    assert not failures, f"{len(failures)} perturbed forms graded correct: {failures[:20]}"


def test_hmmt_list_answers_also_grade_as_math():
    for ref in _bench_refs("hmmt_feb_2025.json"):
        assert grade(boxed(ref), ref).correct, ref


def test_huge_and_deeply_nested_responses_never_crash():
    nested = "\\frac{" * 300 + "1" + "}{2}" * 300
    assert grade(f"\\boxed{{{nested}}}", "1").correct is False
    rambling = "The answer is " + "blah 1 \\frac{2 " * 20_000
    start = time.monotonic()
    for paper in (False, True):
        g = grade(rambling, "1", paper_compatible=paper)
        assert g.correct is False
    assert time.monotonic() - start < 10
