"""The page-pool KV cache (docs/design.md, the page pool): `PagePool` and the pure functions that edit it.

Per (layer, sequence, KV head) the cache owns S slots of P tokens. The arrays are stacked over layers so the
model can scan over them; the policies (raas_jax/policies.py) see one layer at a time (`layer_at`: the same
type, every leaf without its leading L). `PagePool` lists the fields and their shapes. Slot order does not
matter to attention (RoPE is applied before caching), so evicting page X to start page Y is overwriting slot X.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from raas_jax.kernels import dispatch as kernels
from raas_jax.kernels.reference import is_float8, to_pool_dtype
from raas_jax.models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagePool:
    """The page pool, a pytree: every array stacked over layers. One layer's view (`layer_at`) is a PagePool too,
    every leaf without the leading L (the scales are scalars there); `layer_at(..., pages=False)` leaves k, v,
    kmin and kmax out (None)."""

    k: jax.Array | None  # [L, B, Hkv, S, P, D] the pages, in the policy's kv_dtype (KV_DTYPES)
    v: jax.Array | None  # [L, B, Hkv, S, P, D]
    kmin: jax.Array | None  # [L, B, Hkv, S, D] per-channel key min of each page as stored (Quest bound), model dtype
    kmax: jax.Array | None  # [L, B, Hkv, S, D] per-channel key max
    fill: jax.Array  # [L, B, Hkv, S] int32 tokens held by the slot, 0 = free
    start: jax.Array  # [L, B, Hkv, S] int32 position of the slot's first token
    stamp: jax.Array  # [L, B, Hkv, S] int32 RaaS: last position at which the page was written or judged important
    pinned: jax.Array  # [L, B, Hkv, S] bool prompt pages (never evicted)
    cur: jax.Array  # [L, B, Hkv] int32 slot being filled
    k_scale: jax.Array | None = None  # [L] float32 FP8 pages with calibrated scales only: pages hold k / k_scale
    v_scale: jax.Array | None = None  # [L] float32 ... and v / v_scale
    policy_state: Any = None  # the policy's own arrays (H2O: policies.HeavyHitterMass), None for the others

    def replace(self, **changes: Any) -> PagePool:
        return dataclasses.replace(self, **changes)


def cache_bytes(cache: Any) -> int:
    """Device bytes held by a cache pytree."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache)))


