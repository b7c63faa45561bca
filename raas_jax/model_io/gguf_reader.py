"""Read GGUF checkpoints (llama.cpp format) into Hugging Face-style pieces.

Public functions
----------------
``read_gguf_config(path)``
    An HF ``config.json``-style dict (model_type, sizes, rope, eps, special ids, ...)
    built from the GGUF metadata and tensor table.
``iter_gguf_tensors(path)``
    Yields ``(hf_name, float32 ndarray)`` one tensor at a time, dequantised with the
    ``gguf`` package from the file's memory map, in HF/torch layout, with llama.cpp's
    q/k row permutation undone for the ``llama`` architecture.
``build_gguf_tokenizer(path)``
    The tokenizer as a ``transformers.PreTrainedTokenizerFast``, built with ``tokenizers`` from the
    metadata (no torch for byte-level BPE vocabularies).
``save_gguf_tokenizer(path, out_dir)``
    Writes the HF tokenizer files (tokenizer.json, tokenizer_config.json with the chat
    template, special tokens) plus ``generation_config.json`` to ``out_dir``.
``save_gguf_generation_config(path, out_dir)``
    Writes only ``generation_config.json`` (bos/eos/pad ids).

Supported ``general.architecture`` values: ``llama`` (also Mistral-style llama GGUFs),
``qwen2`` and ``qwen3``; dense models only. A file that is not GGUF, or is truncated
or corrupt, raises ``ValueError`` naming the file and the problem.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField, ReaderTensor
from gguf.quants import dequantize

SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# GGUF tensor name (global tensors) -> HF parameter name.
_GLOBAL_TENSORS: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# GGUF per-block tensor stem -> HF module path inside ``model.layers.{i}``.
_BLOCK_TENSORS: dict[str, str] = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

# Tensors that carry no HF parameter (consumed by read_gguf_config instead).
_SKIPPED_TENSORS: frozenset[str] = frozenset({"rope_freqs.weight"})

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GGUF_MAGIC = b"GGUF"


# --------------------------------------------------------------------------- opening


def _open_reader(path: str | os.PathLike[str]) -> GGUFReader:
    """Open ``path`` as a memory-mapped GGUF file; ``ValueError`` if it is not a valid one."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise ValueError(
            f"{path!r} is not a GGUF file: it starts with {magic!r}, expected {_GGUF_MAGIC!r}"
        )
    try:
        reader = GGUFReader(path, "r")
    except (ValueError, IndexError, TypeError, KeyError, OverflowError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path!r} is not a readable GGUF file: it is truncated or corrupt (file size "
            f"{os.path.getsize(path)} bytes; gguf reader: {type(e).__name__}: {e})"
        ) from None
    _check_tensor_extent(path, reader)
    return reader


def _check_tensor_extent(path: str, reader: GGUFReader) -> None:
    """``ValueError`` if some tensor's bytes lie beyond the end of the file (truncation)."""
    file_size = os.path.getsize(path)
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > file_size or tensor.data.nbytes != int(tensor.n_bytes):
            raise ValueError(
                f"{path!r} is a truncated GGUF file: tensor {tensor.name!r} needs bytes up to "
                f"offset {end}, but the file has only {file_size} bytes"
            )


# --------------------------------------------------------------------------- metadata


def _field_value(field: ReaderField) -> Any:
    """Decode one metadata field into a Python scalar, str or list."""
    def scalar(part: np.ndarray, vtype: GGUFValueType) -> Any:
        if vtype == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        return part.tolist()[0]

    if field.types[0] == GGUFValueType.ARRAY:
        return [scalar(field.parts[i], field.types[-1]) for i in field.data]
    return scalar(field.parts[field.data[0]], field.types[0])


