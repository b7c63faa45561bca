"""Pallas TPU kernels (Mosaic lowering) over the page pool: decode attention with per-slot mass, Quest page
scores and a top-k mask. Same contract as kernels/reference.py (the oracle) and kernels/pallas_gpu.py.

decode_attention: a 1-D "parallel" grid (a megacore chip splits it) over groups of (sequence, KV head) pairs.
The pool stays in HBM (`memory_space=pl.ANY`). A grid step walks its pairs' slots in blocks of `block_slots`
pages with an online softmax, DMA-ing the next block (of the same pair or the next one) into one half of a double
buffer while the current block is computed from the other half, so only the step's first DMA is exposed. The
layer index (may be traced) and the Quest slot lists are scalar-prefetched into SMEM and each DMA address is
computed on the scalar core: without a list a block is one contiguous DMA per K and V, with a list one DMA per
listed page (a -1 entry copies page 0 and is masked). `fill` comes per step as an SMEM block. All query heads
of a GQA group share one MXU dot per block (rows padded to 8 sublanes). Each slot's softmax mass comes from the
same pass: a dot of the probabilities with a 0/1 token->page matrix gives per-slot sums relative to the block's
running max, kept in VMEM and rescaled by exp(m_block - m_final) / l once the pair is done, then maxed over the
group's real rows.

page_scores: grid (sequence, KV head, block of slots); the Quest bound sum_d max(q*kmin, q*kmax) is computed
on the MXU as q+ . max(kmin, kmax) + q- . min(kmin, kmax) (q+ = max(q, 0), q- = min(q, 0), an identity), the
layer's bounds picked by a BlockSpec index_map that reads the prefetched layer index.

top_k_mask: grid over blocks of rows (a multiple of 8 sublanes); the k-th largest value per row by a 32-step
bisection on the bits of order-preserving int32 keys, then ties taken from the lowest slots by a bisection on
the slot index (Mosaic has no cumsum), vectorised over rows (sublanes) and slots (lanes).

All three run on CPU in TPU interpret mode (`interpret=True` -> `pltpu.InterpretParams()`), which simulates
HBM, VMEM, SMEM, DMAs and semaphores. Not yet measured on a TPU: docs/kernels.md has a bandwidth model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .reference import MASK_VALUE

SUBLANES = 8  # f32 rows per vreg: query heads of a group are padded to a multiple of this
BLOCK_TOKENS = 512  # tokens per DMA block of decode_attention (see docs/kernels.md, TPU model)
SCORE_BLOCK_SLOTS = 512  # slots per grid step of page_scores
MAX_PREFETCH_SLOTS = 2**17  # slot-list entries scalar-prefetched into SMEM (512 KiB of 1 MiB on v4/v5)
MAX_TOP_K_ROW = 8192  # 8 rows of this many f32 scores are 256 KiB of VMEM; longer rows use lax.top_k
TOP_K_BLOCK_ELEMENTS = 32768  # scores per grid step of top_k_mask (128 KiB f32): fewer ~0.35 us steps
MAX_HEADS_PER_STEP = 64  # (sequence, KV head) pairs per grid step of decode_attention
FILL_SMEM_WORDS = 32768  # int32 fill entries per grid step (128 KiB of SMEM, double-buffered: 256 KiB)
POOL_DTYPES = (jnp.float32, jnp.bfloat16)


def _interpret_params(interpret):
    """`interpret`: False (compile for the TPU), True (TPU interpret mode) or a `pltpu.InterpretParams`."""
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    return pltpu.InterpretParams() if interpret else False


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _sublane_tile(dtype) -> int:
    """Rows of one (rows, 128) VMEM tile: 8 for 32-bit, 16 for bf16 (packed)."""
    return SUBLANES * 4 // jnp.dtype(dtype).itemsize


def _precision(dtype):
    """f32 dots at full precision (as the reference); bf16 dots are exact products in f32 anyway."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot_nt(a, b, dtype):
    """a [M, K] . b [N, K]^T -> [M, N] float32 (the MXU takes the transposed operand natively)."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(dtype),
                               preferred_element_type=jnp.float32)


def _dot(a, b, dtype):
    """a [M, K] . b [K, N] -> [M, N] float32."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_precision(dtype),
                               preferred_element_type=jnp.float32)


