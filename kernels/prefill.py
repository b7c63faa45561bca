"""Prefill attention without T x T memory: a whole prompt through a kept flash kernel, H2O's key mass in
a second blockwise pass, and a prompt chunk's attention over the pages already written (chunked prefill).

Entry points (dispatched from kernels/dispatch.py; kernels/reference.py is the oracle and the CPU path of each):

  causal_attention(q [B,T,Hq,D], k/v [B,T,Hkv,D], q_positions, k_positions) -> out [B,T,Hq,D]
  key_mass(q, k, q_positions, k_positions) -> [B,Hkv,G,Tk]: per query head, the softmax mass each key received,
      summed over the valid queries (H2O; `causal_attention`'s key mass is its max over the group G)
  chunk_attention(q [B,C,Hq,D], k/v [B,C,Hkv,D], positions [B,C], k_pool/v_pool [(L,) B,Hkv,S,P,D])
      -> out [B,C,Hq,D]: a chunk's queries over the prompt written so far (the pool) and the chunk itself (causal)
  chunk_key_mass(q, positions, k_pool) -> [B,Hkv,G,S*P]: `key_mass` of a chunk's queries over the pool

Implementations:
  reference   plain jnp with T x Tk scores (kernels/reference.py): the CPU path, and `backend="reference"` anywhere.
  cudnn       cuDNN flash attention (bf16/f16 on a GPU): `jax.nn.dot_product_attention(implementation="cudnn")` for a
              whole prompt; for a chunk, two cuDNN calls (the pool so far, the chunk causally) merged by their
              log-sum-exp, taken from JAX's cuDNN module because the public API rounds it to bf16.
  pallas_gpu  JAX's Pallas GPU flash attention op (`jax.experimental.pallas.ops.gpu.attention.mha`, Triton): what a
              GPU runs for a whole prompt when cuDNN refuses the case (f32, a head dim cuDNN does not take).
  pallas_tpu  JAX's Pallas TPU flash attention (`jax.experimental.pallas.ops.tpu.flash_attention`), whole prompts.
  blockwise   plain jnp FlashAttention-2: an online softmax over key blocks inside a loop over query blocks
              (O(BLOCK_Q x BLOCK_K) scores per head), any backend, any positions. Chunks off-GPU, key mass
              everywhere but on CPU, and whatever a kernel refuses.

The flash kernels assume the prefill layout every caller in this project uses: `q_positions is k_positions`, each
row 0, 1, ..., n-1 and then -1 (right padding), so causal by position is causal by index. Other positions go to
`blockwise`, which masks by position exactly like the reference. Rows of padding (position -1) come out as zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import reference

IMPLEMENTATIONS = ("reference", "cudnn", "pallas_gpu", "pallas_tpu", "blockwise")
BLOCK_Q = 256  # query rows per block of the blockwise attention
BLOCK_K = 512  # keys per block of the blockwise online softmax
MASS_BLOCK_BYTES = 1 << 28  # float32 scores one query block of the key-mass pass may hold (256 MiB)
GPU_BLOCK = 128  # Pallas GPU op tile (64 for prompts shorter than this)
TPU_BLOCK = 128  # Pallas TPU flash attention's default tiles: prompts are padded to a multiple of it
HIGHEST = jax.lax.Precision.HIGHEST
# what a kernel raises at trace time for a case it does not take; `auto` then tries the next implementation
REFUSALS = (NotImplementedError, RuntimeError, ValueError, TypeError, ImportError)
NEXT = {"cudnn": "pallas_gpu", "pallas_gpu": "blockwise", "pallas_tpu": "blockwise"}


def choose_implementation(backend: str, dtype, platform: str | None = None) -> str:
    """The prefill implementation that kernel `backend` ("auto", "pallas", "pallas_tpu", "reference") runs on `platform`
    ("cpu", "gpu", "tpu"; default: jax.default_backend()) for activations of `dtype`."""
    platform = platform or jax.default_backend()
    if backend == "reference" or platform == "cpu":
        return "reference"
    if platform == "gpu":
        return "cudnn" if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "pallas_gpu"
    if platform == "tpu":
        return "pallas_tpu"
    return "blockwise"


def _check(impl: str) -> str:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown prefill implementation {impl!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
    return impl


# ------------------------------------------------------------------------------------------- whole prompt

def causal_attention(q, k, v, q_positions, k_positions, *, scale=None, return_key_mass=False, backend="auto",
                     implementation: str | None = None):
    """Prefill attention: q [B,T,Hq,D], k/v [B,Tk,Hkv,D], positions [B,T] / [B,Tk] (-1 = padding) -> out [B,T,Hq,D]
    in q's dtype (and with `return_key_mass` the key mass [B,Hkv,Tk], max over the group, as the reference).

    `implementation` forces one implementation (errors propagate); by default `backend` picks one and a kernel
    that refuses the case at trace time hands it to the next (cudnn -> pallas_gpu -> blockwise)."""
    impl = _check(implementation or choose_implementation(backend, q.dtype))
    if impl == "reference":
        return reference.causal_attention(q, k, v, q_positions, k_positions, scale=scale,
                                          return_key_mass=return_key_mass)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if implementation is None and q_positions is not k_positions:  # not the prompt layout the kernels assume
        impl = "blockwise"
    while True:
        try:
            out = _prompt_attention(impl, q, k, v, q_positions, k_positions, scale)
            break
        except REFUSALS:
            if implementation is not None or impl not in NEXT:
                raise
            impl = NEXT[impl]
    out = jnp.where((q_positions >= 0)[..., None, None], out, 0).astype(q.dtype)
    if not return_key_mass:
        return out
    mass = key_mass(q, k, q_positions, k_positions, scale=scale, implementation="blockwise")
    return out, jnp.max(mass, axis=2)  # [B, Hkv, Tk]


def _prompt_attention(impl, q, k, v, q_positions, k_positions, scale):
    if impl == "cudnn":
        return sdpa_prompt(q, k, v, q_positions, scale)
    if impl == "pallas_gpu":
        return pallas_gpu_prompt(q, k, v, q_positions, scale)
    if impl == "pallas_tpu":
        return pallas_tpu_prompt(q, k, v, q_positions, scale)
    return blockwise_attention(q, k, v, q_positions, k_positions, scale=scale)[0]


def sdpa_prompt(q, k, v, positions, scale, sdpa: str = "cudnn"):
    """A right-padded prompt through `jax.nn.dot_product_attention` (`sdpa="xla"` runs the same call on a CPU):
    causal by index, each row's keys and queries cut at its length."""
    lengths = jnp.sum(positions >= 0, axis=1, dtype=jnp.int32)  # [B] (>= 1 for every prompt row)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, query_seq_lengths=lengths,
                                        key_value_seq_lengths=lengths, implementation=sdpa)


