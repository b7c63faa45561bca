"""Prefill throughput and memory: the flash prefill (whole prompt through cuDNN / Pallas) and the chunked
prefill against the T x T reference attention they replace, Llama-3-8B shapes with random bf16 weights.

    raas-jax bench prefill --out $OUT/prefill.json           # one H200, ~5 min
    raas-jax bench prefill --model-size tiny --out /tmp/prefill.json          # CPU smoke run

Every configuration prefills full-length random prompts into a RaaS pool (budget = prompt + 2 pages: the prompt
pinned, as a real run holds it) and samples the first token: `Generator.start` for a whole prompt, the
`chunked_prefill` loop for chunks. Each is compiled ahead of time (so the compiled call's memory can be read), run
once to warm up and once timed. Reported per configuration:
  tokens_per_s    batch * prompt / seconds of the timed run
  xla_peak_gib    what the compiled call holds at its peak: arguments + outputs + temporaries - donated aliases
                  (for chunks: one chunk call, the largest); the weights (15 GiB for 8B) are among the arguments
  process_peak_gib  the device's peak_bytes_in_use so far (monotone over the run: for the first rows only)
The reference rows try the shapes from the largest down, per batch, and stop at the first that runs: larger ones
are recorded as "OOM". Before the timings, a small model of the same shapes (2 layers) checks on the device that
the three paths give the same logits (`check` in the JSON; "MISMATCH" is printed if not).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from raas_jax.validation import at_least, finite

PAGE = 16


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run measures: the model, the new path's shapes, the chunk, the reference's shapes per batch."""

    model: str
    cases: tuple[tuple[int, int], ...]  # (batch, prompt length) for the flash and chunked paths
    chunk: int
    reference: tuple[tuple[int, tuple[int, ...]], ...]  # (batch, prompt lengths from the largest down)
    check: tuple[int, tuple[int, ...], int]  # (layers, prompt lengths, chunk) of the correctness check


PLANS = {
    "llama3-8b": Plan("llama3-8b", ((1, 32768), (16, 8192)), 2048,
                      ((1, (32768, 16384, 8192, 4096)), (16, (8192, 4096, 2048, 1024))), (2, (3000, 1700), 1024)),
    "tiny": Plan("tiny", ((1, 512), (4, 256)), 128, ((1, (512, 256)), (4, (256, 128))), (2, (300, 170), 64)),
}


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="raas-jax bench prefill", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write (rewritten after every row)")
    ap.add_argument("--model-size", default="llama3-8b", choices=sorted(PLANS), help="tiny: a CPU smoke run")
    ap.add_argument("--cases", default=None, help="BxT,... for the new paths (default: 1x32768,16x8192)")
    ap.add_argument("--chunk", type=at_least(PAGE), default=None, help="prefill chunk in tokens (default 2048)")
    ap.add_argument("--skip-reference", action="store_true", help="do not time the T x T reference path")
    ap.add_argument("--time-limit", type=finite(1.0), default=330.0,
                    help="skip a row that would end later than this many seconds after the start, judged by the "
                         "longest row so far (default 330)")
    args = ap.parse_args(argv)
    plan = PLANS[args.model_size]
    if args.cases:
        try:
            cases = tuple((int(b), int(t)) for b, t in (case.split("x") for case in args.cases.split(",")))
            if any(b < 1 or t < 1 for b, t in cases):
                raise ValueError
        except ValueError:
            ap.error(f"--cases takes BATCHxLENGTH,... (e.g. 1x32768,16x8192), got {args.cases!r}")
        plan = dataclasses.replace(plan, cases=cases)
    if args.chunk:
        if args.chunk % PAGE:
            ap.error(f"--chunk must be a multiple of the page size {PAGE}")
        plan = dataclasses.replace(plan, chunk=args.chunk)
    return args, plan


