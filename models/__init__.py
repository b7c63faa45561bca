"""Functional Flax definitions of the Llama family and Qwen2/Qwen3 (installed as raas_jax.models)."""

from .config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModelError
from .transformer import Transformer, fuse_projections

__all__ = ["SUPPORTED_ARCHITECTURES", "ModelConfig", "Transformer", "UnsupportedModelError", "fuse_projections"]
