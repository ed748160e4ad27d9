"""RL driver mechanics on a tiny random model with scripted structure: structural failures are dropped
and never trained, engine-inserted tokens get no gradient, dynamic sampling refills, a killed run
resumes to the same weights, a finished run returns at once, and the bootstrap interval."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from _support import byte_bpe_tokenizer

from npr_pipelines.data import Problem
from npr_pipelines.engine.testing import ScriptHook, tiny_qwen3, trace_script
from npr_pipelines.structure import Tag, TagVocab, Trace
from npr_pipelines.training import rl as rl_mod
from npr_pipelines.training.checkpoint import weights_digest
from npr_pipelines.training.rl import RLConfig, RLObjective, papo_config, run_rl, sr_config
from npr_pipelines.training.rl_stats import paired_bootstrap

ANSWER = "7"


pytestmark = pytest.mark.usefixtures("one_thread")


def _save_tiny(path: Path, *, with_tags: bool) -> Path:
    tok = byte_bpe_tokenizer(with_tags=with_tags)
    model = tiny_qwen3(len(tok), seed=0, layers=2, hidden=32)
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_tagged(tmp_path_factory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny_tagged"), with_tags=True)


@pytest.fixture(scope="module")
def tiny_plain(tmp_path_factory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny_plain"), with_tags=False)


def _problems(ids: Sequence[str]) -> list[Problem]:
    return [Problem(id=i, question=f"What is {i}?", answer=ANSWER, source="test") for i in ids]


def _tok(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _config(**kw) -> RLConfig:
    base = dict(
        prompts_per_step=2,
        group_size=4,
        steps=1,
        lr=1e-3,
        weight_decay=0.0,
        max_new_tokens=96,
        mini_batches_per_step=1,
        micro_batch_size=3,
        truncate_multiple=1,
        branch_repetition_penalty=None,
        engine_blocks=512,
        engine_block_size=8,
        num_threads=1,
    )
    base.update(kw)
    return papo_config(**base)


class Spy:
    """Records what ``run_rl`` generated and every micro-batch it trained on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rollouts: list = []
        self.batches: list = []
        real_generate = rl_mod.generate_rollouts
        real_call = RLObjective.__call__

        def generate(*args, **kwargs):
            out = real_generate(*args, **kwargs)
            self.rollouts.extend(out)
            return out

        def call(objective, model, batch):
            self.batches.append(batch)
            return real_call(objective, model, batch)

        monkeypatch.setattr(rl_mod, "generate_rollouts", generate)
        monkeypatch.setattr(RLObjective, "__call__", call)


def _trace(answer: str) -> Trace:
    return Trace.build([(["a", "b"], ["aa", "bb"], "cc")], f"\\boxed{{{answer}}}")


def _parallel_hooks(tok):
    """Per sample: 0 valid+correct, 1 valid+wrong, 2 nested guideline in a branch, 3 over budget."""
    tags = TagVocab.from_tokenizer(tok)
    encode = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    eos = tok.eos_token_id
    good = trace_script(_trace(ANSWER), tags, encode, end=(eos,))
    bad = trace_script(_trace("8"), tags, encode, end=(eos,))
    nested = dict(good)
    nested[(0, 0)] = [tags[Tag.GUIDELINE], *encode("x"), tags[Tag.STEP_END]]
    endless = {(0,): encode("1+1=2 ") * 200}
    scripts = [good, bad, nested, endless]

    def factory(problem: Problem, sample: int):
        return ScriptHook(scripts[sample], after=eos)

    return factory


def _row_ids(batch, i: int) -> tuple[int, ...]:
    return tuple(batch.input_ids[i, : int(batch.segments.lengths[i])].tolist())