def pallas_gpu_prompt(q, k, v, positions, scale, interpret: bool = False):
    """A right-padded prompt through JAX's Pallas GPU flash attention: padding is a second segment (a padding key
    is seen by padding queries only), GQA by repeating the KV heads (O(T) memory), T padded to the tile."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    b, t, hq, _ = q.shape
    group = hq // k.shape[2]
    block = GPU_BLOCK if t >= GPU_BLOCK else 64
    padded = _round_up(t, block)
    q, k, v = (_pad_axis(x, 1, padded) for x in (q, k, v))
    segments = (_pad_axis(positions, 1, padded, -1) >= 0).astype(jnp.int32)  # [B, T']
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)  # [B, T', Hq, D]
    out = gpu_attention.mha(q, k, v, segments, sm_scale=scale, causal=True,
                            block_sizes=gpu_attention.BlockSizes(block_q=block, block_k=block), interpret=interpret)
    return out[:, :t]


def pallas_tpu_prompt(q, k, v, positions, scale):
    """A right-padded prompt through JAX's Pallas TPU flash attention: heads-major [B, H, T, D], padding as segment
    0, GQA by repeating the KV heads, T padded to TPU_BLOCK."""
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_attention

    b, t, hq, _ = q.shape
    group = hq // k.shape[2]
    padded = _round_up(t, TPU_BLOCK)
    q, k, v = (_pad_axis(x, 1, padded).transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, H, T', D]
    k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
    segments = (_pad_axis(positions, 1, padded, -1) >= 0).astype(jnp.int32)  # [B, T']
    out = tpu_attention.flash_attention(q, k, v, segment_ids=tpu_attention.SegmentIds(segments, segments),
                                        causal=True, sm_scale=scale)
    return out.transpose(0, 2, 1, 3)[:, :t]


# -------------------------------------------------------------------------------------- blockwise (jnp)

def blockwise_attention(q, k, v, q_positions, k_positions, *, scale=None, block_q: int = BLOCK_Q,
                        block_k: int = BLOCK_K):
    """Attention by position (as the reference) without Tq x Tk scores: q [B,T,Hq,D], k/v [B,Tk,Hkv,D] ->
    (out [B,T,Hq,D] float32, lse [B,T,Hq] float32: log-sum-exp of the scaled scores, -inf where a row sees no key;
    such rows give zeros)."""
    return _blockwise(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), q_positions, k_positions,
                      q.shape[-1] ** -0.5 if scale is None else scale, block_q, block_k)


def _blockwise(q, k, v, q_positions, k_positions, scale, block_q, block_k):
    """`blockwise_attention` with heads-major keys k/v [B,Hkv,Tk,D] (the page pool's layout). A query block stops
    at the last key any of its queries can see (a traced trip count): a causal prompt does about half the work."""
    b, t, hq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    group = hq // hkv
    bq, bk = min(block_q, _round_up(t, 8)), min(block_k, _round_up(tk, 8))
    tq_pad, tk_pad = _round_up(t, bq), _round_up(tk, bk)
    q_positions = _pad_axis(q_positions, 1, tq_pad, -1)
    k_positions = _pad_axis(k_positions, 1, tk_pad, -1)  # [B, Tk']
    k, v = _pad_axis(k, 2, tk_pad), _pad_axis(v, 2, tk_pad)  # [B, Hkv, Tk', D]
    nq = tq_pad // bq
    q_blocks = _pad_axis(q, 1, tq_pad).reshape(b, nq, bq, hkv, group, d).transpose(1, 0, 3, 4, 2, 5)
    pos_blocks = q_positions.reshape(b, nq, bq).transpose(1, 0, 2)  # [nq, B, bq]
    key_ids = jnp.arange(tk_pad)

    def query_block(args):
        qb, qp = args  # [B, Hkv, G, bq, D], [B, bq]
        seen = (k_positions >= 0) & (k_positions <= jnp.max(qp))  # [B, Tk']: keys some query here may see
        num_blocks = (jnp.max(jnp.where(seen, key_ids, -1)) + bk) // bk

        def key_block(j, carry):
            row_max, row_sum, acc = carry
            kj = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2)  # [B, Hkv, bk, D]
            vj = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)
            kp = jax.lax.dynamic_slice_in_dim(k_positions, j * bk, bk, axis=1)  # [B, bk]
            scores = jnp.einsum("bhgqd,bhkd->bhgqk", qb, kj, precision=HIGHEST,
                                preferred_element_type=jnp.float32) * scale  # [B, Hkv, G, bq, bk]
            visible = (kp[:, None, :] <= qp[:, :, None]) & (kp >= 0)[:, None, :]  # [B, bq, bk]
            scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
            new_max = jnp.maximum(row_max, jnp.max(scores, axis=-1))  # [B, Hkv, G, bq]
            shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
            p = jnp.exp(scores - shift[..., None])
            correction = jnp.exp(row_max - shift)
            row_sum = row_sum * correction + jnp.sum(p, axis=-1)
            acc = acc * correction[..., None] + jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(v.dtype), vj,
                                                           precision=HIGHEST, preferred_element_type=jnp.float32)
            return new_max, row_sum, acc

        rows = (b, hkv, group, bq)
        init = (jnp.full(rows, -jnp.inf), jnp.zeros(rows), jnp.zeros(rows + (d,)))
        row_max, row_sum, acc = jax.lax.fori_loop(0, num_blocks, key_block, init)
        out = acc / jnp.where(row_sum > 0, row_sum, 1.0)[..., None]
        lse = jnp.where(row_sum > 0, row_max + jnp.log(jnp.where(row_sum > 0, row_sum, 1.0)), -jnp.inf)
        return out, lse  # [B, Hkv, G, bq, D], [B, Hkv, G, bq]

    out, lse = jax.lax.map(query_block, (q_blocks, pos_blocks))  # [nq, B, Hkv, G, bq, (D)]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, tq_pad, hq, d)[:, :t]
    lse = lse.transpose(1, 0, 4, 2, 3).reshape(b, tq_pad, hq)[:, :t]
    return out, lse


def key_mass(q, k, q_positions, k_positions, *, scale=None, backend="auto", implementation: str | None = None):
    """Per query head, the mass each key received summed over the valid queries: q [B,T,Hq,D], k [B,Tk,Hkv,D] ->
    [B,Hkv,G,Tk] float32. The reference on CPU; elsewhere `blockwise_key_mass` (any positions)."""
    impl = implementation or choose_implementation(backend, q.dtype)
    if _check(impl) == "reference":
        return reference.key_mass(q, k, q_positions, k_positions, scale=scale)
    return blockwise_key_mass(q, k, q_positions, k_positions, scale=scale)


def blockwise_key_mass(q, k, q_positions, k_positions, *, scale=None, block_q: int | None = None):
    """`reference.key_mass` in one pass over blocks of queries: a block's softmax rows are whole (all Tk keys), so
    no log-sum-exp from the attention pass is needed. O(block_q x Tk) scores per head: `mass_block` sizes the block
    to MASS_BLOCK_BYTES. The scores are computed once more than the attention did (H2O pays one extra QK^T)."""
    return _blockwise_key_mass(q, k.transpose(0, 2, 1, 3), q_positions, k_positions,
                               q.shape[-1] ** -0.5 if scale is None else scale, block_q)


def mass_block(batch: int, q_heads: int, keys: int) -> int:
    """Query rows per block of the key-mass pass: the largest power of two up to BLOCK_Q whose float32 scores
    [batch, q_heads, rows, keys] fit MASS_BLOCK_BYTES (at least one row)."""
    rows = BLOCK_Q
    while rows > 1 and batch * q_heads * rows * keys * 4 > MASS_BLOCK_BYTES:
        rows //= 2
    return rows


def _blockwise_key_mass(q, k, q_positions, k_positions, scale, block_q):
    """`blockwise_key_mass` with heads-major keys k [B,Hkv,Tk,D]."""
    b, t, hq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    group = hq // hkv
    bq = min(block_q or mass_block(b, hq, tk), _round_up(t, 8))
    padded = _round_up(t, bq)
    nq = padded // bq
    q_blocks = _pad_axis(q, 1, padded).reshape(b, nq, bq, hkv, group, d).transpose(1, 0, 3, 4, 2, 5)
    pos_blocks = _pad_axis(q_positions, 1, padded, -1).reshape(b, nq, bq).transpose(1, 0, 2)  # [nq, B, bq]
    key_valid = (k_positions >= 0)[:, None, :]  # [B, 1, Tk]

    def query_block(total, args):
        qb, qp = args  # [B, Hkv, G, bq, D], [B, bq]
        scores = jnp.einsum("bhgqd,bhkd->bhgqk", qb, k, precision=HIGHEST,
                            preferred_element_type=jnp.float32) * scale  # [B, Hkv, G, bq, Tk]
        visible = (k_positions[:, None, :] <= qp[:, :, None]) & key_valid  # [B, bq, Tk]
        probs = jax.nn.softmax(jnp.where(visible[:, None, None], scores, reference.MASK_VALUE), axis=-1)
        return total + jnp.sum(probs * (qp >= 0)[:, None, None, :, None], axis=3), None

    total, _ = jax.lax.scan(query_block, jnp.zeros((b, hkv, group, tk), jnp.float32), (q_blocks, pos_blocks))
    return total  # [B, Hkv, G, Tk]


# ------------------------------------------------------------------------------------ chunked prefill

def chunk_start(positions):
    """Position of a chunk's first token: positions [B, C] -> [] int32 (rows past their prompt are all -1; every
    other row starts at the same position). -1 when no row has a token in the chunk."""
    return jnp.max(positions[:, 0])


def prior_positions(start, batch: int, num_keys: int):
    """Positions of the pool's flat keys before a chunk at `start` (page j in slot j): [B, N], i at i < start,
    else -1."""
    ids = jnp.arange(num_keys, dtype=jnp.int32)
    return jnp.broadcast_to(jnp.where(ids < start, ids, -1), (batch, num_keys))


def flat_pool(pool, layer=None, dtype=None):
    """[B,Hkv,S,P,D] (or [L,...] read at `layer`) -> heads-major keys [B,Hkv,S*P,D]: flat index = slot * P + offset.
    An FP8 pool comes back in `dtype` (the queries' dtype): its pages are computed with, not stored, in FP8."""
    if layer is not None:
        pool = pool[layer]
    b, hkv, s, p, d = pool.shape
    if dtype is not None:
        pool = pool.astype(reference.compute_dtype(pool.dtype, dtype))
    return pool.reshape(b, hkv, s * p, d)


def chunk_attention(q, k, v, positions, k_pool, v_pool, *, layer=None, scale=None, backend="auto",
                    implementation: str | None = None):
    """A prompt chunk's queries over the prompt so far and the chunk itself, causally.

    q [B,C,Hq,D], k/v [B,C,Hkv,D]: the chunk (RoPE applied); positions [B,C]: c0, c0+1, ... then -1, with the same c0
    in every row that has tokens in the chunk. k_pool/v_pool [B,Hkv,S,P,D] (or stacked [L,...] with `layer`) hold
    positions 0 .. c0-1 at flat index = position (page j in slot j); what they hold from c0 on is not read.
    -> out [B,C,Hq,D] in q's dtype, zeros on padding rows.

    reference: one T x Tk softmax over [pool | chunk]; otherwise two attentions of the chunk's queries, over the pool
    (all of it visible) and over the chunk (causal), merged by their log-sum-exp: cuDNN on a GPU, `blockwise`
    elsewhere or when cuDNN refuses (f32, odd head dims)."""
    impl = _check(implementation or choose_implementation(backend, q.dtype))
    k_prior, v_prior = flat_pool(k_pool, layer, q.dtype), flat_pool(v_pool, layer, q.dtype)  # [B, Hkv, N, D]
    b, hkv, n, _ = k_prior.shape
    start = chunk_start(positions)
    before = prior_positions(start, b, n)  # [B, N]
    if impl == "reference":
        keys = jnp.concatenate([k_prior.transpose(0, 2, 1, 3), k.astype(k_prior.dtype)], axis=1)  # [B, N + C, Hkv, D]
        values = jnp.concatenate([v_prior.transpose(0, 2, 1, 3), v.astype(v_prior.dtype)], axis=1)
        key_positions = jnp.concatenate([before, positions], axis=1)
        out = reference.causal_attention(q, keys, values, positions, key_positions, scale=scale)
        return jnp.where((positions >= 0)[..., None, None], out, 0).astype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    parts = None
    if impl == "cudnn":
        try:
            parts = cudnn_chunk_parts(q, k, v, positions, k_prior, v_prior, start, scale)
        except REFUSALS:
            if implementation is not None:
                raise
    if parts is None:
        k_self, v_self = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, C, D]
        parts = (_blockwise(q, k_prior, v_prior, positions, before, scale, BLOCK_Q, BLOCK_K),
                 _blockwise(q, k_self, v_self, positions, positions, scale, BLOCK_Q, BLOCK_K))
    out = merge_attention(*parts)
    return jnp.where((positions >= 0)[..., None, None], out, 0).astype(q.dtype)


