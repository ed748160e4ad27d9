"""A real checkpoint's path through the pipeline, offline: a Hugging Face directory with Qwen3's tokenizer
layout (151,643 regular tokens, then its 26 added tokens at 151,643..151,668, 14 of them special, as in
Qwen3-4B's ``tokenizer_config.json``) and a tiny Qwen3 model with Qwen3's 151,936-row embedding, both
built here. It is loaded from a local directory and from ``s3://`` (a local moto server), published as
the ``base`` checkpoint by the ``base_model`` asset under the ``paper`` profile, and prepared for
stage 2 by ``training.sft.prepare_model`` (8 tag tokens, mean-initialised embeddings)."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
import torch
from _support import CHAT_TEMPLATE

from npr_pipelines.storage import ArtifactError, Storage
from npr_pipelines.storage import model_source as ms
from npr_pipelines.structure import TAGS, Tag, TagVocab
from npr_pipelines.tokenization import NPR_INSTRUCTION, prompt_ids, prompt_text, tag_subtoken_ids

pytestmark = pytest.mark.usefixtures("one_thread")

QWEN3_REGULAR = 151_643
#: Qwen3's added tokens in id order; the first 14 are special (``"special": true``), the rest are not.
QWEN3_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
QWEN3_PLAIN = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
]  # fmt: skip
QWEN3_ADDED = QWEN3_SPECIAL + QWEN3_PLAIN
QWEN3_TOKENIZER_SIZE = QWEN3_REGULAR + len(QWEN3_ADDED)  # 151,669
QWEN3_EMBEDDING_ROWS = 151_936  # config.json vocab_size: padded past the tokenizer
#: Qwen2's pre-tokenizer split pattern (the BPE word boundaries).
SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def write_qwen3_tokenizer(directory: Path) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` in the layout of a Qwen3 release: real merges for
    the words the tests use, filler for the rest of the 151,643 regular tokens, Qwen's added tokens."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    small = Tokenizer(models.BPE())
    small.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    small.train_from_iterator(
        ["guide line guideline plan step take away takeaway what is the answer"] * 50, trainer
    )
    trained = json.loads(small.to_str())["model"]
    vocab = dict(trained["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    vocab.update({f"filler{i}": i for i in range(len(vocab), QWEN3_REGULAR)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=t in QWEN3_SPECIAL, normalized=False) for t in QWEN3_ADDED])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(QWEN3_REGULAR + i): {"content": t, **flags, "special": t in QWEN3_SPECIAL}
            for i, t in enumerate(QWEN3_ADDED)
        },
        "additional_special_tokens": QWEN3_SPECIAL[1:],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262_144,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_tiny_qwen3(directory: Path, tie: bool = True) -> torch.Tensor:
    """A Qwen3ForCausalLM with Qwen3's vocabulary size and a tiny body, saved as safetensors; returns its
    input embedding matrix."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=QWEN3_EMBEDDING_ROWS, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=4, tie_word_embeddings=tie,
        bos_token_id=151_643, eos_token_id=151_645,
    )  # fmt: skip
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(directory, safe_serialization=True)
    return model.get_input_embeddings().weight.detach().clone()


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A plain Hugging Face directory, plus what ``huggingface-cli download`` leaves beside the files."""
    directory = tmp_path_factory.mktemp("models") / "Qwen3-tiny-Instruct"
    write_qwen3_tokenizer(directory)
    embedding = write_tiny_qwen3(directory)
    (directory / ".cache" / "huggingface").mkdir(parents=True)
    (directory / ".cache" / "huggingface" / "download.lock").write_text("")
    return directory, embedding


def test_the_test_tokenizer_has_qwen3s_layout(qwen3_dir) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen3_dir[0])
    assert type(tok).__name__ == "Qwen2Tokenizer" and len(tok) == QWEN3_TOKENIZER_SIZE
    assert [tok.convert_tokens_to_ids(t) for t in QWEN3_ADDED] == list(range(151_643, 151_669))
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id, tok.bos_token) == (
        "<|im_end|>",
        151_645,
        151_643,
        None,
    )
    assert set(tok.all_special_tokens) == set(QWEN3_SPECIAL)  # <think>, <tool_call>, ... are not special
    assert tok.encode("<think>x</think>", add_special_tokens=False)[0] == 151_667  # but they are atomic


def test_local_plain_directory_is_checked_and_hashed(qwen3_dir, tmp_path: Path) -> None:
    directory, _ = qwen3_dir
    model = ms.open_model_dir(str(directory), tmp_path / "cache")
    assert model.verified == "hashed" and model.path == directory
    assert set(model.files) == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }  # fmt: skip  (.cache/ left out)
    info = model.info
    assert (info["model_type"], info["vocab_size"], info["tokenizer_size"]) == (
        "qwen3", QWEN3_EMBEDDING_ROWS, QWEN3_TOKENIZER_SIZE,
    )  # fmt: skip
    assert info["tie_word_embeddings"] and not info["has_tag_tokens"] and info["eos_token"] == "<|im_end|>"
    assert ms.open_model_dir(f"file://{directory}", tmp_path / "cache").digest == model.digest


def test_bad_model_directories_are_refused_by_name(qwen3_dir, tmp_path: Path) -> None:
    directory, _ = qwen3_dir

    def copy(name: str) -> Path:
        import shutil

        target = tmp_path / name
        shutil.copytree(directory, target, ignore=shutil.ignore_patterns(".cache"))
        return target

    pickled = copy("pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ArtifactError, match=r"weights only as pickles \(pytorch_model.bin\)"):
        ms.open_model_dir(str(pickled), tmp_path / "cache")
    remote_code = copy("remote-code")
    config = json.loads((remote_code / "config.json").read_text())
    (remote_code / "config.json").write_text(json.dumps({**config, "model_type": "qwen3_custom"}))
    with pytest.raises(ArtifactError, match="'qwen3_custom' is not built into transformers"):
        ms.open_model_dir(str(remote_code), tmp_path / "cache")
    no_template = copy("no-template")
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="has no chat template"):
        ms.open_model_dir(str(no_template), tmp_path / "cache")
    with pytest.raises(ArtifactError, match="no such model directory"):
        ms.open_model_dir(str(tmp_path / "absent"), tmp_path / "cache")


def test_a_manifested_local_directory_is_verified(qwen3_dir, tmp_path: Path) -> None:
    directory, _ = qwen3_dir
    published = tmp_path / "published"
    digest = ms.publish_model(directory, str(published))
    model = ms.open_model_dir(str(published), tmp_path / "cache")
    assert model.verified == "manifest" and model.digest == digest
    (published / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"tokenizer_config\.json differs from its MANIFEST\.json"):
        ms.open_model_dir(str(published), tmp_path / "cache")


def test_s3_model_is_fetched_verified_and_cached(
    qwen3_dir, tmp_path: Path, s3_endpoint: str, s3_bucket: str, monkeypatch
) -> None:
    directory, _ = qwen3_dir
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    uri = f"s3://{s3_bucket}/models/qwen3-tiny"
    digest = ms.publish_model(directory, uri)
    fetched = []
    monkeypatch.setattr(ms, "fetch_dir", _counting(ms.fetch_dir, fetched))
    first = ms.open_model_dir(uri, tmp_path / "cache")
    assert first.verified == "manifest" and first.digest == digest and len(fetched) == 1
    second = ms.open_model_dir(uri, tmp_path / "cache")  # the cached copy matches the remote manifest
    assert second.path == first.path and second.digest == digest and len(fetched) == 1
    (first.path / "config.json").write_text("{}")  # a damaged cache is caught and fetched again
    third = ms.open_model_dir(uri, tmp_path / "cache")
    assert third.digest == digest and third.info == first.info and len(fetched) == 2
    unpublished = f"s3://{s3_bucket}/models/not-published"
    Storage(f"s3://{s3_bucket}").write_bytes("models/not-published/config.json", b"{}")
    with pytest.raises(ArtifactError, match=r"MANIFEST\.json is missing"):
        ms.open_model_dir(unpublished, tmp_path / "cache2")


def test_base_model_asset_publishes_a_real_checkpoint_and_stage2_prepares_it(
    qwen3_dir, tmp_path: Path, s3_endpoint: str, s3_bucket: str, monkeypatch
) -> None:
    """The ``paper`` profile's base_model from ``s3://``; then the stage-2 tokenizer preparation on it."""
    from assets.base import base_model
    from npr_pipelines.storage.checkpoints import read_checkpoint
    from npr_pipelines.training.sft import prepare_model
    from resources import MlflowResource, PipelineSettings, RayResource, StorageResource

    directory, embedding = qwen3_dir
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    monkeypatch.setenv("NPR_HOME", str(tmp_path))
    uri = f"s3://{s3_bucket}/models/qwen3-tiny"
    ms.publish_model(directory, uri)
    monkeypatch.setenv("NPR_BASE_MODEL_URI", uri)
    resources = {
        "settings": PipelineSettings(profile="paper", home=str(tmp_path)),
        "storage": StorageResource(base_uri=str(tmp_path / "artifacts")),
        "mlflow": MlflowResource(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", ui_url=""),
        "ray": RayResource(num_cpus=1),
    }
    result = dg.materialize([base_model], resources=resources)
    assert result.success
    ref = result.output_for_node("base_model")
    store = Storage(str(tmp_path / "artifacts"))
    assert read_checkpoint(store, "base") == ref and ref["partition"] == "base" and ref["stage"] == "base"
    published = sorted(store.read_manifest(ref["uri"]).files)
    assert published == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                         "tokenizer_config.json"]  # fmt: skip
    again = dg.materialize([base_model], resources=resources).output_for_node("base_model")
    assert (again["uri"], again["data_version"]) == (ref["uri"], ref["data_version"])  # published once

    local = tmp_path / "fetched-base"
    store.fetch_dir(ref["uri"], local)
    model, tok, vocab, report = prepare_model(local)

    # the 8 tags get the next ids, in TAGS order; every existing token keeps its id
    assert [vocab[t] for t in Tag] == list(range(151_669, 151_677)) == [report["tag_ids"][t] for t in TAGS]
    assert len(tok) == report["vocab_size"] == 151_677
    assert [tok.convert_tokens_to_ids(t) for t in QWEN3_ADDED] == list(range(151_643, 151_669))
    assert (tok.eos_token_id, tok.pad_token_id) == (151_645, 151_643)
    assert set(QWEN3_SPECIAL) | set(TAGS) <= set(tok.all_special_tokens)
    # embeddings: resized to 151,677 rounded up to 64 (Qwen3's padding rows past it dropped), tag rows =
    # the mean of their names' sub-token rows, every other kept row unchanged, the head still tied
    emb = model.get_input_embeddings().weight.detach()
    assert emb.shape == (151_680, 8) and report["embedding_rows"] == 151_680 and report["max_init_error"] == 0
    subtokens = tag_subtoken_ids(_fresh_tokenizer(local))
    for tag in TAGS:
        assert len(subtokens[tag]) >= 1
        torch.testing.assert_close(emb[tok.convert_tokens_to_ids(tag)], embedding[subtokens[tag]].mean(0))
    torch.testing.assert_close(emb[:151_669], embedding[:151_669])
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert TagVocab.from_tokenizer(tok) == vocab

    # prompts: one user message with the NPR instruction, the generation prompt, no thinking block
    config = _paper_prompt()
    text = prompt_text(tok, "  What is 2+2?  ", config)
    assert text == f"<|im_start|>user\nWhat is 2+2?\n\n{NPR_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    ids = prompt_ids(tok, "What is 2+2?", config)
    assert ids[0] == 151_644 and ids.count(151_645) == 1 and 151_667 not in ids  # one <|im_end|>, no <think>
    assert vocab[Tag.GUIDELINE] in ids  # the instruction's tag examples are single tokens after stage 2
    assert tok.decode(ids) == text

    # the prepared tokenizer saves and reloads with the same ids
    tok.save_pretrained(tmp_path / "prepared")
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path / "prepared")
    assert TagVocab.from_tokenizer(reloaded) == vocab and len(reloaded) == 151_677
    assert [reloaded.convert_tokens_to_ids(t) for t in QWEN3_ADDED] == list(range(151_643, 151_669))


