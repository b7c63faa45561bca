"""Inputs shared by the kernel tests of both Pallas backends (tests/kernels/test_kernels.py, tests/kernels/test_pallas_tpu.py)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

# log2(slots), k, seed, kind of scores
TOP_K_CASES = (st.integers(4, 8), st.integers(1, 300), st.integers(0, 2**31 - 1),
               st.sampled_from(["ties", "normal", "inf"]))


def top_k_scores(log_slots: int, seed: int, kind: str) -> np.ndarray:
    """[2, 3, 2^log_slots] float32 scores: normal, with many ties (lower slots must win), or with -inf (empty
    slots) and +inf (a forced current slot)."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(2, 3, 2**log_slots)).astype(np.float32)
    if kind == "ties":
        scores = np.round(scores * 2) / 2
    elif kind == "inf":
        scores[..., rng.integers(0, scores.shape[-1], 5)] = -np.inf
        scores[..., 0] = np.inf
    return scores


# (GQA group, head_dim, page size) of the decode-attention tests of every kernel backend
ATTENTION_CASES = [(1, 64, 16), (4, 128, 16), (7, 64, 32), (8, 128, 32)]
# the cases of the fast set (`-m "not slow"`): no grouping and an odd group (padded query rows) over pages of 32;
# the power-of-two groups with head dim 128 run in the full set
FAST_ATTENTION_CASES = [(1, 64, 16), (7, 64, 32)]


def attention_params(cases=ATTENTION_CASES):
    """`cases` for @pytest.mark.parametrize("group,head_dim,page", ...): those not in FAST_ATTENTION_CASES slow."""
    return [case if case in FAST_ATTENTION_CASES else pytest.param(*case, marks=pytest.mark.slow) for case in cases]


def page_pool(rng, b, hkv, group, s, page, d):
    """q [b, hkv*group, d], k/v [b, hkv, s, page, d] float32 and fill [b, hkv, s] with partly filled and empty
    slots, and one head with no resident token at all."""
    q = rng.normal(size=(b, hkv * group, d)).astype(np.float32)
    k = rng.normal(size=(b, hkv, s, page, d)).astype(np.float32)
    v = rng.normal(size=(b, hkv, s, page, d)).astype(np.float32)
    fill = rng.integers(0, page + 1, (b, hkv, s)).astype(np.int32)
    fill[1, 0] = 0
    return q, k, v, fill


def random_pool(rng, layers, b, hkv, s, page, d, dtype=jnp.float32, kv_dtype=None):
    """Stacked pool arrays (kernels.APPEND_ARRAYS) with random contents; some rows' current page full. Pages in
    `kv_dtype` (default `dtype`), key bounds in `dtype`."""
    fill = rng.integers(0, page + 1, (layers, b, hkv, s)).astype(np.int32)
    pages = kv_dtype or dtype
    return {"k": jnp.asarray(rng.normal(size=(layers, b, hkv, s, page, d)), dtype).astype(pages),
            "v": jnp.asarray(rng.normal(size=(layers, b, hkv, s, page, d)), dtype).astype(pages),
            "kmin": jnp.asarray(rng.normal(size=(layers, b, hkv, s, d)), dtype),
            "kmax": jnp.asarray(rng.normal(size=(layers, b, hkv, s, d)), dtype),
            "fill": jnp.asarray(fill), "start": jnp.asarray(rng.integers(0, 500, fill.shape), jnp.int32),
            "stamp": jnp.asarray(rng.integers(0, 500, fill.shape), jnp.int32),
            "pinned": jnp.asarray(rng.random(fill.shape) < 0.3),
            "cur": jnp.asarray(rng.integers(0, s, (layers, b, hkv)), jnp.int32)}
