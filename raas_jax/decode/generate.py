"""Batched generation: a jitted prefill, then a jitted `lax.while_loop` decode run in chunks.

Shapes are bucketed (batch and prompt length to powers of two, O(N) caches to a power-of-two number of
pages; fixed-budget caches depend on the budget alone) and decoded tokens go through a fixed 128-column
device buffer drained between chunks, so new request sizes and longer generations rarely compile anything
new. The decode state is one pytree, donated to every chunk.

Prompts longer than `prefill_chunk` tokens are prefilled chunk by chunk (`chunked_prefill`): one jitted call per
chunk of that many tokens writes it into the page pool, so activation memory is bounded by the chunk and any
longer prompt reuses the same compiled chunk. Policies whose layout of a long prompt is chosen over the whole
prompt (H2O, StreamingLLM, unpinned RaaS when the prompt does not fit the pool) take the whole-prompt path
(`Policy.chunkable`, docs/notes.md).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from raas_jax.decode.cache import saturated_entries
from raas_jax.policies import Dense, next_pow2
from raas_jax.models.config import ModelConfig
from raas_jax.models.transformer import Transformer
from raas_jax.decode.sampling import sample_tokens

MIN_PROMPT_BUCKET = 16
DEFAULT_PREFILL_CHUNK = 2048  # prompts longer than this are prefilled in chunks of this many tokens
MIN_OUT_BUCKET = 16  # teacher-forced runs: continuation lengths go to powers of two, at least this
DECODE_CHUNK = 128  # tokens buffered on device per decode call; the host drains it between calls


class DecodeState(NamedTuple):
    cache: dict  # the policy's cache pytree, arrays stacked over layers
    tokens: jax.Array  # [B, DECODE_CHUNK] int32 tokens generated since `base`
    last: jax.Array  # [B] int32 last sampled token (next input)
    pos: jax.Array  # [B] int32 position of `last`
    done: jax.Array  # [B] bool sequence has emitted an EOS (or is batch padding)
    step: jax.Array  # [] int32 tokens generated so far
    base: jax.Array  # [] int32 value of `step` when `tokens` was last drained
    key: jax.Array  # PRNG key


class SamplingParams(NamedTuple):
    temperature: jax.Array  # [] float32, 0 = greedy
    top_k: jax.Array  # [] int32, 0 = off
    top_p: jax.Array  # [] float32, 1 = off


@dataclasses.dataclass(frozen=True)
class Generator:
    """Compiled prefill/decode functions for one (model config, dtype, cache policy)."""

    cfg: ModelConfig
    dtype: Any
    policy: Any = Dense()
    unroll_layers: bool = False

    @functools.cached_property
    def module(self) -> Transformer:
        return Transformer(self.cfg, self.dtype, self.policy, self.unroll_layers)

    @functools.cached_property
    def start(self) -> Callable:
        return jax.jit(self._start, static_argnames=("num_slots",))

    @functools.cached_property
    def decode(self) -> Callable:
        return jax.jit(self._decode, donate_argnums=(1,))

    @functools.cached_property
    def forced(self) -> Callable:
        return jax.jit(self._forced, static_argnames=("num_slots",))

    def _forced(self, params, prompt, lengths, forced, *, num_slots: int) -> jax.Array:
        """Teacher forcing: logits [B, N, V] predicting forced[:, i] after the prompt and forced[:, :i]."""
        batch, t = prompt.shape
        positions = jnp.where(jnp.arange(t)[None, :] < lengths[:, None], jnp.arange(t)[None, :], -1)
        cache = self.policy.init(self.cfg, batch, num_slots, self.dtype)
        first, cache = self.module.apply({"params": params}, prompt, positions, cache, logits_index=lengths - 1)

        def step(carry, token):  # token [B]: the forced token fed at position carry[1]
            cache, pos = carry
            logits, cache = self.module.apply({"params": params}, token[:, None], pos[:, None], cache,
                                              decode=True, logits_index=jnp.zeros_like(pos))
            return (cache, pos + 1), logits

        _, rest = jax.lax.scan(step, (cache, lengths), forced[:, :-1].T)  # [N-1, B, V]
        return jnp.concatenate([first[:, None], rest.transpose(1, 0, 2)], axis=1)

    def _start(self, params, prompt, lengths, done, eos_ids, sampling: SamplingParams, key, *,
               num_slots: int) -> DecodeState:
        """Prefill the prompts [B, T] (right-padded, `lengths` [B]) and sample the first token."""
        batch, t = prompt.shape
        positions = jnp.where(jnp.arange(t)[None, :] < lengths[:, None], jnp.arange(t)[None, :], -1)
        cache = self.policy.init(self.cfg, batch, num_slots, self.dtype)
        logits, cache = self.module.apply({"params": params}, prompt, positions, cache,
                                          logits_index=lengths - 1)  # [B, V]
        return self._first_token(cache, logits, lengths, done, eos_ids, sampling, key)

    @functools.cached_property
    def begin_chunks(self) -> Callable:
        return jax.jit(self._begin_chunks, static_argnames=("batch", "num_slots"))

    @functools.cached_property
    def prefill_chunk(self) -> Callable:
        return jax.jit(self._prefill_chunk, donate_argnums=(1, 4))

    @functools.cached_property
    def finish_chunks(self) -> Callable:
        return jax.jit(self._finish_chunks, donate_argnums=(0,))

    def _begin_chunks(self, *, batch: int, num_slots: int) -> tuple[dict, jax.Array]:
        """The empty cache (with the policy's chunked-prefill extras) and logits [B, V] to fill."""
        cache = self.policy.init(self.cfg, batch, num_slots, self.dtype)
        return self.policy.begin_chunked_prefill(self.cfg, cache), jnp.zeros((batch, self.cfg.vocab_size), jnp.float32)

    def _prefill_chunk(self, params, cache, tokens, positions, logits, last):
        """One chunk [B, C] of the prompts into the cache -> (cache, logits [B, V]); `last` [B] is the index in this
        chunk of each row's last prompt token (-1: not in this chunk), whose logits replace the row's."""
        chunk_logits, cache = self.module.apply({"params": params}, tokens, positions, cache, chunked=True,
                                                logits_index=jnp.maximum(last, 0))  # [B, V]
        return cache, jnp.where((last >= 0)[:, None], chunk_logits, logits)

    def _finish_chunks(self, cache, extras, logits, lengths, done, eos_ids, sampling: SamplingParams,
                       key) -> DecodeState:
        """The decode state after the last chunk: the policy folds its chunked-prefill `extras` (arrays that are
        not donated, since decode has no place for them) into the cache, then the first token is sampled."""
        cache = self.policy.end_chunked_prefill({**cache, **extras})
        return self._first_token(cache, logits, lengths, done, eos_ids, sampling, key)

    def _first_token(self, cache, logits, lengths, done, eos_ids, sampling: SamplingParams, key) -> DecodeState:
        """Sample the first new token from the prompts' last logits [B, V]: the decode state."""
        batch = logits.shape[0]
        key, sub = jax.random.split(key)
        first = sample_tokens(logits, sub, *sampling)  # [B]
        tokens = jnp.zeros((batch, DECODE_CHUNK), jnp.int32).at[:, 0].set(first)
        done = done | jnp.isin(first, eos_ids)
        return DecodeState(cache, tokens, first, lengths, done, jnp.int32(1), jnp.int32(0), key)

    def _decode(self, params, state: DecodeState, stop_step, eos_ids, sampling: SamplingParams) -> DecodeState:
        """Decode until `step == stop_step` (at most DECODE_CHUNK past `base`) or every sequence is done."""

        def cond(s: DecodeState):
            return (s.step < stop_step) & ~jnp.all(s.done)

        def body(s: DecodeState):
            logits, cache = self.module.apply({"params": params}, s.last[:, None], s.pos[:, None], s.cache,
                                              decode=True, logits_index=jnp.zeros_like(s.pos))  # [B, V]
            key, sub = jax.random.split(s.key)
            token = sample_tokens(logits, sub, *sampling)
            token = jnp.where(s.done, 0, token)
            tokens = jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, s.step - s.base))
            pos = s.pos + (~s.done).astype(jnp.int32)  # finished sequences stop moving
            done = s.done | jnp.isin(token, eos_ids)
            return DecodeState(cache, tokens, token, pos, done, s.step + 1, s.base, key)

        return jax.lax.while_loop(cond, body, state)