def test_structural_failures_are_dropped_and_never_trained(tiny_tagged, tmp_path, monkeypatch) -> None:
    spy = Spy(monkeypatch)
    logs: list[dict] = []
    tok = _tok(tiny_tagged)
    result = run_rl(
        tiny_tagged,
        _problems(["p1", "p2"]),
        _config(),
        tmp_path / "run",
        on_log=logs.append,
        logits_hook=_parallel_hooks(tok),
    )
    assert result.final_step == 1
    by_sample = {k: [r for r in spy.rollouts if r.sample == k] for k in range(4)}
    assert all(r.dropped is None and r.record.format_valid for r in by_sample[0] + by_sample[1])
    assert all(r.record.correct for r in by_sample[0]) and not any(r.record.correct for r in by_sample[1])
    assert all(r.dropped == "unclean_finish" for r in by_sample[2] + by_sample[3])
    assert {str(r.output.finish_reason) for r in by_sample[2]} == {"nested_guideline"}
    assert {str(r.output.finish_reason) for r in by_sample[3]} == {"length"}
    assert logs[0]["dropped"] == 4 and logs[0]["kept"] == 4 and logs[0]["trigger_rate"] > 0

    kept = {tuple(r.prompt_ids + r.output.response_ids) for r in by_sample[0] + by_sample[1]}
    dropped = {tuple(r.prompt_ids + r.output.response_ids) for r in by_sample[2] + by_sample[3]}
    trained = [_row_ids(b, i) for b in spy.batches for i in range(b.input_ids.shape[0])]
    assert sorted(trained) == sorted(kept)
    assert not set(trained) & dropped


def test_schema_filter_drops_clean_traces_that_are_not_parallel(tiny_tagged, tmp_path, monkeypatch) -> None:
    tok = _tok(tiny_tagged)
    tags = TagVocab.from_tokenizer(tok)
    encode = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    eos = tok.eos_token_id
    parallel = trace_script(_trace(ANSWER), tags, encode, end=(eos,))
    plain = {(0,): encode(f"\\boxed{{{ANSWER}}}")}  # correct and cleanly finished, but no parallel block

    def factory(problem: Problem, sample: int):
        return ScriptHook(parallel if sample % 2 == 0 else plain, after=eos)

    kept: dict[bool, list] = {}
    for on in (False, True):
        spy = Spy(monkeypatch)
        run_rl(tiny_tagged, _problems(["p1"]), _config(prompts_per_step=1, drop_schema_failures=on),
               tmp_path / f"run-{on}", logits_hook=factory)  # fmt: skip
        assert all(r.record.correct for r in spy.rollouts)
        kept[on] = [r for r in spy.rollouts if r.dropped is None]
        dropped = [r for r in spy.rollouts if r.dropped is not None]
        if on:
            assert {r.sample for r in dropped} == {1, 3} and {r.dropped for r in dropped} == {"schema"}
        else:
            assert not dropped
    assert all(r.record.triggered and r.record.format_valid for r in kept[True])
    assert len(kept[False]) == 4 and len(kept[True]) == 2


@pytest.mark.parametrize(
    ("mode", "valid", "triggered", "fails"),
    [("parallel", True, True, False), ("parallel", True, False, True), ("parallel", False, True, True),
     ("sequential", True, False, False), ("sequential", False, False, True)],
)  # fmt: skip
def test_schema_failure_by_mode(mode, valid, triggered, fails) -> None:
    from types import SimpleNamespace

    from npr_pipelines.training.rl_rollout import schema_failure

    out, record = SimpleNamespace(mode=mode), SimpleNamespace(format_valid=valid, triggered=triggered)
    assert schema_failure(out, record) is fails


def test_inserted_tokens_get_no_gradient(tiny_tagged, tmp_path, monkeypatch) -> None:
    spy = Spy(monkeypatch)
    tok = _tok(tiny_tagged)
    run_rl(tiny_tagged, _problems(["p1"]), _config(prompts_per_step=1), tmp_path / "run",
           logits_hook=_parallel_hooks(tok))  # fmt: skip
    rollouts = {tuple(r.prompt_ids + r.output.response_ids): r for r in spy.rollouts if r.dropped is None}
    objective = RLObjective("papo", denominator=10.0, agg_mode="token-mean", temperature=1.0)
    checked = 0
    for batch in spy.batches:
        logp = torch.zeros(batch.input_ids.shape, requires_grad=True)
        batch.advantages = torch.ones_like(batch.advantages)
        loss, _ = objective.loss_from_logp(logp, batch)
        (grad,) = torch.autograd.grad(loss, logp)
        for i in range(batch.input_ids.shape[0]):
            r = rollouts[_row_ids(batch, i)]
            p = len(r.prompt_ids)
            inserted = torch.tensor(r.output.inserted)
            g = grad[i, p : p + len(inserted)]
            assert inserted.any()
            assert (g[inserted] == 0).all()
            assert (g[~inserted] != 0).all()
            assert (grad[i, :p] == 0).all()
            checked += 1
    assert checked == 2


