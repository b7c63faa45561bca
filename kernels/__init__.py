"""Attention and page-scoring kernels behind one dispatch entry.

`backend="reference"` is the plain-jnp oracle (kernels/reference.py), also the CPU/TPU path.
`backend="pallas"` is kernels/pallas_gpu.py (Pallas, Triton lowering), run in interpret mode off-GPU.
`backend="auto"` picks `AUTO_ON_GPU` on a GPU and the reference elsewhere; shapes the Pallas kernels do not
take fall back to the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import pallas_gpu, reference

BACKENDS = ("auto", "reference", "pallas")
AUTO_ON_GPU = "pallas"  # measured faster than XLA for every kernel and bench shape (docs/performance.md 5, 8)


def resolve(backend: str) -> str:
    """The backend that `backend` means on this machine ("reference" or "pallas")."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return AUTO_ON_GPU if jax.default_backend() == "gpu" else "reference"
    return backend


def _interpret() -> bool:
    return jax.default_backend() != "gpu"


def decode_attention(q, k, v, fill, slots=None, *, layer=None, scale=None, backend: str = "auto"):
    """q [B,Hq,D], k/v [B,Hkv,S,P,D], fill [B,Hkv,S] -> (out [B,Hq,D], mass [B,Hkv,S or K]).

    With `layer` (a scalar, may be traced), k/v are stacked over layers [L,B,Hkv,S,P,D] and layer `layer` is
    read: the Pallas kernel reads it in place, where slicing it first would copy a pool per layer and step.
    """
    stacked = layer is not None
    if resolve(backend) == "pallas" and pallas_gpu.supports(q, k, slots, stacked=stacked):
        return pallas_gpu.decode_attention(q, k, v, fill, slots, layer=layer, scale=scale, interpret=_interpret())
    if stacked:
        k, v = jnp.asarray(k)[layer], jnp.asarray(v)[layer]
    return reference.decode_attention(q, k, v, fill, slots, scale=scale)


def page_scores(q, kmin, kmax, fill, *, layer=None, backend: str = "auto"):
    """q [B,Hq,D], kmin/kmax [B,Hkv,S,D] (or [L,B,Hkv,S,D] with `layer`), fill [B,Hkv,S] -> U [B,Hkv,S]
    (-inf on empty slots)."""
    if resolve(backend) == "pallas" and pallas_gpu.page_scores_supported(q, kmin):
        return pallas_gpu.page_scores(q, kmin, kmax, fill, layer=layer, interpret=_interpret())
    if layer is not None:
        kmin, kmax = jnp.asarray(kmin)[layer], jnp.asarray(kmax)[layer]
    return reference.page_scores(q, kmin, kmax, fill)


def top_k_mask(scores, k: int, *, backend: str = "auto"):
    """scores [B,Hkv,S] -> bool [B,Hkv,S]: the min(k, S) highest of each row (ties: lower slot first)."""
    if resolve(backend) == "pallas" and pallas_gpu.top_k_supported(scores):
        return pallas_gpu.top_k_mask(scores, k, interpret=_interpret())
    return reference.top_k_mask(scores, k)


def causal_attention(q, k, v, q_positions, k_positions, *, scale=None, return_key_mass=False,
                     backend: str = "auto"):
    """Prefill attention: q [B,T,Hq,D], k/v [B,Tk,Hkv,D] -> [B,T,Hq,D] (and key mass [B,Hkv,Tk])."""
    resolve(backend)
    return reference.causal_attention(q, k, v, q_positions, k_positions, scale=scale,
                                      return_key_mass=return_key_mass)
