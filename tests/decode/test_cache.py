"""The page pool's editing functions (raas_jax/cache.py) beyond what the policy tests cover."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from raas_jax.decode.cache import KV_DTYPES, cache_bytes, init_pool, write_chunk, write_prompt
from raas_jax.models.config import ModelConfig
from raas_jax.policies import RaaS

CFG = ModelConfig(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
                  num_heads=2, num_kv_heads=1, head_dim=8)


def chunk(start, lengths, size, seed=0):
    rng = np.random.default_rng(seed)
    ids = start + np.arange(size)[None]
    positions = np.where(ids < np.asarray(lengths)[:, None], ids, -1).astype(np.int32)
    k = rng.normal(size=(len(lengths), size, CFG.num_kv_heads, CFG.head_dim)).astype(np.float32)
    return jnp.asarray(k), jnp.asarray(-k), jnp.asarray(positions)


def test_write_chunk_builds_the_prompt_page_by_page():
    cache = init_pool(CFG, 2, 8, 4, jnp.float32)
    lengths = [14, 6]
    for start in (0, 8):
        k, v, pos = chunk(start, lengths, 8, seed=start)
        cache = write_chunk(cache, jnp.int32(1), k, v, pos, 4, pin=True)
    layer = {name: np.asarray(x[1]) for name, x in cache.items()}
    np.testing.assert_array_equal(layer["fill"][:, 0], [[4, 4, 4, 2, 0, 0, 0, 0], [4, 2, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(layer["start"][:, 0], [[0, 4, 8, 12, 0, 0, 0, 0], [0, 4, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(layer["stamp"][:, 0], [[13] * 4 + [0] * 4, [5] * 2 + [0] * 6])
    np.testing.assert_array_equal(layer["cur"][:, 0], [3, 1])
    assert (layer["pinned"] == (layer["fill"] > 0)).all()
    assert not np.asarray(cache["fill"][0]).any()  # layer 0 untouched
    # row 1 ended in the first chunk: the second chunk (its positions all -1) left its pages alone
    k0, _, _ = chunk(0, lengths, 8, seed=0)
    np.testing.assert_array_equal(layer["k"][1, 0, :2].reshape(8, -1)[:6], np.asarray(k0)[1, :6, 0])
    np.testing.assert_array_equal(layer["kmax"][1, 0, 1], np.asarray(k0)[1, 4:6, 0].max(0))


def test_a_chunk_without_tokens_changes_nothing():
    """A shard whose rows all ended sees a chunk of -1 positions: no slot may be overwritten."""
    cache = init_pool(CFG, 2, 8, 4, jnp.float32)
    k, v, pos = chunk(0, [6, 6], 8)
    cache = write_chunk(cache, jnp.int32(0), k, v, pos, 4, pin=False)
    k, v, pos = chunk(8, [6, 6], 8, seed=1)
    after = write_chunk(cache, jnp.int32(0), k, v, pos, 4, pin=False)
    for name in cache:
        np.testing.assert_array_equal(np.asarray(after[name]), np.asarray(cache[name]), err_msg=name)
    with pytest.raises(ValueError, match="not a whole number of pages"):
        write_chunk(cache, jnp.int32(0), k[:, :6], v[:, :6], pos[:, :6], 4, pin=False)


@pytest.mark.parametrize("kv_dtype", ["fp8", "fp8_e5m2"])
def test_fp8_pages_saturate_and_bound_what_they_store(kv_dtype):
    """kv_dtype="fp8": pages in 8 bits, key bounds in the model's dtype. A key past the format's largest value is
    stored saturated (a plain cast would store NaN), the bounds are the min / max of the stored keys, and the whole
    prompt and a prompt in chunks store the same bytes."""
    fp8 = KV_DTYPES[kv_dtype]
    top = float(jnp.finfo(fp8).max)
    whole = init_pool(CFG, 2, 8, 4, jnp.float32, kv_dtype)
    assert whole["k"].dtype == whole["v"].dtype == fp8 and whole["kmin"].dtype == jnp.float32
    assert cache_bytes({n: whole[n] for n in ("k", "v")}) * 4 == cache_bytes(
        {n: init_pool(CFG, 2, 8, 4, jnp.float32)[n] for n in ("k", "v")})
    lengths = [14, 6]
    k, v, pos = chunk(0, lengths, 16)
    k = k.at[0, 2, 0, 5].set(1e6)  # past e4m3fn's 448 and e5m2's 57344
    v = v.at[1, 3, 0, 0].set(-1e6)
    layer = write_prompt({name: x[0] for name, x in whole.items()}, k, v, pos, 4, pin=True)
    assert float(layer["k"][0, 0, 0, 2, 5].astype(jnp.float32)) == top
    assert float(layer["v"][1, 0, 0, 3, 0].astype(jnp.float32)) == -top
    assert not np.isnan(np.asarray(layer["k"], np.float32)).any()
    keys = np.asarray(layer["k"], np.float32)  # [B, Hkv, S, P, D] as stored
    np.testing.assert_array_equal(np.asarray(layer["kmax"][0, 0, 0]), keys[0, 0, 0].max(0))
    np.testing.assert_array_equal(np.asarray(layer["kmin"][1, 0, 1]), keys[1, 0, 1, :2].min(0))  # 2 tokens filled
    chunked = init_pool(CFG, 2, 8, 4, jnp.float32, kv_dtype)
    for start in (0, 8):
        part = slice(start, start + 8)
        chunked = write_chunk(chunked, jnp.int32(0), k[:, part], v[:, part], pos[:, part], 4, pin=True)
    filled = (np.arange(4) < np.asarray(layer["fill"])[..., None])[..., None]  # [B, Hkv, S, P, 1] resident tokens
    for name in ("k", "v", "kmin", "kmax", "fill"):
        got, want = np.asarray(chunked[name][0], np.float32), np.asarray(layer[name], np.float32)
        if name in ("k", "v"):  # padding tokens: the whole prompt keeps them, chunks write zeros; neither is read
            got, want = got * filled, want * filled
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_unknown_kv_dtype_is_refused():
    with pytest.raises(ValueError, match="unknown kv_dtype 'int4'; choose one of auto, "):
        init_pool(CFG, 1, 4, 4, jnp.float32, "int4")
    with pytest.raises(ValueError, match="unknown kv_dtype"):
        RaaS(budget=64, kv_dtype="fp4")
