#!/usr/bin/env python
"""Effective bandwidth of the decode-shaped matmuls ([B, 4096] x [4096, 14336] bf16) under XLA.

32 distinct weight matrices (1.9 GB in all, far past L2) are multiplied in turn inside one jitted loop;
bandwidth = weight bytes read / time. Compare with the device copy bandwidth (~4.0 TB/s measured).
"""

import sys
import time

import jax
import jax.numpy as jnp


def main(batch: int) -> None:
    weights = jax.random.normal(jax.random.PRNGKey(0), (32, 4096, 14336), jnp.bfloat16)
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, 4096), jnp.bfloat16)

    @jax.jit
    def loop(x, weights):
        def body(i, acc):
            return acc + (x @ weights[i])[:, :4096] * 1e-3
        return jax.lax.fori_loop(0, 32, body, x)

    loop(x, weights).block_until_ready()
    start = time.perf_counter()
    for _ in range(5):
        out = loop(x, weights)
    out.block_until_ready()
    seconds = (time.perf_counter() - start) / 5
    print(f"B={batch}: {weights.nbytes / seconds / 1e12:.2f} TB/s effective over {weights.nbytes / 2**30:.2f} GiB "
          f"({seconds * 1e3:.2f} ms)", flush=True)


if __name__ == "__main__":
    for b in map(int, (sys.argv[1] if len(sys.argv) > 1 else "1,64").split(",")):
        main(b)
