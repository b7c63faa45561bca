#!/usr/bin/env python
"""Time the per-layer decode bookkeeping with and without its Pallas kernels (append, RaaS refresh).

    python scripts/bookkeeping_variants.py --variants xla,append,fused --configs raas:1,raas:64,dense:1,dense:64

Every decode step appends one token per (sequence, KV head) and layer (k/v into its page, the page's key bounds,
fill, start, stamp, pinned, cur), and RaaS then stamps the top half of its evictable pages by the Quest bound.
The variants compute the same values:
  xla     the append as XLA fusions and one scatter per array; the refresh as the page-score kernel, a sort and
          XLA fusions (the library before the bookkeeping kernels)
  append  the append as one Pallas kernel (kernels/pallas_gpu.py append_token); the refresh as in xla
  fused   both as one Pallas kernel each (append_token, refresh_top_half): the library's default on a GPU
First each variant's cache after 12 decode steps of the tiny model is checked equal to `xla`'s (RaaS and Dense);
then each (policy:batch) is timed with bench.time_decode at --position on the --model shapes.
(c9b2f70 timed other scatter layouts with this script's ancestor, append_variants.py: performance.md section 15.)
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from raas_jax import bench, configure_gpu, policies
from raas_jax.generate import DECODE_CHUNK, DecodeState, Generator, SamplingParams
from raas_jax.kernels import pallas_gpu

APPEND_SUPPORTED, REFRESH_SUPPORTED = pallas_gpu.append_supported, pallas_gpu.refresh_supported
REFRESH = pallas_gpu.refresh_top_half
KERNELS = {"xla": (False, False), "append": (True, False), "fused": (True, True)}  # (append, refresh) in Pallas


def use_variant(kind: str) -> None:
    """Switch the bookkeeping kernels on or off by their `supported` checks (the dispatch's fallback is the XLA
    path). `fused:C` sums the refresh's page bound over C channels at a time (the kernel's `channels`)."""
    name, _, channels = kind.partition(":")
    if name not in KERNELS:
        raise ValueError(f"unknown variant {kind!r}; choose from {', '.join(KERNELS)} (fused:C for C channels)")
    append, refresh = KERNELS[name]
    pallas_gpu.append_supported = APPEND_SUPPORTED if append else (lambda *a: False)
    pallas_gpu.refresh_supported = REFRESH_SUPPORTED if refresh else (lambda *a: False)
    pallas_gpu.refresh_top_half = functools.partial(REFRESH, channels=int(channels)) if channels else REFRESH


def check(kinds: list[str]) -> None:
    """Every variant's cache after 12 decode steps equals the first's (tiny model, RaaS and Dense; the Pallas kernels
    run in interpret mode off a GPU)."""
    cfg = bench.MODEL_SHAPES["tiny"]
    params = bench.random_params(cfg, jnp.float32)
    for policy in (policies.RaaS(budget=32, page_size=4, backend="pallas"),
                   policies.Dense(page_size=4, backend="pallas")):
        results = {}
        for kind in kinds:
            use_variant(kind)
            gen = Generator(cfg, jnp.float32, policy)
            cache = bench.synthetic_cache(policy, cfg, 3, 50, 12, 14, jnp.float32)
            state = DecodeState(cache, jnp.zeros((3, DECODE_CHUNK), jnp.int32), jnp.arange(3, dtype=jnp.int32),
                                jnp.full((3,), 50, jnp.int32), jnp.zeros((3,), bool), jnp.int32(0), jnp.int32(0),
                                jax.random.PRNGKey(0))
            state = gen.decode(params, state, jnp.int32(12), jnp.asarray([-1], jnp.int32),
                               SamplingParams(jnp.float32(0), jnp.int32(0), jnp.float32(1)))
            results[kind] = jax.tree.map(np.asarray, state.cache)
        for kind in kinds[1:]:
            for name in results[kinds[0]]:
                np.testing.assert_array_equal(results[kind][name], results[kinds[0]][name], err_msg=f"{kind} {name}")
        print(f"check {type(policy).__name__}: {', '.join(kinds[1:])} equal to {kinds[0]} after 12 steps")
    use_variant("fused")


def main() -> None:
    configure_gpu()
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--variants", default="xla,append,fused")
    ap.add_argument("--configs", default="raas:1,raas:64,dense:1,dense:64")
    ap.add_argument("--position", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    kinds = args.variants.split(",")
    check(kinds)
    cfg = bench.MODEL_SHAPES[args.model]
    params = bench.random_params(cfg, jnp.bfloat16)
    table = {}
    for kind in kinds:
        use_variant(kind)
        for config in args.configs.split(","):
            name, batch = config.split(":")
            policy, batch = bench.default_policies()[name], int(batch)
            gen = Generator(cfg, jnp.bfloat16, policy, unroll_layers=jax.default_backend() != "cpu")
            cache = bench.synthetic_cache(policy, cfg, batch, args.position, 128, args.steps + 2, jnp.bfloat16)
            seconds, _, _ = bench.time_decode(gen, params, cache, batch, args.position, args.steps)
            cache = None
            table[kind, config] = seconds * 1e3
            print(f"{kind:8s} {config:10s} {seconds * 1e3:7.2f} ms/step", flush=True)
    configs = args.configs.split(",")
    print(f"\n{'variant':8s} " + " ".join(f"{c:>10s}" for c in configs))
    for kind in kinds:
        print(f"{kind:8s} " + " ".join(f"{table[kind, c]:10.2f}" for c in configs))


if __name__ == "__main__":
    main()
