"""Strong torch reference for `bench e2e --torch-reference`: dense decode the way a user would write it in torch.

gpt-fast style: random bf16 weights of a benchmark shape (`bench.MODEL_SHAPES`), a static KV cache
`[L, B, Hkv, N + steps + 2, D]` holding N random tokens, cuBLAS matmuls, `scaled_dot_product_attention` with
GQA, and the whole decode step (embedding, layers, logits, greedy argmax, position + 1) captured in one CUDA
graph that is replayed once per step. No torch.compile. On a CPU the same step runs eagerly in float32 (for
tests). Run in a child process (`run_torch_reference`) so torch and JAX do not share an allocator.

    python -m raas_jax.bench.torch_decode --model llama3-8b --positions 2048,32768 --batches 1,64 --steps 32 --out t.json
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from raas_jax.models.config import ModelConfig

GIB = 2**30
MAX_BATCH = 1024  # the cap of the JAX side's largest-batch search too
OOM_RETRIES = 3  # at the largest batch: try 80% of the batch after an out-of-memory, this many times


@dataclasses.dataclass(frozen=True)
class Weights:
    """A Llama/Qwen2 decoder's weights, stacked over layers, laid out for `x @ W` (cuBLAS GEMMs)."""
    embed: Any  # [V, H]
    lm_head: Any  # [H, V]
    norm: Any  # [H]
    norm1: Any  # [L, H] before attention
    norm2: Any  # [L, H] before the MLP
    qkv: Any  # [L, H, (Hq + 2 Hkv) D]
    qkv_bias: Any  # [L, (Hq + 2 Hkv) D] or None
    o: Any  # [L, Hq D, H]
    gate_up: Any  # [L, H, 2 M]
    down: Any  # [L, M, H]
    inv_freq: Any  # [D / 2] float32 (RoPE)


@dataclasses.dataclass(frozen=True)
class Timing:
    """One (position, batch) measurement: ms per decode step and torch's memory counters."""
    step_ms: float
    live_gib: float  # allocated right after the timed steps: weights + cache + the graph's buffers
    peak_gib: float  # peak allocated during this configuration


