"""The Python API: `raas_jax.load(...)` -> `Model` with `.logits(...)` and `.generate(...)`."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from raas_jax.model_io import checkpoint
from raas_jax.eval.calibrate import read_kv_absmax
from raas_jax.decode.cache import cache_bytes
from raas_jax.decode.generate import (DEFAULT_PREFILL_CHUNK, Generator, data_parallelism, forced_logits, run_generation,
                               trim_at_eos)
from raas_jax.models.config import ModelConfig
from raas_jax.models.transformer import Transformer, fuse_projections
from raas_jax import validation
from raas_jax.policies import Dense, Policy, next_pow2


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: dict[str, Any]


def default_dtype() -> Any:
    """bf16 on accelerators, f32 on CPU (where bf16 matmuls are slow)."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


class Model:
    """A loaded checkpoint: config, device params, tokenizer (optional) and EOS ids."""

    def __init__(self, cfg: ModelConfig, params: dict, dtype: Any, tokenizer: Any = None,
                 eos_ids: Sequence[int] = (), path: Path | None = None, mesh: Any = None):
        self.cfg = cfg
        self.mesh = mesh  # a (data, model) jax.sharding.Mesh, or None for one device
        self.params = params
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.eos_ids = tuple(int(i) for i in eos_ids)
        self.path = path
        # calibrated per-layer (key, value) maxima for FP8 pages (kv_scales.json beside the checkpoint), or None
        self.kv_absmax: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        self._generators: dict[Any, Generator] = {}

    def __repr__(self) -> str:
        c = self.cfg
        return (f"Model({c.model_type}, layers={c.num_layers}, heads={c.num_heads}/{c.num_kv_heads}, "
                f"hidden={c.hidden_size}, vocab={c.vocab_size}, dtype={jnp.dtype(self.dtype).name}, path={self.path})")

    # ------------------------------------------------------------------------------- logits
    @functools.cached_property
    def _forward(self) -> Callable:
        module = Transformer(self.cfg, self.dtype)

        def forward(params, tokens):
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
            return module.apply({"params": params}, tokens, positions)[0]

        return jax.jit(forward)

    def logits(self, token_ids) -> np.ndarray:
        """Full causal forward without cache: int [B, T] (or [T]) -> float32 numpy [B, T, vocab]."""
        tokens = np.asarray(token_ids)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.shape[1] == 0 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"token_ids must be a non-empty integer array [B, T]; got shape {tokens.shape}, "
                             f"dtype {tokens.dtype}")
        self._check_ids(tokens)
        return np.asarray(self._forward(self.params, jnp.asarray(tokens, jnp.int32)))

    def _check_ids(self, tokens: np.ndarray) -> None:
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}); got "
                             f"[{tokens.min()}, {tokens.max()}]")

    # ----------------------------------------------------------------------------- generate
    def encode(self, prompt: str | Sequence[int], chat: bool = True) -> list[int]:
        """A prompt string (chat template applied when asked and available) or token ids -> ids."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("empty prompt: give some text (or a list of token ids)")
            tok = self._require_tokenizer()
            if chat and getattr(tok, "chat_template", None):
                ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              tokenize=True)
                if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
                    ids = ids["input_ids"]
                return list(ids)
            return list(tok.encode(prompt, add_special_tokens=True))
        if isinstance(prompt, np.ndarray):
            prompt = _array_prompts(prompt)
            if len(prompt) != 1:
                raise ValueError(f"one prompt expected, got an array of {len(prompt)} rows")
            prompt = prompt[0]
        if not isinstance(prompt, Sequence) or isinstance(prompt, (bytes, bytearray)) \
                or not all(validation.is_int(i) for i in prompt):
            raise ValueError(f"a prompt is a string or a sequence of integer token ids; got {prompt!r:.80}")
        ids = [int(i) for i in prompt]
        if not ids:
            raise ValueError("empty prompt: a token-id prompt needs at least one id")
        self._check_ids(np.asarray(ids))
        return ids

    def decode_text(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _check_size(self, policy: Policy, ids: list[list[int]], max_new_tokens: int) -> None:
        """Refuse a cache that cannot fit the device (saying how many new tokens would); warn past the model's
        context length (positions it was not trained on; the output may degrade)."""
        longest = max(len(p) for p in ids)
        context = self.cfg.max_position_embeddings
        if longest >= context:
            warnings.warn(f"the prompt alone ({longest} tokens) reaches this model's context length ({context}): every "
                          "new token sits at a position it was not trained on; shorten the prompt to keep the output "
                          "reliable", stacklevel=3)
        elif longest + max_new_tokens > context:
            warnings.warn(f"prompt + max_new_tokens = {longest + max_new_tokens} tokens exceeds this model's context "
                          f"length ({context}): positions past it were not trained (max_new_tokens <= "
                          f"{max(context - longest, 0)} stays inside)", stacklevel=3)
        batch = -(-next_pow2(len(ids)) // data_parallelism(policy)) * data_parallelism(policy)
        shards = 1 if self.mesh is None else self.mesh.size  # the pool is split over the mesh
        base = getattr(policy, "policy", policy)

        def pool_bytes(new_tokens: int) -> int:
            return _pool_bytes(base, self.cfg, batch, policy.num_slots(longest, new_tokens), self.dtype) // shards

        need, free = pool_bytes(max_new_tokens), device_free_bytes()
        if free is not None and need > free:
            fit, too_many = 0, max_new_tokens  # the most new tokens whose cache fits (bisection)
            while not policy.fixed_budget and too_many - fit > 1:
                middle = (fit + too_many) // 2
                fit, too_many = (middle, too_many) if pool_bytes(middle) <= free else (fit, middle)
            raise ValueError(
                f"the KV cache for {len(ids)} prompt(s) of up to {longest} tokens + {max_new_tokens} new tokens "
                f"would take {_size(need)}, more than the {_size(free)} free on the "
                f"{jax.devices()[0].platform} device" + (f": at most {fit} new tokens fit" if fit > 0 else
                                                  ": use fewer prompts, or a smaller budget or page size"))

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"this model has no tokenizer (no tokenizer.json / tokenizer_config.json in "
                             f"{self.path}): copy the tokenizer files next to config.json, or pass token ids")
        return self.tokenizer

    def with_kv_scales(self, policy: Policy) -> Policy:
        """`policy` with this model's calibrated FP8 maxima filled in (FP8 pages, none given), else unchanged."""
        if self.kv_absmax is not None and policy.kv_absmax is None and policy.kv_dtype.startswith("fp8"):
            return dataclasses.replace(policy, kv_absmax=self.kv_absmax)
        return policy

    def _generator(self, policy: Policy | None) -> Generator:
        chosen = Dense() if policy is None else policy
        if not isinstance(chosen, Policy):
            raise ValueError(f"policy must be a raas_jax.policies object (Dense, RaaS, Quest, H2O, StreamingLLM) "
                             f"or None, got {policy!r}")
        chosen = self.with_kv_scales(chosen)
        if self.mesh is not None:
            from raas_jax.decode.sharding import ShardedPolicy

            chosen = ShardedPolicy(chosen, self.mesh)
        if chosen not in self._generators:
            unroll = jax.default_backend() != "cpu"  # static weight slices; measured faster on the H200
            self._generators[chosen] = Generator(self.cfg, self.dtype, chosen, unroll_layers=unroll)
        return self._generators[chosen]

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]], max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                 policy: Any = None, chat: bool = True, decode_steps: int | None = None,
                 on_text: Callable[[int, str], None] | None = None,
                 prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK) -> list[GenerationResult]:
        """Generate for one prompt or a batch (strings or token-id lists); one result per prompt.

        `on_text(index, new_text)` streams decoded text as it is produced, after every jitted decode call of
        `decode_steps` steps (default 16 when streaming, else 128, the most).
        Prompts longer than `prefill_chunk` tokens are prefilled in chunks of that many (rounded down to whole
        pages; None = the whole prompt at once): same output, activation memory bounded by the chunk, one compiled
        chunk for any longer prompt (per pool size: a prompt longer than a fixed budget fills a staging pool sized
        for it in quarter-octave steps).
        """
        if isinstance(prompts, np.ndarray):
            prompts = _array_prompts(prompts)
        elif isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                          and isinstance(prompts[0], (int, float, np.number, np.bool_))):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, bytearray)) or not prompts:
            raise ValueError("no prompts given" if not prompts else
                             f"prompts must be strings or lists of token ids, got {type(prompts).__name__}")
        validation.max_new_tokens(max_new_tokens)  # the CLI's checks and messages (raas_jax/validation.py)
        validation.sampling(temperature, top_p, top_k, seed)
        if decode_steps is not None:
            validation.integer("decode_steps", decode_steps, 1)
        ids = [self.encode(p, chat) for p in prompts]
        longest = max(len(p) for p in ids) + max_new_tokens
        if self.cfg.sliding_window and longest > self.cfg.sliding_window:
            raise ValueError(f"prompt + max_new_tokens = {longest} exceeds this model's sliding window "
                             f"({self.cfg.sliding_window}); sliding-window attention is not implemented")
        gen = self._generator(policy)
        self._check_size(gen.policy, ids, max_new_tokens)
        streamer = _TextStreamer(self, len(ids), on_text) if on_text else None
        start = time.perf_counter()
        out, state = run_generation(gen, self.params, ids, max_new_tokens=max_new_tokens, eos_ids=self.eos_ids,
                                    temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                    decode_steps=decode_steps or (16 if on_text else None),
                                    on_tokens=streamer.update if streamer else None, prefill_chunk=prefill_chunk)
        seconds = time.perf_counter() - start
        steps = int(state.step)
        if streamer:
            streamer.update(out, steps, final=True)
        nbytes = cache_bytes(state.cache)
        results = []
        for i, row in enumerate(out):
            new = trim_at_eos(row, self.eos_ids, steps)
            results.append(GenerationResult(
                text=self.decode_text(new), token_ids=new,
                stats={"prompt_tokens": len(ids[i]), "new_tokens": len(new), "seconds": seconds,
                       "tokens_per_second": len(new) / seconds if seconds > 0 else float("nan"),
                       "cache_bytes": nbytes, "batch": len(ids)}))
        return results


