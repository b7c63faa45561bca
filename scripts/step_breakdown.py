#!/usr/bin/env python
"""Split a decode step's time: the model without attention cache (weights + per-layer ops) vs a RaaS step.

    python scripts/step_breakdown.py --model llama3-8b --batches 1,64 [--unrolled-only] [--variants]

(a) `no-cache`: one token through the model with cache=None (weights, norms, MLP, attention to itself),
    64 times inside one jitted fori_loop; (b) `raas`: 64 RaaS decode steps from a synthetic full pool.
`--variants` also times, at the same batch and N=4096, the fixed-budget policies that do less per step:
StreamingLLM (append + attention + eviction, no scores) and RaaS with score=exact (no page bounds read).
"""

import argparse
import time

import jax
import jax.numpy as jnp

from raas_jax import bench, configure_gpu
from raas_jax.generate import Generator
from raas_jax.models.transformer import Transformer
from raas_jax.policies import RaaS, StreamingLLM


def time_no_cache(cfg, params, batch, unroll, steps=64):
    module = Transformer(cfg, jnp.bfloat16, unroll_layers=unroll)

    @jax.jit
    def loop(params, tokens):
        def body(i, tokens):
            logits, _ = module.apply({"params": params}, tokens[:, None], jnp.zeros_like(tokens)[:, None] + i)
            return jnp.argmax(logits[:, 0], -1).astype(jnp.int32)
        return jax.lax.fori_loop(0, steps, body, tokens)

    tokens = jnp.zeros((batch,), jnp.int32)
    loop(params, tokens).block_until_ready()
    start = time.perf_counter()
    loop(params, tokens).block_until_ready()
    return (time.perf_counter() - start) / steps


def main():
    configure_gpu()  # cuBLAS for the decode matmuls, as `raas-jax` does
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--unrolled-only", action="store_true", help="skip the rolled layer scan")
    ap.add_argument("--variants", action="store_true", help="also StreamingLLM and RaaS(score=exact)")
    args = ap.parse_args()
    cfg = bench.MODEL_SHAPES[args.model]
    params = bench.random_params(cfg, jnp.bfloat16)
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    policy = RaaS(budget=1024)
    for unroll in (True,) if args.unrolled_only else (False, True):
        gen = Generator(cfg, jnp.bfloat16, policy, unroll_layers=unroll)
        for batch in map(int, args.batches.split(",")):
            plain = time_no_cache(cfg, params, batch, unroll)
            cache = bench.synthetic_cache(policy, cfg, batch, 4096, 128, 66, jnp.bfloat16)
            raas, _, _ = bench.time_decode(gen, params, cache, batch, 4096, 64)
            print(f"{args.model} B={batch} unroll={unroll}: no-cache step {plain * 1e3:.2f} ms, RaaS step "
                  f"{raas * 1e3:.2f} ms, weights alone at 4.0 TB/s {weights / 4.0e12 * 1e3:.2f} ms", flush=True)
            if args.variants:
                for variant in (StreamingLLM(budget=1024), RaaS(budget=1024, score="exact")):
                    cache = bench.synthetic_cache(variant, cfg, batch, 4096, 128, 66, jnp.bfloat16)
                    seconds, _, _ = bench.time_decode(Generator(cfg, jnp.bfloat16, variant, unroll_layers=unroll),
                                                      params, cache, batch, 4096, 64)
                    print(f"  {variant!r}: {seconds * 1e3:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
