"""Calibrated FP8 KV scales: measured maxima, kv_scales.json beside a checkpoint, the pool's k_scale / v_scale."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import raas_jax
from raas_jax.decode.cache import KV_SCALE_HEADROOM, init_pool, kv_scales
from raas_jax.eval.calibrate import SCALES_FILE, read_kv_absmax, write_kv_absmax
from raas_jax.cli import main
from raas_jax.models.config import ModelConfig
from raas_jax.policies import Dense, RaaS

CFG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
                  head_dim=8)


def test_scales_follow_the_maxima_and_the_format():
    """k_scale = absmax / (format max / headroom), per layer and format; FP8 pools carry them, others do not."""
    absmax = ((896.0, 1.0, 0.0), (4.0, 8.0, 16.0))
    k_scale, v_scale = kv_scales(absmax, jnp.float8_e4m3fn, 3)
    np.testing.assert_allclose(np.asarray(k_scale), [896 * KV_SCALE_HEADROOM / 448, KV_SCALE_HEADROOM / 448, 1e-30 *
                                                     KV_SCALE_HEADROOM / 448], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(kv_scales(absmax, jnp.float8_e5m2, 3)[1]),
                               np.array([4.0, 8.0, 16.0]) * KV_SCALE_HEADROOM / 57344, rtol=1e-6)
    pool = init_pool(CFG, 2, 4, 4, jnp.float32, "fp8", absmax)
    assert pool.k_scale.shape == pool.v_scale.shape == (3,)
    assert init_pool(CFG, 2, 4, 4, jnp.float32, "bfloat16", absmax).k_scale is None  # only FP8 pages are scaled
    assert init_pool(CFG, 2, 4, 4, jnp.float32, "fp8").k_scale is None
    with pytest.raises(ValueError, match="3 finite values >= 0"):
        kv_scales(((1.0, 2.0), (1.0, 2.0)), jnp.float8_e4m3fn, 3)
    with pytest.raises(ValueError, match="3 finite values >= 0"):
        kv_scales(((1.0, float("nan"), 2.0), (1.0, 2.0, 3.0)), jnp.float8_e4m3fn, 3)


def test_kv_scales_file_round_trip_and_refusals(tmp_path):
    absmax = ((1.5, 2.5, 3.5), (0.5, 0.25, 4.0))
    path = write_kv_absmax(tmp_path, absmax, dataset="gsm8k")
    assert path.name == SCALES_FILE and not list(tmp_path.glob("*.tmp"))  # written through a renamed temporary
    assert read_kv_absmax(tmp_path, 3) == absmax
    assert read_kv_absmax(tmp_path / "elsewhere", 3) is None
    with pytest.raises(ValueError, match="must hold 4 finite values"):
        read_kv_absmax(tmp_path, 4)  # another model's layer count
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not a kv_scales file"):
        read_kv_absmax(tmp_path, 3)
    path.write_text(json.dumps({"k_absmax": [1, 2, 3]}))
    with pytest.raises(ValueError, match="re-run `raas-jax calibrate-kv`"):
        read_kv_absmax(tmp_path, 3)


def test_calibrate_cli_writes_scales_the_loaded_model_applies(tiny_llama_converted, tmp_path, capsys):
    """`raas-jax calibrate-kv` measures the maxima over dataset prompts and their continuations and saves them;
    a model loaded from that directory stores FP8 pages scaled (k_scale / v_scale in the pool), an explicit
    policy value wins, and other page dtypes are unchanged."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_converted, model_dir)
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "1"}) + "\n" for q in ("one two", "three four five")))
    assert main(["calibrate-kv", "--model", str(model_dir), "--dataset", str(data), "--limit", "2",
                 "--max-new-tokens", "6", "--batch-size", "1", "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    model = raas_jax.load(model_dir, dtype="f32")
    k_max, v_max = model.kv_absmax
    assert len(k_max) == len(v_max) == model.cfg.num_layers and min(k_max + v_max) > 0
    assert model.with_kv_scales(RaaS(budget=32, page_size=4, kv_dtype="fp8")).kv_absmax == model.kv_absmax
    assert model.with_kv_scales(Dense()).kv_absmax is None  # pages in the model's dtype: nothing to scale
    mine = ((1.0,) * model.cfg.num_layers,) * 2
    assert model.with_kv_scales(Dense(kv_dtype="fp8", kv_absmax=mine)).kv_absmax == mine
    out = model.generate(["one two"], max_new_tokens=4, policy=Dense(page_size=4, kv_dtype="fp8"))[0]
    assert len(out.token_ids) == 4
    cache = model._generator(Dense(page_size=4, kv_dtype="fp8")).policy.init(model.cfg, 1, 4, model.dtype)
    np.testing.assert_allclose(np.asarray(cache.k_scale), np.asarray(k_max) * 2 / 448, rtol=1e-6)
    assert main(["calibrate-kv", "--model", str(model_dir), "--dataset", str(tmp_path / "missing.jsonl")]) == 2


def test_an_fp8_eval_resumes_only_with_the_same_scales(tmp_path):
    """The calibrated maxima an FP8 eval ran with are part of its config: a resume with other ones is refused."""
    from raas_jax.eval.runner import EvalConfig, check_config

    config = EvalConfig("gsm8k", kv_dtype="fp8")
    check_config(tmp_path, config, kv_absmax=((1.0, 2.0), (3.0, 4.0)))
    check_config(tmp_path, config, kv_absmax=((1.0, 2.0), (3.0, 4.0)))  # the same: resumes
    with pytest.raises(ValueError, match="different kv_absmax"):
        check_config(tmp_path, config, kv_absmax=None)  # the scales file was deleted since


def test_calibrate_checks_the_folder_is_writable_before_calibrating(tiny_llama_converted, tmp_path, monkeypatch,
                                                                      capsys):
    import os

    from raas_jax.eval import calibrate

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_converted, model_dir)
    data = tmp_path / "questions.jsonl"
    data.write_text(json.dumps({"question": "one two", "answer": "1"}) + "\n")
    monkeypatch.setattr(calibrate, "measure_kv_absmax", lambda *a, **k: pytest.fail("calibrated first"))
    model_dir.chmod(0o500)
    try:
        assert main(["calibrate-kv", "--model", str(model_dir), "--dataset", str(data), "--quiet"]) == 2
    finally:
        model_dir.chmod(0o700)
    assert "cannot write kv_scales.json into" in capsys.readouterr().err


def test_check_writable_names_the_folder(tmp_path):
    from raas_jax.eval.calibrate import check_writable

    with pytest.raises(ValueError, match="cannot write kv_scales.json into .*missing"):
        check_writable(tmp_path / "missing")


def test_scales_file_gets_the_usual_mode(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        path = write_kv_absmax(tmp_path, ((1.0,), (2.0,)))
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644  # not the 0600 of a private temporary
