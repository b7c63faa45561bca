"""Outside reference for `bench e2e --hf-reference`: HF transformers (torch, SDPA) dense decode at context N.

Builds a randomly initialised model of the benchmark shape (`bench.MODEL_SHAPES`) in bf16 on the GPU (or
float32 on a CPU), prefills N random tokens per sequence, then times greedy decode steps with HF's default
dynamic cache, eager mode, torch.cuda.synchronize around the loop. Run in a child process
(`python -m raas_jax.bench.hf_decode ...`, see `run_hf_reference`) so torch and JAX do not share an allocator.

    python -m raas_jax.bench.hf_decode --model llama3-8b --positions 2048,16384 --batches 1 --steps 32 --out hf.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from raas_jax.models.config import ModelConfig
from raas_jax.validation import at_least, int_list

HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def hf_model(cfg: ModelConfig, device, dtype):
    """A random-weight transformers model with `cfg`'s shapes (Llama or Qwen2 architecture)."""
    import torch
    import transformers

    if cfg.model_type not in HF_CLASSES:
        raise ValueError(f"no HF reference for model_type {cfg.model_type!r}; use one of {', '.join(HF_CLASSES)}")
    config_cls, model_cls = (getattr(transformers, name) for name in HF_CLASSES[cfg.model_type])
    config = config_cls(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                        head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
                        max_position_embeddings=131072, tie_word_embeddings=cfg.tie_word_embeddings,
                        attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = model_cls(config).to(dtype).eval()
    return model


def time_decode(model, batch: int, context: int, steps: int, device) -> float:
    """ms per greedy decode step after prefilling `context` random tokens (3 warm-up steps)."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    tokens = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    with torch.no_grad():
        out = model(tokens, use_cache=True, logits_to_keep=1)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for step in range(3 + steps):
            if step == 3:
                sync()
                start = time.perf_counter()
            out = model(nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
    return (time.perf_counter() - start) / steps * 1e3


def measure(model_name: str, positions: list[int], batches: list[int], steps: int) -> list[dict]:
    """One row per (batch, position); a configuration that runs out of memory gets step_ms None."""
    import torch
    import transformers

    from raas_jax.bench.e2e import MODEL_SHAPES

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = hf_model(MODEL_SHAPES[model_name], device, dtype)
    impl = f"transformers {transformers.__version__} eager, DynamicCache, SDPA; torch {torch.__version__}"
    rows = []
    for batch in batches:
        for position in positions:
            try:
                ms = time_decode(model, batch, position, steps, device)
            except torch.OutOfMemoryError:
                ms = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append({"model": model_name, "impl": impl, "device": str(device), "batch": batch,
                         "position": position, "step_ms": ms})
            shown = "out of memory" if ms is None else f"{ms:.2f} ms/step"
            print(f"  hf     N={position:6d} B={batch:4d} {shown}  ({impl})", flush=True)
    return rows


def run_child(module: str, label: str, args: list[str], out: Path) -> list[dict]:
    """`python -m module ARGS --out OUT` in a child process, so its torch allocator does not share the GPU with
    JAX's (the child keeps JAX on the CPU); the rows it wrote to `out` (those written before a failure, if it
    failed: a child may write its rows as it goes), [] if it wrote none."""
    out.unlink(missing_ok=True)  # rows of an earlier run must not pass for this one's
    cmd = [sys.executable, "-m", module, *args, "--out", str(out)]
    result = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"})
    rows = json.loads(out.read_text()) if out.is_file() else []
    if result.returncode != 0:
        print(f"  {label} failed (exit {result.returncode}, {len(rows)} rows kept); see the output above",
              flush=True)
    return rows


def run_hf_reference(model_name: str, positions: list[int], batches: list[int], steps: int,
                     out: Path) -> list[dict]:
    """`measure` in a child process (its own torch allocator); rows also written to `out`."""
    return run_child("raas_jax.bench.hf_decode", "hf reference", ["--model", model_name, "--positions",
                     ",".join(map(str, positions)), "--batches", ",".join(map(str, batches)), "--steps", str(steps)],
                     out)


def reference_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every reference child takes (its parent passes them from `bench e2e`)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--positions", type=int_list(1), default=(2048, 16384))
    ap.add_argument("--batches", type=int_list(1), default=(1,))
    ap.add_argument("--steps", type=at_least(1), default=32)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = reference_parser(__doc__.splitlines()[0]).parse_args(argv)
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        print("the HF reference needs torch and transformers: pip install torch transformers", file=sys.stderr)
        return 2
    rows = measure(args.model, list(args.positions), list(args.batches), args.steps)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