def _uniform_and_mixed_hook(tok):
    """Problems "u*": every sample correct (a uniform group, advantage 0); "m*": half correct."""
    encode = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    eos = tok.eos_token_id

    def factory(problem: Problem, sample: int):
        right = problem.id.startswith("u") or sample % 2 == 0
        return ScriptHook({(0,): encode(f"\\boxed{{{ANSWER if right else '8'}}}")}, after=eos)

    return factory


def test_dynamic_sampling_refills_with_mixed_groups(tiny_plain, tmp_path, monkeypatch) -> None:
    spy = Spy(monkeypatch)
    tok = _tok(tiny_plain)
    factory = _uniform_and_mixed_hook(tok)
    logs: list[dict] = []
    cfg = sr_config(**{**_config().to_dict(), "stage": "sr", "mode": "sequential", "prompt": _config().prompt,
                       "betas": (0.9, 0.999), "dynamic_sampling": True, "max_gen_batches": 4})  # fmt: skip
    run_rl(tiny_plain, _problems(["u1", "u2", "u3", "m1"]), cfg, tmp_path / "run", on_log=logs.append,
           logits_hook=factory)  # fmt: skip
    rec = logs[0]
    # One mixed problem per epoch of four and two prompts per batch: at least two batches are needed.
    assert rec["gen_batches"] >= 2 and rec["mixed_groups"] >= 2
    assert rec["rollouts"] == 4 * rec["gen_batches"] * 2
    trained = {_row_ids(b, i) for b in spy.batches for i in range(b.input_ids.shape[0])}
    trained_rollouts = [r for r in spy.rollouts if tuple(r.prompt_ids + r.output.response_ids) in trained]
    assert trained_rollouts and all(r.problem.id == "m1" for r in trained_rollouts)
    assert rec["kept"] == sum(r.problem.id == "m1" for r in spy.rollouts)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).state_dict()


def test_zero_advantage_rollouts_are_skipped_exactly(tiny_plain, tmp_path, monkeypatch) -> None:
    tok = _tok(tiny_plain)
    cfg = _config(mode="sequential", stage="sr", steps=2, prompts_per_step=2, micro_batch_size=2)
    problems = _problems(["u1", "m1"])  # both in every step
    spy = Spy(monkeypatch)
    logs: list[dict] = []
    skipped = run_rl(tiny_plain, problems, cfg, tmp_path / "skip", logits_hook=_uniform_and_mixed_hook(tok),
                     on_log=logs.append)  # fmt: skip
    trained = {_row_ids(b, i) for b in spy.batches for i in range(b.input_ids.shape[0])}
    by_row = {tuple(r.prompt_ids + r.output.response_ids): r for r in spy.rollouts}
    assert trained and all(by_row[row].problem.id.startswith("m") for row in trained)
    assert [rec["zero_advantage"] for rec in logs] == [4.0, 4.0]  # one uniform group of four per step

    full = run_rl(tiny_plain, problems, cfg.replace(skip_zero_advantage=False), tmp_path / "full",
                  logits_hook=_uniform_and_mixed_hook(tok))  # fmt: skip
    a, b, init = _weights(skipped.final_dir), _weights(full.final_dir), _weights(tiny_plain)
    assert any(not torch.equal(a[k], init[k]) for k in a)  # the update is not empty
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)  # AVX2 kernels: 1.7e-7


def _resume_hook(tok):
    """Free sampling for three tokens, then an answer whose correctness depends on what was sampled."""
    encode = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    right, wrong = encode(f" \\boxed{{{ANSWER}}}"), encode(" \\boxed{8}")

    class Hook:
        def __call__(self, stream, logits):
            n = stream.n_sampled
            if n < 3:
                return logits
            tail = right if stream.response_tokens[0] % 2 == 0 else wrong
            forced = tail[n - 3] if n - 3 < len(tail) else tok.eos_token_id
            out = torch.full_like(logits, float("-inf"))
            out[forced] = 0.0
            return out

    hook = Hook()
    return lambda problem, sample: hook


class Killed(Exception):
    pass


def _digest(path: Path) -> str:
    from transformers import AutoModelForCausalLM

    return weights_digest(AutoModelForCausalLM.from_pretrained(str(path)))


