"""Answer extraction and equivalence, after the release's ``evals/utils/parser.py`` / ``grader.py``
(``method.md`` §5.3), with ``math_verify`` as the symbolic back end.

The pipeline is ``grade(response, reference)``:

1. ``response_only`` cuts the chat prompt off (default) -- see ``paper_compatible`` below;
2. ``extract_answer``: the Minerva phrase "final answer is $…$. I hope"; else the content after the
   LAST "boxed" (``\\boxed{…}`` with nested-brace matching, or up to ``$`` without a brace); else the
   text after "he answer is" / "final answer is" / "答案是"; else the last number;
3. ``normalize_answer`` (the release's ``strip_string``, made idempotent);
4. ``answers_equal``: case-insensitive string equality, multiple-choice letters (``answer_type=
   "letter"``), numbers (relative tolerance 1e-4), element-wise tuples / lists / sets, then
   ``math_verify`` (sympy) under a timeout.

The normalisation is shared by both modes and is not a byte-for-byte copy of ``strip_string``: e.g.
only multi-letter trailing unit words are dropped (the release also deletes one-letter "units" such
as a, c, m anywhere, i.e. variables), "x=" is dropped only as a prefix, not inside "2x=4".

``paper_compatible=True`` reproduces the release where its behaviour changes verdicts:

- the whole text is graded, prompt included. The engine returns prompt+completion and the NPR prompt
  contains ``\\boxed{...}``, so a completion without a box yields "..." (normalised to nothing, hence
  wrong) instead of falling back to the completion's last number. By default the prompt is cut off;
- "he answer is" / "final answer is" take the whole rest of the text (default: up to the end of the
  line or sentence, or the first ``$…$``);
- an unclosed ``\\boxed{`` (a truncated generation) yields the rest of the text (default: no answer);
- numbers lose every comma, so "3,5,7" equals 357 (default: only thousands separators are removed);
- percent variants: a prediction equal to ref/100 or ref*100 is accepted (default: only a "%" written
  on either side makes x and x/100 both acceptable);
- the 1e-4 relative tolerance also applies to integer references, so 10081 equals 10080 (default:
  an integer reference needs an exact value);
- tuples and intervals are compared bracket-insensitively, "(1,2]" equals "[1,2)" (default: brackets
  must match for ``answer_type="math"``; ``"list"`` ignores them);
- multiple choice: the prediction is upper-cased before looking for the last standalone A–E
  (default: a lower-case letter counts only when it is the whole answer); a reference A–E is also
  matched that way under ``answer_type="math"`` (default: only with ``"letter"``).

``math_verify`` times out with ``signal.alarm``, which works only in the main thread. Elsewhere (Ray
actors, Dagster threads) it runs without a timeout and the input-length cap is the only guard.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

log = logging.getLogger(__name__)

ANSWER_TYPES = ("math", "list", "letter")
CHOICE_LETTERS = ("A", "B", "C", "D", "E")
REL_TOL = 1e-4
MATH_VERIFY_TIMEOUT_S = 5
# Longer strings are not handed to sympy: the release's answers are short, and parsing cost explodes.
MATH_VERIFY_MAX_CHARS = 1000
_MAX_SEQUENCE_ITEMS = 64
MAX_ANSWER_CHARS = 2000

DEFAULT_RESPONSE_MARKERS = ("<|im_start|>assistant",)
_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|end_of_text|>", "</s>")


@dataclass(frozen=True)
class Grade:
    """One graded response: the normalised extracted answer (None if none), the normalised
    reference, and the verdict."""

    extracted: str | None
    reference: str
    correct: bool


# --------------------------------------------------------------------------------------------------
# Extraction


def response_only(text: str, markers: tuple[str, ...] = DEFAULT_RESPONSE_MARKERS) -> str:
    """The completion part of a prompt+completion text: everything after the last assistant marker
    (unchanged when there is none), without end-of-turn tokens."""
    cut = -1
    for marker in markers:
        at = text.rfind(marker)
        if at >= 0:
            cut = max(cut, at + len(marker))
    out = text[cut:] if cut >= 0 else text
    for tok in _END_TOKENS:
        out = out.replace(tok, "")
    return out.lstrip("\n")


def _brace_content(text: str, open_at: int) -> str | None:
    """Content of the brace group opening at ``text[open_at] == "{"``; None if it never closes."""
    depth = 0
    for j in range(open_at, len(text)):
        ch = text[j]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : j]
    return None


def _after_phrase(rest: str, paper_compatible: bool) -> str:
    if paper_compatible:
        return rest.strip()
    rest = rest.strip().split("\n", 1)[0]
    m = re.match(r"\s*:?\s*\$+([^$]+)\$", rest)
    if m:
        return m.group(1)
    return re.split(r"\.(?:\s|$)", rest, maxsplit=1)[0]


def extract_raw_answer(text: str, *, paper_compatible: bool = False) -> str | None:
    """The answer candidate as written, before normalisation; None when nothing is found."""
    if "final answer is $" in text and "$. I hope" in text:
        cand = text.split("final answer is $", 1)[1].split("$. I hope", 1)[0]
    elif "boxed" in text:
        tail = text.split("boxed")[-1]
        if tail.startswith("{"):
            inner = _brace_content(tail, 0)
            if inner is None:
                if not paper_compatible:
                    return None
                inner = tail[1:]
            cand = inner
        else:
            cand = tail.split("$")[0]
    elif "he answer is" in text:
        cand = _after_phrase(text.split("he answer is")[-1], paper_compatible)
    elif "final answer is" in text:
        cand = _after_phrase(text.split("final answer is")[-1], paper_compatible)
    elif "答案是" in text:
        cand = text.split("答案是")[1].strip().split("\n\n")[0]
    else:
        numbers = re.findall(r"-?\d*\.?\d+", text.replace(",", ""))
        cand = numbers[-1] if numbers else ""
    cand = re.sub(r"\n\s*", "", cand).strip()
    return cand or None


def extract_answer(text: str, *, paper_compatible: bool = False) -> str | None:
    """Extract and normalise the final answer of ``text`` (see the module docstring for the order
    of rules); None when there is no answer or it normalises to nothing."""
    raw = extract_raw_answer(text, paper_compatible=paper_compatible)
    if raw is None:
        return None
    return normalize_answer(raw) or None


# --------------------------------------------------------------------------------------------------
# Normalisation (strip_string)

# Only multi-letter words, and only trailing: the release also strips one-letter "units" (a, c, m, s,
# ...) anywhere, which deletes variables.
_UNIT_WORDS = (
    r"units?|degrees?|radians?|(?:centi|milli|kilo)?met(?:er|re)s?|cm|mm|km|inch(?:es)?|feet|foot|ft"
    r"|yards?|miles?|mph|kmh|hours?|hrs?|minutes?|mins?|seconds?|secs?|days?|weeks?|months?|years?"
    r"|dollars?|cents?|pounds?|lbs?|kg|(?:kilo)?grams?|lit(?:er|re)s?|ml|gallons?|square|sq|cubic"
    r"|percent|points?|students|people|ways|times"
)
_UNIT_RE = re.compile(r"(?<=[\d}\s)])\s*(?:" + _UNIT_WORDS + r")(?:\^\{?[23]\}?)?\s*$")
_TRAILING_TEXT_RE = re.compile(
    r"\\(?:text|mbox|mathrm|textbf|textit)\s*\{[^{}]*\}(?:\s*\^\s*\{?[23]\}?)?\s*$"
)
_TEXT_WRAP_RE = re.compile(r"\\(?:text|mbox|mathrm|textbf|textit|mathbf|operatorname)\s*\{([^{}]*)\}")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![A-Za-z])")
_CMD_SPACE_RE = re.compile(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])")
_PREFIX_RE = re.compile(r"(^|[,(\[{])[a-zA-Z](?:\\in|\\to)(?![A-Za-z])")
_ITEM_ASSIGN_RE = re.compile(r"(^|[,(\[{])[a-zA-Z]=(?!=)")
_WORD_NUMBERS = {
    w: str(i)
    for i, w in enumerate(
        re.findall(
            r"\w+",
            "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
            "sixteen seventeen eighteen nineteen twenty",
        )
    )
}
_WORD_NUMBERS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70"})
_WORD_NUMBERS.update({"eighty": "80", "ninety": "90", "hundred": "100", "thousand": "1000"})


def _read_arg(s: str, i: int) -> tuple[str, int] | None:
    """One TeX macro argument at ``s[i:]``: a brace group, a control word, or a single character."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None
    if s[i] == "{":
        inner = _brace_content(s, i)
        return None if inner is None else (inner, i + len(inner) + 2)
    if s[i] == "\\":
        m = re.match(r"\\[A-Za-z]+|\\.", s[i:])
        return (m.group(0), i + m.end()) if m else None
    if s[i].isalnum():
        return s[i], i + 1
    return None


