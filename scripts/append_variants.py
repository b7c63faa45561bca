#!/usr/bin/env python
"""Time ways of writing one decode token into the stacked page pool (the per-layer append of cache.append_token).

    python scripts/append_variants.py --variants scatter,unique,flat,rows --configs raas:1,raas:64,dense:1

A decode step appends one token per (sequence, KV head) and layer: k and v into its page, and the page's
metadata (key bounds, fill, start, stamp, pinned). The variants write the same values (cache.token_write's) differently:
  scatter  the library's append (cache.append_token): 8 scatters with [layer, b, h, slot(, offset)] indices
  unique   the same scatters, told the indices are unique and sorted (no conflict handling)
  flat     every array viewed as rows ([L*B*H*S*P, D], [L*B*H*S, D], [L*B*H*S]) and written by one 1-D index
  rows     k/v/bounds as `unique`; the [B, Hkv, S] metadata rewritten as whole layer rows (select + update slice)
First every variant's cache after 12 decode steps of the tiny model is checked equal to `scatter`'s; then each
(policy:batch) is timed with bench.time_decode at --position on the --model shapes.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from raas_jax import bench, cache as cache_lib, configure_gpu, policies
from raas_jax.generate import DECODE_CHUNK, DecodeState, Generator, SamplingParams

ORIGINAL = cache_lib.append_token


def append_variant(kind: str):
    if kind == "scatter":
        return ORIGINAL

    def append(cache, layer, k, v, positions, victim, page_size):
        write = cache_lib.token_write(cache, layer, k, v, positions, victim, page_size)  # the library's values
        slot, offset = write.slot, write.offset
        b, hkv = slot.shape
        bi, hi = jnp.arange(b)[:, None], jnp.arange(hkv)[None, :]
        out = dict(cache)
        index = (layer, bi, hi, slot)
        hint = dict(unique_indices=True, indices_are_sorted=True)
        if kind == "flat":
            n_l, n_b, n_h, n_s = cache["fill"].shape
            row = (((layer * n_b + bi) * n_h + hi) * n_s + slot).reshape(-1)  # [B*Hkv], increasing
            for name, value in write.pages.items():
                pool, width = cache[name], cache[name].shape[-1]
                flat_index = row * page_size + offset.reshape(-1) if name in ("k", "v") else row
                out[name] = pool.reshape(-1, width).at[flat_index].set(value.reshape(-1, width), **hint
                                                                       ).reshape(pool.shape)
            for name, value in write.meta.items():
                out[name] = cache[name].reshape(-1).at[row].set(value.reshape(-1), **hint).reshape(cache[name].shape)
        else:
            for name, value in write.pages.items():
                out[name] = cache[name].at[index + ((offset,) if name in ("k", "v") else ())].set(value, **hint)
            if kind == "unique":
                for name, value in write.meta.items():
                    out[name] = cache[name].at[index].set(value, **hint)
            elif kind == "rows":
                chosen = jnp.arange(cache["fill"].shape[-1]) == slot[..., None]  # [B, Hkv, S]
                for name, value in write.meta.items():
                    out[name] = cache[name].at[layer].set(jnp.where(chosen, value[..., None], cache[name][layer]))
            else:
                raise ValueError(f"unknown variant {kind!r}")
        out["cur"] = cache["cur"].at[layer].set(slot)
        return out, slot, write.evicted

    return append


def check(kinds: list[str]) -> None:
    """Every variant's cache after 12 decode steps equals the library's (tiny model, RaaS and Dense)."""
    cfg = bench.MODEL_SHAPES["tiny"]
    params = bench.random_params(cfg, jnp.float32)
    for policy in (policies.RaaS(budget=32, page_size=4), policies.Dense(page_size=4)):
        results = {}
        for kind in kinds:
            policies.append_token = append_variant(kind)
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
    policies.append_token = ORIGINAL


def main() -> None:
    configure_gpu()
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--variants", default="scatter,unique,flat,rows")
    ap.add_argument("--configs", default="raas:1,raas:64,dense:1")
    ap.add_argument("--position", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    kinds = args.variants.split(",")
    check(kinds)
    cfg = bench.MODEL_SHAPES[args.model]
    params = bench.random_params(cfg, jnp.bfloat16)
    table = {}
    for kind in kinds:
        policies.append_token = append_variant(kind)
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
