"""Token sampling: greedy, temperature, top-k and top-p, all with traced parameters (no recompiles).

Parameters are scalars (one setting for the batch) or arrays over rows [B] (each row its own request's settings:
greedy and sampled rows in one batch); the key is one PRNG key or one per row [B, 2].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_tokens(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> jax.Array:
    """logits [B, V] float32 -> tokens [B] int32.

    temperature == 0 is greedy; top_k == 0 and top_p == 1 switch those filters off. `temperature`, `top_k`,
    `top_p`: [] or [B]; `key`: one key, or [B, 2] (a key per row).
    """
    batch, vocab = logits.shape
    temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (batch,))  # [B]
    top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (batch,))  # [B]
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (batch,))  # [B]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]

    def sample(_):
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]  # [B, V]
        sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]  # [B, V] descending
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)  # [B]
        kth = jnp.take_along_axis(sorted_logits, (k - 1)[:, None], axis=1)  # [B, 1] smallest kept under top-k
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted entry
        keep_sorted = (before < top_p[:, None]) & (jnp.arange(vocab)[None, :] < k[:, None])  # top entry always kept
        pth = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
        filtered = jnp.where(scaled >= jnp.maximum(kth, pth), scaled, -jnp.inf)  # [B, V]
        if key.ndim == 2:  # a key per row: a row's draws do not depend on the other rows
            drawn = jax.vmap(jax.random.categorical)(key, filtered)
        else:
            drawn = jax.random.categorical(key, filtered, axis=-1)
        return jnp.where(temperature > 0, drawn.astype(jnp.int32), greedy)

    # an all-greedy batch skips the sort over the vocabulary
    return jax.lax.cond(jnp.any(temperature > 0), sample, lambda _: greedy, None)
