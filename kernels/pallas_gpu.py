"""Pallas GPU kernels over the page pool: split decode attention with per-slot mass, and Quest page scores.

Lowered through Pallas' Triton backend (selected by passing `pltriton.CompilerParams`; without them JAX >= 0.10
picks Mosaic GPU). The Triton lowering is deprecated since JAX 0.11 but is the one that takes these shapes
(gathers of pages, small dots) today; `kernels/dispatch.py` hides the choice so it can move to Mosaic GPU.

decode_attention: one program per (sequence, KV head, split). A split walks up to `blocks_per_split` blocks of
`block_slots` slots (T = block_slots * page tokens; blocks go round-robin to the splits, none past the caller's
`live_slots` bound) with an online softmax, all query heads of the group in one dot (rows padded to 16 for
Triton). Per block it stores the per-slot sums of exp(logit - m_running) and m_running, so the jnp epilogue can
turn them into each slot's softmax mass once the global max and sum are known (flash-decoding combine). With a slot list `[B, Hkv, K]` the same loop gathers only the listed pages
(Quest), gathering their token rows straight from the pool: no XLA gather copy. Given `layer`, the kernels take
the pools of every layer and read that layer in place (a layer slice passed to a custom call would be copied).

Over an FP8 pool (`kv_dtype="fp8"`) the pages are read as uint16 pairs, upcast in registers, and the products run
in float16 (see AttentionTuning). Faster than the jnp reference under XLA at every benchmark shape (docs/kernels.md);
`backend="auto"` uses these on a GPU (the decode attention over bf16 / f16 pools on Hopper is kernels/mosaic_gpu.py).

page_scores: one program per (sequence, KV head, block of slots): the Quest bound sum_d max(q*kmin, q*kmax)
for each query head of the group, max over the group, -inf on empty slots.

top_k_mask: one program per row of scores: the k-th largest value found by a 32-step bisection on the bits of
order-preserving integer keys, in registers, then ties broken towards lower slots with a cumulative count.
On an H200 it gives lax.top_k's masks about twice as fast at Quest's bench shape (docs/kernels.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .reference import APPEND_ARRAYS, MASK_VALUE, REFRESH_ARRAYS, compute_dtype, is_float8, to_pool_dtype

MIN_ROWS = 16  # Triton dots need every dimension >= 16: the query heads of a group are padded to this


@dataclasses.dataclass(frozen=True)
class AttentionTuning:
    """Launch parameters of `decode_attention` (chosen with `raas-jax bench kernels --sweep`: docs/kernels.md)."""

    block_tokens: int = 64  # tokens per loop iteration (rounded to whole pages)
    target_programs: int = 1024  # splits grow until (B * Hkv * splits) reaches this
    num_warps: int = 4
    num_stages: int = 2
    # Over an FP8 pool (docs/kernels.md: a bf16 compute dtype and 2 stages made FP8 pools no faster than bf16 ones):
    # compute in float16, which holds every e4m3 value (q scaled first, as the reference does), with one more
    # pipeline stage.
    fp8_as_f16: bool = True
    fp8_num_stages: int = 3
    # An FP8 pool is read as uint16 pairs (the even and odd channels in two dots each): 1.15x faster than one byte per
    # load (docs/kernels.md), and it keeps a pool of 2^31 to 2^32 values inside Triton's int32 offsets (they turn int64
    # only past 4 GiB). False: one byte per load where the offsets allow it.
    pack_fp8: bool = True


DEFAULT_TUNING = AttentionTuning()


def _pow2_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def plan(batch: int, kv_heads: int, slots: int, page: int, tuning: AttentionTuning = DEFAULT_TUNING):
    """(block_slots, splits, blocks_per_split) for a pool of `slots` pages, or None if the shape is unsupported."""
    block_slots = _pow2_at_most(max(1, tuning.block_tokens // page))
    while block_slots > 1 and slots % block_slots:
        block_slots //= 2
    if page & (page - 1) or slots % block_slots:
        return None
    return (block_slots,) + split_blocks(batch * kv_heads, slots // block_slots, tuning.target_programs)


def split_blocks(rows: int, blocks: int, target_programs: int) -> tuple[int, int]:
    """(splits, blocks_per_split): the splits of each of `rows` (sequence, KV head) rows double until there are
    `target_programs` programs, while they still divide the `blocks`."""
    splits = 1
    while rows * splits < target_programs and blocks % (2 * splits) == 0:
        splits *= 2
    return splits, blocks // splits


def offsets_fit(array) -> bool:
    """Whether Triton's element offsets into `array` cannot overflow: Pallas switches them to int64 only for
    arrays over 4 GiB, so a 1-byte array of 2^31 to 2^32 elements would wrap int32."""
    return array.size <= 2**31 or array.size * array.dtype.itemsize > 2**32  # offsets reach size - 1


def supports(q, k, slots=None, stacked: bool = False) -> bool:
    """Shapes the kernel handles (else the dispatch falls back to the reference); `stacked`: k is [L, B, ...]."""
    _, hkv, s, page, _ = k.shape[1:] if stacked else k.shape
    d = q.shape[-1]
    listed = s if slots is None else slots.shape[-1]
    # an FP8 pool Triton cannot address is read as uint16 pairs, with dots over d / 2 >= 16 channels
    addressable = offsets_fit(k) or (is_float8(k.dtype) and d >= 32)
    return addressable and d >= 16 and d & (d - 1) == 0 and plan(q.shape[0], hkv, listed, page) is not None


def _unpack_fp8(x, dtype, compute):
    """A tile of FP8 pairs packed in uint16 [T, D/2] -> its even and odd channels [T, D/2] each, in `compute`."""
    low = jax.lax.bitcast_convert_type((x & 0xFF).astype(jnp.uint8), dtype)  # little-endian: channel 2j is the low byte
    high = jax.lax.bitcast_convert_type((x >> 8).astype(jnp.uint8), dtype)
    return low.astype(compute), high.astype(compute)


def _attention_kernel(*refs, scale, prescale, compute, group, page, block_slots, blocks_per_split, splits, has_slots,
                      pair_dtype):
    # pair_dtype: None, or the FP8 dtype of a pool read as uint16 pairs of channels (AttentionTuning.pack_fp8)
    packed = pair_dtype is not None
    if has_slots:
        (layer_ref, live_ref, q_ref, k_ref, v_ref, fill_ref, slots_ref,
         o_ref, m_ref, l_ref, sums_ref, block_max_ref) = refs
    else:
        layer_ref, live_ref, q_ref, k_ref, v_ref, fill_ref, o_ref, m_ref, l_ref, sums_ref, block_max_ref = refs
    split = pl.program_id(2)
    layer = layer_ref[0]  # k_ref / v_ref hold this head's pool in every layer: [L, S*P, D]
    rows, d = o_ref.shape  # the group padded to >= 16 rows (Triton dots need 16)
    # q padded outside [R, D], or as given [G, D]: then its padding rows repeat the group's last head (their
    # outputs are dropped)
    q_rows = jnp.minimum(jax.lax.broadcasted_iota(jnp.int32, (rows,), 0), group - 1)  # [R]

    def load_q(channels):  # the group's queries [R, C] in the compute dtype, scaled and saturated as the pages are
        x = q_ref[:, channels] if q_ref.shape[0] == rows else q_ref[q_rows, channels]
        if prescale is not None:
            x = x.astype(jnp.float32) * prescale
        if compute == jnp.float16:  # a query past 65504 saturates rather than turn into inf (NaN stays NaN:
            x = x.astype(jnp.float32)  # Triton lowers jnp.clip to maxnum / minnum, which would drop it)
            x = jnp.where(jnp.abs(x) > 65504.0, jnp.sign(x) * 65504.0, x)
        return x.astype(compute)

    half = d // 2
    if packed:  # loaded once, outside the block loop: q's even and odd channels, as the pool's pairs hold them
        q_even, q_odd = load_q(pl.ds(0, half, stride=2)), load_q(pl.ds(1, half, stride=2))  # [R, D/2] each
    else:
        q = load_q(pl.ds(0, d))  # [R, D]
    tokens = block_slots * page
    # split j walks blocks j, j + splits, j + 2 * splits, ... below the live bound (blocks past it are empty)
    live_blocks = (live_ref[0] + block_slots - 1) // block_slots
    walked = jnp.clip((live_blocks - split + splits - 1) // splits, 0, blocks_per_split)

    token = jax.lax.broadcasted_iota(jnp.int32, (tokens,), 0)  # [T]
    offset = token % page  # position of each token in its page

    def load(i):  # block i's pages: k, v [T, D] in the pool's dtype, tokens filled in their slot [T]
        first = (i * splits + split) * block_slots
        # every load below is [T] or [T, D]: no reshape (layout change) of tiles in-kernel
        if has_slots:
            ids = slots_ref[first + token // page]  # [T] the slot each token comes from (repeated per page)
            present = ids >= 0
            ids = jnp.maximum(ids, 0)
            k = k_ref[layer, ids * page + offset]  # [T, D] rows gathered from the flat pool
            v = v_ref[layer, ids * page + offset]
            return k, v, jnp.where(present, fill_ref[ids], 0)  # [T]
        # the slot range of one head is contiguous
        return k_ref[layer, pl.ds(first * page, tokens)], v_ref[layer, pl.ds(first * page, tokens)], \
            fill_ref[first + token // page]

    def attend(i, o, m, l, k, v, token_fill):
        valid = offset < token_fill  # [T]
        if packed:  # FP8 pairs in uint16 (AttentionTuning.pack_fp8): q and o in [even | odd] channel order
            (k_even, k_odd), (v_even, v_odd) = _unpack_fp8(k, pair_dtype, compute), _unpack_fp8(v, pair_dtype, compute)
            logits = (pltriton.dot(q_even, k_even, trans_b=True).astype(jnp.float32)
                      + pltriton.dot(q_odd, k_odd, trans_b=True).astype(jnp.float32)) * scale
        else:
            k, v = k.astype(compute), v.astype(compute)  # an FP8 pool's tiles upcast in registers (else a no-op)
            logits = pltriton.dot(q, k, trans_b=True).astype(jnp.float32) * scale  # [R, T]
        logits = jnp.where(valid[None, :], logits, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))  # [R]
        p = jnp.where(valid[None, :], jnp.exp(logits - m_new[:, None]), 0.0)  # [R, T]
        correction = jnp.exp(m - m_new)
        l = l * correction + jnp.sum(p, axis=1)
        if packed:
            o = (o[0] * correction[:, None] + pltriton.dot(p.astype(compute), v_even).astype(jnp.float32),
                 o[1] * correction[:, None] + pltriton.dot(p.astype(compute), v_odd).astype(jnp.float32))
        else:
            o = o * correction[:, None] + pltriton.dot(p.astype(compute), v).astype(jnp.float32)
        sums_ref[i] = jnp.sum(p.reshape(rows, block_slots, page), axis=2)  # [R, SB] relative to m_new
        block_max_ref[i] = m_new
        return o, m_new, l

    zeros = jnp.zeros((rows, half), jnp.float32)
    init = ((zeros, zeros) if packed else jnp.zeros((rows, d), jnp.float32),
            jnp.full((rows,), MASK_VALUE, jnp.float32), jnp.zeros((rows,), jnp.float32))
    o, m, l = jax.lax.fori_loop(0, walked, lambda i, carry: attend(i, *carry, *load(i)), init)

    def skip(i, carry):  # blocks past the live bound: no mass
        sums_ref[i] = jnp.zeros((rows, block_slots), jnp.float32)
        block_max_ref[i] = jnp.full((rows,), MASK_VALUE, jnp.float32)
        return carry

    jax.lax.fori_loop(walked, blocks_per_split, skip, 0)
    if packed:
        o_ref[:, pl.ds(0, half)] = o[0]
        o_ref[:, pl.ds(half, half)] = o[1]
    else:
        o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = l


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "tuning"))
def decode_attention(q, k, v, fill, slots=None, *, layer=None, live_slots=None, scale: float | None = None,
                     interpret: bool = False, tuning: AttentionTuning = DEFAULT_TUNING):
    """q [B, Hq, D], k/v [B, Hkv, S, P, D], fill [B, Hkv, S], slots [B, Hkv, K] or None (-1 = none)
    -> (out [B, Hq, D], mass [B, Hkv, S or K] float32), the contract of kernels/reference.py.

    `live_slots` [B] int32 (optional, without `slots`): the caller's promise that slots >= live_slots[b] are
    empty in every head of sequence b. They are not read (a Dense pool sized for the whole generation is mostly
    empty early on); their mass is 0 as it would be anyway. Splits take blocks round-robin, so the live prefix
    is spread over all of them.

    With `layer` (an int32 scalar, may be traced) k/v are the pools of every layer [L, B, Hkv, S, P, D] and the
    kernel reads layer `layer` of them in place: slicing the layer outside would copy it (XLA materialises a
    custom call's operands), one pool-sized copy per layer and step.
    """
    if layer is None:
        k, v, layer = k[None], v[None], 0
    num_layers, b, hkv, s, page, d = k.shape
    hq = q.shape[1]
    group = hq // hkv
    rows = max(MIN_ROWS, 1 << (group - 1).bit_length())
    scale = d**-0.5 if scale is None else scale
    listed = s if slots is None else slots.shape[-1]
    block_slots, splits, per_split = plan(b, hkv, listed, page, tuning)
    compute = compute_dtype(k.dtype, q.dtype)  # the pool's dtype, or q's over an FP8 pool
    prescale = None
    if tuning.fp8_as_f16 and k.dtype != compute and compute.itemsize == 2:  # f16 holds every e4m3 value; q scaled first
        compute, prescale, scale = jnp.dtype(jnp.float16), scale, 1.0
    k_flat = k.reshape(num_layers, b, hkv, s * page, d)  # tokens of one head are contiguous: a free reshape
    v_flat = v.reshape(num_layers, b, hkv, s * page, d)
    packed = is_float8(k.dtype) and d >= 32 and (tuning.pack_fp8 or not offsets_fit(k))  # dots over d / 2 >= 16
    stored = d // 2 if packed else d  # channels per row as the kernel reads the pool
    q_heads = q.reshape(b, hkv, group, d)
    if not is_float8(k.dtype):  # padded by XLA: gathering its rows in the kernel made bf16 pools 5% slower at B = 128
        q_heads = jnp.pad(q_heads, ((0, 0), (0, 0), (0, rows - group), (0, 0)))  # (docs/kernels.md)
    if packed:  # the pool as uint16 pairs (an XLA bitcast; half the elements: int32 offsets suffice)
        k_flat, v_flat = (jax.lax.bitcast_convert_type(x.reshape(x.shape[:-1] + (stored, 2)), jnp.uint16)
                          for x in (k_flat, v_flat))
    head = lambda i, h, j: (0, i, h, 0, 0)  # noqa: E731  the whole pool of one KV head, every layer
    in_specs = [
        pl.BlockSpec((1,), lambda i, h, j: (0,)),
        pl.BlockSpec((None, 1), lambda i, h, j: (i, 0)),
        pl.BlockSpec((None, None, q_heads.shape[2], d), lambda i, h, j: (i, h, 0, 0)),
        pl.BlockSpec((num_layers, None, None, s * page, stored), head),
        pl.BlockSpec((num_layers, None, None, s * page, stored), head),
        pl.BlockSpec((None, None, s), lambda i, h, j: (i, h, 0)),
    ]
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    if live_slots is None or slots is not None:
        live_slots = jnp.full((b,), listed, jnp.int32)
    live_slots = jnp.minimum(jnp.asarray(live_slots, jnp.int32), listed).reshape(b, 1)
    inputs = [layer, live_slots, q_heads, k_flat, v_flat, fill.astype(jnp.int32)]
    if slots is not None:
        in_specs.append(pl.BlockSpec((None, None, listed), lambda i, h, j: (i, h, 0)))
        inputs.append(slots.astype(jnp.int32))
    blocks = splits * per_split
    kernel = functools.partial(_attention_kernel, scale=scale, prescale=prescale, compute=compute, group=group,
                               page=page, block_slots=block_slots,
                               blocks_per_split=per_split, splits=splits, has_slots=slots is not None,
                               pair_dtype=jnp.dtype(k.dtype) if packed else None)
    o, m, l, sums, block_max = pl.pallas_call(
        kernel,
        grid=(b, hkv, splits),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, None, rows, d), lambda i, h, j: (i, h, j, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, h, j: (i, h, j, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, h, j: (i, h, j, 0)),
            pl.BlockSpec((None, None, per_split, None, rows, block_slots), lambda i, h, j: (i, h, 0, j, 0, 0)),
            pl.BlockSpec((None, None, per_split, None, rows), lambda i, h, j: (i, h, 0, j, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, hkv, splits, rows, d), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, rows), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, rows), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, per_split, splits, rows, block_slots), jnp.float32),  # block i*splits+j
            jax.ShapeDtypeStruct((b, hkv, per_split, splits, rows), jnp.float32),
        ],
        compiler_params=pltriton.CompilerParams(
            num_warps=tuning.num_warps, num_stages=tuning.fp8_num_stages if is_float8(k.dtype) else tuning.num_stages),
        interpret=interpret,
        name="raas_decode_attention",
    )(*inputs)
    if packed:  # [even | odd] channels back in order
        o = jnp.stack([o[..., :stored], o[..., stored:]], axis=-1).reshape(o.shape)
    sums = sums.reshape(b, hkv, blocks, rows, block_slots)  # blocks in slot order
    block_max = block_max.reshape(b, hkv, blocks, rows)
    return combine_splits(o, m, l, sums, block_max, group=group, dtype=q.dtype)


def combine_splits(o, m, l, sums, block_max, *, group: int, dtype):
    """The flash-decoding combine of a split kernel's partials -> (out [B, Hq, D], mass [B, Hkv, S]).

    o [B, Hkv, splits, R, D] (unnormalised, relative to m), m / l [B, Hkv, splits, R] (running max and sum),
    sums [B, Hkv, NB, R, SB] (per-slot sums of block i relative to block_max [B, Hkv, NB, R]); rows past `group`
    are padding."""
    b, hkv, _, _, d = o.shape
    top = jnp.max(m, axis=2)  # [B, Hkv, R]: the global max of each row
    weight = jnp.exp(m - top[:, :, None])  # [B, Hkv, splits, R]
    total = jnp.maximum(jnp.sum(l * weight, axis=2), 1e-30)  # [B, Hkv, R]
    out = jnp.sum(o * weight[..., None], axis=2) / total[..., None]  # [B, Hkv, R, D]
    mass = slot_mass(sums, block_max, top, total, group=group)
    return out[:, :, :group].reshape(b, hkv * group, d).astype(dtype), mass


def slot_mass(sums, block_max, top, total, *, group: int):
    """Per-slot softmax mass [B, Hkv, NB * SB] from per-block sums [B, Hkv, NB, R, SB] relative to block_max
    [B, Hkv, NB, R], given each row's global max `top` and softmax denominator `total` [B, Hkv, R]: the max over
    the group's real query heads (rows past `group` are padding)."""
    b, hkv, nb, _, sb = sums.shape
    scale_rows = jnp.exp(block_max - top[:, :, None]) / total[:, :, None]  # [B, Hkv, NB, R]
    mass = sums[:, :, :, :group] * scale_rows[:, :, :, :group, None]  # [B, Hkv, NB, G, SB]
    return jnp.max(mass, axis=3).reshape(b, hkv, nb * sb)


def _scores_kernel(layer_ref, q_ref, kmin_ref, kmax_ref, fill_ref, u_ref, *, group, block_slots):
    layer, slots = layer_ref[0], pl.ds(pl.program_id(2) * block_slots, block_slots)
    kmin = kmin_ref[layer, slots].astype(jnp.float32)  # [SB, D]
    kmax = kmax_ref[layer, slots].astype(jnp.float32)
    bound = None
    for g in range(group):  # static: a GQA group has a handful of query heads
        qg = q_ref[g, :].astype(jnp.float32)[None, :]  # [1, D]
        u = jnp.sum(jnp.maximum(qg * kmin, qg * kmax), axis=1)  # [SB]
        bound = u if bound is None else jnp.maximum(bound, u)
    u_ref[...] = jnp.where(fill_ref[...] > 0, bound, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("interpret", "block_slots"))
def page_scores(q, kmin, kmax, fill, *, layer=None, interpret: bool = False, block_slots: int = 64):
    """q [B, Hq, D], kmin/kmax [B, Hkv, S, D], fill [B, Hkv, S] -> U [B, Hkv, S] f32 (-inf on empty slots).

    With `layer`, kmin/kmax are every layer's bounds [L, B, Hkv, S, D], read in place (see decode_attention)."""
    if layer is None:
        kmin, kmax, layer = kmin[None], kmax[None], 0
    num_layers, _, hkv, s, _ = kmin.shape
    b, hq, d = q.shape
    group = hq // hkv
    rows = 1 << (group - 1).bit_length()
    block_slots = min(block_slots, _pow2_at_most(s))
    while s % block_slots:
        block_slots //= 2
    qg = jnp.pad(q.reshape(b, hkv, group, d), ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    head = lambda i, h, j: (0, i, h, 0, 0)  # noqa: E731  one KV head's bounds in every layer
    return pl.pallas_call(
        functools.partial(_scores_kernel, group=group, block_slots=block_slots),
        grid=(b, hkv, s // block_slots),
        in_specs=[
            pl.BlockSpec((1,), lambda i, h, j: (0,)),
            pl.BlockSpec((None, None, rows, d), lambda i, h, j: (i, h, 0, 0)),
            pl.BlockSpec((num_layers, None, None, s, d), head),
            pl.BlockSpec((num_layers, None, None, s, d), head),
            pl.BlockSpec((None, None, block_slots), lambda i, h, j: (i, h, j)),
        ],
        out_specs=pl.BlockSpec((None, None, block_slots), lambda i, h, j: (i, h, j)),
        out_shape=jax.ShapeDtypeStruct((b, hkv, s), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="raas_page_scores",
    )(jnp.asarray(layer, jnp.int32).reshape(1), qg, kmin, kmax, fill.astype(jnp.int32))


def page_scores_supported(q, kmin) -> bool:
    d = q.shape[-1]
    return offsets_fit(kmin) and d & (d - 1) == 0 and d >= 16


INT32_MIN = -(2**31)
MAX_TOP_K_ROW = 8192  # a row lives in registers: longer rows fall back to lax.top_k


def _order_keys(x):
    """float32 -> int32 with the same order (-0.0 just below +0.0)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _top_k_kernel(scores_ref, mask_ref, *, k):
    key = _order_keys(scores_ref[...])  # [S]

    def set_bit(i, threshold):  # threshold kept with its sign bit flipped, so bits can be set from the top
        candidate = threshold | jax.lax.shift_left(jnp.int32(1), 31 - i)
        count = jnp.sum((key >= (candidate ^ jnp.int32(INT32_MIN))).astype(jnp.int32))
        return jnp.where(count >= k, candidate, threshold)

    kth = jax.lax.fori_loop(0, 32, set_bit, jnp.int32(0)) ^ jnp.int32(INT32_MIN)  # the k-th largest key
    above = key > kth
    need = k - jnp.sum(above.astype(jnp.int32))  # how many of the ties at the k-th value to take
    ties = key == kth
    tie_rank = jnp.cumsum(ties.astype(jnp.int32))  # 1-based among the ties, lower slots first
    mask_ref[...] = (above | (ties & (tie_rank <= need))).astype(jnp.int32)


def top_k_supported(scores) -> bool:
    s = scores.shape[-1]
    return s & (s - 1) == 0 and 16 <= s <= MAX_TOP_K_ROW


@functools.partial(jax.jit, static_argnames=("k", "interpret"))
def top_k_mask(scores, k: int, *, interpret: bool = False):
    """scores [B, Hkv, S] f32 -> bool [B, Hkv, S]: the min(k, S) highest of each row, ties to lower slots."""
    b, hkv, s = scores.shape
    k = min(k, s)
    mask = pl.pallas_call(
        functools.partial(_top_k_kernel, k=k),
        grid=(b, hkv),
        in_specs=[pl.BlockSpec((None, None, s), lambda i, h: (i, h, 0))],
        out_specs=pl.BlockSpec((None, None, s), lambda i, h: (i, h, 0)),
        out_shape=jax.ShapeDtypeStruct((b, hkv, s), jnp.int32),
        compiler_params=pltriton.CompilerParams(num_warps=4 if s <= 2048 else 8, num_stages=1),
        interpret=interpret,
        name="raas_top_k_mask",
    )(scores.astype(jnp.float32))
    return mask != 0


def whole_head_specs(arrays, heads: int | None = None):
    """Block specs for stacked cache arrays [L, B, Hkv, ...] on a (sequence, KV head) grid: each program gets its
    head's arrays in every layer ([L, ...]) and indexes the layer itself (a traced scalar). With `heads`, a grid of
    (sequence, group of `heads` KV heads): [L, heads, ...]."""
    def spec(x):
        rank = x.ndim - 3
        return pl.BlockSpec((x.shape[0], None, heads) + x.shape[3:], lambda i, h: (0, i, h) + (0,) * rank)

    return [spec(x) for x in arrays]


def _append_kernel(layer_ref, pos_ref, victim_ref, k_new_ref, v_new_ref, *refs, page, slots):
    (k_in, _, kmin_in, kmax_in, fill_in, start_in, _, pinned_in, cur_in,
     k_out, v_out, kmin_out, kmax_out, fill_out, start_out, stamp_out, pinned_out, cur_out, slot_out, evicted_out) = refs
    layer = layer_ref[0]  # the pool refs hold this (sequence, KV head)'s arrays in every layer: [L, S(*P), ...]
    cur = cur_in[layer]
    ids = jax.lax.broadcasted_iota(jnp.int32, (pl.next_power_of_2(slots),), 0)  # [S'] Triton tensors are 2^n long
    fill = jnp.where(ids < slots, fill_in[layer, jnp.minimum(ids, slots - 1)], -1)  # [S'] padding: never free
    cur_fill = jnp.sum(jnp.where(ids == cur, fill, 0))
    first_free = jnp.min(jnp.where(fill == 0, ids, slots))
    has_free = first_free < slots
    need_new = cur_fill >= page
    victim = victim_ref[0]
    slot = jnp.where(need_new, jnp.where(has_free, first_free, victim), cur)
    offset = jnp.where(need_new, 0, cur_fill)
    position = pos_ref[0]
    row, one = pl.ds(slot * page + offset, 1), pl.ds(slot, 1)
    k_new = k_new_ref[...][None, :]  # [1, D]
    k_out[layer, row, :] = k_new
    v_out[layer, row, :] = v_new_ref[...][None, :]
    k32 = k_new.astype(jnp.float32)
    kmin_out[layer, one, :] = jnp.where(need_new, k32, jnp.minimum(kmin_in[layer, one, :].astype(jnp.float32), k32)
                                        ).astype(kmin_out.dtype)
    kmax_out[layer, one, :] = jnp.where(need_new, k32, jnp.maximum(kmax_in[layer, one, :].astype(jnp.float32), k32)
                                        ).astype(kmax_out.dtype)
    fill_out[layer, one] = jnp.full((1,), offset + 1, jnp.int32)
    start_out[layer, one] = jnp.where(need_new, position, start_in[layer, one])
    stamp_out[layer, one] = jnp.full((1,), position, jnp.int32)  # the page written now is the newest
    pinned_out[layer, one] = jnp.logical_and(jnp.logical_not(need_new), pinned_in[layer, one])
    cur_out[pl.ds(layer, 1)] = jnp.full((1,), slot, jnp.int32)
    slot_out[...] = jnp.full((1,), slot, jnp.int32)
    evicted_out[...] = jnp.full((1,), jnp.where(need_new & jnp.logical_not(has_free), victim, -1), jnp.int32)


def append_supported(pool, k) -> bool:
    d = k.shape[-1]
    return (d >= 16 and d & (d - 1) == 0 and all(offsets_fit(pool[name]) for name in APPEND_ARRAYS)
            and pool["pinned"].dtype == jnp.bool_)


@functools.partial(jax.jit, static_argnames=("page_size", "interpret"))
def append_token(pool, layer, k, v, positions, victim, *, page_size: int, interpret: bool = False):
    """kernels/reference.py's `append_token` in one launch: one program per (sequence, KV head) finds the slot
    (current page, else the first free slot, else the victim), then writes the token's k/v row, the page's key
    bounds and its fill / start / stamp / pinned, and `cur`, into the stacked pool arrays in place
    (`input_output_aliases`): no other byte of the pool is read or written. XLA's version is one scatter
    fusion per array (9 launches per layer, ~1.7 us each at B = 1 on an H200)."""
    num_layers, b, hkv, s, page, d = pool["k"].shape
    assert page == page_size, (page, page_size)
    flat = {name: pool[name].reshape(num_layers, b, hkv, s * page, d) for name in ("k", "v")}  # a free reshape
    arrays = [flat.get(name, pool[name]) for name in APPEND_ARRAYS]
    pool_specs = whole_head_specs(arrays)
    row = lambda i, h: (i, h, 0)  # noqa: E731
    in_specs = [
        pl.BlockSpec((1,), lambda i, h: (0,)),
        pl.BlockSpec((None, 1), lambda i, h: (i, 0)),
        pl.BlockSpec((None, None, 1), row),
        pl.BlockSpec((None, None, d), row),
        pl.BlockSpec((None, None, d), row),
    ] + pool_specs
    inputs = [jnp.asarray(layer, jnp.int32).reshape(1), jnp.asarray(positions, jnp.int32).reshape(b, 1),
              jnp.asarray(victim, jnp.int32).reshape(b, hkv, 1), to_pool_dtype(k, pool["k"].dtype),
              to_pool_dtype(v, pool["v"].dtype)]
    first_pool_input = len(inputs)
    written = pl.pallas_call(
        functools.partial(_append_kernel, page=page, slots=s),
        grid=(b, hkv),
        in_specs=in_specs,
        out_specs=pool_specs + [pl.BlockSpec((None, None, 1), row)] * 2,
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in arrays]
        + [jax.ShapeDtypeStruct((b, hkv, 1), jnp.int32)] * 2,
        input_output_aliases={first_pool_input + i: i for i in range(len(arrays))},
        compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="raas_append_token",
    )(*inputs, *arrays)
    out = dict(zip(APPEND_ARRAYS, written))
    out["k"], out["v"] = out["k"].reshape(pool["k"].shape), out["v"].reshape(pool["v"].shape)
    return out, written[-2][..., 0], written[-1][..., 0]


MAX_REFRESH_SLOTS = 128  # a row's bounds [S, D] and its [S, S] rank comparisons live in registers


@dataclasses.dataclass(frozen=True)
class RefreshTuning:
    """Launch parameters of `refresh_top_half` (chosen on an H200: docs/kernels.md)."""

    channels: int = 64  # head-dim channels per pair of bound products (a power of two >= 16)
    num_warps: int = 4
    heads_per_program: int = 1  # KV heads of one sequence per program, in a loop (its gcd with Hkv)
    num_stages: int = 1  # Triton's software pipelining of that loop's loads
    # The query rows gathered in the kernel from q [B, Hq, D] (the group's last row repeated up to the products' 16
    # columns) instead of a padded copy of q made by XLA: one pad fusion per layer less, and the kernel itself is a
    # little faster at large batch (docs/kernels.md).
    gather_q: bool = True


def quest_bounds_by_products(q, kmin, kmax):
    """q [R, C], kmin / kmax [S, C] -> [S, R] f32: the Quest bound sum_c max(q_c kmin_c, q_c kmax_c) of every page
    for every query row, as two tensor-core products: kmax @ max(q, 0)^T + kmin @ min(q, 0)^T (kmin <= kmax, so
    a channel's larger product is the one with its bound of q's sign). R, S and C are multiples of 16 (tl.dot)."""
    dtype = jnp.promote_types(q.dtype, kmin.dtype)  # bf16 pools and queries: bf16 products, f32 sums
    q, kmin, kmax = q.astype(dtype), kmin.astype(dtype), kmax.astype(dtype)
    zero = jnp.zeros((), dtype)

    def times_q_t(k, q_part):  # k @ q_part^T in f32 (IEEE for f32 operands, not TF32)
        return jax.lax.dot_general(k, q_part, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST,
                                   preferred_element_type=jnp.float32)

    return times_q_t(kmax, jnp.maximum(q, zero)) + times_q_t(kmin, jnp.minimum(q, zero))


def _refresh_kernel(layer_ref, pos_ref, q_ref, kmin_ref, kmax_ref, fill_ref, pinned_ref, cur_ref, stamp_in,
                    stamp_out, *, group, page, slots, head_dim, channels, heads, q_columns, gather_q):
    # the pool refs hold this sequence's `heads` KV heads in every layer; q_ref their padded query rows
    # [heads, R, D], or with `gather_q` all of the sequence's query heads [Hq, D]
    layer = layer_ref[0]
    lanes = max(16, pl.next_power_of_2(slots))  # 2^n (Triton tensors), >= 16 (a product's rows)
    ids = jax.lax.broadcasted_iota(jnp.int32, (lanes,), 0)  # [S']
    in_pool = ids < slots
    # a 2^n row is one contiguous block (vectorised loads); otherwise padding lanes re-read the last slot
    rows = pl.ds(0, slots) if slots == lanes else jnp.minimum(ids, slots - 1)
    first_head = pl.program_id(1) * heads  # (read outside the loop: interpret mode cannot inside one)

    def refresh_head(h, carry):  # a loop, so Triton can load the next head's bounds while this one ranks
        if gather_q:  # this KV head's query rows, the last one repeated up to the products' columns
            q_rows = (first_head + h) * group + jnp.minimum(jax.lax.broadcasted_iota(jnp.int32, (q_columns,), 0),
                                                            group - 1)  # [R]
            q_of = lambda c: q_ref[q_rows, pl.ds(c, channels)]  # noqa: E731
        else:
            q_of = lambda c: q_ref[h, :, pl.ds(c, channels)]  # noqa: E731
        # the Quest bound per query row (two products per channel chunk), then the max over the group's real rows
        per_row = None
        for c in range(0, head_dim, channels):  # static
            part = quest_bounds_by_products(q_of(c),
                                            kmin_ref[layer, h, rows, pl.ds(c, channels)],
                                            kmax_ref[layer, h, rows, pl.ds(c, channels)])  # [S', R]
            per_row = part if per_row is None else per_row + part
        real_row = jax.lax.broadcasted_iota(jnp.int32, per_row.shape, 1) < group
        bound = jnp.max(jnp.where(real_row, per_row, -jnp.inf), axis=1)  # [S']
        candidate = (in_pool & (fill_ref[layer, h, rows] >= page) & jnp.logical_not(pinned_ref[layer, h, rows])
                     & (ids != cur_ref[layer, h]))  # evictable: full, unpinned, not the page being filled
        score = jnp.where(candidate, bound, -jnp.inf)
        # rank of slot i among the candidates: those scoring higher, or equal at a lower slot, come first
        ahead = candidate[None, :] & ((score[None, :] > score[:, None])
                                      | ((score[None, :] == score[:, None]) & (ids[None, :] < ids[:, None])))
        rank = jnp.sum(ahead.astype(jnp.int32), axis=1)  # [S'] from [S', S']
        keep = (jnp.sum(candidate.astype(jnp.int32)) + 1) // 2
        important = candidate & (rank < keep)
        stamp = jnp.where(important, pos_ref[0], stamp_in[layer, h, rows])
        if slots < lanes:  # padding lanes point at the last slot too: they write its new value (a masked store
            # would not do: interpret mode writes the old value through masked lanes, and the last lane wins)
            stamp = jnp.where(in_pool, stamp, jnp.sum(jnp.where(ids == slots - 1, stamp, 0)))
        stamp_out[layer, h, rows] = stamp
        return carry

    jax.lax.fori_loop(0, heads, refresh_head, 0)


def refresh_supported(q, pool) -> bool:
    slots = pool["fill"].shape[-1]
    return slots <= MAX_REFRESH_SLOTS and page_scores_supported(q, pool["kmin"]) and pool["pinned"].dtype == jnp.bool_


@functools.partial(jax.jit, static_argnames=("page_size", "interpret", "tuning"))
def refresh_top_half(q, pool, layer, positions, *, page_size: int, interpret: bool = False,
                     tuning: RefreshTuning = RefreshTuning()):
    """kernels/reference.py's `refresh_top_half` in one launch: each program scores the pages of some KV heads of
    one sequence by the Quest bound, ranks the evictable ones and writes the stamps of the top half, in place
    (`input_output_aliases`). What it replaces: the page-score kernel, a sort, and XLA's rank, mask and stamp
    fusions."""
    _, b, hkv, s, d = pool["kmin"].shape
    channels = min(tuning.channels, d)
    if channels & (channels - 1) or d % channels or channels < 16:
        raise ValueError(f"refresh channels must be a power of two >= 16 dividing the head dim {d}, got {channels}")
    heads = math.gcd(tuning.heads_per_program, hkv)
    hq = q.shape[1]
    group = hq // hkv
    q_columns = max(16, 1 << (group - 1).bit_length())  # the products' columns: 16 or more
    if tuning.gather_q:
        q_spec, q_in = pl.BlockSpec((None, hq, d), lambda i, h: (i, 0, 0)), q
    else:
        q_spec = pl.BlockSpec((None, heads, q_columns, d), lambda i, h: (i, h, 0, 0))
        q_in = jnp.pad(q.reshape(b, hkv, group, d), ((0, 0), (0, 0), (0, q_columns - group), (0, 0)))

    arrays = [pool[name] for name in REFRESH_ARRAYS]

    pool_specs = whole_head_specs(arrays, heads)  # this sequence's `heads` KV heads, every layer
    return pl.pallas_call(
        functools.partial(_refresh_kernel, group=group, page=page_size, slots=s, head_dim=d,
                          channels=channels, heads=heads, q_columns=q_columns, gather_q=tuning.gather_q),
        grid=(b, hkv // heads),
        in_specs=[pl.BlockSpec((1,), lambda i, h: (0,)), pl.BlockSpec((None, 1), lambda i, h: (i, 0)),
                  q_spec] + pool_specs,
        out_specs=pool_specs[-1],
        out_shape=jax.ShapeDtypeStruct(pool["stamp"].shape, pool["stamp"].dtype),
        input_output_aliases={3 + len(arrays) - 1: 0},
        compiler_params=pltriton.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages),
        interpret=interpret,
        name="raas_refresh_top_half",
    )(jnp.asarray(layer, jnp.int32).reshape(1), jnp.asarray(positions, jnp.int32).reshape(b, 1), q_in, *arrays)
