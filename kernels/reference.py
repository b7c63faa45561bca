"""Plain-jnp attention kernels: the oracle for every Pallas kernel and the CPU/TPU fallback.

Shapes follow the kernel contract (docs/design.md):
  q     [B, Hq, D]            one query token per sequence
  k, v  [B, Hkv, S, P, D]     a pool of S page slots of P tokens per KV head
  fill  [B, Hkv, S] int32     tokens held by each slot (0 = empty)
  slots [B, Hkv, K] int32     optional: attend only these slots (Quest); -1 = no slot
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -1e30  # finite, so a fully masked row gives zeros instead of NaN
HIGHEST = jax.lax.Precision.HIGHEST


def is_float8(dtype) -> bool:
    """An 8-bit float pool (`kv_dtype="fp8"`): stored only, upcast to the query's dtype to compute."""
    dtype = jnp.dtype(dtype)
    return dtype.itemsize == 1 and jnp.issubdtype(dtype, jnp.floating)


def compute_dtype(pool_dtype, q_dtype):
    """The dtype attention computes in over a pool of `pool_dtype`: the pool's own, or q's for an FP8 pool."""
    return jnp.dtype(q_dtype) if is_float8(pool_dtype) else jnp.dtype(pool_dtype)


def to_pool_dtype(x, dtype):
    """Cast keys/values into a pool of `dtype`, saturating at its largest finite value when that is below x's (FP8:
    e4m3fn has no infinity, so a plain cast turns an out-of-range value into NaN, and the GPU's cvt.satfinite
    saturates as this does; float16 pages of a bf16 model would turn one into inf)."""
    dtype = jnp.dtype(dtype)
    if dtype != jnp.dtype(x.dtype) and jnp.issubdtype(dtype, jnp.floating) and jnp.issubdtype(x.dtype, jnp.floating) \
            and float(jnp.finfo(dtype).max) < float(jnp.finfo(x.dtype).max):
        top = float(jnp.finfo(dtype).max)
        x = jnp.clip(x.astype(jnp.float32), -top, top)
    return x.astype(dtype)


def as_stored(x, pool_dtype):
    """x as a pool of `pool_dtype` gives it back: rounded (and saturated) to it, in x's dtype. Prefill attends these
    values, so a prompt sees what decode will read and a chunked prefill equals the whole-prompt one."""
    if jnp.dtype(pool_dtype) == jnp.dtype(x.dtype):
        return x
    return to_pool_dtype(x, pool_dtype).astype(x.dtype)


def decode_attention(q, k, v, fill, slots=None, *, scale=None):
    """Softmax attention of one query per sequence over the resident pages.

    Returns (out [B, Hq, D] in q's dtype, mass [B, Hkv, S or K] float32): mass is the softmax
    probability each slot received, max over the query heads of the KV group.
    """
    b, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    scale = d**-0.5 if scale is None else scale
    if slots is not None:
        valid_slot = slots >= 0  # [B, Hkv, K]
        safe = jnp.where(valid_slot, slots, 0)
        k = jnp.take_along_axis(k, safe[..., None, None], axis=2)  # [B, Hkv, K, P, D]
        v = jnp.take_along_axis(v, safe[..., None, None], axis=2)
        fill = jnp.where(valid_slot, jnp.take_along_axis(fill, safe, axis=2), 0)  # [B, Hkv, K]
    page = k.shape[3]
    # Inputs stay in the cache dtype (no float32 copy of the pool); products accumulate in float32.
    # An FP8 pool is upcast to q's dtype (exact), as the GPU kernel does per tile.
    compute = compute_dtype(k.dtype, q.dtype)
    k, v = k.astype(compute), v.astype(compute)
    qg = (q.reshape(b, hkv, group, d).astype(jnp.float32) * scale).astype(compute)  # [B, Hkv, G, D]
    logits = jnp.einsum("bhgd,bhspd->bhgsp", qg, k, precision=HIGHEST,
                        preferred_element_type=jnp.float32)  # [B, Hkv, G, S, P]
    token_valid = jnp.arange(page)[None, None, None, :] < fill[..., None]  # [B, Hkv, S, P]
    logits = jnp.where(token_valid[:, :, None], logits, MASK_VALUE)
    row_max = jnp.max(logits, axis=(-2, -1), keepdims=True)
    probs = jnp.exp(logits - row_max) * token_valid[:, :, None]
    probs = probs / jnp.maximum(jnp.sum(probs, axis=(-2, -1), keepdims=True), 1e-30)
    out = jnp.einsum("bhgsp,bhspd->bhgd", probs.astype(v.dtype), v, precision=HIGHEST,
                     preferred_element_type=jnp.float32)  # [B, Hkv, G, D]
    mass = jnp.max(jnp.sum(probs, axis=-1), axis=2)  # [B, Hkv, S]
    return out.reshape(b, hq, d).astype(q.dtype), mass


