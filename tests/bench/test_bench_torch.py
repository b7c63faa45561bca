"""The torch reference of `bench e2e --torch-reference` (raas_jax/bench_torch.py) on a CPU: same logits as our
model, the child-process path end to end, a clear error without torch. (The CUDA graph needs a GPU.)"""

from __future__ import annotations

import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from raas_jax.bench import e2e as bench
from raas_jax.bench import torch_decode as bench_torch
from raas_jax.cli import main as cli_main
from raas_jax.models.transformer import Transformer

CFG = bench.MODEL_SHAPES["tiny"]


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def test_static_cache_decode_matches_jax_model():
    params = bench.random_params(CFG, jnp.float32, seed=3, fused=False)  # torch takes the checkpoint layout
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 23))  # prompt 19 + 4 decode steps
    prompt, steps = 19, 4
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    ref, _ = Transformer(CFG, jnp.float32).apply({"params": params}, jnp.asarray(tokens, jnp.int32),
                                                 jnp.asarray(positions, jnp.int32))  # [2, 23, V] full causal
    ref = np.asarray(ref)
    w = bench_torch.weights_from_params(params, CFG, torch.device("cpu"), torch.float32)
    kc, vc = bench_torch.static_cache(CFG, 2, prompt + steps + 5, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        pos = torch.tensor(0)
        out = bench_torch.forward(w, CFG, torch.from_numpy(tokens[:, :prompt]), pos, kc, vc)  # prefill
        assert relative_error(out.numpy(), ref[:, :prompt]) <= 1e-4
        for t in range(prompt, prompt + steps):  # decode one token at a time through the static cache
            out = bench_torch.forward(w, CFG, torch.from_numpy(tokens[:, t:t + 1]), torch.tensor(t), kc, vc)
            assert out.shape == (2, 1, CFG.vocab_size)
            assert relative_error(out[:, 0].numpy(), ref[:, t]) <= 1e-4


def test_time_decode_on_cpu_and_largest_batch():
    w = bench_torch.random_weights(CFG, torch.device("cpu"), torch.float32)
    timing = bench_torch.time_decode(w, CFG, 2, 40, 3)
    assert timing.step_ms > 0 and timing.live_gib == 0.0
    per_seq = 2 * CFG.num_layers * CFG.num_kv_heads * (1000 + 10 + 2) * CFG.head_dim * 2  # bf16
    assert bench_torch.largest_batch(CFG, 1000, 10, 8 * 2**30 + 10 * per_seq, 2) == 8
    assert bench_torch.largest_batch(CFG, 1000, 10, 2**30, 2) == 0
    assert bench_torch.largest_batch(bench.MODEL_SHAPES["llama3-8b"], 2048, 32, 120 * 2**30, 2) > 64


@pytest.mark.slow  # the fast set: the torch decode against our model, its timing and largest batch (above)
def test_torch_reference_in_bench_e2e(tmp_path, capsys):
    assert cli_main(["bench", "e2e", "--models", "tiny", "--allow-cpu", "--positions", "64,128", "--batches", "1,2",
                     "--steps", "3", "--policies", "dense", "--torch-reference", "--torch-batches", "2",
                     "--out-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "e2e_tiny.json").read_text())["rows"]
    torch_rows = [r for r in rows if r["impl"] == "torch_eager"]  # (torch_cuda_graph on a GPU)
    ours = [r for r in rows if r["impl"] == "jax"]
    assert {(r["position"], r["batch"]) for r in torch_rows} == {(64, 2), (128, 2)}
    assert all(r["step_ms"] > 0 and r["roofline_ms"] > 0 and r["policy"] == "torch_eager" for r in torch_rows)
    assert {(r["position"], r["batch"]) for r in ours} == {(64, 1), (64, 2), (128, 1), (128, 2)}
    for r in ours:
        torch_ms = [t["step_ms"] for t in torch_rows if (t["position"], t["batch"]) == (r["position"], r["batch"])]
        assert r["ratio_vs_torch"] == (pytest.approx(r["step_ms"] / torch_ms[0]) if torch_ms else None)
    printed = capsys.readouterr().out
    assert "x torch" in printed and "| tiny | 128 | 2 |" in printed  # per-row ratio and the summary table
    assert (tmp_path / "e2e_tokens_per_s.png").stat().st_size > 1000


def test_missing_torch_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError, find_spec says None
    assert bench_torch.main(["--model", "tiny", "--out", str(tmp_path / "t.json")]) == 2
    assert "pip install torch" in capsys.readouterr().err
    assert cli_main(["bench", "e2e", "--models", "tiny", "--allow-cpu", "--torch-reference",
                     "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pip install torch" in err and "Traceback" not in err
    assert not (tmp_path / "e2e_tiny.json").exists()