@pytest.mark.parametrize("kill_after", [2, 3])
def test_resume_after_kill_gives_the_same_weights(tiny_plain, tmp_path, kill_after) -> None:
    tok = _tok(tiny_plain)
    cfg = _config(mode="sequential", stage="sr", loss="dapo", advantage="grpo", steps=4, save_every=2,
                  mini_batches_per_step=2, group_size=4, prompts_per_step=2)  # fmt: skip
    problems = _problems(["a", "b", "c"])
    hook = _resume_hook(tok)
    full = run_rl(tiny_plain, problems, cfg, tmp_path / "full", logits_hook=hook)
    assert [s for s, _ in full.checkpoints] == [2, 4]
    assert any(h["loss"] != 0 for h in full.history)

    # Killed right after the step-2 checkpoint, or in step 3 before any later checkpoint.
    def kill(step: int, *_: object) -> None:
        if step == kill_after:
            raise Killed

    hooks = {"on_checkpoint": kill} if kill_after == 2 else {"on_log": lambda r: kill(r["step"])}
    with pytest.raises(Killed):
        run_rl(tiny_plain, problems, cfg, tmp_path / "killed", logits_hook=hook, **hooks)
    resumed_steps: list[int] = []
    again = run_rl(tiny_plain, problems, cfg, tmp_path / "killed", logits_hook=hook,
                   on_log=lambda r: resumed_steps.append(r["step"]))  # fmt: skip
    assert resumed_steps == [3, 4]  # from the step-2 checkpoint either way
    assert _digest(again.final_dir) == _digest(full.final_dir)
    assert [h["step"] for h in again.history] == [1, 2, 3, 4]
    assert again.history[-1]["data_cursor"] == full.history[-1]["data_cursor"]


def test_finished_run_returns_immediately(tiny_plain, tmp_path, monkeypatch) -> None:
    tok = _tok(tiny_plain)
    cfg = _config(mode="sequential", stage="sr", steps=1)
    problems = _problems(["a", "b"])
    first = run_rl(tiny_plain, problems, cfg, tmp_path / "run", logits_hook=_resume_hook(tok))

    def boom(*args, **kwargs):
        raise AssertionError("a finished run must not rebuild its model")

    monkeypatch.setattr(rl_mod, "_Run", boom)
    again = run_rl(tiny_plain, problems, cfg, tmp_path / "run", on_log=boom)
    assert again.final_dir == first.final_dir and again.final_step == 1
    assert again.history == first.history and again.metrics == first.metrics
    with pytest.raises(ValueError, match="different config"):
        run_rl(tiny_plain, problems, cfg.replace(lr=2e-3), tmp_path / "run")


def test_killed_between_final_checkpoint_and_metrics_still_reports_them(tiny_plain, tmp_path) -> None:
    tok = _tok(tiny_plain)
    cfg = _config(mode="sequential", stage="sr", steps=1)
    problems = _problems(["a", "b"])
    full = run_rl(tiny_plain, problems, cfg, tmp_path / "full", logits_hook=_resume_hook(tok))

    def kill(*_: object) -> None:
        raise Killed

    with pytest.raises(Killed):  # the final checkpoint is on disk, its metrics are not
        run_rl(tiny_plain, problems, cfg, tmp_path / "run", logits_hook=_resume_hook(tok), on_checkpoint=kill)
    again = run_rl(tiny_plain, problems, cfg, tmp_path / "run")
    timings = {"rollout_s", "train_s", "wall_s_this_call"}
    assert again.final_step == 1 and again.metrics.keys() == full.metrics.keys() - {"wall_s_this_call"}
    assert {k: v for k, v in again.metrics.items() if k not in timings} == {
        k: v for k, v in full.metrics.items() if k not in timings
    }


def test_lr_schedule_warmup_and_cosine() -> None:
    cfg = RLConfig(lr=1.0, steps=10, mini_batches_per_step=2, warmup_steps=2, warmup_start_ratio=0.2,
                   lr_schedule="cosine", min_lr_ratio=0.1)  # fmt: skip
    lrs = [cfg.lr_at(i) for i in range(20)]
    assert lrs[0] == pytest.approx(0.2 + 0.8 * 0.25) and lrs[3] == pytest.approx(1.0)
    assert (
        lrs[4] == pytest.approx(1.0) and lrs[-1] > 0.1 and all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    )


def test_paired_bootstrap_interval() -> None:
    a = [0.0] * 50 + [1.0] * 50
    b = [0.0] * 40 + [1.0] * 60
    res = paired_bootstrap(a, b, n=2000, seed=0)
    assert res.diff == pytest.approx(0.1)
    assert 0.0 < res.low < 0.1 < res.high
    same = paired_bootstrap(a, a, n=500, seed=0)
    assert same.low == same.high == 0.0
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 0.0])
