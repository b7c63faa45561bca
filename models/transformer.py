"""Decoder-only transformer for the Llama family (Llama 2/3/3.1, Mistral, SmolLM2) and Qwen2/Qwen3.

Flax linen used functionally:

    logits, cache = Transformer(cfg, dtype, policy).apply({"params": params}, tokens, positions, cache)

* `params` is a plain nested dict; the layers are stacked on a leading axis (`nn.scan`). The model takes the
  checkpoint's layout (q/k/v, gate/up as HF has them) or the fused one of `fuse_projections` (what `load` gives).
* `cache` is `None` (a full causal forward) or a `PagePool` (raas_jax/decode/cache.py), arrays stacked over
  layers, carried through the layer scan (so one decode step writes one token per layer in place); the model reads
  only its page dtype and FP8 scales: `policy` (a frozen, hashable policy from `raas_jax.policies`) writes keys and
  values into it and runs decode attention over it. With `decode=False` the tokens are a prompt: they
  attend to each other causally (dense) and are written into the cache; with `chunked=True` they are one
  chunk of a prompt whose earlier chunks are in the cache (`policy.prefill_chunk` attends and writes); with
  `decode=True` there is one token per sequence and attention goes through `policy.decode`.
* `positions[b, t] = -1` marks padding: it is neither attended to nor cached.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from raas_jax.kernels.dispatch import causal_attention
from raas_jax.kernels.reference import as_stored

from .config import ModelConfig, RopeScaling


class CachePolicy(Protocol):
    """What the model needs from a KV cache (the policies in `raas_jax.policies`).

    `cache` is the whole cache, stacked over layers; `layer` is the calling layer's (traced) index, so a
    policy can update one token of one layer in place instead of copying a layer per step.
    """

    def prefill(self, cache: Any, layer: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array,
                positions: jax.Array) -> Any: ...

    def prefill_chunk(self, cache: Any, layer: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array,
                      positions: jax.Array) -> tuple[jax.Array, Any]: ...

    def decode(self, cache: Any, layer: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array,
               positions: jax.Array) -> tuple[jax.Array, Any]: ...


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """Inverse RoPE frequencies [D/2] float32, with HF's `linear` and `llama3` scalings."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    inv_freq = inv_freq.astype(np.float32)
    if scaling.rope_type == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    if scaling.rope_type == "llama3":
        old_ctx = scaling.original_max_position_embeddings
        low_wavelen = old_ctx / scaling.low_freq_factor
        high_wavelen = old_ctx / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x [B, T, H, D], positions [B, T] -> x rotated (HF's rotate_half convention)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight * normed.astype(x.dtype)


def _dense(features: int | tuple[int, ...], use_bias: bool, dtype: Any, name: str) -> nn.Module:
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    if isinstance(features, tuple):  # kernel [in, *features]
        return nn.DenseGeneral(features, use_bias=use_bias, dtype=dtype, param_dtype=dtype, precision=precision,
                               name=name)
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=dtype,
                    precision=precision, name=name)


def fuse_projections(cfg: ModelConfig, params: dict) -> dict:
    """The checkpoint's layout -> the fused one the model also takes: q/k/v as one `qkv_proj` kernel
    [L, H, Hkv, G + 2, D] (each KV head's G query heads, its key, its value) and gate/up as one `gate_up_proj`
    kernel [L, H, 2, F]; biases alike. Two GEMMs fewer per layer, and at batch 1 the small k/v projections
    (which XLA would run as multiply-reduce loops, under its GEMM size threshold) ride in a cuBLAS GEMV.
    Sharding the KV-head axis or F over devices keeps each device's heads whole. Already fused: unchanged.
    numpy leaves are fused with numpy (on the host, before placing), device arrays with jax.numpy."""
    layers = params["layers"]
    attn, mlp = layers["self_attn"], layers["mlp"]
    if "qkv_proj" in attn:
        return params
    xp = np if isinstance(attn["q_proj"]["kernel"], np.ndarray) else jnp
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    group = hq // hkv

    def heads(x, per_kv):  # [..., Hkv * per_kv * D] -> [..., Hkv, per_kv, D]
        return x.reshape(*x.shape[:-1], hkv, per_kv, d)

    qkv = {name: xp.concatenate([heads(attn["q_proj"][name], group), heads(attn["k_proj"][name], 1),
                                  heads(attn["v_proj"][name], 1)], axis=-2)
           for name in attn["q_proj"]}  # kernel [L, H, Hkv, G + 2, D], bias [L, Hkv, G + 2, D]
    gate_up = {name: xp.stack([mlp["gate_proj"][name], mlp["up_proj"][name]], axis=-2)
               for name in mlp["gate_proj"]}  # kernel [L, H, 2, F], bias [L, 2, F]
    attn = {k: v for k, v in attn.items() if k not in ("q_proj", "k_proj", "v_proj")} | {"qkv_proj": qkv}
    mlp = {k: v for k, v in mlp.items() if k not in ("gate_proj", "up_proj")} | {"gate_up_proj": gate_up}
    return params | {"layers": layers | {"self_attn": attn, "mlp": mlp}}


