"""Token sampling: greedy, temperature, top-k and top-p, all with traced parameters (no recompiles)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_tokens(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> jax.Array:
    """logits [B, V] float32 -> tokens [B] int32.

    temperature == 0 is greedy; top_k == 0 and top_p == 1 switch those filters off.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(_):
        scaled = logits / jnp.maximum(temperature, 1e-6)
        sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]  # [B, V] descending
        vocab = logits.shape[-1]
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
        kth = sorted_logits[:, k - 1][:, None]  # [B, 1] smallest kept logit under top-k
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted entry
        keep_sorted = (before < top_p) & (jnp.arange(vocab) < k)  # the top entry is always kept
        pth = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        filtered = jnp.where(scaled >= jnp.maximum(kth, pth), scaled, -jnp.inf)
        return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

    # greedy decoding skips the sort over the vocabulary
    return jax.lax.cond(temperature > 0, sample, lambda _: greedy, None)