def check_torch() -> None:
    """A clear error (not a traceback in a child process) when torch is not installed."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise ValueError("the torch reference needs torch: pip install torch (a CUDA build of it on the GPU "
                         "machine)")


def check_config(cfg: ModelConfig) -> None:
    unsupported = [name for name in ("qk_norm", "o_bias", "mlp_bias") if getattr(cfg, name)]
    if unsupported:
        raise ValueError(f"the torch reference has no {', '.join(unsupported)} (Llama / Qwen2 shapes only)")


def _inv_freq(cfg: ModelConfig, device) -> Any:
    import torch

    from raas_jax.models.transformer import rope_inv_freq

    return torch.from_numpy(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)).to(device)


def random_weights(cfg: ModelConfig, device, dtype, seed: int = 0) -> Weights:
    """Random weights like `bench.random_params` (N(0, 0.02), norms N(1, 0.1)), drawn in place in `dtype`."""
    import torch

    check_config(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    L, H, M, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim

    def draw(*shape, mean=0.0, std=0.02):
        return torch.empty(shape, device=device, dtype=dtype).normal_(mean, std, generator=gen)

    embed = draw(V, H)
    return Weights(embed=embed, lm_head=embed.t() if cfg.tie_word_embeddings else draw(H, V),
                   norm=draw(H, mean=1.0, std=0.1), norm1=draw(L, H, mean=1.0, std=0.1),
                   norm2=draw(L, H, mean=1.0, std=0.1), qkv=draw(L, H, qkv_out),
                   qkv_bias=draw(L, qkv_out) if cfg.qkv_bias else None, o=draw(L, cfg.num_heads * cfg.head_dim, H),
                   gate_up=draw(L, H, 2 * M), down=draw(L, M, H), inv_freq=_inv_freq(cfg, device))


def weights_from_params(params: dict, cfg: ModelConfig, device, dtype) -> Weights:
    """The same model as a raas_jax parameter tree (`Transformer` params, layers stacked on axis 0)."""
    import numpy as np
    import torch

    check_config(cfg)

    def t(x):
        return torch.from_numpy(np.array(x, np.float32)).to(device=device, dtype=dtype)  # (a writable copy)

    layers, attn, mlp = params["layers"], params["layers"]["self_attn"], params["layers"]["mlp"]
    qkv = np.concatenate([attn[n]["kernel"] for n in ("q_proj", "k_proj", "v_proj")], -1)  # [L, H, (Hq+2Hkv)D]
    bias = np.concatenate([attn[n]["bias"] for n in ("q_proj", "k_proj", "v_proj")], -1) if cfg.qkv_bias else None
    embed = t(params["embed_tokens"]["embedding"])
    return Weights(embed=embed, lm_head=embed.t() if cfg.tie_word_embeddings else t(params["lm_head"]["kernel"]),
                   norm=t(params["norm"]["weight"]), norm1=t(layers["input_layernorm"]["weight"]),
                   norm2=t(layers["post_attention_layernorm"]["weight"]), qkv=t(qkv),
                   qkv_bias=None if bias is None else t(bias), o=t(attn["o_proj"]["kernel"]),
                   gate_up=t(np.concatenate([mlp["gate_proj"]["kernel"], mlp["up_proj"]["kernel"]], -1)),
                   down=t(mlp["down_proj"]["kernel"]), inv_freq=_inv_freq(cfg, device))


def _rms(x, w, eps: float):
    x32 = x.float()
    return w * (x32 * (x32.pow(2).mean(-1, keepdim=True) + eps).rsqrt()).to(x.dtype)


def _rope(x, cos, sin):  # x [B, h, T, D]; cos, sin [T, D]: HF's rotate_half convention
    import torch

    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def has_enable_gqa() -> bool:
    """SDPA takes `enable_gqa` from torch 2.5 on (before: the KV heads are repeated)."""
    import torch

    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def _sdpa(q, k, v, mask):  # q [B, Hq, T, D]; k, v [B, Hkv, S, D]; mask [T, S] bool
    import torch.nn.functional as F

    if has_enable_gqa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                          attn_mask=mask)


def forward(w: Weights, cfg: ModelConfig, tokens, pos, kc, vc):
    """tokens [B, T] at positions pos .. pos+T-1 (`pos`: a 0-d int64 tensor on the device, so a captured graph
    reads it when replayed); writes their keys/values into kc, vc [L, B, Hkv, S, D]; attends every cached
    position <= its own. Returns logits [B, T, V] in the weights' dtype."""
    import torch

    B, T = tokens.shape
    Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    S = kc.shape[3]
    at = pos + torch.arange(T, device=tokens.device)  # [T]
    mask = torch.arange(S, device=tokens.device)[None, :] <= at[:, None]  # [T, S]
    freqs = at.float()[:, None] * w.inv_freq[None, :]  # [T, D/2]
    emb = torch.cat([freqs, freqs], -1)  # [T, D]
    cos, sin = emb.cos().to(w.embed.dtype), emb.sin().to(w.embed.dtype)
    x = w.embed[tokens]  # [B, T, H]
    for layer in range(cfg.num_layers):
        h = _rms(x, w.norm1[layer], cfg.rms_norm_eps) @ w.qkv[layer]  # [B, T, (Hq+2Hkv)D]
        if w.qkv_bias is not None:
            h = h + w.qkv_bias[layer]
        q, k, v = h.split([Hq * D, Hkv * D, Hkv * D], -1)
        q = _rope(q.view(B, T, Hq, D).transpose(1, 2), cos, sin)  # [B, Hq, T, D]
        k = _rope(k.view(B, T, Hkv, D).transpose(1, 2), cos, sin)  # [B, Hkv, T, D]
        kc[layer].index_copy_(2, at, k)
        vc[layer].index_copy_(2, at, v.view(B, T, Hkv, D).transpose(1, 2))
        a = _sdpa(q, kc[layer], vc[layer], mask)  # [B, Hq, T, D]
        x = x + a.transpose(1, 2).reshape(B, T, Hq * D) @ w.o[layer]
        gate, up = (_rms(x, w.norm2[layer], cfg.rms_norm_eps) @ w.gate_up[layer]).chunk(2, -1)  # [B, T, M] each
        x = x + (torch.nn.functional.silu(gate) * up) @ w.down[layer]
    return _rms(x, w.norm, cfg.rms_norm_eps) @ w.lm_head  # [B, T, V]