# `kv_dtype` names (vLLM's `kv_cache_dtype`): the dtype the pages are stored in. "auto" = the model's dtype.
# "fp8" is float8_e4m3fn (vLLM's default fp8, 3 mantissa bits, largest value 448), cast with saturation and no scale;
# the kernels upcast each tile to the query's dtype. The key bounds (kmin/kmax) stay in the model's dtype.
KV_DTYPES = {"auto": None, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32,
             "fp8": jnp.float8_e4m3fn, "fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}


def check_kv_dtype(kv_dtype: str) -> str:
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"unknown kv_dtype {kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
    return kv_dtype


def pool_dtype(kv_dtype: str, dtype: Any) -> Any:
    """The dtype the pages are stored in: `kv_dtype` (a KV_DTYPES name), "auto" = the model's `dtype`."""
    return KV_DTYPES[check_kv_dtype(kv_dtype)] or dtype


# A calibrated absmax maps to 1 / KV_SCALE_HEADROOM of an FP8 format's largest value: later keys and values up to
# twice the calibration's largest stay unclipped (e4m3fn's precision is relative, so the headroom costs none).
KV_SCALE_HEADROOM = 2.0


def kv_scales(kv_absmax: tuple[Sequence[float], Sequence[float]], pages: Any, num_layers: int
              ) -> tuple[jax.Array, jax.Array]:
    """Per-layer (k_scale, v_scale) [L] float32 for FP8 pages from calibrated per-layer absolute maxima of the
    keys and values (`raas-jax calibrate-kv`): pages hold k / k_scale and v / v_scale (vLLM's k_scale / v_scale)."""
    limit = float(jnp.finfo(pages).max) / KV_SCALE_HEADROOM
    scales = []
    for name, absmax in zip(("key", "value"), kv_absmax):
        values = np.asarray(absmax, np.float64)
        if values.shape != (num_layers,) or not np.all(np.isfinite(values)) or not np.all(values >= 0):
            raise ValueError(f"calibrated {name} absmax must be {num_layers} finite values >= 0 (one per layer), got "
                             f"{values.shape} values; re-run `raas-jax calibrate-kv` for this model")
        scales.append(jnp.asarray(np.maximum(values, 1e-30) / limit, jnp.float32))
    return scales[0], scales[1]


def init_pool(cfg: ModelConfig, batch: int, num_slots: int, page_size: int, dtype: Any,
              kv_dtype: str = "auto", kv_absmax: tuple[Sequence[float], Sequence[float]] | None = None
              ) -> PagePool:
    """An empty pool, every array stacked over layers: [L, B, Hkv, S, ...]. Pages in `kv_dtype` (KV_DTYPES),
    key bounds in `dtype`. FP8 pages with `kv_absmax` (per-layer key and value maxima) also carry the per-layer
    `k_scale` / `v_scale` [L] the attention divides the pages by (models/transformer.py)."""
    slots = (cfg.num_layers, batch, cfg.num_kv_heads, num_slots)
    pages = pool_dtype(kv_dtype, dtype)
    k_scale = v_scale = None
    if kv_absmax is not None and is_float8(pages):
        k_scale, v_scale = kv_scales(kv_absmax, pages, cfg.num_layers)  # [L] each
    return PagePool(
        k=jnp.zeros(slots + (page_size, cfg.head_dim), pages),  # [L, B, Hkv, S, P, D]
        v=jnp.zeros(slots + (page_size, cfg.head_dim), pages),  # [L, B, Hkv, S, P, D]
        kmin=jnp.zeros(slots + (cfg.head_dim,), dtype),  # [L, B, Hkv, S, D]
        kmax=jnp.zeros(slots + (cfg.head_dim,), dtype),  # [L, B, Hkv, S, D]
        fill=jnp.zeros(slots, jnp.int32),  # [L, B, Hkv, S]
        start=jnp.zeros(slots, jnp.int32),  # [L, B, Hkv, S]
        stamp=jnp.zeros(slots, jnp.int32),  # [L, B, Hkv, S]
        pinned=jnp.zeros(slots, jnp.bool_),  # [L, B, Hkv, S]
        cur=jnp.zeros(slots[:-1], jnp.int32),  # [L, B, Hkv]
        k_scale=k_scale,
        v_scale=v_scale,
    )


@jax.jit
def _entries_at_limit(x: jax.Array, layer: jax.Array) -> jax.Array:
    """Entries of layer `layer` of an FP8 pool [L, ...] at the format's largest magnitude (int32)."""
    values = jax.lax.dynamic_index_in_dim(x, layer, keepdims=False)
    return jnp.sum(jnp.abs(values.astype(jnp.float32)) >= float(jnp.finfo(x.dtype).max), dtype=jnp.int32)


def saturated_entries(cache: PagePool) -> int:
    """Key / value entries of an FP8 pool stored at the format's largest magnitude (448 for e4m3fn): writes clip
    values past it (`to_pool_dtype`), so a count above 0 says some were likely clipped. 0 for pools of other
    dtypes. One layer at a time: a backend that does not fuse the upcast into the sum (XLA on the CPU) then holds
    one layer in float32, not the pool."""
    return sum(int(_entries_at_limit(pages, jnp.int32(layer)))
               for pages in (cache.k, cache.v) if is_float8(pages.dtype) for layer in range(pages.shape[0]))


def prompt_pages(x: jax.Array, page_size: int) -> jax.Array:
    """A right-padded prompt's keys or values as pages: x [B, T, Hkv, D] -> [B, Hkv, ceil(T/P), P, D].

    Token t (position t) lands in page t // P at offset t % P; padding rows are masked later by `fill`."""
    b, t, hkv, d = x.shape
    pages = -(-t // page_size)
    x = jnp.pad(x, ((0, 0), (0, pages * page_size - t), (0, 0), (0, 0)))
    return x.reshape(b, pages, page_size, hkv, d).transpose(0, 3, 1, 2, 4)


def page_key_bounds(k: jax.Array, fill: jax.Array, dtype: Any = None) -> tuple[jax.Array, jax.Array]:
    """Per-channel min / max over the filled tokens of each page (0 on empty slots), in `dtype` (default k's).

    k [B, Hkv, S, P, D], fill [B, Hkv, S] -> kmin, kmax [B, Hkv, S, D].
    """
    k = k.astype(dtype or k.dtype)  # FP8 pages: bounds in the model's dtype (exact; e4m3fn has no infinity)
    valid = (jnp.arange(k.shape[3]) < fill[..., None])[..., None]  # [B, Hkv, S, P, 1]
    kmin = jnp.min(jnp.where(valid, k, jnp.inf), axis=3)
    kmax = jnp.max(jnp.where(valid, k, -jnp.inf), axis=3)
    resident = (fill > 0)[..., None]
    return jnp.where(resident, kmin, 0).astype(k.dtype), jnp.where(resident, kmax, 0).astype(k.dtype)


def identity_layout(num_pages: int, num_slots: int, shape: tuple[int, int]) -> jax.Array:
    """Prompt page j in slot j (every prompt page fits): [B, Hkv, S] page index per slot, -1 = empty."""
    page = jnp.where(jnp.arange(num_slots) < num_pages, jnp.arange(num_slots), -1).astype(jnp.int32)
    return jnp.broadcast_to(page, shape + (num_slots,))


def compact_pages(kept: jax.Array, num_slots: int) -> jax.Array:
    """Kept prompt pages, in page order, into slots 0, 1, ...: kept [B, Hkv, N] bool -> [B, Hkv, S] page or -1.

    At most `num_slots` pages may be kept per row (the policies guarantee it)."""
    b, h, n = kept.shape
    slot = jnp.where(kept, jnp.cumsum(kept, axis=-1) - 1, num_slots)  # num_slots = dropped
    layout = jnp.full((b, h, num_slots), -1, jnp.int32)
    return layout.at[jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], slot].set(
        jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), kept.shape), mode="drop")