def page_scores(q, kmin, kmax, fill):
    """Quest upper bound of q.k over each page, max over the query heads of the group.

    q [B, Hq, D], kmin/kmax [B, Hkv, S, D], fill [B, Hkv, S] -> U [B, Hkv, S] float32, -inf on empty slots.
    """
    b, hq, d = q.shape
    hkv = kmin.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d).astype(jnp.float32)  # [B, Hkv, G, D]
    hi = qg[:, :, :, None, :] * kmax.astype(jnp.float32)[:, :, None]  # [B, Hkv, G, S, D]
    lo = qg[:, :, :, None, :] * kmin.astype(jnp.float32)[:, :, None]
    bound = jnp.sum(jnp.maximum(hi, lo), axis=-1)  # [B, Hkv, G, S]
    bound = jnp.max(bound, axis=2)  # [B, Hkv, S]
    return jnp.where(fill > 0, bound, -jnp.inf)


def causal_attention(q, k, v, q_positions, k_positions, *, scale=None, return_key_mass=False):
    """Dense attention for a block of queries (prefill / full forward), GQA, float32 softmax.

    q [B, T, Hq, D], k/v [B, Tk, Hkv, D], q_positions [B, T], k_positions [B, Tk] (-1 = padding).
    A query sees the keys at positions <= its own. Returns [B, T, Hq, D] in q's dtype, and with
    `return_key_mass` also the attention mass each key received summed over the (non-padding)
    queries, max over the query heads of its group: [B, Hkv, Tk] float32 (H2O's prefill scores).
    """
    b, t, hq, d = q.shape
    probs = _prefill_probs(q, k, q_positions, k_positions, scale)  # [B, Hkv, G, T, Tk]
    out = jnp.einsum("bhgts,bshd->bthgd", probs, v.astype(jnp.float32),
                     precision=HIGHEST)
    out = out.reshape(b, t, hq, d).astype(q.dtype)
    if not return_key_mass:
        return out
    return out, jnp.max(_summed_over_queries(probs, q_positions), axis=2)  # [B, Hkv, Tk]


def key_mass(q, k, q_positions, k_positions, *, scale=None):
    """Per query head, the softmax mass each key received summed over the (non-padding) queries:
    q [B, T, Hq, D], k [B, Tk, Hkv, D] -> [B, Hkv, G, Tk] float32 (`causal_attention`'s key mass before the max
    over the group; chunked prefill adds it up chunk by chunk)."""
    return _summed_over_queries(_prefill_probs(q, k, q_positions, k_positions, scale), q_positions)


