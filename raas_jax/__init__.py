"""raas-jax: Llama/Qwen inference in JAX with RaaS (Reasoning-Aware Attention Sparsity) and its baselines."""

import os as _os

# Decode matmuls are [batch, hidden] x [hidden, out]: on an H200, XLA's Triton GEMMs read the weights at
# 1.2 TB/s there, cuBLAS at 3.1 TB/s (docs/performance.md). Takes effect only if JAX has not started its
# GPU backend yet; set RAAS_JAX_KEEP_XLA_FLAGS=1 to leave XLA_FLAGS alone.
if not _os.environ.get("RAAS_JAX_KEEP_XLA_FLAGS") and "triton_gemm" not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false").strip()

from raas_jax.api import GenerationResult, Model, load
from raas_jax.models.config import ModelConfig, UnsupportedModelError

__all__ = ["GenerationResult", "Model", "ModelConfig", "UnsupportedModelError", "load"]
__version__ = "0.1.0"
