"""A local, deterministic byte-level BPE tokenizer for the toy world, shaped like Qwen's.

- Byte-level BPE (``tokenizers``) trained on a generated corpus of toy questions, both solution formats,
  the prompts and the tag names, so the tags split into a few sub-word pieces (``<``, ``guideline``,
  ``>``) -- never into single characters, and never into one token: the tag tokens are added at stage 2
  by ``npr_pipelines.tokenization.add_tag_tokens``, exactly as for a real model.
- Digits are pre-tokenised one by one, so every number is a sequence of digit tokens.
- Specials ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos) and a Qwen-style chat
  template: ``<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n``.
- Saved and loaded like any Hugging Face tokenizer (``save_pretrained`` / ``AutoTokenizer``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from npr_pipelines.structure import TAGS
from npr_pipelines.tokenization import NPR_INSTRUCTION, PromptConfig
from npr_pipelines.toy.problems import TRAIN, ProblemConfig, generate_problems
from npr_pipelines.toy.solutions import parallel_solution, sequential_solution

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START, IM_END)

#: Qwen's chat template reduced to what the project uses: no system prompt unless given, no tools,
#: ``enable_thinking`` accepted and ignored (an instruct model, no thinking block).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

#: The toy NPR instruction: short (prompt tokens cost training time) but naming the structure.
TOY_INSTRUCTION = "Answer in the parallel format."

#: How toy questions become prompts (question, one newline, instruction; one user message).
TOY_PROMPT = PromptConfig(instruction=TOY_INSTRUCTION, separator="\n")

#: A plain chain-of-thought prompt for the toy world (sequential baselines).
TOY_COT_PROMPT = PromptConfig(instruction="Think step by step, then give \\boxed{}.", separator="\n")

#: Words every toy tokenizer sees, so roles, tag names and common prompt words get merges.
_EXTRA_TEXTS: tuple[str, ...] = (
    "user",
    "assistant",
    "system",
    *TAGS,
    *(t.strip("<>") for t in TAGS),
    TOY_INSTRUCTION,
    TOY_COT_PROMPT.instruction,
    NPR_INSTRUCTION,
)


@dataclass(frozen=True)
class TokenizerConfig:
    """How the toy tokenizer is trained. Same config -> same tokenizer (the corpus is seeded)."""

    vocab_size: int = 384
    corpus_problems: int = 3000
    corpus_seed: int = 12345
    min_frequency: int = 2
    model_max_length: int = 512


def tokenizer_corpus(config: TokenizerConfig, problem_config: ProblemConfig | None = None) -> Iterator[str]:
    """Deterministic training texts: prompts, both solution formats of train problems, extra words."""
    extras = list(_EXTRA_TEXTS)
    for _ in range(20):  # repeat the fixed texts so their merges beat rare digit/punctuation pairs
        yield from extras
    rng = random.Random(config.corpus_seed)
    for p in generate_problems(TRAIN, config.corpus_problems, config.corpus_seed, problem_config):
        yield f"{IM_START}user\n{p.question}\n{TOY_INSTRUCTION}{IM_END}\n{IM_START}assistant\n"
        yield sequential_solution(p) + IM_END
        if rng.random() < 0.5:
            yield parallel_solution(p) + IM_END


def build_tokenizer(
    config: TokenizerConfig | None = None, problem_config: ProblemConfig | None = None
) -> PreTrainedTokenizerFast:
    """Train the toy BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast`` with the chat template."""
    config = config or TokenizerConfig()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(config, problem_config), trainer=trainer)
    return wrap_tokenizer(tok, config.model_max_length)


def wrap_tokenizer(tok: Tokenizer, model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A ``tokenizers.Tokenizer`` as a transformers tokenizer with Qwen's specials and chat template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