def write_prompt(view: PagePool, k: jax.Array, v: jax.Array, positions: jax.Array, page_size: int,
                 pin: bool, layout: jax.Array | None = None) -> PagePool:
    """Write a right-padded prompt into an empty layer cache.

    k, v [B, T, Hkv, D]; positions [B, T] (-1 = padding). `layout` [B, Hkv, S] names the prompt page each slot
    receives (-1: none; default: page j in slot j, which needs every page to fit). Every written page gets
    stamp = the last prompt position (all pages are new now); `pin` marks them pinned. The page holding the
    last prompt token becomes the page being filled; it must be in the layout.
    """
    num_slots = view.fill.shape[-1]
    length = (jnp.max(positions, axis=1) + 1)[:, None, None]  # [B, 1, 1]
    k_pages, v_pages = prompt_pages(k, page_size), prompt_pages(v, page_size)  # [B, Hkv, N, P, D]
    if layout is None:
        layout = identity_layout(k_pages.shape[2], num_slots, view.cur.shape)
    page = jnp.maximum(layout, 0)  # [B, Hkv, S]
    gather = page[..., None, None]
    k_pool = to_pool_dtype(jnp.take_along_axis(k_pages, gather, axis=2), view.k.dtype)  # [B, Hkv, S, P, D]
    v_pool = to_pool_dtype(jnp.take_along_axis(v_pages, gather, axis=2), view.v.dtype)
    start = page * page_size
    fill = jnp.where(layout >= 0, jnp.clip(length - start, 0, page_size), 0).astype(jnp.int32)  # [B, Hkv, S]
    resident = fill > 0
    kmin, kmax = page_key_bounds(k_pool, fill, view.kmin.dtype)
    last_page = (length - 1) // page_size  # [B, 1, 1]
    cur = jnp.argmax(resident & (page == last_page), axis=-1).astype(jnp.int32)  # [B, Hkv]
    return view.replace(
        k=k_pool,
        v=v_pool,
        kmin=kmin,
        kmax=kmax,
        fill=fill,
        start=jnp.where(resident, start, 0).astype(jnp.int32),
        stamp=jnp.where(resident, length - 1, 0).astype(jnp.int32),
        pinned=resident & pin,
        cur=cur,
    )


