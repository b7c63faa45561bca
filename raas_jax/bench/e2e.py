"""End-to-end decode benchmark: time per token and memory vs decode position for Dense, Quest and RaaS.

Random-weight models of real shapes are built on the device. Reaching position N by decoding N tokens
would take too long, so the cache a run would hold at position N is synthesised (pages of random keys
and values, consistent fill / start / stamp / key bounds / pinned prompt pages), then at least 32 decode
steps are timed inside one jitted `lax.while_loop` call after two one-step warm-up calls that compile. The
largest batch is the largest whose compiled decode fits the allocator's limit (`largest_decode_batch`).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from raas_jax.decode.cache import PagePool, cache_bytes, page_key_bounds, pool_dtype
from raas_jax.kernels.reference import to_pool_dtype
from raas_jax.model_io.checkpoint import param_shapes
from raas_jax.decode import memory
from raas_jax.decode.generate import Generator, data_parallelism, decode_state
from raas_jax.models.config import ModelConfig
from raas_jax.models.transformer import fuse_projections
from raas_jax.policies import Dense, Policy, Quest, RaaS
from raas_jax.decode.sharding import ShardedPolicy, cache_spec, make_mesh, param_shardings

MODEL_SHAPES = {
    "llama3-8b": ModelConfig(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0),
    "qwen2.5-7b": ModelConfig(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                              num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1e6,
                              qkv_bias=True),
    # for trying the machinery on a CPU (`--models tiny --allow-cpu`) and for tests
    "tiny": ModelConfig(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=16),
}


def noise_key(seed: int) -> jax.Array:
    """The key the synthetic weights and pools are drawn with: XLA's RngBitGenerator ("rbg"), not JAX's default
    threefry. Benchmark noise needs no counter-based stream, and threefry's hash, unrolled over every value drawn,
    makes these programs compile up to 10x longer on the CPU."""
    return jax.random.key(seed, impl="rbg")


def random_params(cfg: ModelConfig, dtype: Any, seed: int = 0, fused: bool = True) -> dict:
    """Random weights of the model's shapes, made on the device (norm weights near one); in the fused layout
    `load` gives (models.fuse_projections) unless `fused=False` (the checkpoint's layout)."""
    shapes = param_shapes(cfg, dtype)
    leaves, treedef = jax.tree.flatten_with_path(shapes)

    @jax.jit
    def make(key):
        keys = jax.random.split(key, len(leaves))
        out = []
        for k, (path, s) in zip(keys, leaves):
            name = jax.tree_util.keystr(path)
            if "norm" in name:
                out.append((1.0 + 0.1 * jax.random.normal(k, s.shape, jnp.float32)).astype(s.dtype))
            else:
                out.append((0.02 * jax.random.normal(k, s.shape, jnp.float32)).astype(s.dtype))
        params = jax.tree.unflatten(treedef, out)
        return fuse_projections(cfg, params) if fused else params

    return make(noise_key(seed))


@functools.partial(jax.jit, donate_argnums=(0,), static_argnums=(3,))
def write_random_layer(pools: tuple, fill: jax.Array, layer: jax.Array, seed: int) -> tuple:
    """Random keys and values (and their page bounds) into one layer of the pools (k, v, kmin, kmax), in place.

    The pools are donated and one layer is drawn per call: a whole pool's random bits (4 bytes a value), or a
    stacked copy of it (what `lax.map`'s outputs cost, and a loop carry can cost), would not fit beside the pools
    at the largest batch. Unfilled tokens hold noise; `fill` [L, B, Hkv, S] masks them."""
    k, v, kmin, kmax = pools
    key = jax.random.fold_in(noise_key(seed), layer)
    draw = lambda i: to_pool_dtype(jax.random.normal(jax.random.fold_in(key, i), k.shape[1:], kmin.dtype),  # noqa: E731
                                   k.dtype)  # [B, Hkv, S, P, D] (an FP8 pool: drawn in the bounds' dtype, then cast)
    k_layer, v_layer = draw(0), draw(1)
    lo, hi = page_key_bounds(k_layer, fill[layer], kmin.dtype)  # [B, Hkv, S, D]
    return k.at[layer].set(k_layer), v.at[layer].set(v_layer), kmin.at[layer].set(lo), kmax.at[layer].set(hi)


def synthetic_cache(policy: Policy, cfg: ModelConfig, batch: int, position: int, prompt_len: int,
                    headroom: int, dtype: Any, seed: int = 0) -> PagePool:
    """The cache a run would hold after `position` tokens (prompt `prompt_len`), room for `headroom` more."""
    page = policy.page_size
    slots = policy.num_slots(prompt_len, position - prompt_len + headroom)
    pool = jax.eval_shape(lambda: policy.init(cfg, batch, slots, dtype))
    shape = pool.fill.shape  # [L, B, Hkv, S]
    prompt_pages = -(-prompt_len // page)
    rng = np.random.default_rng(seed)
    if policy.fixed_budget:
        # pinned prompt pages, then the newest decode pages in random slot order; the current page is partial
        decode_pages = slots - prompt_pages
        last_page = (position - 1) // page
        pages = np.concatenate([np.arange(prompt_pages), np.arange(last_page - decode_pages + 1, last_page + 1)])
        start = np.broadcast_to(pages * page, shape).copy()
        fill = np.full(shape, page, np.int32)
        cur_slot = slots - 1
        fill[..., cur_slot] = position - last_page * page
        stamp = rng.integers(start, position, size=shape).astype(np.int32)
        pinned = np.zeros(shape, bool)
        pinned[..., :prompt_pages] = True
    else:
        resident = -(-position // page)
        starts = np.arange(slots) * page
        fill = np.broadcast_to(np.clip(position - starts, 0, page), shape).astype(np.int32)
        start = np.broadcast_to(np.where(fill[0, 0, 0] > 0, starts, 0), shape)
        stamp = start.copy()
        pinned = np.zeros(shape, bool)
        cur_slot = resident - 1

    k_shape, bounds_shape = (*shape, page, cfg.head_dim), (*shape, cfg.head_dim)
    mesh = getattr(policy, "mesh", None)  # a ShardedPolicy: batch over data, KV heads over model

    def place(x):
        return jnp.asarray(x) if mesh is None else jax.device_put(x, NamedSharding(mesh, cache_spec(x.ndim)))

    fill = place(fill)
    pages = pool.k.dtype  # the policy's kv_dtype
    zeros = jax.jit(lambda: (jnp.zeros(k_shape, pages), jnp.zeros(k_shape, pages), jnp.zeros(bounds_shape, dtype),
                             jnp.zeros(bounds_shape, dtype)),
                    out_shardings=None if mesh is None else (NamedSharding(mesh, cache_spec(6)),) * 2
                    + (NamedSharding(mesh, cache_spec(5)),) * 2)
    pools = zeros()
    for layer in range(k_shape[0]):  # in place (donated), one layer per call: see write_random_layer
        pools = write_random_layer(pools, fill, jnp.int32(layer), seed)
    k, v, kmin, kmax = pools

    def zeros_like(spec):  # the scales and the policy's own arrays (e.g. H2O's accumulated mass): zeros
        return place(np.zeros(spec.shape, spec.dtype))

    return PagePool(k=k, v=v, kmin=kmin, kmax=kmax, fill=fill, start=place(start.astype(np.int32)),
                    stamp=place(stamp), pinned=place(pinned), cur=place(np.full(shape[:-1], cur_slot, np.int32)),
                    k_scale=jax.tree.map(zeros_like, pool.k_scale), v_scale=jax.tree.map(zeros_like, pool.v_scale),
                    policy_state=jax.tree.map(zeros_like, pool.policy_state))


def _slots(gen: Generator, position: int, prompt_len: int, headroom: int) -> int:
    return gen.policy.num_slots(prompt_len, position - prompt_len + headroom)


def abstract_decode_args(gen: Generator, batch: int, position: int, prompt_len: int = 128, headroom: int = 34
                         ) -> tuple:
    """Shapes of `gen.decode`'s arguments for `batch` sequences at `position` (the pool holds `headroom` more),
    random weights of the model's shapes."""
    params = jax.eval_shape(lambda: random_params(gen.cfg, gen.dtype))
    return memory.abstract_decode_args(gen, params, batch, _slots(gen, position, prompt_len, headroom))


def decode_memory(gen: Generator, batch: int, position: int, prompt_len: int = 128, headroom: int = 34) -> dict:
    """`memory.decode_bytes` for `batch` sequences at `position` (random weights of the model's shapes)."""
    params = jax.eval_shape(lambda: random_params(gen.cfg, gen.dtype))
    return memory.decode_bytes(gen, params, batch, _slots(gen, position, prompt_len, headroom))


def largest_decode_batch(gen: Generator, position: int, limit: int, *, reserve: int = 2 * 2**30,
                         probes: tuple[int, int] = (16, 64), prompt_len: int = 128, headroom: int = 34,
                         cap: int = 4096) -> tuple[int, list[dict]]:
    """`memory.largest_batch` for sequences at `position` (random weights of the model's shapes)."""
    params = jax.eval_shape(lambda: random_params(gen.cfg, gen.dtype))
    return memory.largest_batch(gen, params, _slots(gen, position, prompt_len, headroom), limit, reserve=reserve,
                                probes=probes, cap=cap)


def kv_bytes_read(policy: Policy, cfg: ModelConfig, batch: int, position: int, dtype: Any) -> int:
    """KV bytes one decode step must read under the policy (keys + values in its kv_dtype, plus Quest's key bounds
    in `dtype`)."""
    item = jnp.dtype(dtype).itemsize
    per_token = 2 * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(pool_dtype(policy.kv_dtype, dtype)).itemsize
    if policy.fixed_budget:  # RaaS, H2O, StreamingLLM: the whole fixed pool
        return batch * cfg.num_layers * policy.budget * per_token
    if isinstance(policy, Quest):
        pages = -(-position // policy.page_size)
        bounds = 2 * cfg.num_kv_heads * cfg.head_dim * item * pages  # kmin + kmax
        sparse_layers = cfg.num_layers - policy.dense_layers
        sparse = sparse_layers * (min(policy.budget, position) * per_token + bounds)
        return batch * (sparse + policy.dense_layers * position * per_token)
    return batch * cfg.num_layers * position * per_token


def copy_bandwidth(gib: float = 4.0, reps: int = 20) -> float:
    """Device copy bandwidth in bytes/s (bytes read + written), timed inside one jitted loop."""
    x = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)

    @jax.jit
    def loop(x):
        return jax.lax.fori_loop(0, reps, lambda i, y: y * 1.0001 + 1e-7, x)

    loop(x).block_until_ready()
    start = time.perf_counter()
    loop(x).block_until_ready()
    return 2 * x.nbytes * reps / (time.perf_counter() - start)


@dataclasses.dataclass
class Measurement:
    model: str
    policy: str
    batch: int
    position: int
    step_ms: float
    tokens_per_s: float
    cache_gib: float
    live_gib: float  # device memory in use right after the timed steps (weights + pool + decode state)
    peak_gib: float  # the process's peak device memory so far (monotone: includes earlier configurations)
    roofline_ms: float
    compiled_during_timing: bool
    impl: str = "jax"  # torch reference rows (bench_torch) say "torch_cuda_graph" (on a CPU "torch_eager")
    ratio_vs_torch: float | None = None  # step_ms / the torch reference's at the same model, N and B
    mesh: str | None = None  # e.g. "data=2,model=1" when the run was spread over devices (sizes are per device)
    kv_dtype: str = "auto"  # the policy's page storage dtype (cache.KV_DTYPES)


def time_decode(gen: Generator, params: dict, cache: dict, batch: int, position: int, steps: int,
                seed: int = 0) -> tuple[float, bool, dict]:
    """Seconds per decode step over `steps` steps (after a 2-step warm-up call), whether the timed call
    compiled anything, and the device's memory_stats() read while the pool and state are still alive."""
    key = jax.random.PRNGKey(seed)
    tokens = jax.random.randint(key, (batch,), 0, gen.cfg.vocab_size, jnp.int32)
    state = decode_state(cache, tokens, jnp.full((batch,), position, jnp.int32), seed=seed)
    eos = jnp.asarray([-1], jnp.int32)
    state = gen.decode(params, state, jnp.int32(1), eos)  # compiles for the inputs' placement
    state = state.replace(base=jnp.int32(1))  # and (under a mesh) for the timed call's: the outputs' own
    state = gen.decode(params, state, jnp.int32(2), eos)
    jax.block_until_ready(state)
    compiled = gen.decode._cache_size()
    state = state.replace(base=jnp.int32(2))
    start = time.perf_counter()
    state = gen.decode(params, state, jnp.int32(2 + steps), eos)
    jax.block_until_ready(state)
    seconds = (time.perf_counter() - start) / steps
    assert int(state.step) == 2 + steps
    memory = jax.devices()[0].memory_stats() or {}
    return seconds, gen.decode._cache_size() != compiled, memory


def with_torch_roofline(torch_rows: list[dict], cfg: ModelConfig, weight_bytes: int, bandwidth: float,
                        dtype: Any) -> list[dict]:
    """The torch reference's rows (bench_torch) with the dense roofline of this run's copy bandwidth."""
    return [{**r, "roofline_ms": (weight_bytes + kv_bytes_read(Dense(), cfg, r["batch"], r["position"], dtype))
             / bandwidth * 1e3} for r in torch_rows]


def torch_step_ms(torch_rows: list[dict]) -> dict[tuple[str, int, int], float]:
    """(model, position, batch) -> the torch reference's ms/step (configurations that ran)."""
    return {(r["model"], r["position"], r["batch"]): r["step_ms"] for r in torch_rows if r["step_ms"] is not None}


def run_e2e(model: str, policies: dict[str, Policy], positions: list[int], batches: list[int], steps: int,
            out: Path, prompt_len: int = 128, dtype: Any = jnp.bfloat16, largest_batch: bool = True,
            hf_reference: list[dict] | None = None, torch_reference: list[dict] | None = None,
            mesh: str | None = None) -> list[dict]:
    """Time every (policy, position, batch) and write the rows to `out` as JSON after each one, so an
    interrupted run keeps what it measured. `torch_reference`'s rows (bench_torch) go into the same rows (their
    `impl` says so), and each of ours gets `ratio_vs_torch` where torch ran the same N and B; `hf_reference`'s
    rows are kept under their own key. `mesh` ("data=2", "model=2", ...) spreads weights and pools over the devices
    (raas_jax.decode.sharding); memory figures are then those of one device and the roofline is one device's share."""
    cfg = MODEL_SHAPES[model]
    params = random_params(cfg, dtype)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    device_mesh = None if mesh is None else make_mesh(cfg, mesh)
    if device_mesh is not None:
        params = jax.device_put(params, param_shardings(params, device_mesh))
        mesh = ",".join(f"{axis}={size}" for axis, size in device_mesh.shape.items())
    model_split = 1 if device_mesh is None else device_mesh.shape["model"]
    devices = 1 if device_mesh is None else device_mesh.size
    bandwidth = copy_bandwidth(4.0 if jax.default_backend() != "cpu" else 0.125)
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit", 0)
    print(f"{model}: {weight_bytes / 2**30:.1f} GiB weights, copy bandwidth {bandwidth / 1e12:.2f} TB/s, "
          f"device limit {limit / 2**30:.0f} GiB", flush=True)
    rows = with_torch_roofline(torch_reference or [], cfg, weight_bytes, bandwidth, dtype)
    torch_ms = torch_step_ms(rows)

    def save():
        out.write_text(json.dumps({"rows": rows, "copy_bandwidth": bandwidth, "weight_bytes": weight_bytes,
                                   "jax": jax.__version__, "device": jax.devices()[0].device_kind,
                                   "hf_reference": hf_reference or []}, indent=1))

    save()
    for name, policy in policies.items():
        run_policy = policy if device_mesh is None else ShardedPolicy(policy, device_mesh)
        gen = Generator(cfg, dtype, run_policy, unroll_layers=jax.default_backend() != "cpu")
        fits = {}  # pool slots -> the largest batch whose compiled decode fits the device's allocator limit
        for position in positions:
            per_seq = cache_bytes(jax.eval_shape(lambda: policy.init(
                cfg, 1, policy.num_slots(prompt_len, position - prompt_len + steps + 2), dtype)))
            slots = policy.num_slots(prompt_len, position - prompt_len + steps + 2)
            if limit and slots not in fits:  # fixed-budget pools: the same at every position
                fits[slots], sizes = largest_decode_batch(gen, position, limit, prompt_len=prompt_len,
                                                          headroom=steps + 2)
                measured = ", ".join(f"B={size['batch']}: {size['total'] / 2**30:.1f} GiB" for size in sizes)
                print(f"  {name} N={position}: largest batch {fits[slots]} from the compiled decode ({measured})",
                      flush=True)
            fit = fits[slots] if limit else max(batches)
            data = data_parallelism(run_policy)  # a sharded batch splits evenly over the data axis
            if any(b % data for b in batches):
                print(f"  {name} N={position}: skipping B={[b for b in batches if b % data]}: not a multiple of the "
                      f"mesh's data axis ({data})", flush=True)
            todo = [b for b in batches if b <= fit and b % data == 0]
            if largest_batch and fit > 0 and fit not in todo:
                todo.append(fit)
            todo, retries = sorted(set(todo)), 2
            while todo:
                batch = todo.pop(0)
                try:
                    cache = synthetic_cache(run_policy, cfg, batch, position, prompt_len, steps + 2, dtype)
                    seconds, compiled, memory = time_decode(gen, params, cache, batch, position, steps)
                except Exception as e:  # out of memory at the largest batch: report it, then try 90% of it
                    print(f"  {name} N={position} B={batch}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                    gc.collect()  # drop what the failed call's frames still reference before the next configuration
                    if batch == fit and "RESOURCE_EXHAUSTED" in str(e) and retries:
                        fit, retries = int(0.9 * batch) // data * data, retries - 1
                        todo.append(fit)
                    continue
                finally:
                    cache = None  # free the pool before the next configuration
                roofline = (weight_bytes / model_split + kv_bytes_read(policy, cfg, batch, position, dtype) / devices
                            ) / bandwidth  # one device's share of the weights and pools
                reference = torch_ms.get((model, position, batch))
                m = Measurement(model, name, batch, position, seconds * 1e3, batch / seconds,
                                per_seq * batch / devices / 2**30, memory.get("bytes_in_use", 0) / 2**30,
                                memory.get("peak_bytes_in_use", 0) / 2**30, roofline * 1e3, compiled,
                                ratio_vs_torch=None if reference is None or mesh else seconds * 1e3 / reference,
                                mesh=mesh, kv_dtype=policy.kv_dtype)
                rows.append(dataclasses.asdict(m))
                print(f"  {name:6s} N={position:6d} B={batch:4d} {m.step_ms:8.2f} ms/step {m.tokens_per_s:9.0f} tok/s "
                      f"cache {m.cache_gib:7.2f} GiB live {m.live_gib:6.1f} GiB roofline {m.roofline_ms:7.2f} ms"
                      + ("" if m.ratio_vs_torch is None else f" {m.ratio_vs_torch:5.2f}x torch ({reference:.2f} ms)")
                      + (f" mesh {mesh} (memory per device)" if mesh else "") + (" COMPILED" if compiled else "")
                      + (f" kv {policy.kv_dtype}" if policy.kv_dtype != "auto" else ""),
                      flush=True)
                save()
    if torch_reference:
        print(torch_ratio_table(rows), flush=True)
    return rows


def torch_ratio_table(rows: list[dict]) -> str:
    """Markdown: every torch reference configuration, its ms/step and tokens/s, and ours / torch per policy."""
    mine = [r for r in rows if r.get("impl", "jax") == "jax"]
    policies = list(dict.fromkeys(r["policy"] for r in mine))
    lines = ["| model | N | B | torch ms (tok/s) | " + " | ".join(f"{p} ms (x torch)" for p in policies) + " |",
             "|---|---|---|---|" + "---|" * len(policies)]
    for t in (r for r in rows if r.get("impl", "jax") != "jax"):
        shown = "OOM" if t["step_ms"] is None else f"{t['step_ms']:.2f} ({t['tokens_per_s']:.0f})"
        cells = []
        for policy in policies:
            ours = next((r for r in mine if (r["policy"], r["model"], r["position"], r["batch"])
                         == (policy, t["model"], t["position"], t["batch"])), None)
            if ours is None:
                cells.append("-")
            elif ours["ratio_vs_torch"] is None:
                cells.append(f"{ours['step_ms']:.2f}")
            else:
                cells.append(f"{ours['step_ms']:.2f} ({ours['ratio_vs_torch']:.2f}x)")
        lines.append(f"| {t['model']} | {t['position']} | {t['batch']} | {shown} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _series(rows: list[dict], value) -> dict[str, list[tuple[float, float]]]:
    """'policy (model)' -> [(position, value(rows at that position))] over the rows of each policy and model."""
    series = {}  # (rows with step_ms None: a torch reference configuration that ran out of memory)
    for model in dict.fromkeys(r["model"] for r in rows):
        for policy in dict.fromkeys(r["policy"] for r in rows):
            mine = [r for r in rows if r["model"] == model and r["policy"] == policy and r["step_ms"] is not None]
            positions = sorted({r["position"] for r in mine})
            series[f"{policy} ({model})"] = [(n, value([r for r in mine if r["position"] == n])) for n in positions]
    return series


def plot_e2e(rows: list[dict], out_dir: Path, batch: int, device: str | None = None) -> list[Path]:
    """Step time and device memory in use vs decode position at one batch size (one line per policy)."""
    from raas_jax.plots import line_plot

    device = device or jax.devices()[0].device_kind
    at_batch = [r for r in rows if r["batch"] == batch]
    return [line_plot(_series(at_batch, lambda rs, m=metric: rs[0][m]), out_dir / f"e2e_{metric}_b{batch}.png",
                      "decode position N", label, f"batch {batch}, {dtype_label(rows)}, {device}")
            for metric, label in (("step_ms", "ms per decode step"),
                                  ("live_gib", "device memory in use (GiB): weights + cache"))]


def plot_throughput(rows: list[dict], out_dir: Path, device: str | None = None) -> Path:
    """Tokens/s at the largest batch measured for each policy and position (what a server would get)."""
    from raas_jax.plots import line_plot

    device = device or jax.devices()[0].device_kind
    return line_plot(_series(rows, lambda rs: max(r["tokens_per_s"] for r in rs)), out_dir / "e2e_tokens_per_s.png",
                     "decode position N", "tokens/s at the largest batch that fits",
                     f"{dtype_label(rows)}, {device}", log_y=True)


def dtype_label(rows: list[dict]) -> str:
    """"bf16", or the page dtypes of the rows when some are not the model's (e.g. "bf16 weights, fp8 pages")."""
    pages = sorted({r.get("kv_dtype", "auto") for r in rows})
    if pages == ["auto"]:
        return "bf16"
    return "bf16 weights, " + "/".join(p.replace("auto", "bf16") for p in pages) + " pages"


def default_policies() -> dict[str, Policy]:
    return {"dense": Dense(), "quest": Quest(budget=1024), "raas": RaaS(budget=1024)}


def real_run(model: str, policy: Policy, batch: int, new_tokens: int, prompt_len: int = 128,
             dtype: Any = jnp.bfloat16) -> dict:
    """A real generation (random weights, no EOS) of `new_tokens` tokens: ms per step over the whole run."""
    from raas_jax.api import Model

    cfg = MODEL_SHAPES[model]
    params = random_params(cfg, dtype)
    lm = Model(cfg, params, dtype, tokenizer=None, eos_ids=())
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len)).tolist()
    lm.generate(prompts, max_new_tokens=200, policy=policy)  # compile
    result = lm.generate(prompts, max_new_tokens=new_tokens, policy=policy)[0]
    return {"model": model, "policy": policy.name, "batch": batch, "new_tokens": result.stats["new_tokens"],
            "step_ms": 1e3 * result.stats["seconds"] / result.stats["new_tokens"]}
