"""Sampling filters against brute force."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raas_jax.decode.sampling import sample_tokens


def allowed_set(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> set[int]:
    """Brute force: the tokens top-k and top-p (nucleus) filtering keep."""
    order = np.argsort(-logits, kind="stable")
    keep = set(order[:top_k].tolist()) if top_k > 0 else set(order.tolist())
    probs = np.exp((logits - logits.max()) / temperature)
    probs /= probs.sum()
    nucleus, mass = set(), 0.0
    for tok in order:
        if mass >= top_p:
            break
        nucleus.add(int(tok))
        mass += probs[tok]
    return keep & nucleus


FILTERS = dict(seed=st.integers(0, 10_000), top_k=st.integers(0, 12), top_p=st.sampled_from([0.1, 0.5, 0.9, 1.0]),
               temperature=st.sampled_from([0.5, 1.0, 2.0]))


@settings(max_examples=10, deadline=None)
@given(**FILTERS)
def test_samples_stay_in_the_filtered_set(seed, top_k, top_p, temperature):
    check_filtered_set(seed, top_k, top_p, temperature)


@pytest.mark.slow
@settings(max_examples=15, deadline=None)  # 25 in all, as before the split
@given(**FILTERS)
def test_samples_stay_in_the_filtered_set_more_cases(seed, top_k, top_p, temperature):
    check_filtered_set(seed, top_k, top_p, temperature)


@jax.jit
def _sample_64(logits, keys, temperature, top_k, top_p):
    """64 draws, compiled once (the filters are traced, as in the decode loop): op by op, each example took seconds."""
    return jax.vmap(lambda k: sample_tokens(logits, k, temperature, top_k, top_p))(keys)


def check_filtered_set(seed, top_k, top_p, temperature):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(1, 40)).astype(np.float32) * 3
    keys = jax.random.split(jax.random.PRNGKey(seed), 64)
    sample = _sample_64(jnp.asarray(logits), keys, jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
    allowed = allowed_set(logits[0], temperature, top_k, top_p)
    assert set(np.asarray(sample).ravel().tolist()) <= allowed


def test_greedy_and_distribution():
    logits = jnp.log(jnp.array([[0.1, 0.6, 0.3]], jnp.float32))
    greedy = sample_tokens(logits, jax.random.PRNGKey(0), jnp.float32(0), jnp.int32(0), jnp.float32(1))
    assert int(greedy[0]) == 1
    keys = jax.random.split(jax.random.PRNGKey(1), 4000)
    draws = jax.vmap(lambda k: sample_tokens(logits, k, jnp.float32(1), jnp.int32(0), jnp.float32(1)))(keys)
    freq = np.bincount(np.asarray(draws).ravel(), minlength=3) / 4000
    np.testing.assert_allclose(freq, [0.1, 0.6, 0.3], atol=0.03)
