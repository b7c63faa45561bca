"""Calibrated FP8 KV scales (vLLM's k_scale / v_scale): per-layer absolute maxima of the keys and values a model
writes, measured over prompts and their greedy continuations with pages in the model's dtype, saved beside the
checkpoint as kv_scales.json. A model loaded from that directory stores FP8 pages as k / k_scale, v / v_scale
(cache.kv_scales), so keys past e4m3fn's 448 are not clipped."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from raas_jax import signals, validation
from raas_jax.model_io.checkpoint import give_umask_mode

SCALES_FILE = "kv_scales.json"


@jax.jit
def _layer_absmax(x: jax.Array) -> jax.Array:
    """[L, B, ...] -> [L] largest |x| of each layer, reduced in the pool's dtype (exact for a max: no float32 copy of
    the pool on a backend that would not fuse the upcast)."""
    return jnp.max(jnp.abs(x).reshape(x.shape[0], -1), axis=1).astype(jnp.float32)


def measure_kv_absmax(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 8,
                      progress: bool = True) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-layer (key, value) absolute maxima over `prompts` (token ids) and `max_new_tokens` greedy tokens each,
    under Dense pages in the model's dtype (nothing is clipped or evicted)."""
    from raas_jax.decode.generate import run_generation
    from raas_jax.policies import Dense

    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    gen = model._generator(Dense())
    k_max = v_max = np.zeros(model.cfg.num_layers)
    for start in tqdm(range(0, len(prompts), batch_size), desc="calibrating", unit="batch", disable=not progress):
        batch = [list(p) for p in prompts[start:start + batch_size]]
        signals.checkpoint("calibration batch")
        _, state = run_generation(gen, model.params, batch, max_new_tokens=max_new_tokens, eos_ids=model.eos_ids)
        rows = slice(0, len(batch))  # the padding rows a mesh may add hold no prompt
        k_max = np.maximum(k_max, np.asarray(_layer_absmax(state.cache.k[:, rows])))
        v_max = np.maximum(v_max, np.asarray(_layer_absmax(state.cache.v[:, rows])))
    return tuple(map(float, k_max)), tuple(map(float, v_max))


def write_kv_absmax(directory: str | Path, kv_absmax: tuple[Sequence[float], Sequence[float]], **meta) -> Path:
    """Write kv_scales.json into `directory` (a temporary file renamed into place: a reader never sees half)."""
    directory = Path(directory)
    path = directory / SCALES_FILE
    record = {"k_absmax": list(kv_absmax[0]), "v_absmax": list(kv_absmax[1]), **meta}
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as f:
        json.dump(record, f, indent=1)
    give_umask_mode(Path(f.name))  # NamedTemporaryFile makes it 0600
    os.replace(f.name, path)
    return path


def check_writable(directory: str | Path) -> None:
    """Refuse, before any calibration, a checkpoint directory kv_scales.json cannot be written into."""
    validation.check_writable(directory, SCALES_FILE, "calibrate a copy you can write (`raas-jax convert SRC OUT`, "
                              "then calibrate OUT)")


def read_kv_absmax(directory: str | Path, num_layers: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The calibrated maxima saved in `directory`, or None if it has none. A file that does not hold one finite,
    non-negative value per layer for keys and values is refused with what to do."""
    path = Path(directory) / SCALES_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        k, v = (tuple(float(x) for x in record[name]) for name in ("k_absmax", "v_absmax"))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a kv_scales file ({type(e).__name__}: {e}); delete it or re-run "
                         "`raas-jax calibrate-kv`") from None
    if len(k) != num_layers or len(v) != num_layers or not all(np.isfinite(k + v)) or min(k + v) < 0:
        raise ValueError(f"{path} must hold {num_layers} finite values >= 0 each for k_absmax and v_absmax (one per "
                         f"layer), got {len(k)} and {len(v)}; re-run `raas-jax calibrate-kv` for this model")
    return k, v
