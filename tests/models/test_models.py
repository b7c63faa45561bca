"""Model forward against HF transformers (torch, fp32) on tiny random checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import raas_jax
from raas_jax.model_io.checkpoint import convert
from raas_jax.models.config import ModelConfig, UnsupportedModelError

from conftest import VOCAB, make_hf_model

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

CASES = {
    "llama-gqa-untied": ("llama", {}),
    "llama-mha-tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama3-rope-scaling": ("llama", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0}),
    "llama-linear-rope-bias": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0},
                                         "attention_bias": True, "mlp_bias": True}),
    "llama-mqa-headdim": ("llama", {"num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 24}),
    "mistral": ("mistral", {"sliding_window": None}),
    "qwen2-bias-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen2-gqa": ("qwen2", {"num_attention_heads": 6, "num_key_value_heads": 2, "hidden_size": 96}),
    "qwen3-qknorm": ("qwen3", {"head_dim": 40}),
    "qwen3-mha-tied": ("qwen3", {"num_key_value_heads": 4, "tie_word_embeddings": True, "head_dim": 16}),
}


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    kind, overrides = CASES[case]
    hf_model = make_hf_model(tmp_path / "hf", kind, seed=hash(case) % 1000, tokenizer=False, **overrides)
    convert(tmp_path / "hf", tmp_path / "ours", dtype="f32", progress=False)
    model = raas_jax.load(tmp_path / "ours", dtype="f32")
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, 37))
    with torch.no_grad():
        ref = hf_model(torch.tensor(tokens)).logits.float().numpy()
    ours = model.logits(tokens)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert relative_error(ours, ref) <= 1e-4


@pytest.mark.parametrize("case", ["llama-linear-rope-bias", pytest.param("llama-mqa-headdim", marks=pytest.mark.slow),
                                  pytest.param("qwen2-gqa", marks=pytest.mark.slow)])
def test_fused_projections_equal_the_checkpoint_layout(case, tmp_path):
    """`load` gives the fused layout (one qkv and one gate/up kernel per layer; the test above checks it against
    HF); the checkpoint's layout gives the same logits, prompt and decode, and fusing is idempotent."""
    import jax
    import jax.numpy as jnp

    from raas_jax.model_io import checkpoint
    from raas_jax.models.transformer import Transformer, fuse_projections
    from raas_jax.policies import Dense

    kind, overrides = CASES[case]
    make_hf_model(tmp_path / "hf", kind, seed=7, tokenizer=False, **overrides)
    convert(tmp_path / "hf", tmp_path / "ours", dtype="f32", progress=False)
    model = raas_jax.load(tmp_path / "ours", dtype="f32")
    plain = checkpoint.restore_params(tmp_path / "ours", model.cfg, jnp.float32)
    assert "qkv_proj" in model.params["layers"]["self_attn"] and "q_proj" in plain["layers"]["self_attn"]
    assert jax.tree.structure(fuse_projections(model.cfg, model.params)) == jax.tree.structure(model.params)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, VOCAB, (2, 9)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))
    module = Transformer(model.cfg, jnp.float32, Dense(page_size=4))
    cache = Dense(page_size=4).init(model.cfg, 2, 8, jnp.float32)
    apply = jax.jit(module.apply, static_argnames="decode")  # op by op (eager) takes many times longer
    outs = []
    for params in (plain, model.params):
        logits, filled = apply({"params": params}, tokens[:, :8], positions[:, :8], cache)
        step, _ = apply({"params": params}, tokens[:, 8:], positions[:, 8:], filled, decode=True)
        outs.append((np.asarray(logits), np.asarray(step)))
    for got, want in zip(outs[1], outs[0]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_no_room_to_fuse_keeps_the_checkpoint_layout(tiny_llama_dir, tmp_path, monkeypatch):
    """A converted model is fused on the device after restoring; without room for the fused copy `load` keeps the
    checkpoint's layout and says so, and the logits are the same."""
    from raas_jax import api

    convert(tiny_llama_dir, tmp_path / "ours", dtype="f32", progress=False)
    fused = raas_jax.load(tmp_path / "ours", dtype="f32")
    monkeypatch.setattr(api, "device_free_bytes", lambda: 0)
    with pytest.warns(UserWarning, match="no room on the device to fuse"):
        plain = raas_jax.load(tmp_path / "ours", dtype="f32")
    assert "q_proj" in plain.params["layers"]["self_attn"] and "qkv_proj" in fused.params["layers"]["self_attn"]
    tokens = np.random.default_rng(3).integers(0, VOCAB, (2, 11))
    np.testing.assert_allclose(plain.logits(tokens), fused.logits(tokens), rtol=1e-5, atol=1e-5)


def test_hf_directory_loads_without_conversion(tiny_llama_dir):
    import transformers

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    tokens = np.arange(30)[None] % VOCAB
    with torch.no_grad():
        ref = hf_model(torch.tensor(tokens)).logits.numpy()
    assert relative_error(raas_jax.load(tiny_llama_dir, dtype="f32").logits(tokens), ref) <= 1e-4


def test_bf16_logits_close_to_f32(tiny_llama_dir):
    tokens = np.arange(40)[None] % VOCAB
    f32 = raas_jax.load(tiny_llama_dir, dtype="f32").logits(tokens)
    bf16 = raas_jax.load(tiny_llama_dir, dtype="bf16").logits(tokens)
    assert np.isfinite(bf16).all()
    assert relative_error(bf16, f32) <= 3e-2


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.*Qwen3ForCausalLM"):
        ModelConfig.from_hf_dict({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})


def test_unsupported_rope_scaling_is_named():
    hf = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8,
          "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
          "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(UnsupportedModelError, match="yarn.*default, linear, llama3"):
        ModelConfig.from_hf_dict(hf)


def test_bad_token_ids_are_rejected(tiny_llama_dir):
    model = raas_jax.load(tiny_llama_dir, dtype="f32")
    with pytest.raises(ValueError, match=r"\[0, 320\)"):
        model.logits([[1, 2, VOCAB]])
    with pytest.raises(ValueError, match="non-empty integer"):
        model.logits(np.zeros((1, 0), np.int32))


def test_a_chunk_needs_a_cache(tiny_llama_dir):
    import jax.numpy as jnp

    from raas_jax.models.transformer import Transformer
    from raas_jax.policies import Dense

    model = raas_jax.load(tiny_llama_dir, dtype="f32")
    module = Transformer(model.cfg, model.dtype, Dense())
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="chunked=True .* needs a cache"):
        module.apply({"params": model.params}, tokens, jnp.arange(4)[None], chunked=True)


def test_decode_materialises_q_k_v_once():
    """The decode step computes q, k, v behind an optimization barrier: at B = 1 XLA's GPU compiler otherwise turns
    the small k/v projections into multiply-reduce loops and fuses a copy into every cache write that reads them
    (docs/performance.md). In decode only: a prompt's projections are GEMMs."""
    import jax
    import jax.numpy as jnp

    from raas_jax.bench import e2e as bench
    from raas_jax.decode.generate import Generator
    from raas_jax.policies import RaaS

    cfg = bench.MODEL_SHAPES["tiny"]
    gen = Generator(cfg, jnp.float32, RaaS(budget=32, page_size=4), unroll_layers=True)
    params, state, *rest = bench.abstract_decode_args(gen, 1, 64)
    decode_text = str(jax.make_jaxpr(gen._decode)(params, state, *rest))
    assert "optimization_barrier" in decode_text  # the layer's jaxpr (shared by the unrolled layers) holds it
    prompt = jax.ShapeDtypeStruct((1, 16), jnp.int32)
    prefill_text = str(jax.make_jaxpr(lambda p, t: gen.module.apply({"params": p}, t, jnp.zeros_like(t)))(
        params, prompt))
    assert "optimization_barrier" not in prefill_text