def _get(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else _field_value(field)


def _require(reader: GGUFReader, key: str, path: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        raise ValueError(f"{path!r}: required GGUF metadata key {key!r} is missing")
    return _field_value(field)


def _f32_to_float(value: float) -> float:
    """Shortest decimal that round-trips the float32 (e.g. 9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _architecture(reader: GGUFReader, path: str) -> str:
    arch = _require(reader, "general.architecture", path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path!r}: GGUF architecture {arch!r} is not supported; supported architectures: "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    if _get(reader, f"{arch}.expert_count", 0):
        raise ValueError(f"{path!r}: mixture-of-experts {arch!r} GGUFs are not supported")
    return arch


def _tensor_by_name(reader: GGUFReader) -> dict[str, ReaderTensor]:
    return {t.name: t for t in reader.tensors}


def _hf_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    """GGUF stores dims innermost-first (ne0 = in_features); numpy/torch is the reverse."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


# --------------------------------------------------------------------------- rope scaling


def _rope_scaling_from_metadata(reader: GGUFReader, arch: str, path: str) -> dict[str, Any] | None:
    """``{arch}.rope.scaling.*`` keys -> HF rope_scaling dict (linear / yarn), or None."""
    kind = _get(reader, f"{arch}.rope.scaling.type")
    if kind is None or kind == "none":
        return None
    factor = float(_require(reader, f"{arch}.rope.scaling.factor", path))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": factor}
        orig = _get(reader, f"{arch}.rope.scaling.original_context_length")
        if orig is not None:
            scaling["original_max_position_embeddings"] = int(orig)
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            value = _get(reader, f"{arch}.rope.scaling.{gguf_key}")
            if value is not None:
                scaling[hf_key] = _f32_to_float(value)
        return scaling
    raise ValueError(f"{path!r}: unsupported rope scaling type {kind!r} (supported: linear, yarn)")


def _llama3_rope_factors(
    inv_freq: np.ndarray, factor: float, low: float, high: float, orig_ctx: float
) -> np.ndarray:
    """Per-dimension frequency divisors as llama.cpp computes them for llama3 rope scaling."""
    wavelen = 2.0 * math.pi / inv_freq
    smooth = (orig_ctx / wavelen - low) / (high - low)
    medium = 1.0 / ((1.0 - smooth) / factor + smooth)
    return np.where(wavelen < orig_ctx / high, 1.0, np.where(wavelen > orig_ctx / low, factor, medium))


def _rope_scaling_from_freqs(
    factors: np.ndarray, theta: float, rope_dim: int, path: str
) -> dict[str, Any] | None:
    """Recover HF ``llama3`` rope_scaling from llama.cpp's ``rope_freqs.weight`` tensor.

    llama.cpp stores the per-dimension divisors instead of the parameters. The divisors
    only determine ``original_max_position_embeddings`` relative to the low/high frequency
    factors, so ``low_freq_factor`` is fixed to 1.0 (as in every Llama 3.x release) and the
    rest is solved from the smoothly interpolated dimensions, then checked to reproduce
    the tensor. Raises ``ValueError`` if it cannot be recovered exactly.
    """
    factors = factors.astype(np.float64)
    if np.allclose(factors, 1.0):
        return None
    inv_freq = 1.0 / theta ** (np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    if factors.shape != inv_freq.shape:
        raise ValueError(f"{path!r}: rope_freqs.weight has shape {factors.shape}, expected {inv_freq.shape}")
    factor = float(factors.max())
    medium = (factors > 1.0 + 1e-6) & (factors < factor * (1.0 - 1e-6))
    if medium.sum() < 2 or factor <= 1.0:
        raise ValueError(f"{path!r}: cannot infer llama3 rope scaling from rope_freqs.weight")
    # 1/f = (1 - s)/factor + s  and  s = a / wavelen - b, with a = orig/(high-low), b = low/(high-low).
    smooth = (1.0 / factors[medium] - 1.0 / factor) / (1.0 - 1.0 / factor)
    a, minus_b = np.polyfit(inv_freq[medium] / (2.0 * math.pi), smooth, 1)
    if minus_b >= 0.0 or a <= 0.0:
        raise ValueError(f"{path!r}: cannot infer llama3 rope scaling from rope_freqs.weight")
    low = 1.0
    high = round(float(low + low / -minus_b), 4)
    orig_ctx = float(round(a * (high - low)))
    recomputed = _llama3_rope_factors(inv_freq, factor, low, high, orig_ctx)
    if not np.allclose(recomputed, factors, rtol=1e-4, atol=1e-4):
        raise ValueError(f"{path!r}: rope_freqs.weight does not match llama3 rope scaling")
    return {
        "rope_type": "llama3",
        "factor": _f32_to_float(factor),
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": int(orig_ctx),
    }


def _rope_scaling(
    reader: GGUFReader, tensors: dict[str, ReaderTensor], arch: str, theta: float, head_dim: int, path: str
) -> dict[str, Any] | None:
    scaling = _rope_scaling_from_metadata(reader, arch, path)
    freqs = tensors.get("rope_freqs.weight")
    if scaling is not None or freqs is None:
        return scaling
    rope_dim = int(_get(reader, f"{arch}.rope.dimension_count", head_dim))
    return _rope_scaling_from_freqs(_dequantize(freqs), theta, rope_dim, path)


# --------------------------------------------------------------------------- config


def _head_dim(reader: GGUFReader, tensors: dict[str, ReaderTensor], arch: str, n_kv: int, path: str) -> int:
    """``attention.key_length`` if present, else k_proj rows / num_key_value_heads."""
    key_length = _get(reader, f"{arch}.attention.key_length")
    if key_length is not None:
        return int(key_length)
    k_proj = tensors.get("blk.0.attn_k.weight")
    if k_proj is None:
        raise ValueError(f"{path!r}: tensor 'blk.0.attn_k.weight' is missing")
    return _hf_shape(k_proj)[0] // n_kv


def _vocab_size(reader: GGUFReader, tensors: dict[str, ReaderTensor], path: str) -> int:
    """Rows of ``token_embd.weight`` (== len(tokenizer.ggml.tokens) in llama.cpp conversions)."""
    embed = tensors.get("token_embd.weight")
    if embed is not None:
        return _hf_shape(embed)[0]
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(f"{path!r}: neither 'token_embd.weight' nor 'tokenizer.ggml.tokens' present")
    return len(tokens.data)


def read_gguf_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Build an HF ``config.json``-style dict from a GGUF file's metadata.

    Keys follow ``transformers`` ``LlamaConfig`` / ``Qwen2Config`` / ``Qwen3Config``.
    Both the legacy ``rope_theta``/``rope_scaling`` keys and the transformers-5
    ``rope_parameters`` dict are filled in. ``tie_word_embeddings`` is True iff the file
    has no ``output.weight``; ``attention_bias``/``mlp_bias`` reflect whether layer 0 has
    q/up-projection biases. ``eos_token_id`` is the GGUF eos id, or the list
    ``[eos, eot, eom]`` when the GGUF also names distinct end-of-turn/-message tokens (as HF
    instruct configs do). float32 metadata (eps, theta) is rounded to its shortest
    decimal (``9.99999974e-06`` -> ``1e-05``).
    """
    path = os.fspath(path)
    reader = _open_reader(path)
    arch = _architecture(reader, path)
    tensors = _tensor_by_name(reader)
    n_heads = int(_require(reader, f"{arch}.attention.head_count", path))
    n_kv = int(_get(reader, f"{arch}.attention.head_count_kv", n_heads))
    head_dim = _head_dim(reader, tensors, arch, n_kv, path)
    theta = _f32_to_float(_get(reader, f"{arch}.rope.freq_base", 10000.0))
    rope_scaling = _rope_scaling(reader, tensors, arch, theta, head_dim, path)
    rope_parameters = {"rope_type": "default", "rope_theta": theta, **(rope_scaling or {})}
    config: dict[str, Any] = {
        "model_type": arch,
        "architectures": [SUPPORTED_ARCHITECTURES[arch]],
        "vocab_size": _vocab_size(reader, tensors, path),
        "hidden_size": int(_require(reader, f"{arch}.embedding_length", path)),
        "intermediate_size": int(_require(reader, f"{arch}.feed_forward_length", path)),
        "num_hidden_layers": int(_require(reader, f"{arch}.block_count", path)),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32_to_float(_require(reader, f"{arch}.attention.layer_norm_rms_epsilon", path)),
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "max_position_embeddings": int(_require(reader, f"{arch}.context_length", path)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _get(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _eos_token_id(reader),
        "pad_token_id": _get(reader, "tokenizer.ggml.padding_token_id"),
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
    }
    return config


# --------------------------------------------------------------------------- tensors


def _dequantize(tensor: ReaderTensor) -> np.ndarray:
    """Dequantise one tensor into a fresh, writable float32 array in HF (numpy) shape."""
    qtype = GGMLQuantizationType(int(tensor.tensor_type))
    values = dequantize(tensor.data, qtype)
    if np.may_share_memory(values, tensor.data) or values.dtype != np.float32:
        values = values.astype(np.float32)  # F32/BF16 come back as views of the memory map
    return np.ascontiguousarray(values.reshape(_hf_shape(tensor)))


def _unpermute_rows(values: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation on the output rows (weights or biases).

    llama.cpp reorders each head's rows from HF's rotate-half layout (``[half0 | half1]``)
    to interleaved pairs: ``reshape(n_heads, 2, half, ...) -> swap(1, 2)``. The inverse
    reads rows as ``(n_heads, half, 2)`` and swaps back to ``(n_heads, 2, half)``.
    """
    rows = values.shape[0]
    half = rows // n_heads // 2
    if n_heads * 2 * half != rows:
        raise ValueError(f"cannot unpermute {rows} rows into {n_heads} heads")
    grouped = values.reshape(n_heads, half, 2, *values.shape[1:])
    return np.ascontiguousarray(grouped.swapaxes(1, 2).reshape(values.shape))


def _hf_tensor_name(gguf_name: str, path: str) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _BLOCK_RE.match(gguf_name)
    if match is None or match.group(2) not in _BLOCK_TENSORS:
        raise ValueError(f"{path!r}: unsupported GGUF tensor {gguf_name!r}")
    layer, stem, kind = match.groups()
    return f"model.layers.{layer}.{_BLOCK_TENSORS[stem]}.{kind}"


def _permute_heads(gguf_name: str, arch: str, n_heads: int, n_kv: int) -> int | None:
    """Head count to unpermute with, or None if this tensor is stored unpermuted."""
    if arch != "llama":
        return None
    stem = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else ""
    return {"attn_q": n_heads, "attn_k": n_kv}.get(stem)


def iter_gguf_tensors(path: str | os.PathLike[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, array)`` for every model parameter in the GGUF file, in file order.

    Arrays are fresh float32, C-contiguous, in HF/torch shape (``[out, in]`` for linears).
    Only one tensor is dequantised at a time; the file is read through its memory map.
    ``lm_head.weight`` is yielded only when the file has ``output.weight`` (untied).
    ``rope_freqs.weight`` is skipped (it is folded into ``read_gguf_config``'s rope_scaling).
    Unknown tensors (e.g. MoE experts) raise ``ValueError``. The file is validated before
    the first tensor is yielded.
    """
    path = os.fspath(path)
    reader = _open_reader(path)
    arch = _architecture(reader, path)
    n_heads = int(_require(reader, f"{arch}.attention.head_count", path))
    n_kv = int(_get(reader, f"{arch}.attention.head_count_kv", n_heads))
    names = [(t, _hf_tensor_name(t.name, path)) for t in reader.tensors if t.name not in _SKIPPED_TENSORS]
    return _iter_tensors(names, arch, n_heads, n_kv)


def _iter_tensors(
    names: list[tuple[ReaderTensor, str]], arch: str, n_heads: int, n_kv: int
) -> Iterator[tuple[str, np.ndarray]]:
    for tensor, hf_name in names:
        values = _dequantize(tensor)
        heads = _permute_heads(tensor.name, arch, n_heads, n_kv)
        if heads is not None:
            values = _unpermute_rows(values, heads)
        yield hf_name, values


# --------------------------------------------------------------------------- tokenizer


def _eos_ids(reader: GGUFReader) -> list[int]:
    """eos plus end-of-turn / end-of-message ids (llama.cpp's end-of-generation set), deduplicated."""
    ids = [
        _get(reader, key)
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    ]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def _eos_token_id(reader: GGUFReader) -> int | list[int] | None:
    """HF-style ``eos_token_id``: an int for a single end token, else the list ``[eos, eot, eom]``."""
    eos = _eos_ids(reader)
    return eos[0] if len(eos) == 1 else (eos or None)


def save_gguf_generation_config(path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> None:
    """Write ``out_dir/generation_config.json`` with bos/eos/pad ids from the GGUF metadata.

    ``eos_token_id`` as in ``read_gguf_config``: an int when the GGUF names a single end token,
    otherwise the list ``[eos, eot, eom]`` (deduplicated, in that order). Keys that the GGUF
    lacks are omitted.
    """
    path = os.fspath(path)
    reader = _open_reader(path)
    generation_config: dict[str, Any] = {
        "bos_token_id": _get(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _eos_token_id(reader),
        "pad_token_id": _get(reader, "tokenizer.ggml.padding_token_id"),
    }
    generation_config = {k: v for k, v in generation_config.items() if v is not None}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation_config, f, indent=2)
        f.write("\n")


# Pre-tokenizer split for a `tokenizer.ggml.pre` value (the regex its merges were learned with), as in
# llama.cpp and transformers' GGUF loader; any other value gets GPT-2's byte-level split.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def build_gguf_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The GGUF file's tokenizer as a ``transformers.PreTrainedTokenizerFast``, built without torch.

    Byte-level BPE (``tokenizer.ggml.model == "gpt2"``: Llama 3, Qwen2/2.5/3, SmolLM2) is built with
    ``tokenizers`` from the vocabulary, merges, token types, special ids, add-BOS/EOS flags and chat template
    in the metadata, the same way transformers' GGUF loader builds it (control tokens become special added
    tokens, user-defined ones plain added tokens; the pre-tokenizer split follows ``tokenizer.ggml.pre``).
    Any other tokenizer model (sentencepiece ``llama``, ...) goes through transformers' GGUF loader, which
    needs torch.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    path = os.fspath(path)
    reader = _open_reader(path)
    _architecture(reader, path)
    kind = _get(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        del reader
        return _transformers_gguf_tokenizer(path, kind)
    tokens: list[str] = _require(reader, "tokenizer.ggml.tokens", path)
    merges = [tuple(m.split(" ", 1)) for m in _require(reader, "tokenizer.ggml.merges", path)]
    types = _get(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)

    spelling = _byte_spelling()
    allowed = set(spelling)
    vocab = {tok if set(tok) <= allowed else "".join(spelling[b] for b in tok.encode("utf-8")): i
             for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False))
    split = _PRE_TOKENIZER_SPLITS.get(_get(reader, "tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel: not added (as transformers).
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= allowed])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab])

    def token(key: str) -> str | None:
        index = _get(reader, f"tokenizer.ggml.{key}")
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    special = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
               "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
    add_bos = bool(_get(reader, "tokenizer.ggml.add_bos_token", False)) and special["bos_token"] is not None
    add_eos = bool(_get(reader, "tokenizer.ggml.add_eos_token", False)) and special["eos_token"] is not None
    bos, eos = special["bos_token"], special["eos_token"]
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair,
        special_tokens=[(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on])
    chat_template = _get(reader, "tokenizer.chat_template")
    del reader
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False,
                                   **{k: v for k, v in special.items() if v is not None})
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def _byte_spelling() -> list[str]:
    """GPT-2's printable spelling of each byte value 0..255 (``bytes_to_unicode``)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    spelled, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelled[b] = chr(b)
        else:
            spelled[b] = chr(256 + extra)
            extra += 1
    return [spelled[b] for b in range(256)]


def _transformers_gguf_tokenizer(path: str, kind: Any) -> Any:
    """transformers' GGUF tokenizer (for non-byte-level vocabularies); its GGUF code imports torch."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise ValueError(f"{path!r}: building a {kind!r} GGUF tokenizer goes through transformers' GGUF "
                         "code, which needs torch (pip install torch); byte-level (gpt2) vocabularies do not")
    from transformers import AutoTokenizer

    directory, name = os.path.split(os.path.abspath(path))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    chat_template = _get(_open_reader(path), "tokenizer.chat_template")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def save_gguf_tokenizer(path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> None:
    """Write HF tokenizer files and ``generation_config.json`` for a GGUF file to ``out_dir``.

    The tokenizer comes from ``build_gguf_tokenizer`` (no torch for byte-level vocabularies) and is saved
    with ``save_pretrained`` (tokenizer.json, tokenizer_config.json, special tokens). The GGUF
    ``tokenizer.chat_template`` is stored inside tokenizer_config.json (not a separate
    chat_template.jinja), so ``AutoTokenizer.from_pretrained(out_dir).chat_template`` returns it. Also
    calls ``save_gguf_generation_config(path, out_dir)``.
    """
    path = os.fspath(path)
    tokenizer = build_gguf_tokenizer(path)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    save_gguf_generation_config(path, out_dir)