def data_parallelism(policy: Any) -> int:
    """Size of the mesh's data axis when the policy runs sharded (the batch must divide it), else 1."""
    mesh = getattr(policy, "mesh", None)
    return mesh.shape["data"] if mesh is not None else 1


def pad_prompts(prompts: Sequence[Sequence[int]], multiple: int = 1, chunk: int | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad to bucketed [B', T'] -> (tokens, lengths [B'], padding-row mask [B']); B' is a multiple of
    `multiple` (the data-parallel width), T' a power of two or, with `chunk`, a multiple of the chunk."""
    batch = -(-next_pow2(len(prompts)) // multiple) * multiple
    longest = max(len(p) for p in prompts)
    t = next_pow2(longest, MIN_PROMPT_BUCKET) if chunk is None else -(-longest // chunk) * chunk
    tokens = np.zeros((batch, t), np.int32)
    lengths = np.ones((batch,), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
        lengths[i] = len(p)
    is_padding = np.arange(batch) >= len(prompts)
    return tokens, lengths, is_padding


def prefill_plan(policy: Any, lengths: Sequence[int], prefill_chunk: int | None) -> int | None:
    """The chunk size these prompts are prefilled with, or None for the whole-prompt path: `prefill_chunk` rounded
    down to whole pages, when the longest prompt is longer and the policy keeps every prompt page (`chunkable`).
    `prefill_chunk=None` never chunks."""
    if prefill_chunk is None:
        return None
    page_size = policy.page_size
    if not isinstance(prefill_chunk, (int, np.integer)) or isinstance(prefill_chunk, bool) \
            or prefill_chunk < page_size:
        raise ValueError(f"prefill_chunk must be an integer >= the page size ({page_size}), or None for no "
                         f"chunking; got {prefill_chunk!r}")
    chunk = int(prefill_chunk) // page_size * page_size
    longest = max(lengths)
    return chunk if longest > chunk and policy.chunkable(longest) else None


def chunked_prefill(gen: Generator, params, tokens: np.ndarray, lengths: np.ndarray, *, chunk: int,
                    num_slots: int) -> tuple[dict, jax.Array]:
    """Prefill right-padded prompts [B, T] (T a multiple of `chunk`) one chunk per call -> (cache, logits [B, V] at
    each row's last prompt token). The cache still holds the policy's chunked-prefill extras
    (`Policy.chunk_extras`, which `Generator.finish_chunks` folds away)."""
    batch, t = tokens.shape
    if t % chunk:
        raise ValueError(f"prompt length {t} is not a multiple of the prefill chunk {chunk}")
    ids = np.arange(t)[None, :]
    positions = np.where(ids < lengths[:, None], ids, -1).astype(np.int32)  # [B, T]
    cache, logits = gen.begin_chunks(batch=batch, num_slots=num_slots)
    for start in range(0, t, chunk):
        last = lengths - 1 - start
        last = np.where((last >= 0) & (last < chunk), last, -1).astype(np.int32)  # [B]
        cache, logits = gen.prefill_chunk(params, cache, jnp.asarray(tokens[:, start:start + chunk]),
                                          jnp.asarray(positions[:, start:start + chunk]), logits, jnp.asarray(last))
    return cache, logits


def run_generation(gen: Generator, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   eos_ids: Sequence[int], temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                   seed: int = 0, chunk: int | None = None,
                   on_chunk: Callable[[np.ndarray, int], None] | None = None,
                   prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK) -> tuple[np.ndarray, DecodeState]:
    """Generate for a batch of token-id prompts; returns (tokens [len(prompts), steps], final state).

    `on_chunk(tokens_so_far, step)` is called after each chunk of `chunk` decode steps (streaming).
    Prompts longer than `prefill_chunk` tokens (rounded down to whole pages; None: never) are prefilled in chunks
    of that size where the policy allows it (`prefill_plan`); the output is the same either way.
    """
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    gen.policy.check_prompts([len(p) for p in prompts])
    plan = prefill_plan(gen.policy, [len(p) for p in prompts], prefill_chunk)
    tokens, lengths, is_padding = pad_prompts(prompts, data_parallelism(gen.policy), chunk=plan)
    num_slots = gen.policy.num_slots(int(lengths.max()), max_new_tokens)
    sampling = SamplingParams(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
    eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    if plan is None:
        state = gen.start(params, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(is_padding), eos,
                          sampling, jax.random.PRNGKey(seed), num_slots=num_slots)
    else:
        cache, logits = chunked_prefill(gen, params, tokens, lengths, chunk=plan, num_slots=num_slots)
        extras = {name: cache.pop(name) for name in gen.policy.chunk_extras}
        state = gen.finish_chunks(cache, extras, logits, jnp.asarray(lengths), jnp.asarray(is_padding), eos,
                                  sampling, jax.random.PRNGKey(seed))
    chunk = min(chunk or DECODE_CHUNK, DECODE_CHUNK)
    drained: list[np.ndarray] = []
    while True:
        step, base = int(state.step), int(state.base)
        drained.append(np.asarray(state.tokens[:len(prompts), :step - base]))
        if on_chunk is not None:
            on_chunk(np.concatenate(drained, axis=1), step)
        if step >= max_new_tokens or bool(jnp.all(state.done)):
            break
        state = state._replace(base=jnp.int32(step))
        state = gen.decode(params, state, jnp.int32(min(step + chunk, max_new_tokens)), eos, sampling)
        if int(state.step) <= step and not bool(jnp.all(state.done)):
            raise RuntimeError(f"decoding made no progress at step {step} of {max_new_tokens}")
    out = np.concatenate(drained, axis=1)
    clipped = saturated_entries(state.cache)
    if clipped:
        remedy = ("past the range of the model's calibrated scales: re-run `raas-jax calibrate-kv` on more or longer "
                  "prompts" if "k_scale" in state.cache else "no k/v scales are applied: `raas-jax calibrate-kv` "
                  "measures them for this model")
        warnings.warn(f"{clipped} key/value entries of the FP8 page pool sit at its largest magnitude "
                      f"({float(jnp.finfo(state.cache['k'].dtype).max):g}): values were clipped ({remedy}). Compare the "
                      "output with --kv-dtype auto (kv_dtype='auto').", stacklevel=2)
    return out, state


def forced_logits(gen: Generator, params, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
                  ) -> list[np.ndarray]:
    """Teacher-forced logits of each continuation under `gen`'s policy: one [len(cont), V] array per prompt."""
    gen.policy.check_prompts([len(p) for p in prompts])
    tokens, lengths, _ = pad_prompts(prompts, data_parallelism(gen.policy))
    steps = next_pow2(max(len(c) for c in continuations), MIN_OUT_BUCKET)
    forced = np.zeros((tokens.shape[0], steps), np.int32)
    for i, c in enumerate(continuations):
        forced[i, :len(c)] = c
    num_slots = gen.policy.num_slots(int(lengths.max()), steps)
    logits = np.asarray(gen.forced(params, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(forced),
                                   num_slots=num_slots))
    return [logits[i, :len(c)] for i, c in enumerate(continuations)]


def trim_at_eos(row: np.ndarray, eos_ids: Sequence[int], steps: int) -> list[int]:
    """Tokens up to and including the first EOS (as HF's generate returns them)."""
    row = row[:steps].tolist()
    for i, tok in enumerate(row):
        if tok in eos_ids:
            return row[:i + 1]
    return row
