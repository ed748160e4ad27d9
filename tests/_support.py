"""Shared test helpers: tokenizers with the tags as single tokens, built in the test process; free ports."""

from __future__ import annotations

import socket

from npr_pipelines.structure import TAGS, Tag, TagVocab

#: Ports `free_port` has handed out in this process.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 that this process has not handed out before. The OS may return a
    port it just released, and a Ray node given one port for two of its components refuses to start."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


# A synthetic character-level id scheme: one id per character, tags above the character range.
CHAR_TAG_BASE = 0x110000


class CharCodec:
    """encode: one id per character (its code point); tags are ids CHAR_TAG_BASE + i."""

    vocab = TagVocab({t: CHAR_TAG_BASE + i for i, t in enumerate(Tag)})

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids) -> str:
        by_id = self.vocab.by_id
        return "".join(by_id[i].value if i in by_id else chr(i) for i in ids)

    def encode_with_tags(self, text: str) -> list[int]:
        """Encode text whose tag strings become single tag ids."""
        from npr_pipelines.structure import lex_text

        out: list[int] = []
        for lex in lex_text(text):
            out += [self.vocab[lex.tag]] if lex.tag is not None else self.encode(lex.text)
        return out


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_bpe_tokenizer(vocab_size: int = 400, with_tags: bool = True):
    """A small byte-level BPE ``PreTrainedTokenizerFast`` trained on a fixed corpus (lossless decode)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [
        "guideline plan step takeaway boxed answer the of and compute sum product",
        "1: 2: 3: 4: 5: a*b=12 c*d=30 12+30=42 \\boxed{42}",
    ] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )
    if with_tags:
        fast.add_special_tokens({"additional_special_tokens": list(TAGS)})
    return fast


QWEN3_REGULAR_VOCAB = 151_643
QWEN3_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<think>", "</think>",
]  # fmt: skip


def qwen3_sized_tokenizer():
    """A byte-level BPE tokenizer with Qwen3's layout: 151,643 regular tokens then its 26 special
    tokens (ids 151,643..151,668), and a Qwen-style chat template. Real merges for common words;
    the rest of the regular vocabulary is filler, so sizes and ids are realistic."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    small = Tokenizer(models.BPE())
    small.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    small.train_from_iterator(
        ["guide line guideline plan step take away takeaway the answer sum"] * 50, trainer
    )
    model_json = json.loads(small.to_str())["model"]
    vocab = dict(model_json["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_json["merges"]]
    for i in range(len(vocab), QWEN3_REGULAR_VOCAB):
        vocab[f"filler{i}"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(QWEN3_SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )
