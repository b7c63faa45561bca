"""Export a converted raas-jax model directory as a Hugging Face directory (the inverse of `convert`).

    from raas_jax.model_io.export import export_hf
    export_hf("checkpoints/milestones-13m", "out/milestones-13m-hf")     # config.json, model.safetensors, tokenizer

The result loads with `transformers.AutoModelForCausalLM.from_pretrained(out)` (Llama, Mistral, Qwen2, Qwen3).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from raas_jax import signals
from raas_jax.eval.calibrate import SCALES_FILE
from raas_jax.model_io import checkpoint
from raas_jax.models.config import ModelConfig

_MODULES = {("self_attn", "q_proj"): "self_attn.q_proj", ("self_attn", "k_proj"): "self_attn.k_proj",
            ("self_attn", "v_proj"): "self_attn.v_proj", ("self_attn", "o_proj"): "self_attn.o_proj",
            ("mlp", "gate_proj"): "mlp.gate_proj", ("mlp", "up_proj"): "mlp.up_proj",
            ("mlp", "down_proj"): "mlp.down_proj"}
_NORMS = {("input_layernorm",): "input_layernorm", ("post_attention_layernorm",): "post_attention_layernorm",
          ("self_attn", "q_norm"): "self_attn.q_norm", ("self_attn", "k_norm"): "self_attn.k_norm"}
_NP_DTYPES = {"bf16": ml_dtypes.bfloat16, "bfloat16": ml_dtypes.bfloat16, "f32": np.float32, "float32": np.float32}


def hf_tensors(params: dict, cfg: ModelConfig, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Our parameter tree -> {HF tensor name: array} (kernels transposed, stacked layers split)."""
    out: dict[str, np.ndarray] = {}

    def put(name: str, value) -> None:
        out[name] = np.ascontiguousarray(np.asarray(value).astype(dtype))

    put("model.embed_tokens.weight", params["embed_tokens"]["embedding"])
    put("model.norm.weight", params["norm"]["weight"])
    if not cfg.tie_word_embeddings:
        put("lm_head.weight", np.asarray(params["lm_head"]["kernel"]).T)
    layers = params["layers"]
    for path, hf in _MODULES.items():
        module = layers[path[0]][path[1]]
        for i in range(cfg.num_layers):
            put(f"model.layers.{i}.{hf}.weight", np.asarray(module["kernel"][i]).T)
            if "bias" in module:
                put(f"model.layers.{i}.{hf}.bias", module["bias"][i])
    for path, hf in _NORMS.items():
        module = layers
        try:
            for key in path:
                module = module[key]
        except KeyError:
            continue
        for i in range(cfg.num_layers):
            put(f"model.layers.{i}.{hf}.weight", module["weight"][i])
    return out


def export_hf(src: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None,
              overwrite: bool = False) -> Path:
    """Write the converted directory `src` as an HF directory `out` (config.json, model.safetensors, tokenizer
    and generation_config.json). `dtype`: bf16 or f32 (default: the dtype the checkpoint was stored in)."""
    from safetensors.numpy import save_file

    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not checkpoint.is_converted(src):
        raise FileNotFoundError(f"{src} is not a converted raas-jax directory (config.json + params/)")
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise ValueError(f"OUT {out} is the source or a folder holding it: exporting there would delete the "
                         f"source {src}; choose another OUT")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
    stored = checkpoint.stored_dtype(src)
    name = dtype or ("bf16" if np.dtype(stored) == np.dtype(ml_dtypes.bfloat16) else "f32")
    if name not in _NP_DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use bf16 or f32")
    hf_config = json.loads((src / "config.json").read_text())
    cfg = ModelConfig.from_hf_dict(hf_config)
    params = jax.device_get(checkpoint.restore_params(src, cfg, stored))
    tensors = hf_tensors(params, cfg, _NP_DTYPES[name])
    with checkpoint.atomic_directory(out) as tmp:
        hf_config = dict(hf_config, torch_dtype="bfloat16" if _NP_DTYPES[name] is ml_dtypes.bfloat16 else "float32")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        signals.checkpoint("export tensors")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        checkpoint.give_umask_mode(tmp / "model.safetensors")  # save_file creates it 0600
        for side in checkpoint.TOKENIZER_FILES + ("generation_config.json", SCALES_FILE):
            if (src / side).is_file():
                shutil.copy2(src / side, tmp / side)
    return out