def _fix_fracs(s: str) -> str:
    """``\\frac12`` / ``\\frac1{2}`` / ``\\frac{1}2`` -> ``\\frac{1}{2}``, recursively."""
    out: list[str] = []
    i = 0
    while True:
        j = s.find("\\frac", i)
        if j < 0:
            out.append(s[i:])
            return "".join(out)
        k = j + len("\\frac")
        out.append(s[i:k])
        if k < len(s) and s[k].isalpha():  # some other control word starting with \frac
            i = k
            continue
        first = _read_arg(s, k)
        second = _read_arg(s, first[1]) if first else None
        if first is None or second is None:
            i = k
            continue
        out.append("{" + _fix_fracs(first[0]) + "}{" + _fix_fracs(second[0]) + "}")
        i = second[1]


def _fix_sqrt(s: str) -> str:
    s = re.sub(r"\\sqrt\s*(\\[A-Za-z]+)", r"\\sqrt{\1}", s)
    return re.sub(r"\\sqrt\s*([A-Za-z0-9])", r"\\sqrt{\1}", s)


def _strip_outer_alnum_brackets(s: str) -> str:
    if len(s) >= 3 and s[0] + s[-1] in ("{}", "()", "[]") and s[1:-1].isalnum():
        return s[1:-1]
    return s


