"""How much device memory does the compiled decode need, and what are its largest buffers?

    raas-jax bench memory --policy raas --position 2048 --batches 64,635 [--model llama3-8b]
        [--memory-fraction 0.92] [--dump DIR]

Compiles `Generator.decode` for abstract inputs (nothing is allocated) at each batch and prints XLA's buffer
sizes: arguments (weights + decode state), outputs, the part of the outputs aliased to the donated state,
and temporaries, next to the exact cache size. A decode that updates its pool in place has temporaries far
below one pool. Then the largest batch that fits the device's allocator limit (`raas_jax.decode.memory.largest_batch`).
With --dump, XLA's memory-usage report of each compile (largest buffers first) is written under DIR and its
top lines printed.
"""

import argparse
import os
import sys
from pathlib import Path

from raas_jax.validation import at_least, fraction, int_list


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="raas-jax bench memory", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--policy", default="raas")
    ap.add_argument("--position", type=at_least(1), default=2048)
    ap.add_argument("--batches", type=int_list(1), default=(64, 635))
    ap.add_argument("--memory-fraction", type=fraction, default=None)
    ap.add_argument("--dump", type=Path, default=None, help="write XLA's buffer reports of each compile here")
    args = ap.parse_args(argv)
    if args.memory_fraction is not None:
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(args.memory_fraction)
    if args.dump is not None:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={args.dump}"
                                   " --xla_dump_hlo_module_re=.*_decode.*").strip()
    import jax
    import jax.numpy as jnp

    from raas_jax import configure_gpu
    from raas_jax.bench import e2e as bench
    from raas_jax.decode.cache import cache_bytes
    from raas_jax.decode.generate import Generator

    configure_gpu()
    cfg = bench.MODEL_SHAPES[args.model]
    policy = bench.default_policies()[args.policy]
    gen = Generator(cfg, jnp.bfloat16, policy, unroll_layers=jax.default_backend() != "cpu")
    gib = 2**30
    print(f"{args.model} {args.policy} N={args.position}: GiB per batch (arguments include the weights)")
    print(f"{'B':>5} {'cache':>8} {'k pool':>8} {'args':>8} {'out':>8} {'aliased':>8} {'temp':>8} {'total':>8}")
    for batch in args.batches:
        state = bench.abstract_decode_args(gen, batch, args.position)[1]
        m = bench.decode_memory(gen, batch, args.position)
        print(f"{batch:5d} {cache_bytes(state.cache) / gib:8.2f} {state.cache.k.size * 2 / gib:8.2f} "
              f"{m['argument'] / gib:8.2f} {m['output'] / gib:8.2f} {m['alias'] / gib:8.2f} {m['temp'] / gib:8.2f} "
              f"{m['total'] / gib:8.2f}", flush=True)
        pools = (state.cache.k, state.cache.v, state.cache.kmin, state.cache.kmax)
        write = bench.write_random_layer.lower(pools, state.cache.fill, jax.ShapeDtypeStruct((), jnp.int32),
                                               0).compile().memory_analysis()
        print(f"      synthetic pool, one layer written in place: arguments {write.argument_size_in_bytes / gib:.2f}, "
              f"aliased {write.alias_size_in_bytes / gib:.2f}, temp {write.temp_size_in_bytes / gib:.2f} GiB")
    if args.dump is not None:
        for report in sorted(args.dump.glob("*memory-usage-report.txt")):
            print(f"--- {report.name}")
            print("\n".join(report.read_text().splitlines()[:14]))
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    if limit:
        batch, sizes = bench.largest_decode_batch(gen, args.position, limit)
        print(f"device limit {limit / gib:.1f} GiB: largest batch {batch} "
              f"(compiled at {[s['batch'] for s in sizes]}: {[round(s['total'] / gib, 2) for s in sizes]} GiB)")


if __name__ == "__main__":
    sys.exit(main())
