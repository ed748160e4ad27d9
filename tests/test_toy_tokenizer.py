"""The toy tokenizer: byte-level BPE with per-digit numbers, Qwen-style specials and chat template."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoTokenizer

from npr_pipelines.structure import TAGS
from npr_pipelines.tokenization import add_tag_tokens, has_tag_tokens, prompt_ids, prompt_text
from npr_pipelines.toy.problems import TEST, generate_problems
from npr_pipelines.toy.solutions import parallel_solution, sequential_solution
from npr_pipelines.toy.tokenizer import (
    IM_END,
    PAD_TOKEN,
    TOY_INSTRUCTION,
    TOY_PROMPT,
    TokenizerConfig,
    build_tokenizer,
)

SMALL = TokenizerConfig(vocab_size=320, corpus_problems=300)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(SMALL)


@pytest.fixture(scope="module")
def problems():
    return generate_problems(TEST, 60, seed=0)


def pieces(tok, text):
    return [tok.decode([i]) for i in tok.encode(text, add_special_tokens=False)]


def test_fixed_vocab_size_and_specials(tok):
    assert len(tok) == SMALL.vocab_size
    assert tok.eos_token == IM_END and tok.pad_token == PAD_TOKEN
    assert tok.eos_token_id != tok.pad_token_id
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1


def test_build_is_deterministic(tok):
    again = build_tokenizer(SMALL)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


@pytest.mark.parametrize("tag", TAGS)
def test_tags_split_into_a_few_subword_pieces(tok, tag):
    ps = pieces(tok, tag)
    assert 2 <= len(ps) <= 4, ps  # never one token, never character by character
    assert tag.strip("</>") in ps  # the tag name is one sub-word piece
    assert "".join(ps) == tag


def test_tokenizer_has_no_tag_tokens_until_stage_2(tok):
    assert not has_tag_tokens(tok)
    grown = copy.deepcopy(tok)
    vocab = add_tag_tokens(grown)
    assert has_tag_tokens(grown)
    assert len(grown) == len(tok) + len(TAGS)
    assert sorted(vocab.ids.values()) == list(range(len(tok), len(tok) + len(TAGS)))


def test_numbers_tokenise_per_digit(tok):
    assert pieces(tok, "1234567890") == list("1234567890")
    assert pieces(tok, "12*34=408") == ["1", "2", "*", "3", "4", "=", "4", "0", "8"]
    assert pieces(tok, "\\boxed{105}")[-4:] == ["1", "0", "5", "}"]


def test_round_trip(tok, problems):
    texts = [TOY_INSTRUCTION, "héllo wörld ∑ 😀 \t\n  x"]
    for p in problems:
        texts += [p.question, sequential_solution(p), parallel_solution(p)]
    for text in texts:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_chat_template_is_qwen_style(tok):
    text = prompt_text(tok, "Compute 2*3+4*5.", TOY_PROMPT)
    assert text == (
        "<|im_start|>user\nCompute 2*3+4*5.\n" + TOY_INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = prompt_ids(tok, "Compute 2*3+4*5.", TOY_PROMPT)
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(ids[0]) == "<|im_start|>"


def test_parallel_format_costs_about_twice_the_tokens(tok, problems):
    seq = sum(len(tok.encode(sequential_solution(p))) for p in problems)
    par = sum(len(tok.encode(parallel_solution(p))) for p in problems)
    assert 1.3 < par / seq < 3.0


def test_save_and_load_like_a_real_tokenizer(tok, tmp_path, problems):
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == tok.chat_template
    assert (loaded.eos_token, loaded.pad_token) == (tok.eos_token, tok.pad_token)
    assert len(loaded) == len(tok)
    for p in problems[:10]:
        text = prompt_text(tok, p.question, TOY_PROMPT) + parallel_solution(p) + IM_END
        assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert prompt_text(loaded, "q", TOY_PROMPT) == prompt_text(tok, "q", TOY_PROMPT)
