"""Bootstrap of the toy base model (``small`` profile: seconds), caching, evaluation helper, profiles."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from npr_pipelines.structure import parse_text, validate
from npr_pipelines.tokenization import has_tag_tokens
from npr_pipelines.toy import bootstrap as bootstrap_module
from npr_pipelines.toy.bootstrap import (
    MANIFEST,
    BootstrapConfig,
    TrainConfig,
    bootstrap_base_model,
    bootstrap_manifest,
    build_examples,
    collate,
    lr_at,
    micro_batches,
    solution_for,
)
from npr_pipelines.toy.evaluate import evaluate_toy, is_correct
from npr_pipelines.toy.problems import TEST, TRAIN, generate_problems
from npr_pipelines.toy.profiles import DEFAULT, PAPER, PROFILES, SMALL, get_profile
from npr_pipelines.toy.tokenizer import build_tokenizer

try:
    from toy_fixtures import small_toy_base, toy_cache_dir
except ImportError:  # tests/ imported as a package
    from tests.toy_fixtures import small_toy_base, toy_cache_dir  # noqa: F401


def small_config(cache_dir, **train) -> BootstrapConfig:
    cfg = replace(SMALL.bootstrap, cache_dir=str(cache_dir))
    return replace(cfg, train=replace(cfg.train, **train)) if train else cfg


def test_bootstrap_writes_a_loadable_base_model(small_toy_base):
    files = {p.name for p in small_toy_base.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", MANIFEST} <= files
    manifest = bootstrap_manifest(small_toy_base)
    assert manifest["key"] == small_toy_base.name
    stats = manifest["stats"]
    assert stats["examples"] == SMALL.bootstrap.train.steps * SMALL.bootstrap.train.batch_size
    assert stats["final_loss"] < stats["losses"][0][1] + 1.0
    tok = AutoTokenizer.from_pretrained(small_toy_base)
    assert not has_tag_tokens(tok)  # tags stay text until stage 2
    assert tok.chat_template


def test_rerun_is_a_cache_hit(small_toy_base, monkeypatch):
    before = (small_toy_base / MANIFEST).stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("a cached config must not retrain")

    monkeypatch.setattr(bootstrap_module, "train_base_model", boom)
    again = bootstrap_base_model(replace(SMALL.bootstrap, cache_dir=str(small_toy_base.parent.parent)))
    assert again == small_toy_base
    assert (small_toy_base / MANIFEST).stat().st_mtime_ns == before
    assert not [p for p in small_toy_base.parent.iterdir() if p.name.startswith(".tmp-")]


def test_cache_key_follows_the_config(tmp_path):
    a = small_config(tmp_path)
    assert a.key == small_config(tmp_path / "elsewhere").key  # the cache location is not part of the key
    assert a.key != a.with_seed(1).key
    assert a.key != small_config(tmp_path, lr=1e-3).key


def test_bootstrap_is_deterministic(tmp_path):
    # Two caches, one config: trained twice, bit for bit the same. 24 steps still run the whole path
    # (tokenizer, mixture, data order, warm-up, cosine); both runs cost a fifth of one 240-step run.
    first, second = (small_config(tmp_path / name, steps=24, warmup_steps=4) for name in ("a", "b"))
    path, again = bootstrap_base_model(first), bootstrap_base_model(second)
    assert path != again and path.name == again.name
    a, b = load_file(path / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (path / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_failed_build_leaves_no_cache_entry(tmp_path, monkeypatch):
    def fail(config, out_dir, callback=None):
        (out_dir / "partial").write_text("x")
        raise RuntimeError("crash")

    monkeypatch.setattr(bootstrap_module, "train_base_model", fail)
    cfg = small_config(tmp_path)
    with pytest.raises(RuntimeError):
        bootstrap_base_model(cfg)
    assert not cfg.path().exists()
    assert not [p for p in (tmp_path / "toy_base").iterdir() if not p.name.endswith(".lock")]


def test_mixture_shares_and_completion_only_targets(tmp_path):
    cfg = small_config(tmp_path)
    tok = build_tokenizer(cfg.tokenizer, cfg.problems)
    examples = build_examples(cfg, tok, 400)
    kinds = [e.kind for e in examples]
    par = sum(k.startswith(("parallel", "corrupt")) for k in kinds) / len(kinds)
    assert abs(par - cfg.mixture.parallel_share) < 0.08
    assert any("+noise" in k for k in kinds) and any(k.startswith("corrupt:") for k in kinds)
    assert all(e.completion_ids[-1] == tok.eos_token_id for e in examples)
    micro = micro_batches(examples[:16], 4)
    assert [len(m) for m in micro] == [4, 4, 4, 4]
    assert all(max(map(len, a)) <= min(map(len, b)) for a, b in itertools.pairwise(micro))
    ids, targets = collate(micro[0], tok.pad_token_id)
    for row, e in enumerate(micro[0]):
        assert targets[row][targets[row] != -100].tolist() == e.completion_ids
        assert ids[row, : len(e)].tolist() == e.prompt_ids + e.completion_ids
        # position i predicts token i + 1
        k = len(e.prompt_ids) - 1
        assert targets[row, k].item() == ids[row, k + 1].item()


def test_mixture_texts_match_their_kind(tmp_path):
    cfg = small_config(tmp_path)
    rng = random.Random(0)
    for p in generate_problems(TRAIN, 200, seed=0):
        text, kind = solution_for(p, cfg.mixture, rng)
        valid = validate(parse_text(text)).valid
        assert valid == kind.startswith("parallel"), (kind, text)
        if kind == "sequential" or kind == "parallel":
            assert is_correct(text, p.answer)


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(99, cfg) == pytest.approx(1e-4, rel=0.05)
    lrs = [lr_at(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_evaluate_toy_runs_and_is_seeded(small_toy_base):
    problems = generate_problems(TEST, 6, seed=0)
    kw = {"max_new_tokens": 24, "batch_size": 8}
    r1 = evaluate_toy(small_toy_base, problems, n_samples=2, temperature=1.0, seed=5, **kw)
    r2 = evaluate_toy(
        small_toy_base, problems, n_samples=2, temperature=1.0, seed=5, return_samples=True, **kw
    )
    for key in ("accuracy", "format_valid_rate", "parallel_rate", "truncated_rate", "valid_and_correct_rate"):
        assert 0.0 <= r1[key] <= 1.0
        assert r1[key] == r2[key]
    assert r1["n_problems"] == 6 and r1["n_samples"] == 2
    assert len(r2["samples"]) == 12
    json.dumps(r1)  # plain JSON


def test_greedy_batched_generation_matches_unbatched(small_toy_base):
    problems = generate_problems(TEST, 5, seed=1)
    kw = {"max_new_tokens": 16, "temperature": 0.0, "seed": 0, "return_samples": True}
    batched = evaluate_toy(small_toy_base, problems, batch_size=8, **kw)["samples"]
    single = [evaluate_toy(small_toy_base, [p], batch_size=1, **kw)["samples"][0] for p in problems]
    assert [s.response for s in batched] == [s.response for s in single]


def test_profiles_are_toy_values_not_the_papers():
    assert set(PROFILES) == {"default", "small"}
    assert DEFAULT.npr_zero.lr > 10 * PAPER["npr_zero"]["lr"]
    assert DEFAULT.papo.lr > 10 * PAPER["papo"]["lr"]
    assert DEFAULT.parallel_sft.lr > 10 * PAPER["parallel_sft"]["lr"]
    assert SMALL.bootstrap.train.steps < DEFAULT.bootstrap.train.steps
    assert SMALL.bootstrap.model.hidden_size < DEFAULT.bootstrap.model.hidden_size
    assert get_profile("default", seed=2).bootstrap.seed == 2
    with pytest.raises(KeyError):
        get_profile("huge")
    # the embedded default evaluates with the paper's protocol (T = 1.0, top-p 0.7)
    assert (DEFAULT.eval.temperature, DEFAULT.eval.top_p) == (
        PAPER["eval"]["temperature"],
        PAPER["eval"]["top_p"],
    )
    for profile in PROFILES.values():
        assert profile.eval.temperature == 1.0
        assert profile.papo.max_new_tokens >= profile.npr_zero.max_new_tokens