def write_chunk(cache: PagePool, layer: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                page_size: int, pin: bool) -> PagePool:
    """Write one chunk of right-padded prompts into `layer` of the stacked cache, page j in slot j (chunked prefill).

    k, v [B, C, Hkv, D]; positions [B, C]: c0, c0 + 1, ... then -1 (padding), c0 a multiple of the page size and
    the same in every row with tokens in the chunk; rows without tokens here are left as they are. The chunk's C / P
    pages are written in place; then every resident page of a row that has tokens here gets stamp = its last
    position so far and `cur` the page holding it, so after the last chunk the layer is what `write_prompt` writes
    for the whole prompt (identity layout), up to the contents of empty slots.
    """
    b, c, hkv, _ = k.shape
    if c % page_size:
        raise ValueError(f"a prefill chunk of {c} tokens is not a whole number of pages of {page_size}")
    pages = c // page_size
    first = jnp.maximum(jnp.max(positions[:, 0]), 0) // page_size  # slot of the chunk's first page
    last = jnp.max(positions, axis=1)  # [B] last position so far, -1 = no token in this chunk
    active = last >= 0  # [B]
    token_valid = (positions >= 0)[..., None, None]  # [B, C, 1, 1]
    k_pages = to_pool_dtype(prompt_pages(jnp.where(token_valid, k, 0), page_size), cache.k.dtype)  # [B,Hkv,C/P,P,D]
    v_pages = to_pool_dtype(prompt_pages(jnp.where(token_valid, v, 0), page_size), cache.v.dtype)
    start = (first + jnp.arange(pages, dtype=jnp.int32)) * page_size  # [C/P]
    fill = jnp.broadcast_to(jnp.clip(last[:, None] + 1 - start, 0, page_size)[:, None, :], (b, hkv, pages))
    kmin, kmax = page_key_bounds(k_pages, fill, cache.kmin.dtype)  # [B, Hkv, C/P, D]
    chunk = {"k": k_pages, "v": v_pages, "kmin": kmin, "kmax": kmax, "fill": fill.astype(jnp.int32),
             "start": jnp.where(fill > 0, start, 0).astype(jnp.int32), "pinned": (fill > 0) & pin}
    # Page j goes to slot j. The last chunk of a padded batch can reach past the pool (a Dense pool holds the longest
    # prompt plus the new tokens, not the padding to a whole chunk): those pages are padding and are dropped, where a
    # slice update would clamp its start and write the chunk over earlier pages.
    slots = first + jnp.arange(pages, dtype=jnp.int32)  # [C/P]
    index = (layer, slice(None), slice(None), slots)  # picks [C/P, B, Hkv, ...] (the advanced indices lead)

    def write(pool: jax.Array, value: jax.Array) -> jax.Array:  # only the chunk's slots, only in rows with tokens
        old = pool.at[index].get(mode="fill", fill_value=0)
        new = jnp.moveaxis(value.astype(pool.dtype), 2, 0)  # [C/P, B, Hkv, ...]
        row = active.reshape((1, b) + (1,) * (value.ndim - 2))
        return pool.at[index].set(jnp.where(row, new, old), mode="drop")

    cache = cache.replace(**{name: write(getattr(cache, name), value) for name, value in chunk.items()})
    resident = cache.fill[layer] > 0  # [B, Hkv, S]
    stamp = jnp.where(active[:, None, None] & resident, last[:, None, None], cache.stamp[layer])
    cur = jnp.where(active[:, None], (last // page_size)[:, None], cache.cur[layer]).astype(jnp.int32)
    return cache.replace(stamp=cache.stamp.at[layer].set(stamp), cur=cache.cur.at[layer].set(cur))


def page_sums(token_values: jax.Array, page_size: int) -> jax.Array:
    """Per-token values of a prompt summed per page: [B, Hkv, T] -> [B, Hkv, ceil(T/P)]."""
    b, h, t = token_values.shape
    pages = -(-t // page_size)
    padded = jnp.pad(token_values, ((0, 0), (0, 0), (0, pages * page_size - t)))
    return padded.reshape(b, h, pages, page_size).sum(-1)


PAGE_ARRAYS = ("k", "v", "kmin", "kmax")  # pool-sized: the kernels read them stacked, in place


def layer_at(cache: PagePool, layer: jax.Array, pages: bool = True) -> PagePool:
    """One layer's view of the stacked cache: every leaf indexed at `layer` (which may be traced).

    `pages=False` leaves out the pool-sized arrays (PAGE_ARRAYS, None in the view): decode passes those to the
    kernels stacked, with the layer index, since a slice of them handed to a custom call is a copy."""
    if not pages:
        cache = cache.replace(**dict.fromkeys(PAGE_ARRAYS))
    return jax.tree.map(lambda x: x[layer], cache)


def store_layer(cache: PagePool, layer: jax.Array, view: PagePool) -> PagePool:
    """Write a whole layer's view (`layer_at`, pages included) back into the stacked cache (prefill)."""
    return jax.tree.map(lambda whole, part: whole.at[layer].set(part), cache, view)


def append_token(cache: PagePool, layer: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                 victim: jax.Array, page_size: int, backend: str = "reference"
                 ) -> tuple[PagePool, jax.Array, jax.Array]:
    """Append one token per (sequence, KV head) of `layer`, opening a new page when the current one is full.

    Works on the stacked cache and writes only what changes (one token of k/v, one slot of metadata per
    (sequence, head)), so the pages are updated in place. A new page goes to the first free slot, else
    to `victim` [B, Hkv] (chosen by the policy from the state before this token). The rules are
    kernels/reference.py's `append_token`; on a GPU one Pallas kernel writes everything.
    k, v [B, Hkv, D], positions [B]. Returns (cache, slot written [B, Hkv], evicted slot or -1 [B, Hkv]).
    """
    pool = {name: getattr(cache, name) for name in kernels.APPEND_ARRAYS}
    written, slot, evicted = kernels.append_token(pool, layer, k, v, positions, victim, page_size, backend=backend)
    return cache.replace(**written), slot, evicted


def refresh_stamps(cache: PagePool, layer: jax.Array, important: jax.Array, positions: jax.Array) -> PagePool:
    """RaaS: the pages judged important at this step get stamp = the current position.

    important [B, Hkv, S] bool, positions [B]."""
    stamp = jnp.where(important, positions[:, None, None], cache.stamp[layer])
    return cache.replace(stamp=cache.stamp.at[layer].set(stamp))
