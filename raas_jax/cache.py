"""The page-pool KV cache (DESIGN.md section 2) and its dense policy.

Per (layer, sequence, KV head) the cache owns S slots of P tokens. All arrays are stacked over layers
so that the model can scan over them; the model only sees one layer's slice at a time:

    k, v   [L, B, Hkv, S, P, D]   the pages
    fill   [L, B, Hkv, S] int32   tokens held by each slot (0 = empty)

`DenseCache` is the dense policy: slot s holds positions [s*P, (s+1)*P), nothing is evicted and
decode attends to every resident token. Sparse policies add metadata and eviction on the same pool.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from raas_jax import kernels
from raas_jax.models.config import ModelConfig

LayerCache = dict[str, jax.Array]


def cache_bytes(cache: dict[str, jax.Array]) -> int:
    """Device bytes held by a cache pytree."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache)))


def _write_prompt(pool: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Scatter prompt tokens into a dense-layout pool.

    pool [B, Hkv, S, P, D], new [B, T, Hkv, D], positions [B, T] (-1 = padding, dropped).
    """
    b, hkv, s, p, d = pool.shape
    flat = pool.transpose(0, 2, 3, 1, 4).reshape(b, s * p, hkv, d)  # [B, S*P, Hkv, D]
    index = jnp.where(positions >= 0, positions, s * p)  # out of range -> dropped
    flat = flat.at[jnp.arange(b)[:, None], index].set(new.astype(pool.dtype), mode="drop")
    return flat.reshape(b, s, p, hkv, d).transpose(0, 3, 1, 2, 4)


def _write_token(pool: jax.Array, new: jax.Array, slot: jax.Array, offset: jax.Array) -> jax.Array:
    """pool [B, Hkv, S, P, D], new [B, Hkv, D], slot/offset [B] -> pool with one token written."""

    def one(pool_b, new_b, slot_b, offset_b):  # [Hkv, S, P, D], [Hkv, D]
        return jax.lax.dynamic_update_slice(pool_b, new_b[:, None, None, :], (0, slot_b, offset_b, 0))

    return jax.vmap(one)(pool, new.astype(pool.dtype), slot, offset)


@dataclasses.dataclass(frozen=True)
class DenseCache:
    """Dense attention over a page pool sized for the whole sequence (O(N) memory)."""

    page_size: int = 16
    backend: str = "auto"

    def init(self, cfg: ModelConfig, batch: int, num_slots: int, dtype: Any) -> dict[str, jax.Array]:
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, num_slots)
        return {
            "k": jnp.zeros(shape + (self.page_size, cfg.head_dim), dtype),  # [L, B, Hkv, S, P, D]
            "v": jnp.zeros(shape + (self.page_size, cfg.head_dim), dtype),  # [L, B, Hkv, S, P, D]
            "fill": jnp.zeros(shape, jnp.int32),  # [L, B, Hkv, S]
        }

    def capacity(self, cache: dict[str, jax.Array]) -> int:
        """Tokens the cache can hold per sequence."""
        return cache["k"].shape[3] * self.page_size

    def prefill(self, layer: LayerCache, k, v, positions) -> LayerCache:
        """k, v [B, T, Hkv, D], positions [B, T] -> the layer cache holding the prompt."""
        num_slots = layer["k"].shape[2]
        length = jnp.max(positions, axis=1) + 1  # [B]
        slot_start = jnp.arange(num_slots) * self.page_size  # [S]
        fill = jnp.clip(length[:, None] - slot_start[None, :], 0, self.page_size)  # [B, S]
        fill = jnp.broadcast_to(fill[:, None, :], layer["fill"].shape).astype(jnp.int32)
        return {
            "k": _write_prompt(layer["k"], k, positions),
            "v": _write_prompt(layer["v"], v, positions),
            "fill": fill,
        }

    def decode(self, layer: LayerCache, q, k, v, positions):
        """q [B, Hq, D], k/v [B, Hkv, D], positions [B] -> (out [B, Hq, D], layer cache)."""
        slot, offset = positions // self.page_size, positions % self.page_size  # [B]
        new_k = _write_token(layer["k"], k, slot, offset)
        new_v = _write_token(layer["v"], v, slot, offset)
        slot_ids = jnp.arange(layer["fill"].shape[-1])
        fill = jnp.where(slot_ids[None, None, :] == slot[:, None, None], (offset + 1)[:, None, None],
                         layer["fill"])  # [B, Hkv, S]
        out, _ = kernels.decode_attention(q, new_k, new_v, fill, backend=self.backend)
        return out, {"k": new_k, "v": new_v, "fill": fill}