def static_cache(cfg: ModelConfig, batch: int, capacity: int, device, dtype, seed: int = 0):
    """Keys and values [L, B, Hkv, capacity, D], random (the tokens before the decode position)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim)
    return tuple(torch.empty(shape, device=device, dtype=dtype).normal_(generator=gen) for _ in range(2))


def time_decode(w: Weights, cfg: ModelConfig, batch: int, position: int, steps: int) -> Timing:
    """ms per greedy decode step from position `position` (the cache holds that many tokens): 2 warm-up steps,
    then `steps` timed steps, as `bench.time_decode` does. On a GPU each step is one CUDA-graph replay."""
    import torch

    device = w.embed.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    kc, vc = static_cache(cfg, batch, position + steps + 2, device, w.embed.dtype)
    tok = torch.zeros(batch, 1, dtype=torch.long, device=device)  # [B, 1]
    pos = torch.tensor(position, dtype=torch.long, device=device)

    def step():
        logits = forward(w, cfg, tok, pos, kc, vc)  # [B, 1, V]
        tok.copy_(logits.argmax(-1))
        pos.add_(1)

    with torch.no_grad():
        run = step
        if cuda:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up outside the graph (cuBLAS workspaces, SDPA backend choice)
                for _ in range(2):
                    step()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize(device)
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # JAX's threads share the process
                step()
            run = graph.replay
        pos.fill_(position)
        for _ in range(2):
            run()
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            run()
        if cuda:
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - start) / steps
    assert int(pos) == position + 2 + steps
    live = torch.cuda.memory_allocated(device) / GIB if cuda else 0.0
    peak = torch.cuda.max_memory_allocated(device) / GIB if cuda else 0.0
    return Timing(seconds * 1e3, live, peak)


def largest_batch(cfg: ModelConfig, position: int, steps: int, free_bytes: int, itemsize: int) -> int:
    """Like the JAX side: 80% of what is free (after the weights) less 8 GiB, over one sequence's cache."""
    per_seq = 2 * cfg.num_layers * cfg.num_kv_heads * (position + steps + 2) * cfg.head_dim * itemsize
    return max(0, min(MAX_BATCH, int(0.8 * (free_bytes - 8 * GIB) // per_seq)))


def _is_oom(error: Exception) -> bool:
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error)


def _plan(cfg: ModelConfig, position: int, steps: int, batches: list[int], largest: bool, device,
          itemsize: int) -> tuple[list[int], int | None]:
    """The batches to time at `position` and the largest one added (None if none). On a GPU, like
    `bench.run_e2e`: batches over the estimate of what fits are skipped and the estimate is the largest batch."""
    import torch

    todo = sorted(set(batches))
    if device.type != "cuda":
        return todo, None
    torch.cuda.empty_cache()
    fit = largest_batch(cfg, position, steps, torch.cuda.mem_get_info(device)[0], itemsize)
    if any(b > fit for b in todo):
        print(f"  torch  N={position:6d} skipping B={[b for b in todo if b > fit]} (largest that fits: {fit})",
              flush=True)
    todo = [b for b in todo if b <= fit]
    if not largest or fit == 0 or fit in todo:
        return todo, None
    return todo + [fit], fit


def _measure_one(w: Weights, cfg: ModelConfig, batch: int, position: int, steps: int) -> dict:
    """The fields of one row that depend on the run: timing and memory, or the out-of-memory error."""
    try:
        timing = time_decode(w, cfg, batch, position, steps)
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one; so is an OOM inside graph capture
        if not _is_oom(e):
            raise
        return {"step_ms": None, "tokens_per_s": None, "live_gib": None, "peak_gib": None,
                "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    return {"step_ms": timing.step_ms, "tokens_per_s": batch / timing.step_ms * 1e3, "live_gib": timing.live_gib,
            "peak_gib": timing.peak_gib, "error": None}


def measure(model_name: str, positions: list[int], batches: list[int], steps: int, largest: bool,
            out: Path | None = None) -> list[dict]:
    """One row per (position, batch), plus the largest batch that fits at each position when `largest` (on a
    GPU, see `_plan`). A configuration that runs out of memory gets a row with step_ms None and the error; at
    the largest batch 80% of it is tried next (up to OOM_RETRIES times). Rows go to `out` after each one."""
    import torch

    from raas_jax.bench.e2e import MODEL_SHAPES

    cfg = MODEL_SHAPES[model_name]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    impl = "torch_cuda_graph" if cuda else "torch_eager"
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    w = random_weights(cfg, device, dtype)
    print(f"  torch {torch.__version__} {impl} on {name}, {dtype}, SDPA "
          f"{'enable_gqa' if has_enable_gqa() else 'repeat_interleave'}", flush=True)
    rows = []
    for position in positions:
        todo, retry_from = _plan(cfg, position, steps, batches, largest, device, dtype.itemsize)
        retries = 0
        while todo:
            batch = todo.pop(0)
            cache_gib = 2 * cfg.num_layers * batch * cfg.num_kv_heads * position * cfg.head_dim * dtype.itemsize / GIB
            row = {"model": model_name, "policy": impl, "impl": impl, "torch": torch.__version__, "device": name,
                   "batch": batch, "position": position, "cache_gib": cache_gib, "roofline_ms": None,
                   "compiled_during_timing": False, **_measure_one(w, cfg, batch, position, steps)}
            if cuda:
                torch.cuda.empty_cache()  # the configuration's cache and graph died with time_decode's frame
            rows.append(row)
            if out is not None:
                out.write_text(json.dumps(rows, indent=1))
            if row["error"] is None:
                print(f"  torch  N={position:6d} B={batch:4d} {row['step_ms']:8.2f} ms/step "
                      f"{row['tokens_per_s']:9.0f} tok/s cache {cache_gib:7.2f} GiB peak {row['peak_gib']:6.1f} GiB",
                      flush=True)
                continue
            print(f"  torch  N={position:6d} B={batch:4d} out of memory ({row['error']})", flush=True)
            if batch == retry_from and retries < OOM_RETRIES and int(0.8 * batch) > 0:
                retry_from, retries = int(0.8 * batch), retries + 1
                todo.append(retry_from)
    return rows


def run_torch_reference(model_name: str, positions: list[int], batches: list[int], steps: int, largest: bool,
                        out: Path) -> list[dict]:
    """`measure` in a child process (its own torch allocator); rows also written to `out`; [] if it failed."""
    from raas_jax.bench.hf_decode import run_child

    args = ["--model", model_name, "--positions", ",".join(map(str, positions)),
            "--batches", ",".join(map(str, batches)), "--steps", str(steps)]
    return run_child("raas_jax.bench.torch_decode", "torch reference", args + ([] if largest else ["--no-largest-batch"]),
                     out)


def main(argv: list[str] | None = None) -> int:
    from raas_jax.bench.hf_decode import reference_parser

    ap = reference_parser(__doc__.splitlines()[0])
    ap.add_argument("--no-largest-batch", action="store_true", help="skip the largest batch that fits")
    args = ap.parse_args(argv)
    try:
        check_torch()
        import torch  # noqa: F401
    except (ValueError, ImportError) as e:
        message = str(e) if isinstance(e, ValueError) else f"cannot import torch ({e}): pip install torch"
        print(f"raas_jax.bench.torch_decode: error: {message}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else None
    rows = measure(args.model, list(args.positions), list(args.batches), args.steps, not args.no_largest_batch, out)
    if out is not None:
        out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