def teacher_forced_logits(model: Model, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                          policy: Policy | None = None) -> list[np.ndarray]:
    """Logits [len(continuation), V] per prompt when `policy` decodes `continuations` token by token."""
    if len(prompts) != len(continuations) or any(len(c) == 0 for c in continuations):
        raise ValueError("give one non-empty continuation per prompt")
    ids = [model.encode(p, chat=False) for p in prompts]
    return forced_logits(model._generator(policy), model.params, ids, continuations)


class _TextStreamer:
    """Turns growing token rows into text deltas per sequence."""

    def __init__(self, model: Model, n: int, on_text: Callable[[int, str], None]):
        self.model, self.on_text = model, on_text
        self.sent = [""] * n

    def update(self, tokens: np.ndarray, step: int, final: bool = False) -> None:
        for i, row in enumerate(tokens):
            text = self.model.decode_text(trim_at_eos(row, self.model.eos_ids, step))
            if text.endswith("\ufffd") and not final:  # an incomplete multi-byte character: wait
                continue
            if len(text) > len(self.sent[i]) and text.startswith(self.sent[i]):
                self.on_text(i, text[len(self.sent[i]):])
                self.sent[i] = text


def _array_prompts(array: np.ndarray) -> list[list[int]]:
    """A 1-D (one prompt) or 2-D (one per row) integer array -> token-id lists; anything else refused."""
    if not np.issubdtype(array.dtype, np.integer) or array.ndim not in (1, 2):
        raise ValueError(f"a numpy prompt must be a 1-D or 2-D integer array of token ids; got dtype "
                         f"{array.dtype}, shape {array.shape}")
    return [row.tolist() for row in np.atleast_2d(array)]


