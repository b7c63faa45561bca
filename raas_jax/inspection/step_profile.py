"""Which device kernels make up a decode step, and how much of the step is not kernel time?

    raas-jax bench profile --policies raas,dense --batches 1,16 --position 2048 [--model llama3-8b]
        [--out-dir DIR]

For each (policy, batch): a synthetic cache at `position` (bench.synthetic_cache), a warm-up decode call, then
`--steps` decode steps inside one jitted `lax.while_loop` call traced with the JAX profiler. The trace's device
kernels are grouped by name: per step, how many launches, their summed time, and the top kernels. `busy` is
the summed kernel time over the wall time of the step: far below 1 means the step waits on launches or the
host, not on memory. The per-kernel table of every configuration is written to DIR/profile_<policy>_b<B>.txt.

    raas-jax bench profile --plot "before=docs/profile_a.txt,after=docs/profile_b.txt" --png parts.png

draws saved tables side by side, as stacked bars of kernel time by part (attention, matmul, bookkeeping, other)
beside each one's wall time.
"""

import argparse
import collections
import gzip
import json
import re
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from raas_jax import configure_gpu
from raas_jax.bench import e2e as bench
from raas_jax.decode.generate import Generator, decode_state
from raas_jax.validation import at_least, int_list


def device_kernels(trace_dir: Path) -> list[tuple[str, float]]:
    """(kernel name, microseconds) of every complete event on a device (GPU/TPU) track of the perfetto trace."""
    files = sorted(trace_dir.rglob("*.trace.json.gz")) + sorted(trace_dir.rglob("perfetto_trace.json.gz"))
    if not files:
        raise FileNotFoundError(f"no trace under {trace_dir}")
    events = json.loads(gzip.open(files[-1]).read())
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    devices = {pid for pid, name in names.items() if re.search(r"/device:(GPU|TPU)", name)}
    return [(e["name"], float(e["dur"])) for e in events
            if e.get("ph") == "X" and e.get("pid") in devices and "dur" in e]


def short(name: str) -> str:
    """A kernel name without the numeric suffixes XLA adds (loop_add_fusion_12 -> loop_add_fusion)."""
    return re.sub(r"[._]\d+$", "", re.sub(r"[._]\d+(?=[._])", "", name))[:60]


PARTS = ("attention", "matmul", "bookkeeping", "sort", "other")


def category(kernel: str) -> str:
    """matmul (cuBLAS/cuBLASLt/CUTLASS), attention (our decode kernels: Triton's are named `*attention*`, the Mosaic
    GPU one is the only Mosaic kernel of a step), bookkeeping (the RaaS refresh / append kernels), sort, or other
    (XLA fusions, copies)."""
    if re.search(r"nvjet|gemm|cutlass|xmma|cublas", kernel, re.I):
        return "matmul"
    if "attention" in kernel or "mosaic_gpu" in kernel:
        return "attention"
    if kernel.startswith("raas_"):
        return "bookkeeping"
    if "sort" in kernel.lower():
        return "sort"
    return "other"


def read_profile(path: Path) -> tuple[float, dict[str, float]]:
    """(wall ms per step, {part: kernel ms per step}) of a table written by this script."""
    lines = path.read_text().splitlines()
    wall = re.search(r"([\d.]+) ms/step wall", lines[0])
    if wall is None:
        raise ValueError(f"{path} is not a table written by `raas-jax bench profile` (its first line: {lines[0]!r})")
    parts = dict.fromkeys(PARTS, 0.0)
    for line in lines[3:]:
        fields = line.split()
        if len(fields) >= 4:
            parts[category(" ".join(fields[:-3]))] += float(fields[-2]) / 1e3
    return float(wall.group(1)), parts


