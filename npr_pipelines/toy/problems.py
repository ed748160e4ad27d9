"""Synthetic toy problems with genuinely independent sub-problems, and their stable splits.

Two families, each with a difficulty knob ``k`` (2..5, so a parallel solution never exceeds the
engine's 5-plan limit):

- ``sum_of_products``: ``Compute 3*14+7*9+5*6.`` -- k products of small factors are independent
  sub-problems; their sum combines them.
- ``candidate_search``: ``Find x in {3,8,11} with 7*x+5=61.`` -- k candidates to test, exactly one
  fits. Branches finish at different lengths (a candidate whose product already exceeds the target
  stops early), and a sequential solver stops at the first fit while a parallel one tests all of them.

A problem is identified by its canonical string (family + operands). Splits are decided by a hash of
that string, so membership never depends on the seed, the generation order or the other problems:
train and held-out splits can never overlap, whoever generates them.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from npr_pipelines.data.problems import Problem

SUM_OF_PRODUCTS = "sum_of_products"
CANDIDATE_SEARCH = "candidate_search"
FAMILIES: tuple[str, ...] = (SUM_OF_PRODUCTS, CANDIDATE_SEARCH)

#: Split names. Held-out splits never share a problem with ``train`` or with each other.
TRAIN, DEV, TEST = "train", "dev", "test"
SPLITS: tuple[str, ...] = (TRAIN, DEV, TEST)

#: ``Problem.source`` of every toy problem is ``"toy/<family>"``.
SOURCE_PREFIX = "toy/"


@dataclass(frozen=True)
class ToyProblem:
    """A toy problem. ``id``/``question``/``answer``/``source`` are the fields of the project's
    ``Problem`` (``to_problem()`` converts); the rest is what the solution writers need."""

    id: str
    question: str
    answer: str
    source: str
    family: str
    k: int
    operands: tuple[int, ...]
    split: str

    @property
    def canonical(self) -> str:
        return canonical_key(self.family, self.operands)

    def to_problem(self) -> Problem:
        """This problem as the project's generic ``Problem`` (id, question, answer, source)."""
        return Problem(id=self.id, question=self.question, answer=self.answer, source=self.source)


@dataclass(frozen=True)
class ProblemConfig:
    """What problems look like and how they are split.

    ``split_permille``: shares of the hash space (per mille) for each held-out split; the rest is train.
    """

    families: tuple[str, ...] = FAMILIES
    family_weights: tuple[float, ...] = (0.5, 0.5)
    k_values: tuple[int, ...] = (2, 3, 4, 5)
    k_weights: tuple[float, ...] = (0.3, 0.3, 0.2, 0.2)
    factor_min: int = 2
    factor_max: int = 12
    search_a_max: int = 9
    search_b_max: int = 20
    candidate_max: int = 19
    split_permille: tuple[tuple[str, int], ...] = ((DEV, 25), (TEST, 25))

    def __post_init__(self) -> None:
        if len(self.families) != len(self.family_weights):
            raise ValueError("families and family_weights differ in length")
        if len(self.k_values) != len(self.k_weights):
            raise ValueError("k_values and k_weights differ in length")
        unknown = set(self.families) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown toy families {sorted(unknown)}")
        if min(self.k_values) < 1 or max(self.k_values) > 5:
            raise ValueError("k must be within 1..5 (the engine's plan limit)")
        if sum(p for _, p in self.split_permille) >= 1000:
            raise ValueError("held-out splits leave no room for train")
        if self.candidate_max - 1 < max(self.k_values):
            raise ValueError("not enough candidate values for the largest k")


def canonical_key(family: str, operands: Sequence[int]) -> str:
    return f"{family}:" + ",".join(str(x) for x in operands)


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def split_of(family: str, operands: Sequence[int], config: ProblemConfig | None = None) -> str:
    """The split a problem belongs to: a pure function of its canonical string."""
    config = config or ProblemConfig()
    bucket = _hash("split|" + canonical_key(family, operands)) % 1000
    edge = 0
    for name, permille in config.split_permille:
        edge += permille
        if bucket < edge:
            return name
    return TRAIN


# --- the two families ------------------------------------------------------------------------------


def products_of(operands: Sequence[int]) -> list[tuple[int, int]]:
    """``sum_of_products`` operands ``(a1, b1, a2, b2, ...)`` as factor pairs."""
    return [(operands[i], operands[i + 1]) for i in range(0, len(operands), 2)]