def _pool_bytes(policy: Policy, cfg: ModelConfig, batch: int, slots: int, dtype: Any) -> int:
    """Bytes of the cache `policy` would allocate, from shapes alone (nothing is allocated)."""
    return cache_bytes(jax.eval_shape(lambda: policy.init(cfg, batch, slots, dtype)))


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def device_free_bytes() -> int | None:
    """Memory a new cache can take: the accelerator's limit less what is in use (jax memory stats) or, on
    CPU, the host's available memory; None when unknown."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend reports
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:  # Linux: MemAvailable counts the page cache the kernel can drop
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# ------------------------------------------------------------------------------------- load

def _load_tokenizer(path: Path):
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # a broken tokenizer should not hide a usable model
        raise ValueError(f"cannot load the tokenizer in {path}: {type(e).__name__}: {e}") from None


def _eos_ids(path: Path, cfg: ModelConfig, tokenizer: Any) -> tuple[int, ...]:
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        eos = json.loads(gen_file.read_text()).get("eos_token_id")
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (int(eos),)
    if cfg.eos_token_ids:
        return cfg.eos_token_ids
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return (int(tokenizer.eos_token_id),)
    return ()


def load(path: str | Path | None = None, dtype: Any = None, mesh: Any = None) -> Model:
    """Load a converted directory, an HF directory or a .gguf file (`None`: the default model).

    `mesh`: None (one device), a `jax.sharding.Mesh` with axes (data, model), a shape such as
    "data=2,model=4", or "auto" (all devices: model up to the KV-head count, the rest data). The
    parameters are placed (restored, for converted directories) straight into their shardings.
    """
    from raas_jax.model_io import default_model

    if path is None:
        path = default_model.ensure_converted()
    path = Path(path).expanduser()
    dtype = checkpoint.resolve_dtype(dtype) or default_dtype()
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}: give a converted directory, an HF directory or a .gguf file")
    if checkpoint.is_converted(path):
        cfg = ModelConfig.from_json(path / "config.json")
        mesh = _resolve_mesh(cfg, mesh)
        params = _fused(cfg, checkpoint.restore_params(path, cfg, dtype, mesh), mesh)
        tokenizer_dir = path
    elif path.suffix == ".gguf":
        import tempfile

        from raas_jax.model_io import gguf_reader

        hf_config, np_params = checkpoint.read_source(path, dtype)
        cfg = ModelConfig.from_hf_dict(hf_config)
        mesh = _resolve_mesh(cfg, mesh)
        params = _place(fuse_projections(cfg, np_params), mesh)  # fused on the host: no device copy
        with tempfile.TemporaryDirectory(prefix="raas-jax-tok-") as tmp:
            gguf_reader.save_gguf_tokenizer(path, Path(tmp))
            tokenizer = _load_tokenizer(Path(tmp))
            eos_ids = _eos_ids(Path(tmp), cfg, tokenizer)
        return Model(cfg, params, dtype, tokenizer, eos_ids, path, mesh)
    else:
        hf_config, np_params = checkpoint.read_source(path, dtype)
        cfg = ModelConfig.from_hf_dict(hf_config)
        mesh = _resolve_mesh(cfg, mesh)
        params = _place(fuse_projections(cfg, np_params), mesh)  # fused on the host: no device copy
        tokenizer_dir = path
    tokenizer = _load_tokenizer(tokenizer_dir)
    model = Model(cfg, params, dtype, tokenizer, _eos_ids(tokenizer_dir, cfg, tokenizer), path, mesh)
    model.kv_absmax = read_kv_absmax(path, cfg.num_layers)  # `raas-jax calibrate-kv` wrote it, if anyone did
    return model


def _resolve_mesh(cfg: ModelConfig, mesh: Any) -> Any:
    if mesh is None or isinstance(mesh, jax.sharding.Mesh):
        return mesh
    from raas_jax.decode.sharding import make_mesh

    return make_mesh(cfg, None if mesh == "auto" else mesh)


def _fused(cfg: ModelConfig, params: dict, mesh: Any) -> dict:
    """Placed parameters in the model's fused layout (models.fuse_projections), placed alike. Only the q/k/v and
    gate/up weights go through the fusing call (the others are kept as they are); their fused copy exists beside
    them until this returns (two thirds of the layer weights): where the device has no room for that, the
    checkpoint's layout is kept (the model takes both) with a warning."""
    layers = params["layers"]
    attn, mlp = layers["self_attn"], layers["mlp"]
    if "qkv_proj" in attn:
        return params
    projections = {"self_attn": {m: attn[m] for m in ("q_proj", "k_proj", "v_proj")},
                   "mlp": {m: mlp[m] for m in ("gate_proj", "up_proj")}}
    extra = sum(x.nbytes for x in jax.tree.leaves(projections)) // (1 if mesh is None else mesh.shape["model"])
    free = device_free_bytes()
    if free is not None and extra > free:
        warnings.warn(f"no room on the device to fuse the q/k/v and gate/up weights ({_size(extra)} needed, "
                      f"{_size(free)} free): keeping the checkpoint's layout, which decodes a little slower "
                      "(docs/performance.md section 16)", stacklevel=3)
        return params

    def fuse(projections: dict) -> dict:
        return fuse_projections(cfg, {"layers": projections})["layers"]

    shardings = None
    if mesh is not None:
        from raas_jax.decode.sharding import param_shardings

        shardings = param_shardings({"layers": jax.eval_shape(fuse, projections)}, mesh)["layers"]
    fused = jax.jit(fuse, out_shardings=shardings)(projections)
    attn = {k: v for k, v in attn.items() if k not in projections["self_attn"]} | fused["self_attn"]
    mlp = {k: v for k, v in mlp.items() if k not in projections["mlp"]} | fused["mlp"]
    return params | {"layers": layers | {"self_attn": attn, "mlp": mlp}}


def _place(np_params: dict, mesh: Any) -> dict:
    if mesh is None:
        return jax.device_put(np_params)
    from raas_jax.decode.sharding import param_shardings

    return jax.device_put(np_params, param_shardings(np_params, mesh))
