"""The page pool's editing functions (raas_jax/cache.py) beyond what the policy tests cover."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from raas_jax.decode.cache import (KV_DTYPES, PagePool, cache_bytes, init_pool, layer_at, store_layer, write_chunk,
                                   write_prompt)
from raas_jax.models.config import ModelConfig
from raas_jax.policies import H2O, HeavyHitterMass, RaaS

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
    layer = jax.tree.map(np.asarray, layer_at(cache, 1))
    np.testing.assert_array_equal(layer.fill[:, 0], [[4, 4, 4, 2, 0, 0, 0, 0], [4, 2, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(layer.start[:, 0], [[0, 4, 8, 12, 0, 0, 0, 0], [0, 4, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(layer.stamp[:, 0], [[13] * 4 + [0] * 4, [5] * 2 + [0] * 6])
    np.testing.assert_array_equal(layer.cur[:, 0], [3, 1])
    assert (layer.pinned == (layer.fill > 0)).all()
    assert not np.asarray(cache.fill[0]).any()  # layer 0 untouched
    # row 1 ended in the first chunk: the second chunk (its positions all -1) left its pages alone
    k0, _, _ = chunk(0, lengths, 8, seed=0)
    np.testing.assert_array_equal(layer.k[1, 0, :2].reshape(8, -1)[:6], np.asarray(k0)[1, :6, 0])
    np.testing.assert_array_equal(layer.kmax[1, 0, 1], np.asarray(k0)[1, 4:6, 0].max(0))


def test_a_chunk_without_tokens_changes_nothing():
    """A shard whose rows all ended sees a chunk of -1 positions: no slot may be overwritten."""
    cache = init_pool(CFG, 2, 8, 4, jnp.float32)
    k, v, pos = chunk(0, [6, 6], 8)
    cache = write_chunk(cache, jnp.int32(0), k, v, pos, 4, pin=False)
    k, v, pos = chunk(8, [6, 6], 8, seed=1)
    after = write_chunk(cache, jnp.int32(0), k, v, pos, 4, pin=False)
    for field in dataclasses.fields(PagePool):
        np.testing.assert_array_equal(np.asarray(getattr(after, field.name)), np.asarray(getattr(cache, field.name)),
                                      err_msg=field.name)
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
    assert whole.k.dtype == whole.v.dtype == fp8 and whole.kmin.dtype == jnp.float32
    full = init_pool(CFG, 2, 8, 4, jnp.float32)
    assert cache_bytes((whole.k, whole.v)) * 4 == cache_bytes((full.k, full.v))
    lengths = [14, 6]
    k, v, pos = chunk(0, lengths, 16)
    k = k.at[0, 2, 0, 5].set(1e6)  # past e4m3fn's 448 and e5m2's 57344
    v = v.at[1, 3, 0, 0].set(-1e6)
    layer = write_prompt(layer_at(whole, 0), k, v, pos, 4, pin=True)
    assert float(layer.k[0, 0, 0, 2, 5].astype(jnp.float32)) == top
    assert float(layer.v[1, 0, 0, 3, 0].astype(jnp.float32)) == -top
    assert not np.isnan(np.asarray(layer.k, np.float32)).any()
    keys = np.asarray(layer.k, np.float32)  # [B, Hkv, S, P, D] as stored
    np.testing.assert_array_equal(np.asarray(layer.kmax[0, 0, 0]), keys[0, 0, 0].max(0))
    np.testing.assert_array_equal(np.asarray(layer.kmin[1, 0, 1]), keys[1, 0, 1, :2].min(0))  # 2 tokens filled
    chunked = init_pool(CFG, 2, 8, 4, jnp.float32, kv_dtype)
    for start in (0, 8):
        part = slice(start, start + 8)
        chunked = write_chunk(chunked, jnp.int32(0), k[:, part], v[:, part], pos[:, part], 4, pin=True)
    filled = (np.arange(4) < np.asarray(layer.fill)[..., None])[..., None]  # [B, Hkv, S, P, 1] resident tokens
    for name in ("k", "v", "kmin", "kmax", "fill"):
        got, want = np.asarray(getattr(chunked, name)[0], np.float32), np.asarray(getattr(layer, name), np.float32)
        if name in ("k", "v"):  # padding tokens: the whole prompt keeps them, chunks write zeros; neither is read
            got, want = got * filled, want * filled
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_unknown_kv_dtype_is_refused():
    with pytest.raises(ValueError, match="unknown kv_dtype 'int4'; choose one of auto, "):
        init_pool(CFG, 1, 4, 4, jnp.float32, "int4")
    with pytest.raises(ValueError, match="unknown kv_dtype"):
        RaaS(budget=64, kv_dtype="fp4")


def test_the_pool_is_a_pytree():
    """PagePool is a registered dataclass: tree maps keep the type, jit takes and returns it, a layer view has the
    per-layer shapes (the page arrays left out on request), `replace` gives a new pool."""
    pool = init_pool(CFG, 2, 8, 4, jnp.float32)
    assert isinstance(jax.tree.map(jnp.zeros_like, pool), PagePool)
    assert jax.tree.structure(jax.jit(lambda p: p)(pool)) == jax.tree.structure(pool)
    doubled = jax.jit(lambda p: p.replace(stamp=p.stamp + 2))(pool)
    assert isinstance(doubled, PagePool) and (np.asarray(doubled.stamp) == 2).all()
    assert (np.asarray(pool.stamp) == 0).all()  # replace made a new pool
    view = layer_at(pool, jnp.int32(1))
    assert isinstance(view, PagePool) and view.k.shape == (2, CFG.num_kv_heads, 8, 4, CFG.head_dim)
    assert view.kmin.shape == (2, CFG.num_kv_heads, 8, CFG.head_dim)
    assert view.fill.shape == view.stamp.shape == view.pinned.shape == (2, CFG.num_kv_heads, 8)
    assert view.cur.shape == (2, CFG.num_kv_heads) and view.k_scale is None and view.policy_state is None
    meta = layer_at(pool, jnp.int32(1), pages=False)
    assert meta.k is meta.v is meta.kmin is meta.kmax is None and meta.fill.shape == view.fill.shape
    stored = store_layer(pool, jnp.int32(1), view.replace(stamp=view.stamp + 7))
    assert (np.asarray(stored.stamp[1]) == 7).all() and (np.asarray(stored.stamp[0]) == 0).all()
    with pytest.raises(dataclasses.FrozenInstanceError):
        pool.stamp = pool.fill
    scaled = init_pool(CFG, 2, 8, 4, jnp.float32, "fp8", kv_absmax=((1.0, 2.0), (3.0, 4.0)))
    assert scaled.k_scale.shape == scaled.v_scale.shape == (CFG.num_layers,)
    assert layer_at(scaled, jnp.int32(0)).k_scale.shape == ()


def test_h2o_state_is_a_pytree_in_the_pool():
    """H2O's arrays (HeavyHitterMass) ride in `policy_state`: through jit, a layer view and a chunked prefill's
    accumulator, which `end_chunked_prefill` folds away."""
    policy = H2O(budget=16, page_size=4)
    pool = policy.init(CFG, 2, policy.slot_count, jnp.float32)
    assert isinstance(pool.policy_state, HeavyHitterMass) and pool.policy_state.token_mass is None
    assert pool.policy_state.mass.shape == pool.fill.shape and pool.policy_state.mass.dtype == jnp.float32
    state = jax.jit(lambda p: p.replace(policy_state=p.policy_state.replace(mass=p.policy_state.mass + 1)))(pool)
    assert isinstance(state.policy_state, HeavyHitterMass) and (np.asarray(state.policy_state.mass) == 1).all()
    assert layer_at(state, jnp.int32(1), pages=False).policy_state.mass.shape == (2, CFG.num_kv_heads, 4)
    chunked = policy.begin_chunked_prefill(CFG, pool)
    group = CFG.num_heads // CFG.num_kv_heads
    assert chunked.policy_state.token_mass.shape == (CFG.num_layers, 2, CFG.num_kv_heads, group, 16)
    assert layer_at(chunked, jnp.int32(0)).policy_state.token_mass.shape == (2, CFG.num_kv_heads, group, 16)
    folded = jax.jit(policy.end_chunked_prefill)(chunked)
    assert folded.policy_state.token_mass is None and jax.tree.structure(folded) == jax.tree.structure(pool)