def merge_attention(part_a, part_b):
    """Attention of the same queries over two disjoint key sets -> the attention over their union.

    Each part is (out [B,T,Hq,D], lse [B,T,Hq] float32, -inf where the part has no visible key) -> out float32."""
    (out_a, lse_a), (out_b, lse_b) = part_a, part_b
    top = jnp.maximum(lse_a, lse_b)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weight_a, weight_b = jnp.exp(lse_a - top), jnp.exp(lse_b - top)  # [B, T, Hq]
    total = jnp.maximum(weight_a + weight_b, 1e-30)
    merged = weight_a[..., None] * out_a.astype(jnp.float32) + weight_b[..., None] * out_b.astype(jnp.float32)
    return merged / total[..., None]


def cudnn_chunk_parts(q, k, v, positions, k_prior, v_prior, start, scale):
    """The two parts of `chunk_attention` through cuDNN: the chunk's queries over the pool's first `start` keys
    (heads-major BNTH layout, read in place) and over the chunk itself (causal). Each -> (out [B,C,Hq,D], lse
    [B,C,Hq] float32). JAX's cuDNN module is used directly: `jax.nn.dot_product_attention(return_residual=True)`
    rounds the log-sum-exp to bf16, too coarse to merge two parts (errors of ~3% in their weights)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    b, c = positions.shape
    counts = jnp.maximum(jnp.sum(positions >= 0, axis=1, dtype=jnp.int32), 1)  # [B]; a row without tokens is dropped
    out_self, lse_self = cudnn.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), q_seqlen=counts, kv_seqlen=counts, scale=scale,
        mask_type=cudnn.MaskType.PADDING_CAUSAL, qkv_layout="BTNH", return_residual=True)
    prior = jnp.full((b,), jnp.maximum(start, 1), jnp.int32)  # >= 1; start == 0 (no pool yet) is dropped below
    out_prior, lse_prior = cudnn.dot_product_attention(
        q.transpose(0, 2, 1, 3), k_prior.astype(q.dtype), v_prior.astype(q.dtype),
        q_seqlen=jnp.full((b,), c, jnp.int32), kv_seqlen=prior, scale=scale, mask_type=cudnn.MaskType.PADDING,
        qkv_layout="BNTH", return_residual=True)  # out [B, Hq, C, D], lse [B, Hq, C]
    lse_prior = jnp.where(start > 0, lse_prior.astype(jnp.float32), -jnp.inf).transpose(0, 2, 1)  # [B, C, Hq]
    return ((out_prior.transpose(0, 2, 1, 3), lse_prior),
            (out_self, lse_self.astype(jnp.float32).transpose(0, 2, 1)))


def chunk_key_mass(q, positions, k_pool, *, layer=None, scale=None, backend="auto",
                   implementation: str | None = None):
    """`key_mass` of a chunk's queries over the pool, once the chunk is written into it: q [B,C,Hq,D],
    positions [B,C], k_pool [B,Hkv,S,P,D] (or [L,...] with `layer`) holding each row's positions 0 .. its last
    position in the chunk at flat index = position -> [B,Hkv,G,S*P] float32."""
    keys = flat_pool(k_pool, layer, q.dtype)  # [B, Hkv, N, D]
    b, _, n, _ = keys.shape
    ids = jnp.arange(n, dtype=jnp.int32)
    last = jnp.max(positions, axis=1, keepdims=True)  # [B, 1]: -1 for rows without tokens here (no valid query)
    key_positions = jnp.where(ids[None, :] <= last, ids[None, :], -1)  # [B, N]
    impl = _check(implementation or choose_implementation(backend, q.dtype))
    if impl == "reference":
        return reference.key_mass(q, keys.transpose(0, 2, 1, 3), positions, key_positions, scale=scale)
    return _blockwise_key_mass(q, keys, positions, key_positions, q.shape[-1] ** -0.5 if scale is None else scale,
                               None)


# -------------------------------------------------------------------------------------------- helpers

def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_axis(x, axis: int, size: int, value=0):
    """Pad `axis` of x at the end up to `size` with `value`."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)
