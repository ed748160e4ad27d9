"""Tag-token addition with mean-initialised embeddings, and prompt construction."""

from __future__ import annotations

import pytest
import torch
from _support import CHAT_TEMPLATE, QWEN3_SPECIALS, byte_bpe_tokenizer, qwen3_sized_tokenizer

from npr_pipelines.structure import TAGS, Tag, TagVocab
from npr_pipelines.tokenization import (
    PromptConfig,
    TokenizerError,
    add_tag_tokens,
    has_tag_tokens,
    prompt_ids,
    prompt_text,
    tag_subtoken_ids,
)


def tiny_qwen3(vocab_size: int, tie: bool = True):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        tie_word_embeddings=tie,
    )
    return Qwen3ForCausalLM(cfg)


@pytest.fixture(scope="module")
def qwen_tok():
    return qwen3_sized_tokenizer()


def test_qwen3_layout_gets_the_expected_ids_and_mean_embeddings(qwen_tok) -> None:
    tok = qwen_tok
    assert len(tok) == 151_669
    assert tok.convert_tokens_to_ids("</think>") == 151_668
    assert not has_tag_tokens(tok)
    subtokens = tag_subtoken_ids(tok)
    assert all(len(ids) >= 1 for ids in subtokens.values())
    assert len(tok.encode("<guideline>", add_special_tokens=False)) > 1  # a plain base tokenizer splits it

    model = tiny_qwen3(151_936)  # Qwen3's embedding matrix has padding rows past the vocabulary
    before = model.get_input_embeddings().weight.detach().clone()
    vocab = add_tag_tokens(tok, model)

    assert [vocab[t] for t in Tag] == list(range(151_669, 151_677))
    assert vocab[Tag.GUIDELINE_END] == 151_670 and vocab[Tag.STEP_END] == 151_674
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == 151_680  # len(tokenizer) = 151,677 rounded up to a multiple of 64
    for tag in TAGS:
        expected = before[subtokens[tag]].mean(dim=0)
        torch.testing.assert_close(emb[tok.convert_tokens_to_ids(tag)], expected)
    torch.testing.assert_close(emb[:151_669], before[:151_669])  # existing rows untouched
    assert model.get_output_embeddings().weight is emb  # still tied
    # Special tokens survive decoding and chat rendering as single tokens.
    ids = tok.encode("<guideline><plan>1: a</plan>", add_special_tokens=False)
    assert ids[0] == vocab[Tag.GUIDELINE] and ids[1] == vocab[Tag.PLAN]
    assert TagVocab.from_tokenizer(tok) == vocab


def test_untied_head_rows_are_mean_initialised_too() -> None:
    tok = byte_bpe_tokenizer(with_tags=False)
    model = tiny_qwen3(len(tok), tie=False)
    head_before = model.get_output_embeddings().weight.detach().clone()
    subtokens = tag_subtoken_ids(tok)
    vocab = add_tag_tokens(tok, model)
    head = model.get_output_embeddings().weight
    assert head.shape[0] % 64 == 0 and head.shape[0] >= len(tok)
    for tag in Tag:
        torch.testing.assert_close(head[vocab[tag]], head_before[subtokens[tag.value]].mean(dim=0))
    # Idempotent: a second call changes nothing.
    snapshot = model.get_input_embeddings().weight.detach().clone()
    assert add_tag_tokens(tok, model) == vocab
    torch.testing.assert_close(model.get_input_embeddings().weight, snapshot)


def test_save_and_reload_keeps_tag_ids(tmp_path) -> None:
    from transformers import AutoTokenizer

    tok = byte_bpe_tokenizer(with_tags=False)
    vocab = add_tag_tokens(tok)
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert TagVocab.from_tokenizer(reloaded) == vocab


def test_prompt_is_one_user_message_with_generation_prompt(qwen_tok) -> None:
    text = prompt_text(qwen_tok, "  What is 2+2?  ", PromptConfig(instruction="Use tags. \\boxed{...}"))
    assert (
        text == "<|im_start|>user\nWhat is 2+2?\n\nUse tags. \\boxed{...}<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = prompt_ids(qwen_tok, "What is 2+2?")
    assert ids[0] == qwen_tok.convert_tokens_to_ids("<|im_start|>")
    assert qwen_tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert ids.count(qwen_tok.convert_tokens_to_ids("<|im_end|>")) == 1
    # The default (paper-style) instruction carries the format's tags and a \boxed{...} example.
    default = prompt_text(qwen_tok, "Q")
    assert "<guideline>" in default and "\\boxed{...}" in default


def test_missing_chat_template_is_a_clear_error() -> None:
    tok = byte_bpe_tokenizer()
    tok.chat_template = None
    with pytest.raises(TokenizerError, match="no chat template"):
        prompt_text(tok, "Q")


def test_specials_layout_of_the_test_tokenizer_matches_qwen3(qwen_tok) -> None:
    ids = [qwen_tok.convert_tokens_to_ids(s) for s in QWEN3_SPECIALS]
    assert ids == list(range(151_643, 151_669))
    assert CHAT_TEMPLATE in (qwen_tok.chat_template or "")
