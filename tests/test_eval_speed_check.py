"""``python -m npr_pipelines.eval.speed_check``: both modes decoded over the same problems, and the
speedups it reports are the ratios of its own per-mode measurements."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from npr_pipelines.engine.testing import tiny_qwen3
from npr_pipelines.eval import speed_check

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from _support import byte_bpe_tokenizer

    path = tmp_path_factory.mktemp("tiny-npr")
    tok = byte_bpe_tokenizer()
    tiny_qwen3(len(tok), seed=3).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_speed_check_reports_ratios_of_its_own_measurements(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    assert speed_check.main([str(model_dir), "--device", "cpu", "--problems", "5", "--chunk", "2", "5",
                             "--latency-problems", "2", "--profile", "small", "--out", str(out)]) == 0  # fmt: skip
    runs = json.loads(out.read_text())
    assert [r["chunk"] for r in runs] == [2, 5]
    for r in runs:
        seq, par = r["modes"]["sequential"], r["modes"]["parallel"]
        for m in (seq, par):
            assert m["tokens_per_s"] == pytest.approx(m["tokens"] / m["wall_s"])
            assert m["ms_per_step"] == pytest.approx(1000 * m["wall_s"] / m["engine_steps"])
            assert m["tokens"] > 0 and m["latency_median_s"] > 0
        assert seq["trigger_rate"] == 0.0  # sequential mode never forks
        assert r["throughput_speedup"] == pytest.approx(par["tokens_per_s"] / seq["tokens_per_s"])
        assert r["step_ratio"] == pytest.approx(seq["engine_steps"] / par["engine_steps"])
        assert r["n_problems"] == 5 and r["device"] == "cpu"
    # More problems in flight: fewer engine steps for the same sequential work.
    assert runs[1]["modes"]["sequential"]["engine_steps"] < runs[0]["modes"]["sequential"]["engine_steps"]
    assert runs[1]["modes"]["sequential"]["tokens"] == runs[0]["modes"]["sequential"]["tokens"]
