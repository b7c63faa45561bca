"""Attention and page-scoring kernels behind one dispatch entry.

`backend="reference"` is the plain-jnp oracle (kernels/reference.py). `backend="pallas"` is the Pallas
(Triton-lowered) decode attention of kernels/pallas_gpu.py, run in interpret mode off-GPU; it has only been
checked in interpret mode so far, so `backend="auto"` still resolves to the reference everywhere.
"""

from __future__ import annotations

import jax

from . import pallas_gpu, reference

BACKENDS = ("auto", "reference", "pallas")


def _resolve(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return "reference" if backend == "auto" else backend


def decode_attention(q, k, v, fill, slots=None, *, scale=None, backend: str = "auto"):
    """q [B,Hq,D], k/v [B,Hkv,S,P,D], fill [B,Hkv,S] -> (out [B,Hq,D], mass [B,Hkv,S or K])."""
    if _resolve(backend) == "pallas" and slots is None and pallas_gpu.supports(q, k):
        return pallas_gpu.decode_attention(q, k, v, fill, scale=scale, interpret=jax.default_backend() != "gpu")
    return reference.decode_attention(q, k, v, fill, slots, scale=scale)


def page_scores(q, kmin, kmax, fill, *, backend: str = "auto"):
    """q [B,Hq,D], kmin/kmax [B,Hkv,S,D], fill [B,Hkv,S] -> U [B,Hkv,S] (-inf on empty slots)."""
    _resolve(backend)
    return reference.page_scores(q, kmin, kmax, fill)


def causal_attention(q, k, v, q_positions, k_positions, *, scale=None, return_key_mass=False,
                     backend: str = "auto"):
    """Prefill attention: q [B,T,Hq,D], k/v [B,Tk,Hkv,D] -> [B,T,Hq,D] (and key mass [B,Hkv,Tk])."""
    _resolve(backend)
    return reference.causal_attention(q, k, v, q_positions, k_positions, scale=scale,
                                      return_key_mass=return_key_mass)
