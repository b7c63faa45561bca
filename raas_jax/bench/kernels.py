"""Kernel benchmark: decode attention over the page pool, ours against XLA, JAX's paged_attention and torch SDPA.

Every JAX variant is timed as back-to-back calls inside one jitted `fori_loop`, up to 20 calls unrolled per
iteration (each call's query depends on the previous output, so nothing is hoisted), torch as calls replayed from one
CUDA graph; both run `calls` and 2 * `calls` calls and take the difference, so neither the dispatch nor a run's fixed
start is counted. Effective bandwidth = KV bytes the variant must read / time per call.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from raas_jax.kernels import dispatch as kernels
from raas_jax.kernels import mosaic_gpu, pallas_gpu, reference
from raas_jax.policies import quest_select

Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    tokens: int  # resident tokens per (sequence, KV head)
    selected: int | None = None  # Quest: tokens attended (a slot list of selected // PAGE pages)

    @property
    def read_tokens(self) -> int:
        return self.selected or self.tokens

    def kv_bytes(self, itemsize: int = 2) -> int:
        return 2 * self.batch * KV_HEADS * self.read_tokens * HEAD_DIM * itemsize


SHAPES = (
    Shape("raas B=1 1K", 1, 1024), Shape("raas B=1 4K", 1, 4096),
    Shape("raas B=32 1K", 32, 1024), Shape("raas B=32 4K", 32, 4096),
    Shape("raas B=128 1K", 128, 1024), Shape("raas B=128 4K", 128, 4096),
    Shape("dense B=32 32K", 32, 32768),
    Shape("quest B=32 32K sel 2K", 32, 32768, 2048),
)


def make_inputs(shape: Shape, seed: int = 0, kv_dtype=None):
    """q, k, v, fill, slot list (Quest shapes) of `shape`; pages in bf16 or `kv_dtype` (e.g. float8_e4m3fn)."""
    slots = shape.tokens // PAGE
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (shape.batch, Q_HEADS, HEAD_DIM), jnp.bfloat16)
    k = jax.random.normal(keys[1], (shape.batch, KV_HEADS, slots, PAGE, HEAD_DIM), jnp.bfloat16)
    v = jax.random.normal(keys[2], (shape.batch, KV_HEADS, slots, PAGE, HEAD_DIM), jnp.bfloat16)
    fill = jnp.full((shape.batch, KV_HEADS, slots), PAGE, jnp.int32)
    if kv_dtype is not None:
        k, v = k.astype(kv_dtype), v.astype(kv_dtype)
    chosen = None
    if shape.selected:
        scores = jax.random.normal(keys[3], fill.shape)
        chosen = jnp.sort(jax.lax.top_k(scores, shape.selected // PAGE)[1], axis=-1).astype(jnp.int32)
    return q, k, v, fill, chosen


TORCH_DEPENDENT = "torch SDPA, q += 1e-3 * out per call (as our loop)"


UNROLL = 20  # calls per iteration of the timed loop


def time_loop(step: Callable, q, operands: tuple, calls: int, reps: int = 3, unroll: int = UNROLL) -> float:
    """Seconds per call of `step(q, *operands) -> out [like q]`, `calls` dependent calls in one jitted loop.

    The operands (the pool) are arguments of the jitted loop, not captured constants. `unroll` calls run per loop
    iteration: XLA's rolled while loop costs host work per iteration that starves the GPU when a call takes a few
    microseconds (measured in docs/kernels.md, "How bench kernels times"), which torch's CUDA-graph replay does not
    pay.

    Per call is the difference of a loop of 2 * `calls` and one of `calls`, over `calls`: starting a loop costs a
    fixed ~0.3 ms on an H200 (host dispatch, XLA's command-buffer launch; docs/kernels.md), too much to divide over a
    few calls of a large shape. Both loops run at least two iterations
    (`unroll` shrinks for few calls), so both are while loops and pay the same start."""
    unroll = max(1, min(unroll, calls // 2))

    def loop_of(n):
        @jax.jit
        def loop(q, operands):
            return jax.lax.fori_loop(0, n, lambda i, x: (x + 1e-3 * step(x, *operands)).astype(x.dtype), q,
                                     unroll=unroll)
        return loop

    return _per_call(lambda n: _best_seconds(loop_of(n), (q, operands), reps), calls)


def _best_seconds(run: Callable, args: tuple, reps: int) -> float:
    jax.block_until_ready(run(*args))  # compile and warm up
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(run(*args))
        best = min(best, time.perf_counter() - start)
    return best


def _per_call(seconds_for: Callable[[int], float], calls: int) -> float:
    """Per-call seconds from runs of `calls` and 2 * `calls` calls, so the fixed cost of a run cancels. Where noise
    leaves no difference, the long run's plain average (the fixed cost included: an upper bound)."""
    short, long = seconds_for(calls), seconds_for(2 * calls)
    return (long - short) / calls if long > short else long / (2 * calls)


def time_torch_sdpa(shape: Shape, calls: int, reps: int = 3, dependent: bool = False) -> float | None:
    """torch SDPA (GQA) on an equal dense KV, per call from CUDA graphs of `calls` and 2 * `calls` calls (as
    `time_loop`); None without CUDA.
    `dependent`: each call's query is updated from the previous output (`q += 1e-3 * out`, one more kernel per call),
    as in our timed loop."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    try:
        return _time_torch_sdpa(shape, calls, reps, dependent)
    finally:
        torch.cuda.empty_cache()  # the dense KV (up to 4 GiB) went with the call's frame


# torch's default capture mode ("global") fails a capture when any other thread of the process makes a CUDA call
# that is unsafe during capture, and JAX's runtime threads do (seen on an H200, docs/kernels.md: "operation failed
# due to a previous error during capture", after which every later JAX and torch call of the run failed)
CAPTURE_MODE = "thread_local"


def _time_torch_sdpa(shape: Shape, calls: int, reps: int, dependent: bool) -> float:
    import torch
    import torch.nn.functional as F

    n = shape.read_tokens
    q = torch.randn(shape.batch, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(shape.batch, KV_HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)

    def sdpa(q=q, k=k, v=v):
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        if dependent:
            q.add_(out, alpha=1e-3)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            sdpa()
    torch.cuda.current_stream().wait_stream(stream)

    def seconds_for(n):  # the best of `reps` replays of one CUDA graph of n calls
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, capture_error_mode=CAPTURE_MODE):
            for _ in range(n):
                sdpa()
        best = float("inf")
        for _ in range(reps + 1):  # the first replay warms up
            torch.cuda.synchronize()
            start = time.perf_counter()
            graph.replay()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        del graph
        return best

    return _per_call(seconds_for, calls)  # as time_loop: the fixed cost of a replay cancels


def paged_attention_variants(q, k, v, fill, chosen):
    """JAX's ops.gpu.paged_attention on the same pages (pool re-laid out as [Hkv, B*S, P, D] once, untimed)."""
    try:
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
    except ImportError:
        return {}
    b, hkv, s, page, d = k.shape
    k_pages = jnp.moveaxis(k, 1, 0).reshape(hkv, b * s, page, d)
    v_pages = jnp.moveaxis(v, 1, 0).reshape(hkv, b * s, page, d)
    if chosen is not None:  # one page list per sequence: the first KV head's selection
        tables = (chosen[:, 0] + jnp.arange(b)[:, None] * s).astype(jnp.int32)
    else:
        tables = (jnp.arange(s)[None, :] + jnp.arange(b)[:, None] * s).astype(jnp.int32)
    pages = tables.shape[1]
    lengths = jnp.full((b,), pages * page, jnp.int32)
    variants = {}
    for per_block, splits in itertools.product((8, 16), (4, 16, 64)):
        if pages % splits or (pages // splits) % min(per_block, pages // splits):
            continue
        variants[f"ops.gpu.paged_attention ppcb={per_block} splits={splits}"] = (
            lambda q, k_pages, v_pages, tables, lengths, ppcb=per_block, splits=splits: paged_attention(
                q, k_pages, v_pages, tables, lengths, pages_per_compute_block=ppcb, k_splits=splits),
            (k_pages, v_pages, tables, lengths))
    return variants


def our_variants(sweep: bool, interpret: bool = False) -> dict[str, Callable]:
    """Our kernels by name: each takes (q, k, v, fill, slots) -> (out, mass). "pallas (default)" is what
    `backend="pallas"` runs (Mosaic GPU on a Hopper GPU where it applies, else Triton); on a Hopper GPU the Triton
    kernel is timed beside it."""
    variants = {"pallas (default)": lambda q, k, v, fill, slots: kernels.decode_attention(
        q, k, v, fill, slots, backend="pallas")}
    triton = {"pallas triton": pallas_gpu.DEFAULT_TUNING} if not interpret and mosaic_gpu.available() else {}
    mosaic = {}
    if sweep:
        grid = [(64, 1024, 4, 2), (128, 1024, 4, 2), (256, 1024, 4, 2), (128, 1024, 8, 2), (64, 4096, 4, 2),
                (64, 1024, 4, 3)]
        triton = {f"pallas triton T={t} prog={p} w={w} s={s}": pallas_gpu.AttentionTuning(t, p, w, s, fp8_num_stages=s)
                  for t, p, w, s in grid}
        for stages in (2, 3):  # over an FP8 pool: its compute dtype (float16 or q's) at 2 and 3 stages
            for as_f16 in (True, False):
                triton[f"pallas triton T=64 fp8 s={stages}" + (" f16" if as_f16 else " bf16")] = (
                    pallas_gpu.AttentionTuning(fp8_as_f16=as_f16, fp8_num_stages=stages))
        triton["pallas triton T=64 fp8 s=3 f16 bytes"] = pallas_gpu.AttentionTuning(pack_fp8=False)  # default: pairs
        if not interpret and mosaic_gpu.available():
            mosaic = mosaic_sweep()
    for name, tuning in triton.items():
        variants[name] = lambda q, k, v, fill, slots, t=tuning: pallas_gpu.decode_attention(
            q, k, v, fill, slots, tuning=t, interpret=interpret)
    for name, tuning in mosaic.items():  # bf16 pools (mosaic_gpu.supports), with or without a slot list
        variants[name] = lambda q, k, v, fill, slots, t=tuning: mosaic_gpu.decode_attention(q, k, v, fill, slots,
                                                                                          tuning=t)
    return variants


def mosaic_sweep() -> dict[str, mosaic_gpu.MosaicTuning]:
    """The Mosaic GPU launches `--sweep` times, by variant name. One-stage programs share an SM two at a time: 264
    is one wave of them (fewer, longer programs); 256 (the default) is one split per (sequence, KV head) from B = 32.
    Past one wave the plan may split further than a target says (`mosaic_launch` names the launch). 256-token blocks
    (one program per SM) and a slot list read from GMEM (the default stages it in SMEM) are for Quest's shape (each
    listed page is its own copy); without a slot list the GMEM variant is the default launch."""
    sweep = {f"pallas mosaic T={t} s={s} prog={p}": mosaic_gpu.MosaicTuning(t, s, p)
             for t, s, p in [(128, 1, 256), (128, 1, 264), (128, 1, 528), (128, 1, 792), (128, 1, 1056),
                             (128, 2, 264), (128, 2, 132), (64, 3, 528), (256, 1, 256)]}
    sweep["pallas mosaic T=128 s=1 prog=256 list from GMEM"] = mosaic_gpu.MosaicTuning(128, 1, 256, staged_list=False)
    return sweep


def mosaic_launch(shape: Shape, tuning: mosaic_gpu.MosaicTuning = mosaic_gpu.DEFAULT_TUNING) -> str:
    """What a Mosaic GPU launch resolves to at `shape`: sweep variants of different names can be the same launch
    (at B=32 4K, 528 and 792 target programs are both 4 splits), which only the noise tells apart."""
    planned = mosaic_gpu.plan(shape.batch, KV_HEADS, shape.read_tokens // PAGE, PAGE, tuning)
    if planned is None:
        return "not taken"
    _, splits, per_split = planned
    return f"{shape.batch * KV_HEADS * splits} programs of {per_split} blocks"


def calls_for(shape: Shape, target_bytes: float = 1e11) -> int:
    """Enough calls that one timed loop reads ~100 GB, between 100 and 4000, a multiple of the loop's unroll. With
    20 GB per loop a large shape's loop ran ~5 ms, and the jitter of its start left up to +-10% between identical
    launches (docs/kernels.md)."""
    return int(np.clip(target_bytes / shape.kv_bytes(), 100, 4000)) // UNROLL * UNROLL


def run_kernels(shapes=SHAPES, calls: int | None = None, sweep: bool = False, out: Path | None = None,
                verbose: bool = True, kv_dtype=None, variants: tuple[str, ...] = ()) -> list[dict]:
    """Time every variant at every shape; returns rows {shape, variant, us, tbps, ...} (also written to `out`).
    `variants`: name prefixes of the JAX variants to time (all if empty; then also the Quest page scores); torch SDPA
    is always timed, as the headline's reference.
    `kv_dtype` (e.g. jnp.float8_e4m3fn): our kernel and the reference read pages of that dtype (TB/s counts their
    bytes); torch SDPA and paged_attention stay bf16."""
    interpret = jax.default_backend() != "gpu"
    rows: list[dict] = []
    itemsize = 2 if kv_dtype is None else jnp.dtype(kv_dtype).itemsize

    launches: dict[str, str] = {}  # variant -> the Mosaic launch it resolves to at the current shape

    def record(shape: Shape, variant: str, seconds: float | None, error: str = "", read_bytes: int | None = None):
        if read_bytes is None:  # the pages this variant reads: ours in kv_dtype, torch / paged_attention in bf16
            ours = variant.startswith(("pallas", "jnp"))
            read_bytes = shape.kv_bytes(itemsize if ours else 2)
        row = {"shape": shape.name, "batch": shape.batch, "tokens": shape.tokens, "selected": shape.selected,
               "variant": variant, "us": None if seconds is None else seconds * 1e6,
               "tbps": None if seconds is None else read_bytes / seconds / 1e12, "error": error[:300],
               "launch": launches.get(variant, "")}
        rows.append(row)
        if verbose:
            figure = f"{row['us']:9.1f} us {row['tbps']:6.2f} TB/s" if seconds is not None else f"failed: {error[:100]}"
            launch = f"  [{row['launch']}]" if row["launch"] else ""
            print(f"  {shape.name:22s} {variant:48s} {figure}{launch}", flush=True)
        if out is not None:
            out.write_text(json.dumps({"rows": rows, "jax": jax.__version__, "device": str(jax.devices()[0])}, indent=1))

    for shape in shapes:
        n = calls or calls_for(shape)
        q, k, v, fill, chosen = make_inputs(shape, kv_dtype=kv_dtype)
        mass_ref = None
        pool = (k, v, fill, chosen)
        timed: dict[str, tuple[Callable, tuple]] = {
            "jnp reference (XLA)": (lambda q, *pool: reference.decode_attention(q, *pool)[0], pool)}
        ours = our_variants(sweep, interpret)
        launches = {}
        if kv_dtype is not None:  # the Mosaic GPU kernel takes no FP8 pool
            ours = {name: f for name, f in ours.items() if not name.startswith("pallas mosaic")}
        elif not interpret and mosaic_gpu.available():  # which launch each Mosaic variant resolves to here
            launches = {name: mosaic_launch(shape, tuning) for name, tuning in mosaic_sweep().items() if name in ours}
            launches["pallas (default)"] = mosaic_launch(shape)
        for name, attend in ours.items():
            timed[name] = (lambda q, *pool, f=attend: f(q, *pool)[0], pool)
        if not interpret and kv_dtype is None:
            timed.update(paged_attention_variants(q, k, v, fill, chosen))
        if variants:
            timed = {name: step for name, step in timed.items() if name.startswith(variants)}
        for variant, (step, operands) in timed.items():
            try:
                if variant in ours:  # correctness at this shape before timing
                    out_p, mass_p = ours[variant](q, k, v, fill, chosen)
                    if mass_ref is None:
                        ref_out, mass_ref = reference.decode_attention(q, k, v, fill, chosen)
                    err = float(jnp.linalg.norm((out_p - ref_out).astype(jnp.float32))
                                / jnp.linalg.norm(ref_out.astype(jnp.float32)))
                    mass_err = float(jnp.max(jnp.abs(mass_p - mass_ref)))
                    if not err <= 1e-2 or not mass_err <= 1e-2:
                        raise AssertionError(f"wrong result: rel. error {err:.2e}, mass error {mass_err:.2e}")
                record(shape, variant, time_loop(step, q, operands, n))
            except Exception as e:  # a variant that does not compile at this shape is reported, not fatal
                record(shape, variant, None, f"{type(e).__name__}: {e}")
        if not interpret:  # the headline is SDPA alone (the faster); the dependent form does what our loop does
            for variant, dependent in (("torch SDPA (dense KV)", False), (TORCH_DEPENDENT, True)):
                try:
                    record(shape, variant, time_torch_sdpa(shape, n, dependent=dependent))
                except Exception as e:
                    record(shape, variant, None, f"{type(e).__name__}: {e}")
        if shape.selected and not variants:  # the selection that feeds the Quest path: bounds over every resident page + top-k
            kmin, kmax = jnp.min(k, axis=3).astype(q.dtype), jnp.max(k, axis=3).astype(q.dtype)  # the model's dtype
            bounds = (kmin, kmax, fill, jnp.zeros(fill.shape[:2], jnp.int32))
            budget = shape.selected // PAGE
            bound_bytes = 2 * kmin.size * kmin.dtype.itemsize
            for backend in ("reference", "pallas"):
                def scores(q, kmin, kmax, fill, cur, backend=backend):
                    u = kernels.page_scores(q, kmin, kmax, fill, backend=backend)
                    return jnp.broadcast_to(jnp.max(u).astype(q.dtype) * 1e-9, q.shape)

                def select(q, kmin, kmax, fill, cur, backend=backend):
                    chosen = quest_select(kernels.page_scores(q, kmin, kmax, fill, backend=backend), cur, fill, budget,
                                          backend)
                    return jnp.broadcast_to(jnp.sum(chosen).astype(q.dtype) * 1e-9, q.shape)

                def top_k(q, kmin, kmax, fill, cur, backend=backend):  # selection alone, on fixed scores
                    u = jnp.where(fill > 0, kmin[..., 0].astype(jnp.float32), -jnp.inf) + q[0, 0, 0].astype(jnp.float32)
                    chosen = kernels.top_k_mask(u, budget, backend=backend)
                    return jnp.broadcast_to(jnp.sum(chosen).astype(q.dtype) * 1e-9, q.shape)

                record(shape, f"page_scores ({backend})", time_loop(scores, q, bounds, n), read_bytes=bound_bytes)
                record(shape, f"top_k_mask ({backend})", time_loop(top_k, q, bounds, n), read_bytes=fill.size * 4)
                record(shape, f"page_scores + top-k ({backend})", time_loop(select, q, bounds, n),
                       read_bytes=bound_bytes)
        del q, k, v, fill, chosen
    return rows


FAMILIES = {"ours (Pallas)": "pallas (default)", "jnp reference (XLA)": "jnp reference",
            "ops.gpu.paged_attention (best)": "ops.gpu.paged_attention", "torch SDPA": "torch SDPA (dense KV)",
            "page_scores + top-k (ours)": "page_scores + top-k (pallas)"}


def best_per_family(rows: list[dict]) -> dict[str, dict[str, dict | None]]:
    """shape -> family -> the fastest timed row of that family (None if none ran). "ours" is the row of what
    `backend="pallas"` runs ("pallas (default)"), not the best of a sweep; rows saved before 6a1081b named it
    "pallas (default)" as well, their sweep rows "pallas T=..."."""
    table = {}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        table[shape] = {}
        for family, prefix in FAMILIES.items():
            timed = [r for r in rows if r["shape"] == shape and r["variant"].startswith(prefix) and r["us"]]
            table[shape][family] = min(timed, key=lambda r: r["us"], default=None)
    return table


def summary_table(rows: list[dict]) -> str:
    """Markdown: per shape, the best of each family (ours, XLA, paged_attention, SDPA) in us and TB/s."""
    lines = ["| shape | " + " | ".join(FAMILIES) + " |", "|---" * (len(FAMILIES) + 1) + "|"]
    for shape, best in best_per_family(rows).items():
        cells = ["-" if r is None else f"{r['us']:.1f} us / {r['tbps']:.2f} TB/s" for r in best.values()]
        lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_kernels(rows: list[dict], path: Path, device: str | None = None, copy_tbps: float | None = None,
                 pages: str = "bf16") -> Path:
    """Effective bandwidth per shape, one bar per family (attention families only); `pages`: our pool's dtype."""
    from raas_jax.plots import bar_plot

    best = best_per_family(rows)
    attention = [f for f in FAMILIES if not f.startswith("page_scores")]
    series = {f: [None if best[s][f] is None else best[s][f]["tbps"] for s in best] for f in attention}
    series = {f: bars for f, bars in series.items() if any(b is not None for b in bars)}  # families that ran
    device = device or jax.devices()[0].device_kind
    return bar_plot(list(best), series, path, "effective TB/s (KV bytes read / time)",
                    f"decode attention, {pages} pages (SDPA: bf16), 32/8 heads, head_dim 128, page 16 ({device})",
                    None if copy_tbps is None else ("device copy bandwidth (read + write)", copy_tbps))
