"""The page pool's editing functions (raas_jax/cache.py) beyond what the policy tests cover."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from raas_jax.cache import init_pool, write_chunk
from raas_jax.models.config import ModelConfig

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
