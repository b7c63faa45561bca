"""Model configuration: one frozen dataclass read from a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# model_type -> the HF architecture class it comes with.
SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not implemented."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str  # llama | mistral | qwen2 | qwen3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2: True)
    o_bias: bool = False  # bias on the output projection (Llama attention_bias=True)
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # recorded only: sliding-window attention is not implemented
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "ModelConfig":
        if not isinstance(hf, dict):
            raise ValueError(f"config.json must hold a JSON object, got a {type(hf).__name__}")
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or []
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported model_type {model_type!r} (architectures {archs}); raas-jax supports "
                + ", ".join(f"{t} ({a})" for t, a in SUPPORTED_ARCHITECTURES.items())
            )
        for arch in archs:
            if not arch.endswith("ForCausalLM") or arch not in SUPPORTED_ARCHITECTURES.values():
                raise UnsupportedModelError(
                    f"unsupported architecture {arch!r}; raas-jax supports "
                    + ", ".join(SUPPORTED_ARCHITECTURES.values())
                )
        _check_fields(hf)
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
        num_heads = int(hf["num_attention_heads"])
        num_kv_heads = int(hf.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}"
            )
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or hidden // num_heads
        attention_bias = bool(hf.get("attention_bias", False))
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias, o_bias = attention_bias, attention_bias
        sliding_window = None
        if model_type == "mistral" or (model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window")):
            sliding_window = hf.get("sliding_window")
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        return cls(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(_rope_theta(hf)),
            rope_scaling=_rope_scaling(hf),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=None if sliding_window is None else int(sliding_window),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        try:
            with open(path) as f:
                hf = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}: is this a model directory?") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); the checkpoint's config is corrupt") from None
        return cls.from_hf_dict(hf)


_REQUIRED_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")
_NUMBERS = ("rms_norm_eps", "rope_theta")


def _check_fields(hf: Any) -> None:
    """ValueError naming the field when config.json lacks a size or holds a wrong type."""
    for key in _REQUIRED_INTS + _OPTIONAL_INTS:
        value = hf.get(key)
        if value is None and key in _REQUIRED_INTS:
            raise ValueError(f"config.json lacks {key!r}")
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"config.json field {key!r} must be a positive integer, got {value!r}")
    for key in _NUMBERS:
        value = hf.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise ValueError(f"config.json field {key!r} must be a number, got {value!r}")


def _rope_theta(hf: dict[str, Any]) -> float:
    if "rope_theta" in hf:
        return hf["rope_theta"]
    params = hf.get("rope_parameters") or {}  # transformers >= 5 keeps theta here
    return params.get("rope_theta", 10000.0)


def _rope_scaling(hf: dict[str, Any]) -> RopeScaling:
    rs = hf.get("rope_scaling") or hf.get("rope_parameters") or None
    if not rs:
        return RopeScaling()
    rope_type = rs.get("rope_type", rs.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return RopeScaling()
    return RopeScaling(
        rope_type=rope_type,
        factor=float(rs.get("factor", 1.0)),
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
    )
