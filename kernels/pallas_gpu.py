"""Decode attention over the page pool in Pallas (Triton lowering), flash-decoding style, with per-slot mass.

Status: checked against `kernels/reference.py` in interpret mode on CPU only; not yet compiled or timed on a
GPU, so `backend="auto"` still picks the reference. Select it with `backend="pallas"`.

One program per (sequence, KV head, block of SLOTS_PER_BLOCK slots) reads its keys and values once and
computes, for all query heads of the group at once:
  m [G]      the block's max logit,
  l [G]      sum of exp(logit - m),
  o [G, D]   sum of exp(logit - m) * v,
  s [G, SB]  sum of exp(logit - m) per slot (a matmul with a token->slot indicator: no reshapes in-kernel).
A jnp epilogue rescales the blocks to the global max and gives the output and each slot's softmax mass
(max over the group), exactly the reference's contract.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .reference import MASK_VALUE

SLOTS_PER_BLOCK = 16  # >= 16: the per-slot sums are a dot, and Triton dots need every dimension >= 16
MIN_GROUP_ROWS = 16  # query heads of a group padded to this many rows (Triton dot minimum)


def _block_kernel(q_ref, k_ref, v_ref, valid_ref, o_ref, m_ref, l_ref, s_ref, *, scale: float, page: int):
    q = q_ref[...]  # [Gp, D]
    k = k_ref[...]  # [T, D] with T = SB * P tokens
    v = v_ref[...]  # [T, D]
    valid = valid_ref[...] != 0  # [T]
    logits = pl.dot(q, k, trans_b=True).astype(jnp.float32) * scale  # [Gp, T]
    logits = jnp.where(valid[None, :], logits, MASK_VALUE)
    m = jnp.max(logits, axis=1)  # [Gp]
    p = jnp.exp(logits - m[:, None]) * valid[None, :].astype(jnp.float32)  # [Gp, T]
    tokens, slots = k.shape[0], s_ref.shape[-1]
    token_slot = jax.lax.broadcasted_iota(jnp.int32, (tokens, slots), 0) // page
    indicator = (token_slot == jax.lax.broadcasted_iota(jnp.int32, (tokens, slots), 1)).astype(jnp.float32)
    o_ref[...] = pl.dot(p.astype(v.dtype), v).astype(jnp.float32)  # [Gp, D]
    m_ref[...] = m
    l_ref[...] = jnp.sum(p, axis=1)
    s_ref[...] = pl.dot(p, indicator)  # [Gp, SB]


def supports(q, k) -> bool:
    """Shapes this kernel handles (else the caller falls back to the reference)."""
    return k.shape[2] % SLOTS_PER_BLOCK == 0 and q.shape[-1] % 16 == 0


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def decode_attention(q, k, v, fill, *, scale: float | None = None, interpret: bool = False):
    """q [B, Hq, D], k/v [B, Hkv, S, P, D], fill [B, Hkv, S] -> (out [B, Hq, D], mass [B, Hkv, S] f32)."""
    b, hq, d = q.shape
    _, hkv, s, page, _ = k.shape
    group = hq // hkv
    rows = max(MIN_GROUP_ROWS, 1 << (group - 1).bit_length())
    scale = d**-0.5 if scale is None else scale
    blocks = s // SLOTS_PER_BLOCK
    tokens = SLOTS_PER_BLOCK * page
    qg = jnp.pad(q.reshape(b, hkv, group, d), ((0, 0), (0, 0), (0, rows - group), (0, 0))).astype(k.dtype)
    k_flat = k.reshape(b, hkv, s * page, d)  # contiguous: no copy
    v_flat = v.reshape(b, hkv, s * page, d)
    valid = (jnp.arange(page) < fill[..., None]).reshape(b, hkv, s * page).astype(jnp.int32)  # [B, Hkv, S*P]
    kernel = functools.partial(_block_kernel, scale=scale, page=page)
    o, m, l, sums = pl.pallas_call(
        kernel,
        grid=(b, hkv, blocks),
        in_specs=[
            pl.BlockSpec((None, None, rows, d), lambda i, h, j: (i, h, 0, 0)),
            pl.BlockSpec((None, None, tokens, d), lambda i, h, j: (i, h, j, 0)),
            pl.BlockSpec((None, None, tokens, d), lambda i, h, j: (i, h, j, 0)),
            pl.BlockSpec((None, None, tokens), lambda i, h, j: (i, h, j)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, d), lambda i, h, j: (i, h, j, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, h, j: (i, h, j, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, h, j: (i, h, j, 0)),
            pl.BlockSpec((None, None, None, rows, SLOTS_PER_BLOCK), lambda i, h, j: (i, h, j, 0, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, hkv, blocks, rows, d), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, blocks, rows), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, blocks, rows), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, blocks, rows, SLOTS_PER_BLOCK), jnp.float32),
        ],
        interpret=interpret,
    )(qg, k_flat, v_flat, valid)
    # combine the blocks: rescale each to the global max of its row
    top = jnp.max(m, axis=2, keepdims=True)  # [B, Hkv, 1, Gp]
    weight = jnp.exp(m - top)  # [B, Hkv, NB, Gp]
    total = jnp.maximum(jnp.sum(l * weight, axis=2), 1e-30)  # [B, Hkv, Gp]
    out = jnp.sum(o * weight[..., None], axis=2) / total[..., None]  # [B, Hkv, Gp, D]
    mass = sums * (weight / total[:, :, None, :])[..., None]  # [B, Hkv, NB, Gp, SB]
    mass = jnp.max(mass[:, :, :, :group], axis=3).reshape(b, hkv, s)  # max over the real query heads
    return out[:, :, :group].reshape(b, hq, d).astype(q.dtype), mass