def normalize_answer(answer: str) -> str:
    """The release's ``strip_string``: canonical spelling of an answer for string comparison.

    tfrac/dfrac -> frac, no ``\\left``/``\\right``, no trailing ``\\text{unit}`` or unit word, no degree
    marks, dollars, percent signs, ``\\text{}`` wrappers, "x=" / "x \\in" prefixes or trailing ".000";
    ``\\sqrt2`` and ``\\frac12`` shorthand expanded; "a/b" -> ``\\frac{a}{b}``; spaces removed except
    where they end a control word (``\\cot x``), so the result still parses as LaTeX. Idempotent.
    Text longer than ``MAX_ANSWER_CHARS`` (never a real answer) only loses its whitespace.
    """
    s = str(answer).strip()
    if len(s) > MAX_ANSWER_CHARS:
        return re.sub(r"\s+", "", s)
    try:
        return _normalize(s)
    except RecursionError:  # absurdly nested \frac
        return re.sub(r"\s+", "", s)


def _normalize(s: str) -> str:
    s = re.sub(r"\n\s*", "", s).replace("−", "-")
    s = s.lstrip(":").rstrip("./").strip()
    s = re.sub(r"(?<!\\)\\[!,;: ]|~", " ", s)
    s = s.replace("\\displaystyle", "")
    s = re.sub(r"\\begin\{array\}\{[^{}]*\}", r"\\begin{pmatrix}", s)
    s = s.replace("\\end{array}", "\\end{pmatrix}").replace("bmatrix", "pmatrix")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = re.sub(r"\\neq(?![A-Za-z])", r"\\ne", s)
    s = re.sub(r"\\leq(?![A-Za-z])", r"\\le", s)
    s = re.sub(r"\\geq(?![A-Za-z])", r"\\ge", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\(", "").replace("\\)", "")
    s = _LEFT_RIGHT_RE.sub("", s)
    s = s.replace("\\{", "{").replace("\\}", "}")
    stripped = _TRAILING_TEXT_RE.sub("", s).strip()
    if stripped and stripped != s:
        s = stripped
    for _ in range(2):
        stripped = _UNIT_RE.sub("", s).strip()
        if stripped:
            s = stripped
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree", "", s)
    s = _TEXT_WRAP_RE.sub(r"\1", s)
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\s+and\s+", ",", s)
    s = _CMD_SPACE_RE.sub(lambda m: m.group(1) + "\0", s)
    s = re.sub(r"\s+", "", s).replace("\0", " ")
    s = s.rstrip("./")
    s = _PREFIX_RE.sub(r"\1", s)
    if "," in s:  # "x=1,y=2" -> "1,2"; a lone "x=5" is handled below
        s = _ITEM_ASSIGN_RE.sub(r"\1", s)
    s = s.replace("\\emptyset", "{}").replace("(-\\infty,\\infty)", "\\mathbb{R}")
    s = re.sub(r"(?<![A-Za-z\\])(?:infinity|inf)(?![A-Za-z])", r"\\infty", s)
    s = _WORD_NUMBERS.get(s.lower(), s)
    s = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", s)
    s = re.sub(r"(\d)\.0+(?=[^\d]|$)", r"\1", s)
    parts = s.split("=")
    if len(parts) == 2 and len(parts[0]) <= 2 and parts[1]:
        s = parts[1]
    s = _fix_sqrt(s)
    s = _fix_fracs(s)
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m:
        s = "\\frac{" + m.group(1) + "}{" + m.group(2) + "}"
    return _strip_outer_alnum_brackets(s)


# --------------------------------------------------------------------------------------------------
# Equivalence

_FLOAT_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_FRAC_RE = re.compile(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}")


def _parse_number(s: str, paper_compatible: bool) -> Fraction | None:
    """Exact value of a plain number, thousands-separated number or numeric ``\\frac``."""
    s = s.strip()
    if paper_compatible or _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    if _FLOAT_RE.fullmatch(s):
        try:
            return Fraction(s)
        except (ValueError, ZeroDivisionError):
            return None
    m = _FRAC_RE.fullmatch(s)
    if m:
        try:
            value = Fraction(m.group(2)) / Fraction(m.group(3))
        except ZeroDivisionError:
            return None
        return -value if m.group(1) else value
    return None


def _has_percent(raw: str) -> bool:
    return bool(
        re.search(r"(?:\\?%|\\text\{\s*%\s*\})\s*\$?\s*$", raw.strip()) or raw.strip().endswith("percent")
    )


def _numbers_equal(p: Fraction, r: Fraction, *, exact: bool) -> bool:
    if exact:
        return p == r
    return math.isclose(float(p), float(r), rel_tol=REL_TOL)


def _numeric_verdict(pred_raw: str, p: str, ref_raw: str, r: str, paper_compatible: bool) -> bool | None:
    """True/False when both sides are plain numbers, else None."""
    pv = _parse_number(p, paper_compatible)
    rv = _parse_number(r, paper_compatible)
    if pv is None or rv is None:
        return None
    if paper_compatible:
        return any(_numbers_equal(pv, cand, exact=False) for cand in (rv / 100, rv, rv * 100))
    preds = {pv, pv / 100} if _has_percent(pred_raw) else {pv}
    refs = {rv, rv / 100} if _has_percent(ref_raw) else {rv}
    exact = rv.denominator == 1 and not _has_percent(ref_raw) and not _has_percent(pred_raw)
    return any(_numbers_equal(a, b, exact=exact) for a in preds for b in refs)


_OPEN, _CLOSE = "([{", ")]}"


def _split_top_level(s: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(s[start:i])
            start = i + 1
    items.append(s[start:])
    return items


def _as_sequence(s: str) -> tuple[str, list[str]] | None:
    """(bracket pair or "", items) when ``s`` is a comma-separated sequence of 2+ items."""
    if len(s) >= 2 and s[0] in _OPEN and s[-1] in _CLOSE:
        depth, first_close = 0, -1
        for i, ch in enumerate(s):
            if ch in _OPEN:
                depth += 1
            elif ch in _CLOSE:
                depth -= 1
                if depth == 0:
                    first_close = i
                    break
        if first_close == len(s) - 1:
            items = _split_top_level(s[1:-1])
            return (s[0] + s[-1], items) if len(items) >= 2 and all(items) else None
    items = _split_top_level(s)
    return ("", items) if len(items) >= 2 and all(items) else None


def _sequences_equal(
    pseq: tuple[str, list[str]], rseq: tuple[str, list[str]], answer_type: str, paper_compatible: bool
) -> bool:
    (pk, pitems), (rk, ritems) = pseq, rseq
    if len(pitems) != len(ritems) or len(ritems) > _MAX_SEQUENCE_ITEMS:
        return False
    unordered_kinds = ("", "{}")
    if (
        answer_type == "math"
        and not paper_compatible
        and pk != rk
        and not (pk in unordered_kinds and rk in unordered_kinds)
    ):
        return False

    def same(a: str, b: str) -> bool:
        return _equal(a, b, "math", paper_compatible)

    if pk in unordered_kinds or rk in unordered_kinds:
        unused = list(ritems)
        for a in pitems:
            hit = next((j for j, b in enumerate(unused) if same(a, b)), None)
            if hit is None:
                return False
            unused.pop(hit)
        return True
    return all(same(a, b) for a, b in zip(pitems, ritems, strict=True))


def _choice_letter(pred: str, paper_compatible: bool) -> str | None:
    s = _TEXT_WRAP_RE.sub(r"\1", pred).replace("$", "")
    if paper_compatible:
        s = s.upper()
    letters = re.findall(r"\b([A-E])\b", s)
    if letters:
        return letters[-1]
    bare = s.strip().strip("().:[]{} ")
    return bare.upper() if len(bare) == 1 and bare.upper() in CHOICE_LETTERS else None


@lru_cache(maxsize=4096)
def _mv_parse(latex: str, timeout: int | None) -> tuple:
    from math_verify import parse

    return tuple(parse(f"${latex}$", parsing_timeout=timeout))  # type: ignore[arg-type]


def _math_verify_equal(ref: str, pred: str, timeout_s: int | None = None) -> bool:
    """Symbolic equivalence through math_verify; any failure or timeout is False."""
    if len(ref) > MATH_VERIFY_MAX_CHARS or len(pred) > MATH_VERIFY_MAX_CHARS:
        return False
    # A plain word parses as a product of symbols: "Evelyn" would equal "Nevlye".
    if re.fullmatch(r"[A-Za-z]{2,}", ref) or re.fullmatch(r"[A-Za-z]{2,}", pred):
        return False
    timeout = MATH_VERIFY_TIMEOUT_S if timeout_s is None else timeout_s
    if threading.current_thread() is not threading.main_thread():
        timeout = None  # signal.alarm is main-thread only
    try:
        from math_verify import verify
        from math_verify.errors import TimeoutException

        try:
            gold, target = _mv_parse(ref, timeout), _mv_parse(pred, timeout)
            if not gold or not target:
                return False
            return bool(verify(list(gold), list(target), timeout_seconds=timeout))
        except TimeoutException:
            return False
    except Exception:
        log.debug("math_verify failed on %r vs %r", ref[:80], pred[:80], exc_info=True)
        return False


def _equal(pred: str, ref: str, answer_type: str, paper_compatible: bool) -> bool:
    if answer_type == "letter":
        letter = ref.strip()
        if letter.upper() not in CHOICE_LETTERS:
            letter = normalize_answer(ref)
        if letter.upper() in CHOICE_LETTERS:
            return _choice_letter(pred, paper_compatible) == letter.upper()
        return normalize_answer(pred).casefold() == normalize_answer(ref).casefold()

    p, r = normalize_answer(pred), normalize_answer(ref)
    if not p or not r:
        return False
    if paper_compatible and r in CHOICE_LETTERS and _choice_letter(p, paper_compatible) == r:
        return True
    if p.casefold() == r.casefold():
        return True
    numeric = _numeric_verdict(pred, p, ref, r, paper_compatible)
    if numeric is not None:
        return numeric
    pseq, rseq = _as_sequence(p), _as_sequence(r)
    if pseq is not None and rseq is not None:
        if answer_type == "list" or paper_compatible:
            return _sequences_equal(pseq, rseq, answer_type, paper_compatible)
        if _sequences_equal(pseq, rseq, answer_type, paper_compatible):
            return True
    return _math_verify_equal(r, p)


def answers_equal(
    pred: str | None,
    ref: str,
    *,
    answer_type: str = "math",
    paper_compatible: bool = False,
) -> bool:
    """Whether the predicted answer (raw or normalised) matches the reference (both are normalised
    here; ``paper_compatible`` as in the module docstring).

    ``answer_type``: "math" (free form), "list" (MathArena-style tuples/lists, compared element-wise
    and bracket-insensitively) or "letter" (multiple choice: the reference is one of A–E and the
    last standalone A–E letter of the prediction must equal it). Never raises on odd input: parse
    failures and timeouts give False.
    """
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}")
    if pred is None:
        return False
    try:
        return _equal(str(pred), str(ref), answer_type, paper_compatible)
    except Exception:  # grading must never take a run down
        log.warning("answer comparison failed for %r vs %r", str(pred)[:80], str(ref)[:80], exc_info=True)
        return False


def grade(
    response: str,
    reference: str,
    *,
    answer_type: str = "math",
    paper_compatible: bool = False,
) -> Grade:
    """Extract the answer of ``response`` and compare it with ``reference``.

    ``response`` may be the completion or prompt+completion; by default the prompt (everything up to
    the last ``<|im_start|>assistant``) is cut off first, with ``paper_compatible`` it is kept.
    """
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}")
    text = response if paper_compatible else response_only(response)
    raw = extract_raw_answer(text, paper_compatible=paper_compatible)
    extracted = (normalize_answer(raw) or None) if raw is not None else None
    ref_norm = str(reference).strip() if answer_type == "letter" else normalize_answer(str(reference))
    correct = extracted is not None and answers_equal(
        raw, str(reference), answer_type=answer_type, paper_compatible=paper_compatible
    )
    return Grade(extracted=extracted, reference=ref_norm, correct=correct)
