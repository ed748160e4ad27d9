"""The eight tags of the NPR output format and their token ids.

Before stage 2 the tags are plain character sequences (a base model splits them into sub-word pieces);
from stage 2 on they are single special tokens, added in this order (``method.md`` §1.3).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class Tag(StrEnum):
    GUIDELINE = "<guideline>"
    GUIDELINE_END = "</guideline>"
    PLAN = "<plan>"
    PLAN_END = "</plan>"
    STEP = "<step>"
    STEP_END = "</step>"
    TAKEAWAY = "<takeaway>"
    TAKEAWAY_END = "</takeaway>"


#: The tag strings in the order they are added to a tokenizer.
TAGS: tuple[str, ...] = tuple(t.value for t in Tag)


@dataclass(frozen=True)
class TagVocab:
    """Token id of every tag, for tokenizers in which each tag is one token."""

    ids: Mapping[Tag, int]

    def __post_init__(self) -> None:
        missing = [t.value for t in Tag if t not in self.ids]
        if missing:
            raise ValueError(f"TagVocab is missing ids for {missing}")
        if len(set(self.ids.values())) != len(Tag):
            raise ValueError(f"TagVocab ids must be distinct, got {dict(self.ids)}")

    def __getitem__(self, tag: Tag) -> int:
        return self.ids[tag]

    @property
    def by_id(self) -> dict[int, Tag]:
        return {i: t for t, i in self.ids.items()}

    @classmethod
    def from_tokenizer(cls, tokenizer) -> TagVocab:
        """Read the tag ids from a tokenizer that has the tags as single tokens.

        Raises ``ValueError`` naming the tags that are not single tokens (e.g. before stage 2).
        """
        ids: dict[Tag, int] = {}
        bad: list[str] = []
        for tag in Tag:
            encoded = tokenizer.encode(tag.value, add_special_tokens=False)
            if len(encoded) != 1:
                bad.append(f"{tag.value} -> {encoded}")
            else:
                ids[tag] = encoded[0]
        if bad:
            raise ValueError(
                "tokenizer does not have the NPR tags as single tokens (run prepare_tokenizer first): "
                + ", ".join(bad)
            )
        return cls(ids)