class Attention(nn.Module):
    cfg: ModelConfig
    dtype: Any
    policy: CachePolicy | None
    attention_fn: Callable | None = None  # replaces the prompt attention (causal_attention's signature)

    @nn.compact
    def __call__(self, x, positions, cache, layer, mode: str):
        cfg = self.cfg
        b, t, _ = x.shape
        hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if self.has_variable("params", "qkv_proj"):  # fused layout (`fuse_projections`): one GEMM
            group = hq // hkv
            qkv = _dense((hkv, group + 2, d), cfg.qkv_bias, self.dtype, "qkv_proj")(x)  # [B, T, Hkv, G + 2, D]
            q = qkv[:, :, :, :group].reshape(b, t, hq, d)  # [B, T, Hq, D] (query head h reads KV head h // G)
            k, v = qkv[:, :, :, group], qkv[:, :, :, group + 1]  # [B, T, Hkv, D]
        else:  # the checkpoint's layout
            q = _dense(hq * d, cfg.qkv_bias, self.dtype, "q_proj")(x).reshape(b, t, hq, d)  # [B, T, Hq, D]
            k = _dense(hkv * d, cfg.qkv_bias, self.dtype, "k_proj")(x).reshape(b, t, hkv, d)  # [B, T, Hkv, D]
            v = _dense(hkv * d, cfg.qkv_bias, self.dtype, "v_proj")(x).reshape(b, t, hkv, d)  # [B, T, Hkv, D]
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, self.dtype, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, self.dtype, name="k_norm")(k)
        inv_freq = rope_inv_freq(d, cfg.rope_theta, cfg.rope_scaling)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        scaled = cache is not None and cache.k_scale is not None  # FP8 pages with calibrated scales (cache.kv_scales)
        if scaled:  # pages hold k / k_scale, v / v_scale; q * k_scale keeps every logit and page score as it was
            k_scale, v_scale = cache.k_scale[layer], cache.v_scale[layer]  # float32 scalars
            q, k, v = ((x.astype(jnp.float32) * s).astype(x.dtype) for x, s in ((q, k_scale), (k, 1 / k_scale),
                                                                                (v, 1 / v_scale)))
        if mode == "decode":
            # Materialise q, k, v once. At B = 1 XLA rewrites the small k/v projections (a vector times a
            # [H, Hkv*D] matrix, under its 1e7-element GEMM threshold) as multiply-reduce loops and fuses a copy of
            # them into every consumer: each of the cache append's scatters re-read the weights (measured in
            # docs/performance.md, "Why the decode is built this way").
            q, k, v = jax.lax.optimization_barrier((q, k, v))
            out, cache = self.policy.decode(cache, layer, q[:, 0], k[:, 0], v[:, 0], positions[:, 0])
            out = out[:, None]  # [B, 1, Hq, D]
        elif mode == "chunk":
            k, v = as_stored(k, cache.k.dtype), as_stored(v, cache.v.dtype)
            out, cache = self.policy.prefill_chunk(cache, layer, q, k, v, positions)  # [B, C, Hq, D]
        else:
            if cache is not None:  # the prompt attends the keys and values its pages will hold (as decode reads them)
                k, v = as_stored(k, cache.k.dtype), as_stored(v, cache.v.dtype)
            out = self.prompt_attention(q, k, v, positions)  # [B, T, Hq, D]
            if cache is not None:
                cache = self.policy.prefill(cache, layer, q, k, v, positions)
        if scaled:
            out = (out.astype(jnp.float32) * v_scale).astype(out.dtype)
        out = _dense(cfg.hidden_size, cfg.o_bias, self.dtype, "o_proj")(out.reshape(b, t, hq * d))
        return out, cache

    def prompt_attention(self, q, k, v, positions):
        """Causal attention within the prompt (kernels.causal_attention: flash kernels off-CPU). A policy's kernel
        backend other than "auto" (e.g. `--kernels reference`) applies here too."""
        if self.attention_fn is not None:  # e.g. scripts/train_reasoner.py's masked training attention
            return self.attention_fn(q, k, v, positions, positions)
        return causal_attention(q, k, v, positions, positions, backend=getattr(self.policy, "backend", "auto"))


