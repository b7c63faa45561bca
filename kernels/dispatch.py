"""Attention and page-scoring kernels behind one dispatch entry.

`backend="reference"` is the plain-jnp oracle (kernels/reference.py), also the CPU path.
`backend="pallas"` is kernels/pallas_gpu.py (Pallas, Triton lowering), run in interpret mode off-GPU; on a Hopper
GPU its decode attention over bf16 / f16 pages (with or without a slot list) is kernels/mosaic_gpu.py (Pallas,
Mosaic GPU lowering: TMA copies and wgmma), faster than Triton at the bf16 bench shapes (docs/kernels.md).
`backend="pallas_tpu"` is kernels/pallas_tpu.py (Pallas, Mosaic TPU lowering), run in TPU interpret mode off-TPU.
`backend="auto"` picks `AUTO_ON_GPU` on a GPU, `AUTO_ON_TPU` on a TPU and the reference elsewhere; shapes the
Pallas kernels do not take (their `supports` functions) fall back to the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import mosaic_gpu, pallas_gpu, pallas_tpu, prefill, reference

APPEND_ARRAYS = reference.APPEND_ARRAYS
REFRESH_ARRAYS = reference.REFRESH_ARRAYS
BACKENDS = ("auto", "reference", "pallas", "pallas_tpu")
AUTO_ON_GPU = "pallas"  # measured faster than XLA for every kernel and bench shape (docs/kernels.md)
AUTO_ON_TPU = "pallas_tpu"  # not measured yet (no TPU): a bandwidth model in docs/kernels.md


def resolve(backend: str) -> str:
    """The backend that `backend` means on this machine ("reference", "pallas" or "pallas_tpu")."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return {"gpu": AUTO_ON_GPU, "tpu": AUTO_ON_TPU}.get(jax.default_backend(), "reference")
    return backend


def _interpret() -> bool:
    return jax.default_backend() != "gpu"


def _tpu_interpret() -> bool:
    return jax.default_backend() != "tpu"


def decode_attention(q, k, v, fill, slots=None, *, layer=None, live_slots=None, scale=None, backend: str = "auto"):
    """q [B,Hq,D], k/v [B,Hkv,S,P,D], fill [B,Hkv,S] -> (out [B,Hq,D], mass [B,Hkv,S or K]).

    With `layer` (a scalar, may be traced), k/v are stacked over layers [L,B,Hkv,S,P,D] and layer `layer` is
    read: the Pallas kernel reads it in place, where slicing it first would copy a pool per layer and step.
    `live_slots` [B] (optional): slots >= live_slots[b] are empty in every head of sequence b, so the GPU kernel
    skips them; the result is the same with or without it.
    """
    stacked = layer is not None
    chosen = resolve(backend)
    if chosen == "pallas" and not _interpret() and mosaic_gpu.available() and mosaic_gpu.supports(
            q, k, slots, stacked=stacked):
        return mosaic_gpu.decode_attention(q, k, v, fill, slots, layer=layer, live_slots=live_slots, scale=scale)
    if chosen == "pallas" and pallas_gpu.supports(q, k, slots, stacked=stacked):
        return pallas_gpu.decode_attention(q, k, v, fill, slots, layer=layer, live_slots=live_slots, scale=scale,
                                           interpret=_interpret())
    if chosen == "pallas_tpu":
        pallas_tpu.check_attention_args(q, k, v, fill, slots, stacked=stacked)
        if pallas_tpu.supports(q, k, slots, stacked=stacked):
            return pallas_tpu.decode_attention(q, k, v, fill, slots, layer=layer, scale=scale,
                                               interpret=_tpu_interpret())
    if stacked:
        k, v = jnp.asarray(k)[layer], jnp.asarray(v)[layer]
    return reference.decode_attention(q, k, v, fill, slots, scale=scale)


def page_scores(q, kmin, kmax, fill, *, layer=None, backend: str = "auto"):
    """q [B,Hq,D], kmin/kmax [B,Hkv,S,D] (or [L,B,Hkv,S,D] with `layer`), fill [B,Hkv,S] -> U [B,Hkv,S]
    (-inf on empty slots)."""
    chosen = resolve(backend)
    if chosen == "pallas" and pallas_gpu.page_scores_supported(q, kmin):
        return pallas_gpu.page_scores(q, kmin, kmax, fill, layer=layer, interpret=_interpret())
    if chosen == "pallas_tpu" and pallas_tpu.page_scores_supported(q, kmin, stacked=layer is not None):
        return pallas_tpu.page_scores(q, kmin, kmax, fill, layer=layer, interpret=_tpu_interpret())
    if layer is not None:
        kmin, kmax = jnp.asarray(kmin)[layer], jnp.asarray(kmax)[layer]
    return reference.page_scores(q, kmin, kmax, fill)