def plot_parts(profiles: dict[str, Path], png: Path) -> Path:
    """Stacked bars of each saved profile's kernel time by part, its wall time marked above."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    read = {label: read_profile(path) for label, path in profiles.items()}
    fig, ax = plt.subplots(figsize=(3.0 + 1.4 * len(read), 4.5))
    for x, (label, (wall, parts)) in enumerate(read.items()):
        bottom = 0.0
        for i, part in enumerate(PARTS):
            if parts[part]:
                ax.bar(x, parts[part], bottom=bottom, color=f"C{i}", label=part if x == 0 else None)
                if parts[part] > 1.5:
                    ax.text(x, bottom + parts[part] / 2, f"{parts[part]:.2f}", ha="center", va="center", fontsize=8)
                bottom += parts[part]
        ax.plot([x - 0.4, x + 0.4], [wall, wall], "k-")
        ax.text(x, wall, f"wall {wall:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(read)), list(read), fontsize=8)
    ax.set_ylabel("ms per decode step")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def profile_decode(gen, params, cache, batch, position, steps) -> tuple[float, list[tuple[str, float]]]:
    """Wall seconds per step of a traced `steps`-step decode call, and its device kernels."""
    key = jax.random.PRNGKey(0)
    state = decode_state(cache, jax.random.randint(key, (batch,), 0, gen.cfg.vocab_size, jnp.int32),
                         jnp.full((batch,), position, jnp.int32))
    eos = jnp.asarray([-1], jnp.int32)
    state = jax.block_until_ready(gen.decode(params, state, jnp.int32(2), eos))  # compile + warm up
    state = state.replace(base=jnp.int32(2))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            start = time.perf_counter()
            state = jax.block_until_ready(gen.decode(params, state, jnp.int32(2 + steps), eos))
            seconds = (time.perf_counter() - start) / steps
        kernels = device_kernels(Path(trace_dir))
    return seconds, kernels


def main(argv: list[str] | None = None) -> None:
    configure_gpu()  # cuBLAS for the decode matmuls, as `raas-jax` does
    ap = argparse.ArgumentParser(prog="raas-jax bench profile", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--policies", default="raas,dense")
    ap.add_argument("--batches", type=int_list(1), default=(1, 16))
    ap.add_argument("--position", type=at_least(1), default=2048)
    ap.add_argument("--steps", type=at_least(1), default=16)
    ap.add_argument("--top", type=at_least(1), default=12)
    ap.add_argument("--out-dir", "--out", type=Path, default=Path("."), help="folder of the profile tables")
    ap.add_argument("--plot", default="", help="LABEL=PATH,...: plot saved tables (no profiling) into --png")
    ap.add_argument("--png", type=Path, default=Path("step_parts.png"))
    args = ap.parse_args(argv)
    if args.plot:
        profiles = dict(item.split("=", 1) for item in args.plot.split(","))
        print(plot_parts({label: Path(path) for label, path in profiles.items()}, args.png))
        return
    args.out_dir.mkdir(parents=True, exist_ok=True)
    cfg = bench.MODEL_SHAPES[args.model]
    dtype = jnp.bfloat16
    params = bench.random_params(cfg, dtype)
    policies = bench.default_policies()
    summary = []
    for name in args.policies.split(","):
        policy = policies[name]
        gen = Generator(cfg, dtype, policy, unroll_layers=jax.default_backend() != "cpu")
        for batch in args.batches:
            cache = bench.synthetic_cache(policy, cfg, batch, args.position, 128, args.steps + 2, dtype)
            seconds, kernels = profile_decode(gen, params, cache, batch, args.position, args.steps)
            cache = None
            groups = collections.defaultdict(lambda: [0, 0.0])
            for kernel, us in kernels:
                groups[short(kernel)][0] += 1
                groups[short(kernel)][1] += us
            busy_ms = sum(us for _, us in kernels) / 1e3 / args.steps
            launches = len(kernels) / args.steps
            lines = [f"{name} B={batch} N={args.position}: {seconds * 1e3:.2f} ms/step wall, {busy_ms:.2f} ms kernel "
                     f"time, {launches:.0f} kernels/step ({launches / cfg.num_layers:.1f} per layer)",
                     f"{'kernel':60s} {'per step':>9s} {'us/step':>9s} {'us each':>8s}"]
            categories = collections.defaultdict(lambda: [0, 0.0])
            for kernel, us in kernels:
                categories[category(kernel)][0] += 1
                categories[category(kernel)][1] += us
            lines.insert(1, "  ".join(f"{cat} {us / args.steps / 1e3:.2f} ms ({count / args.steps:.0f} kernels)"
                                   for cat, (count, us) in sorted(categories.items(), key=lambda kv: -kv[1][1])))
            for kernel, (count, us) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
                lines.append(f"{kernel:60s} {count / args.steps:9.1f} {us / args.steps:9.1f} {us / count:8.1f}")
            (args.out_dir / f"profile_{name}_b{batch}.txt").write_text("\n".join(lines) + "\n")
            print("\n".join(lines[:3 + args.top]), flush=True)
            summary.append((name, batch, seconds * 1e3, busy_ms, launches))
    print(f"\n{'policy':8s} {'B':>4s} {'wall ms':>8s} {'kernel ms':>9s} {'busy':>5s} {'kernels':>8s}")
    for name, batch, wall, busy, launches in summary:
        print(f"{name:8s} {batch:4d} {wall:8.2f} {busy:9.2f} {busy / wall:5.2f} {launches:8.0f}")


if __name__ == "__main__":
    main()