def _page_sums(p, in_page):
    """p [R, T] f32, in_page [T, SB] bf16 0/1 -> per-page sums [R, SB] f32. The 0/1 matrix is exact in bf16, so
    p split into three bf16 pieces (24 mantissa bits) gives float32 sums in one bf16 MXU pass over 3R rows
    (Precision.HIGHEST would split both operands: 6 passes)."""
    rows = p.shape[0]  # a multiple of 8: the pieces stack on whole f32 tiles
    hi = p.astype(jnp.bfloat16).astype(jnp.float32)
    mid = (p - hi).astype(jnp.bfloat16).astype(jnp.float32)
    pieces = jnp.concatenate([hi, mid, p - hi - mid], axis=0).astype(jnp.bfloat16)  # [3R, T]: only lo rounds
    sums = _dot(pieces, in_page, jnp.bfloat16)  # [3R, SB]
    return sums[:rows] + sums[rows:2 * rows] + sums[2 * rows:]


def block_slots_for(listed: int, page: int, block_tokens: int = BLOCK_TOKENS) -> int:
    """Pages per DMA block: the largest divisor of `listed` with at most `block_tokens` tokens (at least 1)."""
    most = max(1, min(listed, block_tokens // page))
    return next(n for n in range(most, 0, -1) if listed % n == 0)


# ------------------------------------------------------------------------------------------ decode attention


def _pool_shape(k, stacked: bool):
    """(layers, B, Hkv, S, P, D) of a pool, with or without its layer axis."""
    if k.ndim != (6 if stacked else 5):
        layout = "[L, B, Hkv, S, P, D] (with layer)" if stacked else "[B, Hkv, S, P, D]"
        raise ValueError(f"k/v must be {layout}, got shape {tuple(k.shape)}")
    return tuple(k.shape) if stacked else (1, *k.shape)


def check_attention_args(q, k, v, fill, slots=None, stacked: bool = False) -> None:
    """Raise ValueError for inputs that break the contract (shape mismatches), whatever the backend."""
    _, b, hkv, s, _, d = _pool_shape(k, stacked)
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.ndim != 3 or q.shape[0] != b or q.shape[2] != d or q.shape[1] % hkv:
        raise ValueError(f"q must be [B={b}, Hq, D={d}] with Hq a multiple of Hkv={hkv}, got {tuple(q.shape)}")
    if tuple(fill.shape) != (b, hkv, s):
        raise ValueError(f"fill must be [B, Hkv, S] = {(b, hkv, s)}, got {tuple(fill.shape)}")
    if slots is not None and (slots.ndim != 3 or tuple(slots.shape[:2]) != (b, hkv)):
        raise ValueError(f"slots must be [B={b}, Hkv={hkv}, K], got {tuple(slots.shape)}")


def supports(q, k, slots=None, stacked: bool = False) -> bool:
    """Shapes the TPU kernel handles (else the dispatch falls back to the reference); `stacked`: k is [L, B, ...].

    Pages must fill whole VMEM tiles (P a multiple of 8 rows for f32, 16 for bf16) so that a block of pages is a
    [tokens, D] matrix without relayout; head_dim a multiple of 64; the pool f32 or bf16; a slot list small
    enough to sit in SMEM."""
    _, b, hkv, _, page, d = _pool_shape(k, stacked)
    listed = 0 if slots is None else b * hkv * slots.shape[-1]
    return (jnp.dtype(k.dtype) in POOL_DTYPES and page % _sublane_tile(k.dtype) == 0 and d % 64 == 0
            and q.shape[1] % hkv == 0 and listed <= MAX_PREFETCH_SLOTS)


def heads_per_step_for(head_rows: int, slots: int) -> int:
    """(sequence, KV head) pairs per grid step of decode_attention, for B * Hkv = `head_rows` pairs of pools of
    `slots` pages: as many as fit (each step costs ~0.35 us and exposes one DMA latency), up to MAX_HEADS_PER_STEP
    and the SMEM kept for `fill` blocks ([pairs, 1, S] int32, S padded to 128), and at most half of them so
    that both TensorCores of a megacore chip (v4, v5p) get a step. A divisor of `head_rows`."""
    most = min(MAX_HEADS_PER_STEP, FILL_SMEM_WORDS // _round_up(slots, 128), max(1, head_rows // 2))
    return next(n for n in range(max(1, most), 0, -1) if head_rows % n == 0)


def _attention_kernel(*refs, kv_heads, page, block_slots, num_blocks, group, has_slots):
    if has_slots:
        (layer_ref, slots_ref, q_ref, fill_ref, k_hbm, v_hbm, o_ref, mass_ref,
         k_buf, v_buf, sems, sums_ref, block_max_ref) = refs
    else:
        (layer_ref, q_ref, fill_ref, k_hbm, v_hbm, o_ref, mass_ref,
         k_buf, v_buf, sems, sums_ref, block_max_ref) = refs
        slots_ref = None
    heads_per_step, rows, d = q_ref.shape  # [HS, R, D]: HS (sequence, KV head) pairs, R query rows each
    first_head = pl.program_id(0) * heads_per_step  # flat index b * Hkv + h of the step's first pair
    layer = layer_ref[0]
    tokens = block_slots * page
    listed = num_blocks * block_slots

    def slot_of(head, entry):  # (slot to read, tokens it holds) of entry `entry` of the step's head `head`
        if slots_ref is None:
            return entry, fill_ref[head, 0, entry]
        slot = slots_ref[(first_head + head) * listed + entry]
        safe = jnp.maximum(slot, 0)
        return safe, jnp.where(slot >= 0, fill_ref[head, 0, safe], 0)

    def dma(item, buf, action):  # `action` (start or wait) the DMAs of work item `item` (a block of a head)
        head, first = jax.lax.div(item, num_blocks), jax.lax.rem(item, num_blocks) * block_slots
        pair = first_head + head
        pool_head = (layer, jax.lax.div(pair, kv_heads), jax.lax.rem(pair, kv_heads))  # (layer, b, h)
        kv = ((k_hbm, k_buf.at[buf], sems.at[0, buf]), (v_hbm, v_buf.at[buf], sems.at[1, buf]))
        if slots_ref is None:  # the block's slots are contiguous in the pool: one DMA each for K and V
            for pool, dst, sem in kv:
                action(pltpu.make_async_copy(pool.at[(*pool_head, pl.ds(first, block_slots))], dst, sem))
            return

        def page_copy(j, carry):  # one page per DMA, its address from the prefetched list
            slot = slot_of(head, first + j)[0]
            for pool, dst, sem in kv:
                action(pltpu.make_async_copy(pool.at[(*pool_head, slot)], dst.at[j], sem))
            return carry

        jax.lax.fori_loop(0, block_slots, page_copy, 0)

    def start(copy):
        copy.start()

    def wait(copy):
        copy.wait()

    # constants: token t of a block belongs to its page t // P (as lanes in [SB, T], as rows in [T, SB])
    page_first = jax.lax.broadcasted_iota(jnp.int32, (block_slots, 1), 0) * page  # [SB, 1]
    token = jax.lax.broadcasted_iota(jnp.int32, (1, tokens), 1)  # [1, T]
    page_tokens = (token >= page_first) & (token < page_first + page)  # [SB, T]
    token_row = jax.lax.broadcasted_iota(jnp.int32, (tokens, block_slots), 0)  # [T, SB]
    page_col = jax.lax.broadcasted_iota(jnp.int32, (tokens, block_slots), 1) * page
    in_page = ((token_row >= page_col) & (token_row < page_col + page)).astype(jnp.bfloat16)  # [T, SB] 0/1
    real_row = jax.lax.broadcasted_iota(jnp.int32, (1, rows, 1), 1) < group  # padded rows are not query heads

    def attend_block(head, block, carry):  # online softmax over one block of one head's slots
        o, m, l = carry  # [R, D], [R, 1], [R, 1] float32
        item = head * num_blocks + block  # work items run on across heads, and so does the double buffer
        buf = jax.lax.rem(item, 2)

        @pl.when(item + 1 < heads_per_step * num_blocks)
        def _prefetch_next():
            dma(item + 1, 1 - buf, start)

        def add_page(j, limit):  # [SB, 1]: page start + tokens held (f32: exact, and f32 reductions always lower)
            held = slot_of(head, block * block_slots + j)[1]
            return jnp.where(page_first == j * page, (held + j * page).astype(jnp.float32), limit)

        limit = jax.lax.fori_loop(0, block_slots, add_page, jnp.zeros((block_slots, 1), jnp.float32))  # [SB, 1]
        token_limit = jnp.max(jnp.where(page_tokens, limit, 0.0), axis=0, keepdims=True)  # [1, T]
        valid = token.astype(jnp.float32) < token_limit  # [1, T]: the token is resident

        dma(item, buf, wait)
        k = k_buf[buf].reshape(tokens, d)  # [T, D]: pages are whole tiles, so no relayout
        v = v_buf[buf].reshape(tokens, d)
        q = q_ref[head].astype(k.dtype)  # [R, D], scaled; exact (rounded to the pool dtype outside)
        logits = jnp.where(valid, _dot_nt(q, k, k.dtype), MASK_VALUE)  # [R, T]
        m_new = jnp.maximum(m, jnp.max(logits, axis=1, keepdims=True))  # [R, 1]
        p = jnp.where(valid, jnp.exp(logits - m_new), 0.0)  # [R, T]
        correction = jnp.exp(m - m_new)
        l = l * correction + jnp.sum(p, axis=1, keepdims=True)
        o = o * correction + _dot(p.astype(v.dtype), v, v.dtype)
        sums_ref[block] = _page_sums(p, in_page)  # [R, SB] per-slot sums, relative to m_new
        block_max_ref[block] = m_new
        return o, m_new, l

    def attend_head(head, carry):
        initial = (jnp.zeros((rows, d), jnp.float32), jnp.full((rows, 1), MASK_VALUE, jnp.float32),
                   jnp.zeros((rows, 1), jnp.float32))
        o, m, l = jax.lax.fori_loop(0, num_blocks, functools.partial(attend_block, head), initial)
        inv_l = 1.0 / jnp.maximum(l, 1e-30)  # [R, 1]
        o_ref[head] = o * inv_l
        weight = jnp.exp(block_max_ref[...] - m[None]) * inv_l[None]  # [NB, R, 1]: block sums -> softmax mass
        mass_ref[head] = jnp.max(jnp.where(real_row, sums_ref[...] * weight, 0.0), axis=1)  # [NB, SB]
        return carry

    dma(0, 0, start)
    jax.lax.fori_loop(0, heads_per_step, attend_head, 0)


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "block_tokens", "heads_per_step"))
def decode_attention(q, k, v, fill, slots=None, *, layer=None, scale: float | None = None,
                     interpret: bool = False, block_tokens: int = BLOCK_TOKENS, heads_per_step: int | None = None):
    """q [B, Hq, D], k/v [B, Hkv, S, P, D], fill [B, Hkv, S], slots [B, Hkv, K] or None (-1 = none)
    -> (out [B, Hq, D], mass [B, Hkv, S or K] float32), the contract of kernels/reference.py.

    With `layer` (an int32 scalar, may be traced) k/v are the pools of every layer [L, B, Hkv, S, P, D]; the
    layer index is scalar-prefetched and the DMAs read that layer in place (no pool-sized slice copy).
    Launch parameters: `block_tokens` (tokens per DMA block), `heads_per_step` ((sequence, KV head) pairs per
    grid step; must divide B * Hkv)."""
    stacked = layer is not None
    check_attention_args(q, k, v, fill, slots, stacked)
    if not supports(q, k, slots, stacked):
        raise ValueError(f"pallas_tpu.decode_attention does not take q {q.shape} {q.dtype}, pool {k.shape} "
                         f"{k.dtype}; see supports() (kernels.decode_attention falls back to the reference)")
    if not stacked:
        k, v, layer = k[None], v[None], 0
    _, b, hkv, s, page, d = k.shape
    hq = q.shape[1]
    group = hq // hkv
    rows = _round_up(group, SUBLANES)
    scale = d**-0.5 if scale is None else scale
    listed = s if slots is None else slots.shape[-1]
    heads_per_step = heads_per_step or heads_per_step_for(b * hkv, s)
    if (b * hkv) % heads_per_step:
        raise ValueError(f"heads_per_step={heads_per_step} must divide B * Hkv = {b * hkv}")
    block_slots = block_slots_for(listed, page, block_tokens)
    num_blocks = listed // block_slots
    qg = (q.reshape(b * hkv, group, d).astype(jnp.float32) * scale).astype(k.dtype)  # rounded as the reference
    qg = jnp.pad(qg.astype(jnp.float32), ((0, 0), (0, rows - group), (0, 0)))  # [B * Hkv, R, D]
    prefetch = [jnp.asarray(layer, jnp.int32).reshape(1)]
    if slots is not None:
        prefetch.append(slots.astype(jnp.int32).reshape(-1))  # [B * Hkv * K] in SMEM
    step_heads = lambda i, *_: (i, 0, 0)  # noqa: E731  this grid step's (sequence, KV head) pairs
    kernel = functools.partial(_attention_kernel, kv_heads=hkv, page=page, block_slots=block_slots,
                               num_blocks=num_blocks, group=group, has_slots=slots is not None)
    out, mass = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(b * hkv // heads_per_step,),
            in_specs=[
                pl.BlockSpec((heads_per_step, rows, d), step_heads),  # q of the groups, f32 (8, 128) tiles
                pl.BlockSpec((heads_per_step, 1, s), step_heads, memory_space=pltpu.SMEM),  # fill, as scalars
                pl.BlockSpec(memory_space=pl.ANY),  # k pool, every layer, left in HBM
                pl.BlockSpec(memory_space=pl.ANY),  # v pool
            ],
            out_specs=[
                pl.BlockSpec((heads_per_step, rows, d), step_heads),
                pl.BlockSpec((heads_per_step, num_blocks, block_slots), step_heads),
            ],
            scratch_shapes=[
                pltpu.VMEM((2, block_slots, page, d), k.dtype),  # double-buffered K pages
                pltpu.VMEM((2, block_slots, page, d), v.dtype),
                pltpu.SemaphoreType.DMA((2, 2)),  # [K or V, buffer half]
                pltpu.VMEM((num_blocks, rows, block_slots), jnp.float32),  # per-slot sums of each block of a head
                pltpu.VMEM((num_blocks, rows, 1), jnp.float32),  # running max after each block
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((b * hkv, rows, d), jnp.float32),
            jax.ShapeDtypeStruct((b * hkv, num_blocks, block_slots), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=_interpret_params(interpret),
        name="raas_tpu_decode_attention",
    )(*prefetch, qg, fill.astype(jnp.int32).reshape(b * hkv, 1, s), k, v)
    return out[:, :group].reshape(b, hq, d).astype(q.dtype), mass.reshape(b, hkv, listed)


# ------------------------------------------------------------------------------------------------ page scores


def score_block_slots(slots: int, block_slots: int = SCORE_BLOCK_SLOTS) -> int:
    """Slots per grid step of page_scores: all of them, or a multiple of 128 (lanes of the output) dividing S."""
    if slots <= block_slots:
        return slots
    return next((n for n in range(block_slots - block_slots % 128, 0, -128) if slots % n == 0), slots)


def page_scores_supported(q, kmin, stacked: bool = False) -> bool:
    """Bounds in f32 or bf16, head_dim a multiple of 64, and a block of slots that fits VMEM (S <= 4096 unless
    S splits into blocks of a multiple of 128 slots)."""
    s, d = kmin.shape[-2:]
    return (kmin.ndim == (5 if stacked else 4) and jnp.dtype(kmin.dtype) in POOL_DTYPES and d % 64 == 0
            and score_block_slots(s) <= 4096)


def _scores_kernel(layer_ref, q_ref, kmin_ref, kmax_ref, fill_ref, u_ref, *, group):
    del layer_ref  # used by the index_maps only
    q = q_ref[...]  # [R, D] float32
    kmin, kmax = kmin_ref[...].astype(jnp.float32), kmax_ref[...].astype(jnp.float32)  # [SB, D]
    # max(q*a, q*b) = max(q, 0) * max(a, b) + min(q, 0) * min(a, b): two MXU dots instead of G VPU passes
    bound = (_dot_nt(jnp.maximum(q, 0.0), jnp.maximum(kmin, kmax), jnp.float32)
             + _dot_nt(jnp.minimum(q, 0.0), jnp.minimum(kmin, kmax), jnp.float32))  # [R, SB]
    real_row = jax.lax.broadcasted_iota(jnp.int32, bound.shape, 0) < group
    bound = jnp.max(jnp.where(real_row, bound, -jnp.inf), axis=0, keepdims=True)  # [1, SB] max over the group
    u_ref[...] = jnp.where(fill_ref[...] > 0, bound, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("interpret", "block_slots"))
def page_scores(q, kmin, kmax, fill, *, layer=None, interpret: bool = False,
                block_slots: int = SCORE_BLOCK_SLOTS):
    """q [B, Hq, D], kmin/kmax [B, Hkv, S, D], fill [B, Hkv, S] -> U [B, Hkv, S] f32 (-inf on empty slots).

    With `layer`, kmin/kmax are every layer's bounds [L, B, Hkv, S, D]: the index_maps read the prefetched
    layer index, so only that layer's blocks are DMA'd."""
    stacked = layer is not None
    if kmin.ndim != (5 if stacked else 4) or kmax.shape != kmin.shape:
        layout = "[L, B, Hkv, S, D] (with layer)" if stacked else "[B, Hkv, S, D]"
        raise ValueError(f"kmin/kmax must both be {layout}, got {tuple(kmin.shape)} and {tuple(kmax.shape)}")
    if not stacked:
        kmin, kmax, layer = kmin[None], kmax[None], 0
    _, b, hkv, s, d = kmin.shape
    hq = q.shape[1]
    if q.shape != (b, hq, d) or hq % hkv or fill.shape != (b, hkv, s):
        raise ValueError(f"q must be [B={b}, Hq, D={d}] (Hq a multiple of {hkv}) and fill [B, Hkv, S] = "
                         f"{(b, hkv, s)}; got q {tuple(q.shape)}, fill {tuple(fill.shape)}")
    group = hq // hkv
    rows = _round_up(group, SUBLANES)
    block_slots = score_block_slots(s, block_slots)
    qg = jnp.pad(q.reshape(b, hkv, group, d).astype(jnp.float32), ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    bounds = pl.BlockSpec((None, None, None, block_slots, d), lambda i, h, j, layer_ref: (layer_ref[0], i, h, j, 0))
    slot_row = pl.BlockSpec((None, None, 1, block_slots), lambda i, h, j, _: (i, h, 0, j))
    u = pl.pallas_call(
        functools.partial(_scores_kernel, group=group),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, hkv, s // block_slots),
            in_specs=[pl.BlockSpec((None, None, rows, d), lambda i, h, j, _: (i, h, 0, 0)), bounds, bounds,
                      slot_row],
            out_specs=slot_row,
        ),
        out_shape=jax.ShapeDtypeStruct((b, hkv, 1, s), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=_interpret_params(interpret),
        name="raas_tpu_page_scores",
    )(jnp.asarray(layer, jnp.int32).reshape(1), qg, kmin, kmax, fill.astype(jnp.int32).reshape(b, hkv, 1, s))
    return u.reshape(b, hkv, s)


# --------------------------------------------------------------------------------------------------- top-k mask

INT32_MIN = -(2**31)


def top_k_block_rows(rows: int, slots: int) -> int:
    """Rows per grid step: a multiple of 8 (sublanes), up to TOP_K_BLOCK_ELEMENTS scores, no more than needed."""
    most = max(SUBLANES, TOP_K_BLOCK_ELEMENTS // slots // SUBLANES * SUBLANES)
    return min(most, _round_up(rows, SUBLANES))


def top_k_supported(scores) -> bool:
    return scores.ndim == 3 and scores.shape[-1] <= MAX_TOP_K_ROW


def _order_keys(x):
    """float32 -> int32 with the same order (-0.0 just below +0.0)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _count(mask):
    """True entries of each row: [RB, S] bool -> [RB, 1] float32 (exact below 2^24; no int reductions needed)."""
    return jnp.sum(jnp.where(mask, 1.0, 0.0), axis=1, keepdims=True)


def _top_k_kernel(scores_ref, mask_ref, *, k):
    key = _order_keys(scores_ref[...])  # [RB, S]
    slot = jax.lax.broadcasted_iota(jnp.int32, key.shape, 1)

    def set_value_bit(i, threshold):  # [RB, 1], kept with its sign bit flipped so bits are set from the top
        candidate = threshold | jax.lax.shift_left(jnp.int32(1), 31 - i)
        enough = _count(key >= (candidate ^ jnp.int32(INT32_MIN))) >= k
        return jnp.where(enough, candidate, threshold)

    start = jnp.zeros((key.shape[0], 1), jnp.int32)
    kth = jax.lax.fori_loop(0, 32, set_value_bit, start) ^ jnp.int32(INT32_MIN)  # the k-th largest key per row
    above = key > kth
    ties = key == kth
    need = k - _count(above)  # ties to take, from the lowest slots: [RB, 1], >= 1

    def set_slot_bit(i, last):  # the slot of the need-th tie: largest c with fewer than `need` ties below c
        candidate = last | jax.lax.shift_left(jnp.int32(1), slot_bits - 1 - i)
        return jnp.where(_count(ties & (slot < candidate)) < need, candidate, last)

    slot_bits = max(1, (key.shape[1] - 1).bit_length())
    last = jax.lax.fori_loop(0, slot_bits, set_slot_bit, start)
    mask_ref[...] = (above | (ties & (slot <= last))).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("k", "interpret"))
def top_k_mask(scores, k: int, *, interpret: bool = False):
    """scores [B, Hkv, S] f32 -> bool [B, Hkv, S]: the min(k, S) highest of each row, ties to lower slots."""
    if scores.ndim != 3 or k < 0:
        raise ValueError(f"top_k_mask takes scores [B, Hkv, S] and k >= 0, got {tuple(scores.shape)}, k={k}")
    b, hkv, s = scores.shape
    k = min(k, s)
    if k == 0:
        return jnp.zeros(scores.shape, jnp.bool_)
    rows = b * hkv
    block_rows = top_k_block_rows(rows, s)
    padded = _round_up(rows, block_rows)  # padding rows are dropped below
    flat = jnp.pad(scores.astype(jnp.float32).reshape(rows, s), ((0, padded - rows), (0, 0)))
    block = pl.BlockSpec((block_rows, s), lambda r: (r, 0))
    mask = pl.pallas_call(
        functools.partial(_top_k_kernel, k=k),
        grid=(padded // block_rows,),
        in_specs=[block],
        out_specs=block,
        out_shape=jax.ShapeDtypeStruct((padded, s), jnp.int32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=_interpret_params(interpret),
        name="raas_tpu_top_k_mask",
    )(flat)
    return mask[:rows].reshape(b, hkv, s) != 0