def is_oom(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def compiled_peak(compiled) -> float | None:
    """GiB a compiled call holds at its peak (XLA's buffer assignment), None where the backend does not say."""
    try:
        m = compiled.memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    return total / 2**30


def process_peak() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def prompt_arrays(cfg, batch, length, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (batch, length)).astype(np.int32)
    return tokens, np.full((batch,), length, np.int32)


def decode_inputs(batch):
    import jax.numpy as jnp

    from raas_jax.decode.generate import RowSettings, batch_keys

    greedy = RowSettings.make(batch, max_new_tokens=1)
    return jnp.zeros((batch,), bool), jnp.asarray([-1], jnp.int32), greedy, batch_keys(0, batch)


def run_whole(gen, params, tokens, lengths, num_slots):
    """Compile `Generator.start` ahead of time; -> (seconds of the timed run, xla_peak_gib)."""
    import jax
    import jax.numpy as jnp

    done, eos, sampling, key = decode_inputs(tokens.shape[0])
    args = (params, jnp.asarray(tokens), jnp.asarray(lengths), done, eos, sampling, key)
    compiled = gen.start.lower(*args, num_slots=num_slots).compile()
    peak = compiled_peak(compiled)
    seconds = []
    for _ in range(2):  # warm-up, timed
        start = time.perf_counter()
        state = compiled(*args)
        jax.block_until_ready(state)
        seconds.append(time.perf_counter() - start)
        del state
    return seconds[-1], peak


def run_chunked(gen, params, tokens, lengths, num_slots, chunk):
    """The `chunked_prefill` loop with the chunk call compiled ahead of time; -> (seconds, xla_peak_gib)."""
    import jax
    import jax.numpy as jnp

    batch, t = tokens.shape
    done, eos, sampling, key = decode_inputs(batch)
    ids = np.arange(t)[None]
    positions = np.where(ids < lengths[:, None], ids, -1).astype(np.int32)
    compiled, peak, seconds = None, None, []
    for _ in range(2):  # warm-up, timed
        start = time.perf_counter()
        cache, logits = gen.begin_chunks(batch=batch, num_slots=gen.policy.prefill_slots(int(lengths.max()), num_slots))
        for c0 in range(0, t, chunk):
            last = lengths - 1 - c0
            last = jnp.asarray(np.where((last >= 0) & (last < chunk), last, -1).astype(np.int32))
            args = (params, cache, jnp.asarray(tokens[:, c0:c0 + chunk]), jnp.asarray(positions[:, c0:c0 + chunk]),
                    logits, last)
            if compiled is None:
                compiled = gen.prefill_chunk.lower(*args).compile()
                peak = compiled_peak(compiled)
                start = time.perf_counter()  # the warm-up run's time is not reported
            cache, logits = compiled(*args)
        state = gen.finish(cache, logits, jnp.asarray(lengths), done, eos, sampling, key)
        jax.block_until_ready(state)
        seconds.append(time.perf_counter() - start)
        del state, cache, logits
    return seconds[-1], peak


def measure(path, cfg, params, batch, length, chunk):
    """One row: prefill `batch` prompts of `length` tokens by `path` ("flash", "chunked" or "reference")."""
    import jax.numpy as jnp

    from raas_jax.decode.generate import Generator
    from raas_jax.policies import RaaS

    backend = "reference" if path == "reference" else "auto"  # reference: the T x T attention of before
    policy = RaaS(budget=length + 2 * PAGE, page_size=PAGE, backend=backend)
    tokens, lengths = prompt_arrays(cfg, batch, length)
    num_slots = policy.num_slots(length, 1)
    gen = Generator(cfg, jnp.bfloat16, policy)
    if path == "chunked":
        seconds, peak = run_chunked(gen, params, tokens, lengths, num_slots, chunk)
    else:
        seconds, peak = run_whole(gen, params, tokens, lengths, num_slots)
    from raas_jax.kernels import prefill

    attention = "reference" if path == "reference" else prefill.choose_implementation("auto", jnp.bfloat16)
    return {"path": path, "batch": batch, "prompt": length, "chunk": chunk if path == "chunked" else None,
            "attention": attention, "status": "ok", "seconds": seconds, "tokens_per_s": batch * length / seconds,
            "xla_peak_gib": peak, "process_peak_gib": process_peak()}


def check_paths(cfg, plan):
    """Logits at each prompt's last token from the reference, flash and chunked prefills of a few-layer model of
    the same shapes (bf16, on the device): relative errors against the reference."""
    import jax
    import jax.numpy as jnp

    from raas_jax.bench import e2e as bench
    from raas_jax.decode.generate import Generator, chunked_prefill, pad_prompts
    from raas_jax.policies import RaaS

    layers, lengths, chunk = plan.check
    small = dataclasses.replace(cfg, num_layers=layers)
    params = bench.random_params(small, jnp.bfloat16, seed=1)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, small.vocab_size, n).tolist() for n in lengths]
    budget = -(-max(lengths) // PAGE) * PAGE + 2 * PAGE
    policy = RaaS(budget=budget, page_size=PAGE)
    tokens, lens, _ = pad_prompts(prompts, prefill_chunk=chunk)
    ids = np.arange(tokens.shape[1])[None]
    positions = jnp.asarray(np.where(ids < lens[:, None], ids, -1))
    num_slots = policy.num_slots(int(lens.max()), 1)

    def whole(backend):
        gen = Generator(small, jnp.bfloat16, RaaS(budget=budget, page_size=PAGE, backend=backend))
        cache = policy.init(small, tokens.shape[0], num_slots, jnp.bfloat16)
        logits, _ = jax.jit(gen.module.apply)({"params": params}, jnp.asarray(tokens), positions, cache,
                                              logits_index=jnp.asarray(lens - 1))
        return np.asarray(logits, np.float32)

    reference = whole("reference")  # the T x T attention every backend ran before
    flash = whole("auto")
    _, chunked = chunked_prefill(Generator(small, jnp.bfloat16, policy), params, tokens, lens, prefill_chunk=chunk,
                                 num_slots=num_slots)
    chunked = np.asarray(chunked, np.float32)

    def error(got):
        return float(np.linalg.norm(got - reference) / np.linalg.norm(reference))

    from raas_jax.kernels import prefill

    result = {"layers": layers, "prompts": list(lengths), "chunk": chunk,
              "implementation": prefill.choose_implementation("auto", jnp.bfloat16),
              "flash_vs_reference": error(flash), "chunked_vs_reference": error(chunked),
              "chunked_vs_flash": float(np.linalg.norm(chunked - flash) / np.linalg.norm(flash))}
    result["ok"] = bool(max(result["flash_vs_reference"], result["chunked_vs_reference"]) < 3e-2)
    return result


def table(rows):
    lines = [f"{'path':10s} {'batch':>5s} {'prompt':>7s} {'status':>10s} {'seconds':>8s} {'tok/s':>9s} "
             f"{'xla GiB':>8s} {'peak GiB':>8s}"]
    for r in rows:
        def num(key, fmt):
            return format(r[key], fmt) if r.get(key) is not None else "-"
        lines.append(f"{r['path']:10s} {r['batch']:5d} {r['prompt']:7d} {r['status']:>10.10s} {num('seconds', '8.2f')} "
                     f"{num('tokens_per_s', '9.0f')} {num('xla_peak_gib', '8.1f')} {num('process_peak_gib', '8.1f')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args, plan = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # before the backend starts
    from raas_jax import configure_gpu

    configure_gpu()  # as `raas-jax` does (cuBLAS GEMMs)
    import jax
    import jax.numpy as jnp

    from raas_jax.bench import e2e as bench

    began = time.perf_counter()
    cfg = bench.MODEL_SHAPES[plan.model]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"model": plan.model, "dtype": "bf16", "policy": f"raas (budget = prompt + {2 * PAGE}, page {PAGE})",
              "layers": "rolled scan", "jax": jax.__version__, "device": jax.devices()[0].device_kind,
              "plan": dataclasses.asdict(plan), "rows": []}

    def save():
        out.write_text(json.dumps(report, indent=1))

    print(f"{plan.model} on {report['device']} (jax {jax.__version__})", flush=True)
    report["check"] = check_paths(cfg, plan)
    print("check:", json.dumps(report["check"]), "" if report["check"]["ok"] else "MISMATCH", flush=True)
    save()
    params = bench.random_params(cfg, jnp.bfloat16)
    report["weights_gib"] = sum(x.nbytes for x in jax.tree.leaves(params)) / 2**30

    longest = [0.0]  # the longest row so far (compile included): a row that would end past the limit is skipped

    def row(path, batch, length):
        started = time.perf_counter()
        if started - began + longest[0] > args.time_limit:
            result = {"path": path, "batch": batch, "prompt": length, "status": "skipped (time limit)"}
        else:
            try:
                result = measure(path, cfg, params, batch, length, plan.chunk)
            except Exception as e:  # noqa: BLE001 - an OOM (or any failure) is a result, the run goes on
                result = {"path": path, "batch": batch, "prompt": length,
                          "status": "OOM" if is_oom(e) else f"error: {type(e).__name__}: {str(e)[:300]}"}
            gc.collect()
            longest[0] = max(longest[0], time.perf_counter() - started)
        report["rows"].append(result)
        save()
        print(table([result]).splitlines()[1], flush=True)
        return result

    print(table([]), flush=True)
    for path in ("flash", "chunked"):
        for batch, length in plan.cases:
            row(path, batch, length)
    if not args.skip_reference:
        for batch, lengths in plan.reference:
            for length in lengths:  # largest first: stop at the first shape that runs
                if row("reference", batch, length)["status"] == "ok":
                    break
    report["seconds"] = time.perf_counter() - began
    save()
    print(f"\n{table(report['rows'])}\n\nwrote {out} ({report['seconds']:.0f} s)", flush=True)
    return 0 if report["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