def search_parts(operands: Sequence[int]) -> tuple[int, int, int, int, list[int]]:
    """``candidate_search`` operands ``(a, b, answer, c1..ck)`` -> ``(a, b, target, answer, candidates)``."""
    a, b, x = operands[0], operands[1], operands[2]
    return a, b, a * x + b, x, list(operands[3:])


def question_of(family: str, operands: Sequence[int]) -> str:
    if family == SUM_OF_PRODUCTS:
        return "Compute " + "+".join(f"{a}*{b}" for a, b in products_of(operands)) + "."
    if family == CANDIDATE_SEARCH:
        a, b, t, _, cands = search_parts(operands)
        return "Find x in {" + ",".join(map(str, cands)) + "} with " + f"{a}*x+{b}={t}."
    raise ValueError(f"unknown family {family!r}")


def answer_of(family: str, operands: Sequence[int]) -> int:
    if family == SUM_OF_PRODUCTS:
        return sum(a * b for a, b in products_of(operands))
    if family == CANDIDATE_SEARCH:
        return search_parts(operands)[3]
    raise ValueError(f"unknown family {family!r}")


def _sample_operands(family: str, k: int, rng: random.Random, config: ProblemConfig) -> tuple[int, ...]:
    lo, hi = config.factor_min, config.factor_max
    if family == SUM_OF_PRODUCTS:
        return tuple(rng.randint(lo, hi) for _ in range(2 * k))
    a = rng.randint(2, config.search_a_max)
    b = rng.randint(1, config.search_b_max)
    cands = rng.sample(range(2, config.candidate_max + 1), k)
    x = cands[rng.randrange(k)]
    return (a, b, x, *cands)


def make_problem(family: str, operands: Sequence[int], config: ProblemConfig | None = None) -> ToyProblem:
    operands = tuple(int(x) for x in operands)
    key = canonical_key(family, operands)
    k = len(operands) // 2 if family == SUM_OF_PRODUCTS else len(operands) - 3
    return ToyProblem(
        id="toy-" + hashlib.sha256(key.encode()).hexdigest()[:16],
        question=question_of(family, operands),
        answer=str(answer_of(family, operands)),
        source=SOURCE_PREFIX + family,
        family=family,
        k=k,
        operands=operands,
        split=split_of(family, operands, config),
    )


@dataclass
class ProblemStream:
    """An endless, deterministic stream of distinct problems of one split."""

    split: str
    seed: int
    config: ProblemConfig = field(default_factory=ProblemConfig)
    families: tuple[str, ...] | None = None  # restrict (weights renormalised); None = config.families
    k_values: tuple[int, ...] | None = None  # restrict; None = config.k_values

    def __iter__(self) -> Iterator[ToyProblem]:
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}; expected one of {SPLITS}")
        cfg = self.config
        fam_pairs = [
            (f, w)
            for f, w in zip(cfg.families, cfg.family_weights, strict=True)
            if self.families is None or f in self.families
        ]
        k_pairs = [
            (k, w)
            for k, w in zip(cfg.k_values, cfg.k_weights, strict=True)
            if self.k_values is None or k in self.k_values
        ]
        if not fam_pairs or not k_pairs:
            raise ValueError("the family/k restriction leaves nothing to generate")
        rng = random.Random(f"toy-problems|{self.split}|{self.seed}")
        seen: set[str] = set()
        misses = 0
        while True:
            family = rng.choices([f for f, _ in fam_pairs], [w for _, w in fam_pairs])[0]
            k = rng.choices([k for k, _ in k_pairs], [w for _, w in k_pairs])[0]
            operands = _sample_operands(family, k, rng, cfg)
            key = canonical_key(family, operands)
            if key in seen or split_of(family, operands, cfg) != self.split:
                misses += 1
                if misses > 1_000_000:
                    raise RuntimeError(f"problem space exhausted for split {self.split!r}")
                continue
            misses = 0
            seen.add(key)
            yield make_problem(family, operands, cfg)


def generate_problems(
    split: str,
    n: int,
    seed: int = 0,
    config: ProblemConfig | None = None,
    *,
    families: Sequence[str] | None = None,
    k_values: Sequence[int] | None = None,
) -> list[ToyProblem]:
    """``n`` distinct problems of ``split``; the same arguments always give the same list."""
    stream = ProblemStream(
        split,
        seed,
        config or ProblemConfig(),
        tuple(families) if families is not None else None,
        tuple(k_values) if k_values is not None else None,
    )
    return list(itertools.islice(stream, n))
