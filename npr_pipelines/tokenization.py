"""Tokenizer preparation for the parallel format, and prompt construction.

Stage 2 adds the eight tags as special tokens (new ids after the existing vocabulary, in the order of
``TAGS``) and initialises each new embedding row with the mean of the embedding rows of the tag name's
sub-tokens, brackets stripped (``"guideline"``, ``"/guideline"``, ...; ``method.md`` §1.3). Before that,
tags are ordinary text. Prompts put the question and the instruction in ONE user message (no system
message: the instruction's own tag examples must stay inside the prompt) with a generation prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from npr_pipelines.structure import TAGS, TagVocab

#: The embedding matrix is resized to a multiple of this (as the release does).
EMBEDDING_MULTIPLE = 64

#: Our instruction for real models, written in the spirit of the paper's (the release's text is not
#: copied). It ends with a skeleton whose ``\boxed{...}`` is why graders must look at the response only.
NPR_INSTRUCTION = """You must answer in the following structured format; a response that does not follow it is invalid.
- <guideline> opens a planning stage. Inside it, write one or more <plan>k: ...</plan> elements, numbered 1, 2, ..., each a one-sentence, self-contained strategy or sub-task. Use several plans when there are independent sub-tasks or alternative methods worth exploring; a single plan is allowed.
- After </guideline>, write exactly one <step>k: ...</step> per plan, in the same order and with the same numbers. Each step carries out its plan as if the other steps did not exist: never refer to another step, and avoid sequencing words such as "then" or "next".
- <takeaway>...</takeaway> compares and consolidates the steps and decides whether another <guideline> round is needed. Do not compute anything new in it.
- Every tag must have meaningful content, and nothing may stand between or outside the tags except the final answer.
- After the last takeaway, state the final answer for the user, with the final result in \\boxed{...}.
Example:
<guideline><plan>1: ...</plan></guideline><step>1: ...</step><takeaway>...</takeaway>
<guideline><plan>1: ...</plan><plan>2: ...</plan></guideline><step>1: ...</step><step>2: ...</step><takeaway>...</takeaway>
... more rounds if needed ...
Final answer: \\boxed{...}"""


class TokenizerError(ValueError):
    """The tokenizer cannot be used as asked (e.g. no chat template)."""


@dataclass(frozen=True)
class PromptConfig:
    """How a question becomes a prompt. The toy world uses a short instruction."""

    instruction: str = NPR_INSTRUCTION
    separator: str = "\n\n"


def prompt_text(tokenizer, question: str, config: PromptConfig | None = None) -> str:
    """``question + separator + instruction`` in one user message, chat template, generation prompt."""
    config = config or PromptConfig()
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise TokenizerError(f"tokenizer {name!r} has no chat template; NPR prompts need one")
    content = (
        question.strip() + config.separator + config.instruction if config.instruction else question.strip()
    )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )


def prompt_ids(tokenizer, question: str, config: PromptConfig | None = None) -> list[int]:
    """Token ids of ``prompt_text`` (the template already holds every special token it needs)."""
    return list(tokenizer(prompt_text(tokenizer, question, config), add_special_tokens=False)["input_ids"])


def has_tag_tokens(tokenizer) -> bool:
    try:
        TagVocab.from_tokenizer(tokenizer)
    except ValueError:
        return False
    return True


def tag_subtoken_ids(tokenizer) -> dict[str, list[int]]:
    """Sub-token ids of each tag name without its angle brackets (before the tags are added)."""
    out = {}
    for tag in TAGS:
        name = tag.strip("<>")
        ids = tokenizer.encode(name, add_special_tokens=False)
        if not ids:
            raise TokenizerError(f"tokenizer encodes {name!r} to no tokens")
        out[tag] = ids
    return out


def add_tag_tokens(tokenizer, model: torch.nn.Module | None = None) -> TagVocab:
    """Add the 8 tags as special tokens and, given a model, resize and mean-initialise its embeddings.

    Idempotent: a tokenizer that already has them is left as is (and the model is not touched).
    The embedding matrix is resized to ``len(tokenizer)`` rounded up to a multiple of 64.
    """
    if has_tag_tokens(tokenizer):
        return TagVocab.from_tokenizer(tokenizer)
    subtokens = tag_subtoken_ids(tokenizer)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": list(TAGS)}, replace_extra_special_tokens=False
    )
    vocab = TagVocab.from_tokenizer(tokenizer)
    if model is not None:
        init_tag_embeddings(model, len(tokenizer), vocab, subtokens)
    return vocab


@torch.no_grad()
def init_tag_embeddings(
    model: torch.nn.Module, vocab_size: int, vocab: TagVocab, subtokens: dict[str, list[int]]
) -> None:
    """Resize ``model``'s embeddings for ``vocab_size`` tokens and set each tag row to the mean of its
    sub-token rows (input embeddings; and the output head's rows when it is untied and same-shaped)."""
    old_in = model.get_input_embeddings().weight.detach().clone()
    out_layer = model.get_output_embeddings()
    tied = out_layer is None or out_layer.weight is model.get_input_embeddings().weight
    old_out = None if tied else out_layer.weight.detach().clone()
    model.resize_token_embeddings(vocab_size, pad_to_multiple_of=EMBEDDING_MULTIPLE)
    new_in = model.get_input_embeddings().weight
    for tag, tag_id in ((t, vocab.ids[t]) for t in vocab.ids):
        rows = subtokens[tag.value]
        new_in[tag_id] = old_in[rows].mean(dim=0)
        if old_out is not None and old_out.shape == old_in.shape:
            model.get_output_embeddings().weight[tag_id] = old_out[rows].mean(dim=0)
