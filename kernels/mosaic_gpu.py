"""Decode attention over a bf16 / f16 page pool as a Mosaic GPU kernel (TMA copies + Hopper wgmma).

Same contract and same partial outputs as the Triton kernel of kernels/pallas_gpu.py (the split combine is
`pallas_gpu.combine_splits`): one program per (sequence, KV head, split); a split walks blocks j, j + splits, ...
below the live bound, copying each block's k and v into SMEM with TMA, with an online softmax. Per block it stores
the per-slot sums of exp(logit - m_running) and m_running, so the combine can give each slot its softmax mass.
With one split (from B x Hkv = 256 programs on, by default) a program's out is final: it is normalised and stored
in q's dtype by the kernel, and XLA only scales the per-slot sums (`pallas_gpu.slot_mass`).

The products are transposed ("swap AB"): wgmma's M is 64, and the group has a handful of query heads, so
logits^T [T, N] = K [T, D] @ Q^T [D, N] with N = the group padded to 8 (the softmax then works on T x N values,
not 64 x T), out^T [D, N] = V^T @ P^T, and the per-slot sums [64, N] = E^T [64, T] @ P^T with E the token -> slot
indicator, built in registers (a reshape of p's register layout is not available, a product is). p goes in as two
bf16 halves (hi + lo) so the sums keep ~16 bits, close to the float32 sums of the Triton kernel.

Token validity (offset in page < the slot's fill) is worked out in registers from the block's fill values (scalar
loads): one select per slot of the block over each token's row (a per-row gather of `fill` has no register layout),
so no token-level mask is written by XLA.

Slot lists (Quest's selected pages, -1 = none): block i holds the pages listed at positions [i * SB, (i + 1) * SB),
one TMA copy per page into its rows of the block's buffer, all arriving on the block's barrier.

Taken (`supports`): bf16 / f16 pools in q's dtype, head dim 64 or 128, groups up to 16 query heads, pages of 2 to
128 tokens (8 or more with a slot list), pools (or lists) of whole 128-token blocks, on a Hopper GPU (`available`).
The dispatch keeps the Triton kernel for everything else: FP8 pools, other head dims and groups, other GPUs. On an
H200 it is faster than the Triton kernel at the bf16 `bench kernels` shapes; the measurements behind its defaults
are in docs/kernels.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .pallas_gpu import combine_splits, slot_mass, split_blocks
from .reference import MASK_VALUE

@dataclasses.dataclass(frozen=True)
class MosaicTuning:
    """Launch parameters of the Mosaic GPU `decode_attention`."""

    # Chosen on an H200 (docs/kernels.md): one 128-token block per program in SMEM (~79 KB, so two programs share an
    # SM and each one's load overlaps the other's compute); 2-3 stages of one program per SM gained nothing, and
    # 64-token blocks lost everywhere, also with 3 stages at two programs per SM.
    block_tokens: int = 128  # tokens per pipeline step (a multiple of 64)
    stages: int = 1  # SMEM buffers of k / v in flight per program
    # Splits grow until (B * Hkv * splits) reaches this: 256 is one split per (sequence, KV head) from B = 32 with 8
    # KV heads, faster than four splits at B = 32 and the same elsewhere (docs/kernels.md)
    target_programs: int = 256
    # Past one wave of co-resident programs (two per SM, 132 SMs) the last wave runs part-empty (1-2 waves was the
    # slowest split count measured, docs/kernels.md). So past `wave_programs` the splits keep doubling until the
    # programs fill `full_waves` waves, while each split keeps `min_split_blocks` blocks or more (short splits pay
    # their prologue).
    wave_programs: int = 264
    full_waves: int = 4
    min_split_blocks: int = 32
    exact_sums: bool = True  # per-slot sums from p's two bf16 halves (~16 bits); False: one bf16 product
    # A slot list copied into SMEM once per program (one TMA copy), so a block's page indices are SMEM reads: read
    # from GMEM, each block's copies wait a GMEM round trip for their indices first (~2% on Quest's bench shape,
    # docs/kernels.md). Lists longer than STAGED_LIST_BYTES are read from GMEM.
    staged_list: bool = True


DEFAULT_TUNING = MosaicTuning()


STAGED_LIST_BYTES = 8192  # at most 2048 list positions staged: two programs still share an SM


def list_width(positions: int) -> int | None:
    """Row width of a slot list of `positions` entries staged in SMEM as [positions / w, w] int32 (a TMA copy moves
    at most 256 elements per dimension and rows of 16 bytes or more), or None where it is not staged."""
    width = math.gcd(positions, 64)
    fits = 4 * positions <= STAGED_LIST_BYTES and positions // width <= 256
    return width if width >= 4 and fits else None


def plan(batch: int, kv_heads: int, slots: int, page: int, tuning: MosaicTuning = DEFAULT_TUNING):
    """(block_slots, splits, blocks_per_split), or None if the shape is not taken."""
    tokens = tuning.block_tokens
    if tokens % 64 or tokens % page or page & (page - 1):
        return None
    block_slots = tokens // page
    if block_slots > 64 or slots % block_slots:
        return None
    rows = batch * kv_heads
    splits, per_split = split_blocks(rows, slots // block_slots, tuning.target_programs)
    while (tuning.wave_programs < rows * splits < tuning.full_waves * tuning.wave_programs
           and per_split % 2 == 0 and per_split // 2 >= tuning.min_split_blocks):
        splits, per_split = 2 * splits, per_split // 2
    return block_slots, splits, per_split


HEAD_DIMS = (64, 128)  # run on the H200 (tests/test_gpu.py); d = 256 would need fewer stages or a smaller block
MAX_HEADS = 16  # the group padded to 8: runs on the H200 for N = 8; past 16, logits, p and out^T crowd the registers
SMEM_BYTES = 232448  # per block on an H200, the reduction scratch included


def smem_bytes(heads: int, d: int, tokens: int, stages: int, exact_sums: bool = True) -> int:
    """SMEM one program allocates: the buffers of `_kernel`, plus ~3.1 KB of barriers, alignment and reduction scratch
    (what Mosaic GPU's lowering reported over the buffers, tests/kernels/test_mosaic_gpu.py checks the bound)."""
    return (2 * (heads * d + 2 * stages * tokens * d + (2 if exact_sums else 1) * heads * tokens)
            + 4 * (max(d, 128) * heads + 2 * heads) + 3584)


def supports(q, k, slots=None, stacked: bool = False, tuning: MosaicTuning = DEFAULT_TUNING) -> bool:
    """Shapes this kernel takes (see the module docstring); the dispatch sends the rest to the Triton kernel. A
    slot list needs pages of 8 tokens or more (each page is its own TMA copy into whole 8-row SMEM tiles)."""
    _, hkv, s, page, d = k.shape[1:] if stacked else k.shape
    heads = _heads(q.shape[1] // hkv)
    planned = plan(q.shape[0], hkv, s if slots is None else slots.shape[-1], page, tuning)
    return ((slots is None or page >= 8) and jnp.dtype(k.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and jnp.dtype(q.dtype) == jnp.dtype(k.dtype) and d in HEAD_DIMS and heads <= MAX_HEADS
            and planned is not None
            and smem_bytes(heads, d, tuning.block_tokens, min(tuning.stages, planned[2]), tuning.exact_sums)
            <= SMEM_BYTES)


def available() -> bool:
    """Whether this machine's first device is a Hopper GPU (sm_90): wgmma is Hopper's, other GPUs keep Triton."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9.")


def _mma_transforms(cols: int, dtype):
    swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


def _heads(group: int) -> int:
    return -(-group // 8) * 8  # the group's query heads padded to wgmma's N granularity


def _kernel(layer_ref, live_ref, q_ref, k_ref, v_ref, fill_ref, *refs, scale, tokens, block_slots, splits,
            per_split, stages, page, exact_sums, listed, staged_width, interpreted):
    """Transposed products ("swap AB"): logits^T [T, N] = K [T, D] @ Q^T [D, N], so the softmax works on T x N
    values (N = the group padded to 8) rather than 64 x T; out^T [D, N] = V^T [D, T] @ P^T [T, N]; per-slot sums
    [64, N] = E^T [64, T] @ P^T (rows past the block's slots are zero). With a slot list (`listed`), block i holds
    the pages listed at positions [i * SB, (i + 1) * SB): one TMA copy per page, all on the block's barrier; with
    `staged_width` the list is first copied into SMEM ([K / w, w], one copy) and read from there.

    With one split the program's result is final: out = out^T / l, stored as [N, D] in q's dtype (no combine).
    (q comes padded to N rows per KV head: TMA reads rows in whole 8-row tiles of the swizzled SMEM layout, so the
    group's rows cannot be read in place from q [B, Hq, D] at offsets h * group.)"""
    slots_ref, (o_ref, m_ref, l_ref, sums_ref, bmax_ref) = (refs[0], refs[1:]) if listed else (None, refs)
    dtype = q_ref.dtype
    heads, d = q_ref.shape[-2:]
    b, h, split = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("split")
    layer = layer_ref[0]
    live_blocks = (live_ref[b] + block_slots - 1) // block_slots
    walked = jnp.clip((live_blocks - split + splits - 1) // splits, 0, per_split)
    cast = (lambda x, layout: x) if interpreted else plgpu.layout_cast  # interpret mode has no layouts
    t = lambda ref: ref.transpose((1, 0))  # noqa: E731  (plgpu.transpose_ref is deprecated in JAX 0.11)

    def scoped(q_smem, k_smem, v_smem, p_smem, stage_smem, vec_smem, q_bar, k_bar, v_bar, *staged):
        list_smem, list_bar = staged if staged else (None, None)

        def listed_slot(position):  # the pool slot at a list position (-1: none)
            if list_smem is None:
                return slots_ref[b, h, position]
            return list_smem[position // staged_width, position % staged_width]

        def issue(i, slot):  # block i of this split into buffer `slot`
            first = (i * splits + split) * block_slots  # the block's first slot (or list position)
            if slots_ref is None:  # the block's pages are contiguous: one copy each for k and v
                rows = pl.ds(first * page, tokens)
                plgpu.copy_gmem_to_smem(k_ref.at[layer, b, h, rows], k_smem.at[slot], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[layer, b, h, rows], v_smem.at[slot], v_bar.at[slot])
                return
            for j in range(block_slots):  # one copy per listed page (-1, no page: any page, its fill reads 0)
                rows = pl.ds(jnp.maximum(listed_slot(first + j), 0) * page, page)
                into = pl.ds(j * page, page)
                plgpu.copy_gmem_to_smem(k_ref.at[layer, b, h, rows], k_smem.at[slot, into], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[layer, b, h, rows], v_smem.at[slot, into], v_bar.at[slot])

        token = cast(lax.broadcasted_iota(jnp.int32, (tokens,), 0), plgpu.Layout.WGMMA.reduce(1))  # [T]
        token_slot, token_offset = token // page, token % page
        plgpu.copy_gmem_to_smem(q_ref.at[b, h], q_smem, q_bar.at[0])
        if list_smem is not None:
            plgpu.copy_gmem_to_smem(slots_ref.at[b, h], list_smem, list_bar.at[0])
            plgpu.barrier_wait(list_bar.at[0])
        for slot in range(stages):
            pl.when(slot < walked)(functools.partial(issue, slot, slot))
        plgpu.barrier_wait(q_bar.at[0])
        # E^T [64, T], the token -> slot indicator (rows past the block's slots are zero), in registers
        if interpreted:
            slot_row = lax.broadcasted_iota(jnp.int32, (64, tokens), 0)
            slot_of_token = lax.broadcasted_iota(jnp.int32, (64, tokens), 1) // page
        else:
            slot_row = lax.broadcast_in_dim(cast(lax.broadcasted_iota(jnp.int32, (64,), 0),
                                                 plgpu.Layout.WGMMA.reduce(1)), (64, tokens), [0])
            slot_of_token = lax.broadcast_in_dim(cast(lax.broadcasted_iota(jnp.int32, (tokens,), 0),
                                                      plgpu.Layout.WGMMA.reduce(0)) // page, (64, tokens), [1])
        indicator = jnp.where(slot_row == slot_of_token, 1.0, 0.0).astype(dtype)  # [64, T]

        def product(a_ref, b_ref, shape, a_t=False, b_t=False):  # a @ b (each transposed if asked) in f32 [M, N]
            # (a_ref may be an array in registers, never transposed)
            if interpreted:  # GPU interpret mode reads neither transposed operands nor swizzled layouts
                a, b = a_ref[...], b_ref[...]
                return jnp.dot(a.T if a_t else a, b.T if b_t else b, preferred_element_type=jnp.float32)

            def run(acc_ref):
                plgpu.wgmma(acc_ref, t(a_ref) if a_t else a_ref, t(b_ref) if b_t else b_ref)
                return acc_ref[...]

            return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))

        def step(i, carry):
            acc, m, l = carry  # out^T [D, N] (relative to m), m / l [N]
            slot = lax.rem(i, stages)
            first = (i * splits + split) * block_slots  # the block's first slot
            # the block's fill row as scalars from GMEM, loaded before the waits below so their latency is hidden
            # (a TMA copy must move a multiple of 128 bytes: 32 slots; loading them a block ahead gained nothing)
            if slots_ref is None:
                fills = [fill_ref[b, h, first + j] for j in range(block_slots)]
            else:
                listed_slots = [listed_slot(first + j) for j in range(block_slots)]
                fills = [jnp.where(u >= 0, fill_ref[b, h, jnp.maximum(u, 0)], 0) for u in listed_slots]
            plgpu.barrier_wait(k_bar.at[slot])
            logits = product(k_smem.at[slot], q_smem, (tokens, heads), b_t=True) * scale  # [T, N]
            token_fill = jnp.zeros((tokens,), jnp.int32)  # [T] the fill of each token's slot
            for j, fill_j in enumerate(fills):  # a gather has no register layout: one select per slot of the block
                token_fill = jnp.where(token_slot == j, fill_j, token_fill)
            valid = lax.broadcast_in_dim(token_offset < token_fill, (tokens, heads), [0])  # [T, N]
            logits = jnp.where(valid, logits, MASK_VALUE)
            m_new = jnp.maximum(m, logits.max(axis=0))  # [N]
            p = jnp.where(valid, jnp.exp(logits - lax.broadcast_in_dim(m_new, logits.shape, [1])), 0.0)  # [T, N]
            correction = jnp.exp(m - m_new)
            l = l * correction + p.sum(axis=0)
            p_hi = p.astype(dtype)
            halves = [p_hi, (p - p_hi.astype(jnp.float32)).astype(dtype)] if exact_sums else [p_hi]
            for half, x in enumerate(halves):
                if interpreted:
                    p_smem[half] = x.T
                else:  # stored as P^T [N, T]: K-major rows for wgmma's B operand
                    t(p_smem.at[half])[...] = cast(x, plgpu.Layout.WGMMA_TRANSPOSED)
            plgpu.commit_smem()  # (also a warpgroup barrier: every warp is past the logits product)
            plgpu.barrier_wait(v_bar.at[slot])
            pv = product(v_smem.at[slot], p_smem.at[0], (d, heads), a_t=True, b_t=True)  # [D, N]
            acc = acc * lax.broadcast_in_dim(correction, acc.shape, [1]) + pv
            sums = product(indicator, p_smem.at[0], (64, heads), b_t=True)
            if exact_sums:
                sums = sums + product(indicator, p_smem.at[1], (64, heads), b_t=True)
            # k / v of this buffer are consumed (the products above were awaited): refill it (refilling k right
            # after the logits product instead gained nothing, docs/kernels.md)
            pl.when(i + stages < walked)(functools.partial(issue, i + stages, slot))
            buf = lax.rem(i, 2)
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the copies out of `buf` two steps ago are done
            sums_smem = stage_smem.at[pl.ds(buf * 64, 64)]
            sums_smem[...] = sums  # [64, N]: slots x heads
            vec_smem[buf] = m_new
            plgpu.commit_smem()
            out_block = (b, h, i, split)
            plgpu.copy_smem_to_gmem(sums_smem.at[pl.ds(0, max(block_slots, 8))], sums_ref.at[out_block],
                                    commit_group=False)
            plgpu.copy_smem_to_gmem(vec_smem.at[buf], bmax_ref.at[out_block])
            return acc, m_new, l

        acc = cast(jnp.zeros((d, heads), jnp.float32), plgpu.Layout.WGMMA)
        m = cast(jnp.full((heads,), MASK_VALUE, jnp.float32), plgpu.Layout.WGMMA.reduce(0))
        l = cast(jnp.zeros((heads,), jnp.float32), plgpu.Layout.WGMMA.reduce(0))
        acc, m, l = lax.fori_loop(0, walked, step, (acc, m, l))
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        out_split = (b, h, split)
        if splits == 1:  # the final out [N, D] (q's SMEM buffer is free: every product has been awaited)
            inverse = 1.0 / jnp.maximum(l, 1e-30)  # [N]: a row with nothing live has out^T = 0 and l = 0
            out_t = (acc * lax.broadcast_in_dim(inverse, acc.shape, [1])).astype(dtype)  # [D, N]
            if interpreted:
                q_smem[...] = out_t.T
            else:
                t(q_smem)[...] = cast(out_t, plgpu.Layout.WGMMA_TRANSPOSED)
            o_smem, o_out = q_smem, o_ref.at[b, h]
        else:  # out^T relative to m, for the combine
            o_smem, o_out = stage_smem.at[pl.ds(0, d)], o_ref.at[out_split]
            o_smem[...] = acc
        vec_smem[0] = m
        vec_smem[1] = l
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_out, commit_group=False)
        plgpu.copy_smem_to_gmem(vec_smem.at[0], m_ref.at[out_split], commit_group=False)
        plgpu.copy_smem_to_gmem(vec_smem.at[1], l_ref.at[out_split])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
        scoped,
        plgpu.SMEM((heads, d), dtype, transforms=_mma_transforms(d, dtype)),
        plgpu.SMEM((stages, tokens, d), dtype, transforms=_mma_transforms(d, dtype)),
        plgpu.SMEM((stages, tokens, d), dtype, transforms=_mma_transforms(d, dtype)),
        plgpu.SMEM((2 if exact_sums else 1, heads, tokens), dtype, transforms=_mma_transforms(tokens, dtype)),
        plgpu.SMEM((max(d, 128), heads), jnp.float32),  # staging of the outputs: out^T, or two blocks' sums
        plgpu.SMEM((2, heads), jnp.float32),
        plgpu.Barrier(num_barriers=1),
        plgpu.Barrier(num_arrivals=block_slots if listed else 1, num_barriers=stages),  # k: a copy per page listed
        plgpu.Barrier(num_arrivals=block_slots if listed else 1, num_barriers=stages),
        *([plgpu.SMEM(slots_ref.shape[-2:], jnp.int32), plgpu.Barrier(num_barriers=1)] if staged_width else []),
    )


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "tuning"))
def decode_attention(q, k, v, fill, slots=None, *, layer=None, live_slots=None, scale: float | None = None,
                     interpret=False, tuning: MosaicTuning = DEFAULT_TUNING):
    """q [B, Hq, D], k/v [B, Hkv, S, P, D] (or [L, ...] with `layer`), fill [B, Hkv, S], slots [B, Hkv, K] or None
    (-1 = none) -> (out [B, Hq, D], mass [B, Hkv, S or K] float32): kernels/reference.py's contract, as
    pallas_gpu.decode_attention (`live_slots` only without a slot list)."""
    if layer is None:
        k, v, layer = k[None], v[None], 0
    num_layers, b, hkv, s, page, d = k.shape
    hq = q.shape[1]
    group = hq // hkv
    heads = _heads(group)
    scale = d**-0.5 if scale is None else scale
    listed = s if slots is None else slots.shape[-1]  # the slots (or list positions) walked
    block_slots, splits, per_split = plan(b, hkv, listed, page, tuning)
    tokens = block_slots * page
    slot_rows = max(block_slots, 8)  # per-slot sums copied out per block (whole 8-row tiles)
    q_heads = jnp.pad(q.reshape(b, hkv, group, d), ((0, 0), (0, 0), (0, heads - group), (0, 0)))  # [B, Hkv, N, D]
    k_flat = k.reshape(num_layers, b, hkv, s * page, d)
    v_flat = v.reshape(num_layers, b, hkv, s * page, d)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    if live_slots is None or slots is not None:
        live_slots = jnp.full((b,), listed, jnp.int32)
    live_slots = jnp.minimum(jnp.asarray(live_slots, jnp.int32).reshape(b), listed)
    inputs = [layer, live_slots, q_heads, k_flat, v_flat, fill.astype(jnp.int32)]
    staged_width = list_width(listed) if slots is not None and tuning.staged_list else None
    if slots is not None:  # [B, Hkv, K], or [B, Hkv, K / w, w] to be staged in SMEM
        slots = slots.astype(jnp.int32)
        inputs.append(slots.reshape(b, hkv, listed // staged_width, staged_width) if staged_width else slots)
    kernel = functools.partial(_kernel, scale=scale, tokens=tokens, block_slots=block_slots, splits=splits,
                               per_split=per_split, stages=min(tuning.stages, per_split), page=page,
                               exact_sums=tuning.exact_sums, listed=slots is not None,
                               staged_width=staged_width, interpreted=bool(interpret))
    o, m, l, sums, block_max = plgpu.kernel(
        kernel,
        out_type=(
            # one split: the final out [B, Hkv, N, D]; several: out^T per split
            jax.ShapeDtypeStruct((b, hkv, heads, d), q.dtype) if splits == 1
            else jax.ShapeDtypeStruct((b, hkv, splits, d, heads), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, heads), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, heads), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, per_split, splits, slot_rows, heads), jnp.float32),  # block i*splits+j
            jax.ShapeDtypeStruct((b, hkv, per_split, splits, heads), jnp.float32),
        ),
        grid=(b, hkv, splits),
        grid_names=("b", "h", "split"),
        interpret=interpret,
    )(*inputs)
    # blocks past each sequence's live bound were not walked: their outputs were never written
    blocks = splits * per_split
    block_id = jnp.arange(per_split)[:, None] * splits + jnp.arange(splits)[None, :]  # [per_split, splits]
    walked = block_id[None] * block_slots < live_slots[:, None, None]  # [B, per_split, splits]
    walked = walked[:, None, :, :, None]  # [B, 1, per_split, splits, 1]
    sums = jnp.swapaxes(jnp.where(walked[..., None], sums, 0.0)[..., :block_slots, :], -1, -2)  # [.., N, SB]
    block_max = jnp.where(walked, block_max, MASK_VALUE)
    sums, block_max = sums.reshape(b, hkv, blocks, heads, block_slots), block_max.reshape(b, hkv, blocks, heads)
    if splits == 1:  # out is final; the slot mass needs each row's max and sum
        mass = slot_mass(sums, block_max, m[:, :, 0], jnp.maximum(l[:, :, 0], 1e-30), group=group)
        return o[:, :, :group].reshape(b, hq, d), mass
    o = jnp.swapaxes(o, -1, -2)  # [B, Hkv, splits, N, D]
    return combine_splits(o, m, l, sums, block_max, group=group, dtype=q.dtype)
