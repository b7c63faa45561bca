"""Shared fixtures: tiny random HF checkpoints (saved with save_pretrained) and a small tokenizer."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# One persistent XLA compilation cache for the whole run, set up before jax is imported: the pytest-xdist workers
# and every child process the tests start (CLI, server, sharded runs) inherit these variables, so a program that
# several of them compile (the same tiny model's prefill and decode, mostly) is compiled once. A fresh directory
# per run, removed at the end, unless JAX_COMPILATION_CACHE_DIR is already set (then that directory is used and
# kept); RAAS_JAX_TEST_XLA_CACHE=0 turns it off. The size limit only turns on JAX's file lock, so that no process
# reads another's half-written entry. Only compiles of 0.2 s or more are written: writing every small program cost
# more than it saved (test_policies.py and test_generate.py's fast tests: 75 s with every compile written, 63 s
# with those of 0.2 s or more; the whole fast set: 3 min 45 s with those, 4 min 35 s with no cache).
_XLA_CACHE_OWNED = ("JAX_COMPILATION_CACHE_DIR" not in os.environ and "PYTEST_XDIST_WORKER" not in os.environ
                    and os.environ.get("RAAS_JAX_TEST_XLA_CACHE", "1") != "0")
if _XLA_CACHE_OWNED:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="raas-jax-test-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(64 << 30))

# On the CPU the tests' time is mostly XLA compiling the tiny model's programs that then run for milliseconds,
# so the tests ask XLA for its quickest compiles:
# - the older elemental emitters: XLA's CPU fusion emitters compile those programs about 3x slower (the six of
#   test_large_budget_equals_dense[raas]: 10.8 s against 3.1 s);
# - no LLVM optimization (`jax_disable_most_optimizations`): tests/test_policies.py and
#   tests/decode/test_generate.py's fast tests took 139 s with it off, 62 s with it on, on two workers.
#   Tests that run real weights for many steps turn it off again with the `optimized_compiles` fixture.
# Set here, before jax starts, so the workers and child processes inherit them; not where a CUDA plugin is
# installed (GPU runs keep XLA's defaults), nor where the environment already chooses.
def _gpu_plugin_installed() -> bool:
    names = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")
    try:
        return any(importlib.util.find_spec(name) is not None for name in names)
    except ImportError:  # no jax_plugins package
        return any(importlib.util.find_spec(name) is not None for name in names[:2])


if not _gpu_plugin_installed():
    if "fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_use_fusion_emitters=false".strip()
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402  (after the cache and XLA variables)

jax.config.update("jax_enable_x64", False)

VOCAB = 320


def pytest_unconfigure(config):
    if _XLA_CACHE_OWNED:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="module")
def optimized_compiles():
    """XLA's full optimization for this module's compiles: for real weights run for many steps, where an
    unoptimized program's run costs more than the optimization (the GGUF model's policy test: 96 s without,
    35 s with)."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def pytest_collection_modifyitems(config, items):
    has_gpu = any(d.platform == "gpu" for d in jax.devices()) if jax.default_backend() == "gpu" else False
    skip_gpu = pytest.mark.skip(reason="needs a GPU (jax.default_backend() != 'gpu')")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


def save_tokenizer(out: Path, vocab_size: int = VOCAB) -> None:
    """A byte-level BPE tokenizer of exactly `vocab_size` ids with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["the quick brown fox jumps over the lazy dog " * 20, "1 2 3 4 5 6 7 8 9 10 plus minus equals"]
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert len(fast) <= vocab_size, len(fast)
    fast.save_pretrained(str(out))


def make_hf_model(out: Path, kind: str = "llama", seed: int = 0, tokenizer: bool = True, **overrides):
    """Save a tiny random HF model of `kind` (llama | mistral | qwen2 | qwen3) to `out`; return the torch model."""
    import torch
    import transformers as tf

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=2)
    base.update(overrides)
    config_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    }[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**base)).eval()
    with torch.no_grad():  # random norm weights, so a wrong norm cannot hide behind ones
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(out))
    if tokenizer:
        save_tokenizer(out)
    return model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_llama")
    make_hf_model(out, "llama")
    return out


@pytest.fixture(scope="session")
def tiny_llama_converted(tiny_llama_dir, tmp_path_factory) -> Path:
    from raas_jax.model_io.checkpoint import convert

    out = tmp_path_factory.mktemp("converted") / "tiny_llama"
    convert(tiny_llama_dir, out, dtype="f32", progress=False)
    return out


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