def test_base_model_asset_reads_a_plain_local_directory(qwen3_dir, tmp_path: Path, monkeypatch) -> None:
    from assets.base import base_model
    from resources import MlflowResource, PipelineSettings, RayResource, StorageResource

    directory, _ = qwen3_dir
    monkeypatch.delenv("NPR_BASE_MODEL_URI", raising=False)
    settings = PipelineSettings(profile="paper", home=str(tmp_path), base_model_uri=str(directory))
    result = dg.materialize(
        [base_model],
        resources={
            "settings": settings,
            "storage": StorageResource(base_uri=str(tmp_path / "artifacts")),
            "mlflow": MlflowResource(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", ui_url=""),
            "ray": RayResource(num_cpus=1),
        },
    )
    ref = result.output_for_node("base_model")
    mat = result.asset_materializations_for_node("base_model")[0]
    assert mat.metadata["verified"].value == "hashed" and mat.metadata["source"].value == str(directory)
    assert ref["data_version"] == ms.open_model_dir(str(directory), tmp_path / "c").digest
    assert not list((tmp_path / "cache" / "staging").glob(".*"))  # the hard-link staging is gone


# -- helpers ----------------------------------------------------------------------------------------


def _counting(fn, calls: list):
    def wrapped(*args, **kwargs):
        calls.append(args)
        return fn(*args, **kwargs)

    return wrapped


def _fresh_tokenizer(directory: Path):
    """The base tokenizer (the published copy has no tags: prepare_model added them in memory)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def _paper_prompt():
    from assets.configs import stage_configs

    return stage_configs("paper")["npr_beta"].prompt