def top_k_mask(scores, k: int, *, backend: str = "auto"):
    """scores [B,Hkv,S] -> bool [B,Hkv,S]: the min(k, S) highest of each row (ties: lower slot first)."""
    chosen = resolve(backend)
    if chosen == "pallas" and pallas_gpu.top_k_supported(scores):
        return pallas_gpu.top_k_mask(scores, k, interpret=_interpret())
    if chosen == "pallas_tpu" and pallas_tpu.top_k_supported(scores):
        return pallas_tpu.top_k_mask(scores, k, interpret=_tpu_interpret())
    return reference.top_k_mask(scores, k)


def append_token(pool, layer, k, v, positions, victim, page_size: int, *, backend: str = "auto"):
    """Append one token per (sequence, KV head) to `layer` of the stacked pool (the arrays in APPEND_ARRAYS):
    k/v [B,Hkv,D], positions [B], victim [B,Hkv] -> (the new arrays, slot written [B,Hkv], evicted or -1 [B,Hkv]).

    The Pallas GPU kernel writes everything in one launch, in place (the reference: one scatter per array)."""
    chosen = resolve(backend)
    if chosen == "pallas" and pallas_gpu.append_supported(pool, k):
        return pallas_gpu.append_token(pool, layer, k, v, positions, victim, page_size=page_size,
                                       interpret=_interpret())
    return reference.append_token(pool, layer, k, v, positions, victim, page_size)


def refresh_top_half(q, pool, layer, positions, page_size: int, *, backend: str = "auto"):
    """RaaS's default refresh of `layer`: the top half of the evictable pages by the Quest bound get stamp =
    the position. q [B,Hq,D]; pool: the stacked arrays in REFRESH_ARRAYS; positions [B] -> stamp [L,B,Hkv,S].

    The Pallas GPU kernel scores, ranks and stamps in one launch, in place; rows longer than it keeps in registers
    (pallas_gpu.MAX_REFRESH_SLOTS) take the reference: the page-score kernel, a sort and XLA fusions."""
    chosen = resolve(backend)
    if chosen == "pallas" and pallas_gpu.refresh_supported(q, pool):
        return pallas_gpu.refresh_top_half(q, pool, layer, positions, page_size=page_size, interpret=_interpret())
    if chosen in ("pallas", "pallas_tpu"):
        scores = page_scores(q, pool["kmin"], pool["kmax"], pool["fill"][layer], layer=layer, backend=backend)
        return reference.refresh_top_half(q, pool, layer, positions, page_size, scores=scores)
    return reference.refresh_top_half(q, pool, layer, positions, page_size)


def causal_attention(q, k, v, q_positions, k_positions, *, scale=None, return_key_mass=False,
                     backend: str = "auto"):
    """Prefill attention: q [B,T,Hq,D], k/v [B,Tk,Hkv,D] -> [B,T,Hq,D] (and key mass [B,Hkv,Tk]).

    No T x T scores off-CPU: cuDNN / Pallas flash attention for a prompt (kernels/prefill.py); the reference on CPU
    and with backend="reference"."""
    resolve(backend)
    return prefill.causal_attention(q, k, v, q_positions, k_positions, scale=scale,
                                    return_key_mass=return_key_mass, backend=backend)


def key_mass(q, k, q_positions, k_positions, *, scale=None, backend: str = "auto"):
    """H2O's prefill statistic per query head: q [B,T,Hq,D], k [B,Tk,Hkv,D] -> [B,Hkv,G,Tk], the softmax mass each
    key received summed over the valid queries (blockwise, O(block x Tk) memory, off-CPU)."""
    resolve(backend)
    return prefill.key_mass(q, k, q_positions, k_positions, scale=scale, backend=backend)


def chunk_attention(q, k, v, positions, k_pool, v_pool, *, layer=None, scale=None, backend: str = "auto"):
    """Chunked prefill: a chunk q [B,C,Hq,D], k/v [B,C,Hkv,D] at positions [B,C] attends the prompt so far (pool
    [B,Hkv,S,P,D] or [L,...] with `layer`, page j in slot j) and itself, causally -> [B,C,Hq,D]."""
    resolve(backend)
    return prefill.chunk_attention(q, k, v, positions, k_pool, v_pool, layer=layer, scale=scale, backend=backend)


def chunk_key_mass(q, positions, k_pool, *, layer=None, scale=None, backend: str = "auto"):
    """`key_mass` of a chunk's queries over the pool once the chunk is written: -> [B,Hkv,G,S*P]."""
    resolve(backend)
    return prefill.chunk_key_mass(q, positions, k_pool, layer=layer, scale=scale, backend=backend)