def _prefill_probs(q, k, q_positions, k_positions, scale):
    """Softmax probabilities [B, Hkv, G, T, Tk] float32 of `causal_attention`."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, t, hkv, group, d).astype(jnp.float32) * scale
    logits = jnp.einsum("bthgd,bshd->bhgts", qg, k.astype(jnp.float32),
                        precision=HIGHEST)  # [B, Hkv, G, T, Tk]
    visible = (k_positions[:, None, :] <= q_positions[:, :, None]) & (k_positions[:, None, :] >= 0)
    logits = jnp.where(visible[:, None, None], logits, MASK_VALUE)
    return jax.nn.softmax(logits, axis=-1)


def _summed_over_queries(probs, q_positions):
    query_valid = (q_positions >= 0)[:, None, None, :, None]  # [B, 1, 1, T, 1]
    return jnp.sum(probs * query_valid, axis=3)  # [B, Hkv, G, Tk]


def top_k_mask(scores, k: int):
    """The `k` highest scores of each row (ties: lower slot first): [B, Hkv, S] f32 -> bool mask, k per row."""
    k = min(k, scores.shape[-1])
    _, top = jax.lax.top_k(scores, k)  # lax.top_k is stable: equal values keep the lower index first
    chosen = jnp.zeros(scores.shape, jnp.bool_)
    return jnp.put_along_axis(chosen, top, True, axis=-1, inplace=False)


# what `append_token` edits, in the order of the Pallas kernels' refs
APPEND_ARRAYS = ("k", "v", "kmin", "kmax", "fill", "start", "stamp", "pinned", "cur")
# what `refresh_top_half` reads (it writes `stamp`), in the order of the Pallas kernel's refs
REFRESH_ARRAYS = ("kmin", "kmax", "fill", "pinned", "cur", "stamp")


def _slot_of(array, slot):
    """array [B, Hkv, S, ...], slot [B, Hkv] -> array[b, h, slot[b, h]] [B, Hkv, ...]."""
    index = slot.reshape(slot.shape + (1,) * (array.ndim - 2))
    return jnp.take_along_axis(array, index, axis=2)[:, :, 0]


def append_token(pool, layer, k, v, positions, victim, page_size: int):
    """Append one token per (sequence, KV head) to `layer` of the stacked pool, opening a new page when the
    current one is full: in the first free slot (lowest index), else in `victim`.

    pool: the stacked cache arrays named in APPEND_ARRAYS, k/v [L, B, Hkv, S, P, D], kmin/kmax [L, B, Hkv, S, D],
    fill/start/stamp [L, B, Hkv, S] int32, pinned [L, B, Hkv, S] bool, cur [L, B, Hkv] int32;
    k, v [B, Hkv, D]; positions [B]; victim [B, Hkv].
    Writes the token's k/v row, the page's key bounds (the token's key if the page is new, else widened by it),
    fill = offset + 1, start (the position if new), stamp = the position (the newest page), pinned (kept only
    if the page is not new) and cur = the slot written.
    Returns (the new arrays, slot written [B, Hkv], evicted slot or -1 [B, Hkv]).
    """
    fill, cur = pool["fill"][layer], pool["cur"][layer]  # [B, Hkv, S], [B, Hkv]
    b, hkv = cur.shape
    cur_fill = _slot_of(fill, cur)  # [B, Hkv]
    need_new = cur_fill >= page_size
    free = fill == 0
    has_free = jnp.any(free, axis=-1)
    fresh = jnp.where(has_free, jnp.argmax(free, axis=-1), victim).astype(jnp.int32)
    slot = jnp.where(need_new, fresh, cur)  # [B, Hkv]
    offset = jnp.where(need_new, 0, cur_fill)  # [B, Hkv]
    evicted = jnp.where(need_new & ~has_free, victim, -1)
    pos = jnp.broadcast_to(positions[:, None], (b, hkv)).astype(jnp.int32)
    k = to_pool_dtype(k, pool["k"].dtype)
    stored = k.astype(pool["kmin"].dtype)  # the bounds bound the key as stored (FP8: rounded, then exact here)

    def at_slot(name):  # [B, Hkv, ...] value of `name` in the written slot
        return _slot_of(pool[name][layer], slot)

    new_page = need_new[..., None]
    pages = {"k": k, "v": to_pool_dtype(v, pool["v"].dtype),
             "kmin": jnp.where(new_page, stored, jnp.minimum(at_slot("kmin"), stored)),
             "kmax": jnp.where(new_page, stored, jnp.maximum(at_slot("kmax"), stored))}
    meta = {"fill": offset + 1, "start": jnp.where(need_new, pos, at_slot("start")),
            "stamp": pos,  # novice protection: the page written now is the newest
            "pinned": ~need_new & at_slot("pinned")}
    index = (layer, jnp.arange(b)[:, None], jnp.arange(hkv)[None, :], slot)
    out = {}
    for name, value in pages.items():  # k/v: one token of the page; kmin/kmax: the page's bounds
        out[name] = pool[name].at[index + ((offset,) if name in ("k", "v") else ())].set(value)
    for name, value in meta.items():
        out[name] = pool[name].at[index].set(value.astype(pool[name].dtype))
    out["cur"] = pool["cur"].at[layer].set(slot)
    return out, slot, evicted


def rank_descending(scores, candidates):
    """Rank of each candidate slot by score, highest first (ties: lower slot); others rank after them.

    [B, Hkv, S] -> int32 [B, Hkv, S]."""
    order = jnp.argsort(jnp.where(candidates, -scores, jnp.inf), axis=-1, stable=True)
    return jnp.argsort(order, axis=-1).astype(jnp.int32)


def top_half_mask(scores, candidates):
    """The top ceil(C/2) of the C candidate slots of each row by score (ties: lower slot): [B, Hkv, S] bool."""
    keep = (jnp.sum(candidates, axis=-1, keepdims=True) + 1) // 2
    return candidates & (rank_descending(scores, candidates) < keep)


def refresh_top_half(q, pool, layer, positions, page_size: int, scores=None):
    """RaaS's default refresh of `layer` after the append: among the evictable pages (full, unpinned, not `cur`),
    the top half by the Quest page bound get stamp = the position. q [B, Hq, D]; pool: the stacked arrays named
    in REFRESH_ARRAYS (shapes as in `append_token`); positions [B] -> the new stamp array [L, B, Hkv, S]."""
    fill, cur, stamp = pool["fill"][layer], pool["cur"][layer], pool["stamp"][layer]  # `scores`: the bounds if known
    slot_ids = jnp.arange(fill.shape[-1])
    candidates = (fill >= page_size) & ~pool["pinned"][layer] & (slot_ids != cur[..., None])
    if scores is None:
        scores = page_scores(q, pool["kmin"][layer], pool["kmax"][layer], fill)
    important = top_half_mask(scores, candidates)
    return pool["stamp"].at[layer].set(jnp.where(important, positions[:, None, None], stamp))
