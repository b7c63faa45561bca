#!/usr/bin/env python
"""Time the decode bookkeeping kernels alone (kernels/pallas_gpu.py append_token, refresh_top_half) per layer call.

    python scripts/bookkeeping_kernels.py --batches 1,64,816 [--slots 64] [--channels 32,128] [--warps 4,8]
        [--heads 1,2,4] [--stages 1,2] [--gather-q 0,1]

On the Llama-3-8B cache shape (4 of its layers, 8 KV heads, group 4, head dim 128, pages of 16) with `--slots` pages
per head: each refresh tuning (channel chunk, warps, KV heads per program,
pipeline stages of its loop over them) is checked against the reference (rows whose stamps differ:
near-ties only) and timed, then the append. Per call: microseconds and the bandwidth of the bytes it must read
(refresh: the layer's key bounds; append: the `fill` row it scans). Prints a table.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from raas_jax.kernels import dispatch as kernels
from raas_jax.kernels import pallas_gpu


def pool_arrays(rng, layers, b, hkv, s, page, d):
    shape = (layers, b, hkv, s)
    kmin = jnp.asarray(rng.normal(size=shape + (d,)), jnp.bfloat16)
    return {"k": jnp.zeros(shape + (page, d), jnp.bfloat16), "v": jnp.zeros(shape + (page, d), jnp.bfloat16),
            "kmin": kmin, "kmax": (kmin.astype(jnp.float32) + 1).astype(jnp.bfloat16),
            "fill": jnp.asarray(rng.integers(page - 1, page + 1, shape), jnp.int32),
            "start": jnp.zeros(shape, jnp.int32), "stamp": jnp.asarray(rng.integers(0, 100, shape), jnp.int32),
            "pinned": jnp.asarray(rng.random(shape) < 0.2), "cur": jnp.zeros(shape[:-1], jnp.int32)}


def time_loop(step, pool, repeats: int = 50) -> tuple[float, dict]:
    """Seconds per call of `step` (pool -> pool), `repeats` calls chained in one jitted loop (no dispatch cost)."""
    loop = jax.jit(lambda p: jax.lax.fori_loop(0, repeats, lambda i, p: step(p), p, unroll=True),
                   donate_argnums=0)  # unrolled: a rolled loop on a GPU waits on the host each iteration
    pool = jax.block_until_ready(loop(pool))
    start = time.perf_counter()
    pool = jax.block_until_ready(loop(pool))
    return (time.perf_counter() - start) / repeats, pool


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,64,816")
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--channels", default="32,64,128")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--heads", default="1", help="KV heads per program")
    ap.add_argument("--stages", default="1", help="Triton pipeline stages of the loop over a program's heads")
    ap.add_argument("--gather-q", default="0", help="0,1: query rows padded by XLA (0) or gathered in the kernel (1)")
    args = ap.parse_args()
    layers, hkv, group, page, d = 4, 8, 4, 16, 128  # the kernels touch one layer: 4 keep B = 816 small
    rng = np.random.default_rng(0)
    print(f"{'B':>5s} {'kernel':40s} {'us':>8s} {'GB/s':>8s} {'rows differ':>12s}")
    for b in map(int, args.batches.split(",")):
        pool = pool_arrays(rng, layers, b, hkv, args.slots, page, d)
        q = jnp.asarray(rng.normal(size=(b, hkv * group, d)), jnp.bfloat16)
        positions = jnp.full((b,), 5000, jnp.int32)
        layer = jnp.int32(layers - 1)
        bound_bytes = 2 * b * hkv * args.slots * d * 2  # kmin + kmax of one layer
        interpret = jax.default_backend() != "gpu"  # a smoke test off a GPU
        tunings = [pallas_gpu.RefreshTuning(c, w, h, st, bool(g)) for c in map(int, args.channels.split(","))
                   for w in map(int, args.warps.split(",")) for h in map(int, args.heads.split(","))
                   for st in map(int, args.stages.split(",")) for g in map(int, args.gather_q.split(","))]
        want = np.asarray(kernels.refresh_top_half(q, pool, layer, positions, page, backend="reference"))
        for tuning in tunings:
            def refresh(p, t=tuning):
                return pallas_gpu.refresh_top_half(q, p, layer, positions, page_size=page, tuning=t,
                                                   interpret=interpret)
            differ = int((np.asarray(jax.jit(refresh)(pool)) != want).any(-1).sum())
            seconds, pool = time_loop(lambda p: {**p, "stamp": refresh(p)}, pool)
            name = (f"refresh C={tuning.channels} w={tuning.num_warps} heads={tuning.heads_per_program} "
                    f"s={tuning.num_stages}" + (" gather q" if tuning.gather_q else ""))
            print(f"{b:5d} {name:40s} {seconds * 1e6:8.1f} {bound_bytes / seconds / 1e9:8.0f} {differ:12d}",
                  flush=True)
        k = jnp.asarray(rng.normal(size=(b, hkv, d)), jnp.bfloat16)
        victim = jnp.ones((b, hkv), jnp.int32)

        def append(p):
            written, _, _ = pallas_gpu.append_token(p, layer, k, k, positions, victim, page_size=page,
                                                    interpret=interpret)
            return {**p, **written}

        seconds, pool = time_loop(append, pool)
        row_bytes = b * hkv * args.slots * 4  # the fill row it scans
        print(f"{b:5d} {'append':40s} {seconds * 1e6:8.1f} {row_bytes / seconds / 1e9:8.0f} {'':>12s}", flush=True)


if __name__ == "__main__":
    main()
