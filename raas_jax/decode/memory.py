"""How many rows fit on a device: the compiled decode's bytes, read from XLA's buffer assignment.

Nothing is allocated: the decode is lowered and compiled for abstract inputs (shapes and shardings only), and its
memory analysis gives arguments (weights + decode state) + outputs not aliased to a donated argument +
temporaries. The bytes are affine in the batch, so two compiles give the line and a third checks the answer.
`raas-jax bench e2e` sizes its largest batch this way, and the serving engine its rows (`--max-rows auto`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from raas_jax.decode.generate import Generator, data_parallelism, decode_state
from raas_jax.decode.sharding import cache_spec, param_shardings


def abstract_decode_args(gen: Generator, params: Any, batch: int, num_slots: int) -> tuple:
    """Shapes (jax.ShapeDtypeStruct) of `gen.decode`'s arguments for `batch` rows of `num_slots` pages each.
    `params`: the parameters or their shapes (jax.eval_shape of them). Under a mesh (a ShardedPolicy) the shapes
    carry the shardings, so sizes come out per device."""
    s = jax.ShapeDtypeStruct
    policy, cfg = gen.policy, gen.cfg
    cache = jax.eval_shape(lambda: policy.init(cfg, batch, num_slots, gen.dtype))
    params = jax.tree.map(lambda x: s(x.shape, x.dtype), params)
    mesh = getattr(policy, "mesh", None)
    if mesh is not None:  # the shards each device holds
        cache = jax.tree.map(lambda x: s(x.shape, x.dtype, sharding=NamedSharding(mesh, cache_spec(x.ndim))), cache)
        params = jax.tree.map(lambda x, sharding: s(x.shape, x.dtype, sharding=sharding), params,
                              param_shardings(params, mesh))
    rows = jnp.zeros((batch,), jnp.int32)
    state = jax.eval_shape(lambda: decode_state(None, rows, rows)).replace(cache=cache)
    return params, state, s((), jnp.int32), s((1,), jnp.int32)


def decode_bytes(gen: Generator, params: Any, batch: int, num_slots: int) -> dict:
    """Device bytes the compiled decode call needs for `batch` rows of `num_slots` pages: a dict of XLA's
    argument / output / alias / temp sizes and their `total` (per device under a mesh)."""
    compiled = gen.decode.lower(*abstract_decode_args(gen, params, batch, num_slots)).compile()
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return {"batch": batch, "argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
            "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes, "total": total}


def largest_batch(gen: Generator, params: Any, num_slots: int, limit: int, *, reserve: int = 2 * 2**30,
                  probes: tuple[int, int] = (16, 64), cap: int = 4096) -> tuple[int, list[dict]]:
    """The largest batch (at most `cap` per data shard) of `num_slots`-page rows whose compiled decode fits in
    `limit` bytes less `reserve` (allocator slack and fragmentation). Two compiles at `probes` with the layer loop
    rolled (seconds, not the unrolled build's) give the line; the real decode is then compiled at the answer to
    check it, stepping down 5% at a time until it fits. Returns (batch, the compiled sizes in the order measured)."""
    rolled = dataclasses.replace(gen, unroll_layers=False)
    data = data_parallelism(gen.policy)  # a sharded batch is a multiple of the mesh's data axis
    small, large = (decode_bytes(rolled, params, b, num_slots) for b in probes)
    per_row = (large["total"] - small["total"]) / (probes[1] - probes[0])
    fixed = small["total"] - per_row * probes[0]
    batch = min(cap * data, int((limit - reserve - fixed) // per_row)) if per_row > 0 else cap * data
    batch -= batch % data
    sizes = [small, large]
    while batch > 0:
        check = decode_bytes(gen, params, batch, num_slots)
        sizes.append(check)
        if check["total"] <= limit - reserve:
            break
        batch = int(batch * 0.95) // data * data
    return batch, sizes


def device_memory_limit() -> int | None:
    """The first device's allocator limit in bytes (None where the backend reports none, e.g. the CPU)."""
    return (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
