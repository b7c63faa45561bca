"""raas-jax: Llama/Qwen inference in JAX with RaaS (Reasoning-Aware Attention Sparsity) and its baselines."""

from raas_jax.api import GenerationResult, Model, load
from raas_jax.models.config import ModelConfig, UnsupportedModelError

__all__ = ["GenerationResult", "Model", "ModelConfig", "UnsupportedModelError", "load"]
__version__ = "0.1.0"
