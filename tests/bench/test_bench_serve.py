"""`raas-jax bench serve` on the CPU: the load generator's workloads and metrics, in process and over HTTP."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from raas_jax.bench import serve as bench_serve
from raas_jax.cli import main


def test_lognormal_lengths_have_the_asked_median_and_p90():
    lengths = bench_serve.lognormal_lengths(20000, np.random.default_rng(0), 4096, 12288, 32768)
    assert abs(np.median(lengths) / 4096 - 1) < 0.03 and abs(np.percentile(lengths, 90) / 12288 - 1) < 0.05
    assert lengths.max() <= 32768 and lengths.min() >= 1
    times = bench_serve.arrivals(5000, 10.0, np.random.default_rng(0))
    assert abs(times[-1] / 500 - 1) < 0.05 and np.all(np.diff(times) >= 0)
    assert not bench_serve.arrivals(3, math.inf, np.random.default_rng(0)).any()


def test_metrics_follow_vllms_definitions():
    r = bench_serve.Record(arrival=0.0, max_tokens=5, prompt_tokens=3, start=1.0,
                           chunks=[(1.5, 1), (2.0, 2), (3.0, 2)], end=3.0, output_tokens=5, finish_reason="length")
    assert r.ttft == 0.5 and r.latency == 2.0 and r.tpot == (2.0 - 0.5) / 4
    assert r.itls() == [0.25, 0.25, 0.5, 0.5]
    timeline = [(0.0, 4, 0), (1.0, 4, 0), (2.0, 2, 0), (3.0, 0, 0)]
    assert bench_serve.saturated_throughput([r], timeline, rows=4) == 3 / 2.0  # tokens at 1.5 and 2.0 over [0, 2]
    summary = bench_serve.summarize([r], timeline, rows=4, goodput={"ttft": 400})
    assert summary["completed"] == 1 and summary["goodput"] == 0 and summary["output_throughput"] == 2.5


def test_tpot_by_output_position_and_the_steady_state_ttft():
    """TPOT over a window of output tokens, from the chunk that delivered each end; TTFT of the later arrivals,
    finished or not, and those still waiting for a first token."""
    chunks = [(1.0 + 0.01 * i, 16) for i in range(200)]  # 3200 tokens, 16 every 10 ms, then slower
    chunks += [(chunks[-1][0] + 0.02 * (i + 1), 16) for i in range(100)]  # 1600 more, 16 every 20 ms
    fast = bench_serve.Record(arrival=0.0, max_tokens=4800, prompt_tokens=8, start=0.5, chunks=chunks)
    assert fast.token_time(1) == 1.0 and fast.token_time(17) == 1.01 and fast.token_time(4801) is None
    assert fast.window_tpot(1, 1024) == pytest.approx(0.64 / 1024)  # tokens 1 and 1025: chunks 0 and 64
    assert fast.window_tpot(3201, 1024) == pytest.approx(1.28 / 1024)
    waiting = bench_serve.Record(arrival=5.0, max_tokens=10, prompt_tokens=8, start=5.0)
    late = bench_serve.Record(arrival=4.0, max_tokens=10, prompt_tokens=8, start=4.0, chunks=[(4.25, 1)])
    by_position = bench_serve.tpot_by_position([fast, waiting, late], window=1024, starts=(1, 2048, 3201, 4000))
    assert set(by_position) == {"1", "2048", "3201"} and by_position["1"]["requests"] == 1
    assert by_position["3201"]["median"] == pytest.approx(1.28 / 1024 * 1e3)
    after = bench_serve.arrivals_after([fast, waiting, late], 3.0)
    assert after["requests"] == 2 and after["no_first_token"] == 1 and after["ttft_ms"]["p99"] == pytest.approx(250)
    text = bench_serve.position_table([{"name": "raas serve", "summary": {"tpot_by_position_ms": by_position,
                                                                       "after": after}}])
    assert "| TPOT tokens 1-1024 median / p99 ms (requests) |" in text and "| 1.25 / 1.25 (1) |" in text
    assert "2 requests arrived after 3 s: TTFT median 250 ms, p99 250 ms; 1 without a first token" in text
    fixed = bench_serve.lognormal_lengths(50, np.random.default_rng(0), 17408, 17408, 32768)
    assert set(fixed.tolist()) == {17408}  # p90 = median: one length


def test_in_process_serve_and_static_on_the_tiny_shape(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "serve", "--model", "tiny", "--policies", "raas,dense", "--modes", "serve,static",
                 "--budget", "64", "--page-size", "4", "--max-rows", "4", "--max-model-len", "256",
                 "--num-prompts", "10", "--prompt-len", "8:24", "--output-median", "12", "--output-p90", "30",
                 "--output-cap", "60", "--time-limit", "300", "--out-dir", str(out)]) == 0
    saved = json.loads((out / "serve.json").read_text())
    names = [run["name"] for run in saved["runs"]]
    assert names == ["raas serve", "raas static", "dense serve", "dense static"]
    wanted = None
    for run in saved["runs"]:
        s = run["summary"]
        assert s["completed"] == 10 and s["failed"] == 0, run["name"]
        total = sum(r["output_tokens"] for r in run["records"])
        wanted = wanted or total
        assert total == wanted == s["total_output_tokens"]  # every request got exactly its max_tokens
    assert (out / "serve.md").read_text().count("\n") == 6 and (out / "serve_rows_in_use.png").exists()
    assert "raas serve" in capsys.readouterr().out


def test_bad_flags_are_refused_before_anything_loads(capsys):
    for argv in (["--prompt-len", "9:3"], ["--output-median", "9", "--output-p90", "3"], ["--modes", "fast"],
                 ["--goodput", "latency:5"]):
        with pytest.raises(SystemExit):
            bench_serve.parse_args(argv)
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("max_tokens", [40, pytest.param(120, marks=pytest.mark.slow)])  # 120: whole answers
def test_served_milestones_answers_equal_the_evals(tmp_path, max_tokens):
    """`bench serve --workload milestones:D` on the committed checkpoint, greedy and in process: every problem's
    text, and so its grade, equals what `raas-jax eval` gets for it."""
    from pathlib import Path

    import raas_jax
    from raas_jax.eval.datasets import load_samples
    from raas_jax.eval.runner import EvalConfig, run_eval

    ckpt = Path(__file__).resolve().parents[2] / "checkpoints" / "milestones-13m"
    out = tmp_path / "served"
    assert main(["bench", "serve", "--model", str(ckpt), "--workload", "milestones:1", "--num-prompts", "3",
                 "--max-tokens", str(max_tokens), "--policies", "raas", "--budget", "256", "--max-rows", "2",
                 "--decode-steps", "16", "--time-limit", "300", "--out-dir", str(out)]) == 0
    run = json.loads((out / "serve.json").read_text())["runs"][0]
    config = EvalConfig(dataset="milestones:1", policies=("raas",), budgets=(256,), max_new_tokens=max_tokens,
                        batch_size=3, model=str(ckpt))
    rows = run_eval(raas_jax.load(ckpt), load_samples("milestones:1", limit=3), config, tmp_path / "eval",
                    progress=False)
    assert [r["text"] for r in run["records"]] == [row["text"] for row in rows]
    assert run["summary"]["accuracy"] == sum(row["correct"] for row in rows) / 3