class MLP(nn.Module):
    cfg: ModelConfig
    dtype: Any

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        if self.has_variable("params", "gate_up_proj"):  # fused layout (`fuse_projections`): one GEMM
            gate_up = _dense((2, cfg.intermediate_size), cfg.mlp_bias, self.dtype, "gate_up_proj")(x)  # [B, T, 2, F]
            gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
        else:
            gate = _dense(cfg.intermediate_size, cfg.mlp_bias, self.dtype, "gate_proj")(x)
            up = _dense(cfg.intermediate_size, cfg.mlp_bias, self.dtype, "up_proj")(x)
        return _dense(cfg.hidden_size, cfg.mlp_bias, self.dtype, "down_proj")(nn.silu(gate) * up)


class Block(nn.Module):
    cfg: ModelConfig
    dtype: Any
    policy: CachePolicy | None
    mode: str  # "prefill" | "chunk" | "decode"
    attention_fn: Callable | None = None

    @nn.compact
    def __call__(self, carry, layer, positions):
        x, cache = carry  # the cache rides in the carry: layers update it in place
        cfg = self.cfg
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="input_layernorm")(x)
        h, cache = Attention(cfg, self.dtype, self.policy, self.attention_fn, name="self_attn")(
            h, positions, cache, layer, self.mode)
        x = x + h
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
        x = x + MLP(cfg, self.dtype, name="mlp")(h)
        return (x, cache), None


class Transformer(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    policy: CachePolicy | None = None
    unroll_layers: bool = False  # unroll the layer scan: static weight slices (no per-layer copies on GPU)
    # A callable that replaces the prompt attention, with kernels.causal_attention's signature (q, k, v,
    # q_positions, k_positions) -> out; None: the kernels' causal attention. Training passes a masked one.
    attention_fn: Callable | None = None

    @nn.compact
    def __call__(self, tokens, positions, cache=None, *, decode: bool = False, chunked: bool = False,
                 logits_index=None):
        """tokens, positions [B, T] int32 -> (logits float32 [B, T, V] or [B, V], cache).

        `logits_index` [B] (optional): compute logits only at x[b, logits_index[b]] -> [B, V].
        `chunked`: the tokens are one chunk of prompts whose earlier chunks are in `cache` (chunked prefill).
        """
        cfg = self.cfg
        if chunked and (decode or cache is None):
            raise ValueError("chunked=True is a prompt chunk written into a cache: it needs a cache and decode=False")
        mode = "decode" if decode else "chunk" if chunked else "prefill"
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.dtype,
                         name="embed_tokens")
        x = embed(tokens)  # [B, T, H]
        layers = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast),
            length=cfg.num_layers,
            unroll=cfg.num_layers if self.unroll_layers else 1,
        )(cfg, self.dtype, self.policy, mode, self.attention_fn, name="layers")
        (x, cache), _ = layers((x, cache), jnp.arange(cfg.num_layers, dtype=jnp.int32), positions)
        x = RMSNorm(cfg.rms_norm_eps, self.dtype, name="norm")(x)
        if logits_index is not None:
            x = jnp.take_along_axis(x, logits_index[:, None, None], axis=1)[:, 0]  # [B, H]
        if cfg.tie_word_embeddings:  # (not embed.attend: it uses the default precision, TF32 on GPUs)
            precision = jax.lax.Precision.HIGHEST if self.dtype == jnp.float32 else None
            logits = jnp.einsum("...h,vh->...v", x, embed.embedding.astype(self.dtype), precision=precision)
        else:
            logits = _dense(cfg.vocab_size, False, self.dtype, "lm_head")(x)
        return logits.astype(jnp.float32), cache
