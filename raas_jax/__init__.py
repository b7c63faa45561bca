"""raas-jax: Llama/Qwen inference in JAX with RaaS (Reasoning-Aware Attention Sparsity) and its baselines."""

import os as _os

# In a source checkout (editable install, PYTHONPATH, or `python -m ...` from the repository root) the
# sub-packages raas_jax.models and raas_jax.kernels are the top-level folders models/ and kernels/ beside this
# one; an installed wheel has them inside raas_jax/. Those folders have no __init__.py on purpose: as namespace
# portions they never shadow an installed top-level `kernels` or `models` package (transformers imports the
# `kernels` package), while here they resolve as sub-packages of raas_jax.
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")):
    __path__.append(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))  # noqa: F821

from raas_jax.api import GenerationResult, Model, load
from raas_jax.models.config import ModelConfig, UnsupportedModelError
from raas_jax.policies import H2O, Dense, Policy, Quest, RaaS, StreamingLLM, make_policy

__all__ = ["H2O", "Dense", "GenerationResult", "Model", "ModelConfig", "Policy", "Quest", "RaaS", "StreamingLLM",
           "UnsupportedModelError", "configure_gpu", "load", "make_policy"]
__version__ = "0.1.0"

_NO_TRITON_GEMM = "--xla_gpu_enable_triton_gemm=false"


def configure_gpu() -> bool:
    """Prefer cuBLAS to XLA's Triton GEMMs: add ``--xla_gpu_enable_triton_gemm=false`` to ``XLA_FLAGS``.

    Decode matmuls are [batch, hidden] x [hidden, out]: on an H200, XLA's Triton GEMMs read the weights at
    1.2 TB/s there, cuBLAS at 3.1 TB/s (docs/performance.md). `raas-jax` calls this when it starts; from
    Python, call it before JAX starts its GPU backend (before the first computation), or it has no effect.
    Leaves ``XLA_FLAGS`` alone when it already names a triton_gemm setting or ``RAAS_JAX_KEEP_XLA_FLAGS``
    is set. Returns whether it changed ``XLA_FLAGS``. Importing raas_jax changes nothing in the environment.
    """
    flags = _os.environ.get("XLA_FLAGS", "")
    if _os.environ.get("RAAS_JAX_KEEP_XLA_FLAGS") or "triton_gemm" in flags:
        return False
    _os.environ["XLA_FLAGS"] = f"{flags} {_NO_TRITON_GEMM}".strip()
    return True
