"""Which compiled decode-loop instructions touch whole KV pools (copies, transposes, layer slices)?

    raas-jax bench hlo --policy raas --batch 64 --position 16384 [--model llama3-8b]

Prints, per instruction kind, how many instructions produce an array of the full stacked pool shape
or of one layer's pool shape. A decode step should write one token per layer in place: any copy or
transpose of those shapes inside the loop is traffic the roofline does not count.
"""

import argparse
import collections
import dataclasses
import re

import jax
import jax.numpy as jnp

from raas_jax import configure_gpu
from raas_jax.bench import e2e as bench
from raas_jax.decode.generate import Generator
from raas_jax.validation import at_least


def main(argv: list[str] | None = None) -> None:
    configure_gpu()  # cuBLAS for the decode matmuls, as `raas-jax` does
    ap = argparse.ArgumentParser(prog="raas-jax bench hlo", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--policy", default="raas")
    ap.add_argument("--batch", type=at_least(1), default=64)
    ap.add_argument("--position", type=at_least(1), default=16384)
    ap.add_argument("--rolled", action="store_true", help="keep the layer scan rolled (generation unrolls on GPU)")
    ap.add_argument("--kv-dtype", default="auto", help="page dtype (cache.KV_DTYPES), e.g. fp8")
    args = ap.parse_args(argv)
    cfg = bench.MODEL_SHAPES[args.model]
    policy = dataclasses.replace(bench.default_policies()[args.policy], kv_dtype=args.kv_dtype)
    gen = Generator(cfg, jnp.bfloat16, policy, unroll_layers=not args.rolled and jax.default_backend() != "cpu")
    decode_args = bench.abstract_decode_args(gen, args.batch, args.position, headroom=0)
    text = gen.decode.lower(*decode_args).compile().as_text()
    shapes, b = decode_args[1].cache, args.batch
    k_shape = shapes.k.shape  # [L, B, Hkv, S, P, D]
    flat = (*k_shape[:3], k_shape[3] * k_shape[4], k_shape[5])  # the Pallas kernel's [.., S*P, D] view
    packed = (*flat[:-1], flat[-1] // 2)  # an FP8 pool read as uint16 pairs (pallas_gpu.AttentionTuning.pack_fp8)
    kinds = {",".join(map(str, k_shape)): "stacked", ",".join(map(str, k_shape[1:])): "layer",
             ",".join(map(str, flat)): "stacked flat", ",".join(map(str, flat[1:])): "layer flat",
             ",".join(map(str, packed)): "stacked u16",
             ",".join(map(str, packed[1:])): "layer u16"}
    full = ",".join(map(str, k_shape))
    counts = collections.Counter()
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?[\w.-]+ = \w+\[([\d,]+)\]\S* (\w[\w-]*)\(", line)
        if m and m.group(1) in kinds:
            counts[(kinds[m.group(1)], m.group(2))] += 1
    print(f"{args.policy} B={b} N={args.position}: pool {full}")
    for (kind, op), n in sorted(counts.items()):
        print(f"  {kind:12s} {op:28s} {n}")


if __name__ == "__main__":
    main()
