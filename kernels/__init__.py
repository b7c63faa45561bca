"""Attention and page-scoring kernels behind one dispatch entry.

`backend="reference"` is the plain-jnp oracle (kernels/reference.py), used on every platform until
the Pallas backends land; `backend="auto"` picks the fastest available for the current platform.
"""

from __future__ import annotations

from . import reference

BACKENDS = ("auto", "reference")


def _resolve(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return "reference"


def decode_attention(q, k, v, fill, slots=None, *, scale=None, backend: str = "auto"):
    """q [B,Hq,D], k/v [B,Hkv,S,P,D], fill [B,Hkv,S] -> (out [B,Hq,D], mass [B,Hkv,S or K])."""
    _resolve(backend)
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
