"""Batched generation: a jitted prefill, then a jitted `lax.while_loop` decode run in chunks.

Shapes are bucketed (batch and prompt length to powers of two, O(N) caches to a power-of-two number of
pages; fixed-budget caches depend on the budget alone) and decoded tokens go through a fixed 128-column
device buffer drained between chunks, so new request sizes and longer generations rarely compile anything
new. The decode state (`DecodeState`) is one typed pytree over rows, donated to every chunk: each row carries its
own position, stop length, sampling settings and PRNG key, so rows can hold unrelated requests (greedy and sampled
in one batch) and a finished row can take a new request (`Generator.insert`) between chunks. `Model.generate`
(a static batch, `run_generation`) and the serving engine (raas_jax/serve) run these same compiled functions.

Prompts longer than `prefill_chunk` tokens are prefilled chunk by chunk (`chunked_prefill`): one jitted call per
chunk of that many tokens writes it into the page pool, so activation memory is bounded by the chunk and any
longer prompt reuses the same compiled chunk (per staging-pool size). A prompt longer than a fixed budget's pool
(H2O, StreamingLLM, unpinned RaaS) is chunked into a staging pool that holds all of it, and the policy then keeps
the pages its whole-prompt prefill would (`Policy.prefill_slots`, `Policy.end_chunked_prefill`, docs/design.md).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from raas_jax import signals

from raas_jax.decode.cache import PagePool, saturated_entries
from raas_jax.policies import Dense, next_pow2
from raas_jax.models.config import ModelConfig
from raas_jax.models.transformer import Transformer
from raas_jax.decode.sampling import sample_tokens

if TYPE_CHECKING:
    from raas_jax.decode.sharding import ShardedPolicy
    from raas_jax.policies import Policy

MIN_PROMPT_BUCKET = 16
DEFAULT_PREFILL_CHUNK = 2048  # prompts longer than this are prefilled in chunks of this many tokens
MIN_OUT_BUCKET = 16  # teacher-forced runs: continuation lengths go to powers of two, at least this
DECODE_CHUNK = 128  # tokens buffered on device per decode call; the host drains it between calls


@struct.dataclass
class RowSettings:
    """What each row's request asked for, as arrays over rows (traced: changing them compiles nothing)."""

    max_new_tokens: jax.Array  # [B] int32 the row is done once it has sampled this many tokens
    ignore_eos: jax.Array  # [B] bool keep going past an EOS token
    temperature: jax.Array  # [B] float32, 0 = greedy
    top_k: jax.Array  # [B] int32, 0 = off
    top_p: jax.Array  # [B] float32, 1 = off

    @classmethod
    def make(cls, batch: int, *, max_new_tokens: Any, ignore_eos: Any = False, temperature: Any = 0.0,
             top_k: Any = 0, top_p: Any = 1.0) -> RowSettings:
        """Settings for `batch` rows from scalars (every row the same) or sequences of `batch` values."""
        def rows(value, dtype):
            return jnp.asarray(np.broadcast_to(np.asarray(value, dtype), (batch,)))

        return cls(rows(max_new_tokens, np.int32), rows(ignore_eos, np.bool_), rows(temperature, np.float32),
                   rows(top_k, np.int32), rows(top_p, np.float32))


@struct.dataclass
class DecodeState:
    """The decode state over B rows; every array's leading axis (the cache's second) is the row."""

    cache: PagePool  # the policy's page pool, arrays stacked over layers: [L, B, ...] (FP8 scales [L])
    tokens: jax.Array  # [B, DECODE_CHUNK] int32 tokens sampled since `base` (column = step - base)
    last: jax.Array  # [B] int32 last sampled token (the next input)
    pos: jax.Array  # [B] int32 position of `last`
    done: jax.Array  # [B] bool finished (EOS or max_new_tokens), a free row, or batch padding
    count: jax.Array  # [B] int32 tokens the row has sampled, the first one included
    settings: RowSettings  # per-row request settings
    key: jax.Array  # [B, 2] uint32 a PRNG key per row
    step: jax.Array  # [] int32 decode steps taken by this state
    base: jax.Array  # [] int32 value of `step` when `tokens` was last drained


def decode_state(cache: PagePool | None, last: jax.Array, pos: jax.Array, *, max_new_tokens: int = 2**30,
                 seed: int = 0) -> DecodeState:
    """A decode state over a given pool (e.g. a synthetic one for benchmarks): row b has just sampled `last[b]` at
    position `pos[b]` ([B] int32 each), greedy, no row done, stopping after `max_new_tokens`."""
    batch = last.shape[0]
    return DecodeState(cache, jnp.zeros((batch, DECODE_CHUNK), jnp.int32), last, pos, jnp.zeros((batch,), bool),
                       jnp.ones((batch,), jnp.int32), RowSettings.make(batch, max_new_tokens=max_new_tokens),
                       batch_keys(seed, batch), jnp.int32(0), jnp.int32(0))


def row_keys(seeds: Sequence[int]) -> jax.Array:
    """A PRNG key per row, [B, 2] uint32, from each row's integer seed."""
    return jnp.stack([jax.random.PRNGKey(int(seed)) for seed in seeds]) if len(seeds) else \
        jnp.zeros((0, 2), jnp.uint32)


def batch_keys(seed: int, batch: int) -> jax.Array:
    """Row keys of one seeded static batch: row i gets fold_in(PRNGKey(seed), i). [B, 2] uint32."""
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(jnp.arange(batch))


@dataclasses.dataclass(frozen=True)
class Generator:
    """Compiled prefill/decode functions for one (model config, dtype, cache policy)."""

    cfg: ModelConfig
    dtype: Any
    policy: Policy | ShardedPolicy = Dense()
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

    def _start(self, params, prompt, lengths, done, eos_ids, settings: RowSettings, keys, *,
               num_slots: int) -> DecodeState:
        """Prefill the prompts [B, T] (right-padded, `lengths` [B]; `done` [B] marks padding rows) and sample
        the first token of each row."""
        batch, t = prompt.shape
        positions = jnp.where(jnp.arange(t)[None, :] < lengths[:, None], jnp.arange(t)[None, :], -1)
        cache = self.policy.init(self.cfg, batch, num_slots, self.dtype)
        logits, cache = self.module.apply({"params": params}, prompt, positions, cache,
                                          logits_index=lengths - 1)  # [B, V]
        return self._first_token(cache, logits, lengths, done, eos_ids, settings, keys)

    @functools.cached_property
    def begin_chunks(self) -> Callable:
        return jax.jit(self._begin_chunks, static_argnames=("batch", "num_slots"))

    @functools.cached_property
    def prefill_chunk(self) -> Callable:
        return jax.jit(self._prefill_chunk, donate_argnums=(1, 4))

    @functools.cached_property
    def finish_chunks(self) -> Callable:
        return jax.jit(self._finish_chunks, donate_argnums=(0,))

    @functools.cached_property
    def finish_staged_chunks(self) -> Callable:
        return jax.jit(self._finish_chunks)  # a staging pool is larger than the decode pool: nothing to donate into

    def finish(self, cache, logits, lengths, done, eos_ids, settings: RowSettings, keys) -> DecodeState:
        """The decode state after the last chunk: the policy's own arrays are split off (not donated: during a
        chunked prefill they may hold accumulators decode has no place for, e.g. H2O's `token_mass`) and the cache
        goes through `finish_chunks`, or `finish_staged_chunks` when it is a staging pool (a prompt longer than a
        fixed budget, `Policy.prefill_slots`)."""
        staged = self.policy.fixed_budget and cache.fill.shape[-1] > self.policy.num_slots(0, 0)
        run = self.finish_staged_chunks if staged else self.finish_chunks
        return run(cache.replace(policy_state=None), cache.policy_state, logits, lengths, done, eos_ids, settings,
                   keys)

    def _begin_chunks(self, *, batch: int, num_slots: int) -> tuple[PagePool, jax.Array]:
        """The empty cache (with the policy's chunked-prefill accumulators) and logits [B, V] to fill."""
        cache = self.policy.init(self.cfg, batch, num_slots, self.dtype)
        return self.policy.begin_chunked_prefill(self.cfg, cache), jnp.zeros((batch, self.cfg.vocab_size), jnp.float32)

    def _prefill_chunk(self, params, cache, tokens, positions, logits, last):
        """One chunk [B, C] of the prompts into the cache -> (cache, logits [B, V]); `last` [B] is the index in this
        chunk of each row's last prompt token (-1: not in this chunk), whose logits replace the row's."""
        chunk_logits, cache = self.module.apply({"params": params}, tokens, positions, cache, chunked=True,
                                                logits_index=jnp.maximum(last, 0))  # [B, V]
        return cache, jnp.where((last >= 0)[:, None], chunk_logits, logits)

    def _finish_chunks(self, cache, policy_state, logits, lengths, done, eos_ids, settings: RowSettings,
                       keys) -> DecodeState:
        """The decode state after the last chunk: the policy's own arrays (`policy_state`, not donated) go back into
        the cache, the policy folds its chunked-prefill accumulators away, then the first token is sampled."""
        cache = self.policy.end_chunked_prefill(cache.replace(policy_state=policy_state))
        return self._first_token(cache, logits, lengths, done, eos_ids, settings, keys)

    def _first_token(self, cache, logits, lengths, done, eos_ids, settings: RowSettings, keys) -> DecodeState:
        """Sample each row's first new token from its prompt's last logits [B, V]: the decode state (step 1)."""
        batch = logits.shape[0]
        keys, subs = _split_rows(keys)
        first = sample_tokens(logits, subs, settings.temperature, settings.top_k, settings.top_p)  # [B]
        tokens = jnp.zeros((batch, DECODE_CHUNK), jnp.int32).at[:, 0].set(first)
        count = jnp.ones((batch,), jnp.int32)
        done = done | _finished(first, count, eos_ids, settings)
        return DecodeState(cache, tokens, first, lengths, done, count, settings, keys, jnp.int32(1), jnp.int32(0))

    def _decode(self, params, state: DecodeState, stop_step, eos_ids) -> DecodeState:
        """Decode until `step == stop_step` (at most DECODE_CHUNK past `base`) or every row is done. Done rows
        still run through the model (the batch is fixed) but sample nothing, keep their position and count."""

        def cond(s: DecodeState):
            return (s.step < stop_step) & ~jnp.all(s.done)

        def body(s: DecodeState):
            logits, cache = self.module.apply({"params": params}, s.last[:, None], s.pos[:, None], s.cache,
                                              decode=True, logits_index=jnp.zeros_like(s.pos))  # [B, V]
            keys, subs = _split_rows(s.key)
            token = sample_tokens(logits, subs, s.settings.temperature, s.settings.top_k, s.settings.top_p)
            token = jnp.where(s.done, 0, token)  # [B]
            tokens = jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, s.step - s.base))
            live = (~s.done).astype(jnp.int32)
            pos, count = s.pos + live, s.count + live  # finished rows stop moving
            done = s.done | _finished(token, count, eos_ids, s.settings)
            return s.replace(cache=cache, tokens=tokens, last=token, pos=pos, done=done, count=count, key=keys,
                             step=s.step + 1)

        return jax.lax.while_loop(cond, body, state)

    @functools.cached_property
    def empty_state(self) -> Callable:
        """empty_state(rows, num_slots) -> a DecodeState of `rows` free rows (all done), each a pool of `num_slots`
        pages: what a server starts from before `insert` fills rows."""
        return jax.jit(self._empty_state, static_argnums=(0, 1))

    def _empty_state(self, rows: int, num_slots: int) -> DecodeState:
        cache = self.policy.init(self.cfg, rows, num_slots, self.dtype)
        zeros = jnp.zeros((rows,), jnp.int32)
        return DecodeState(cache, jnp.zeros((rows, DECODE_CHUNK), jnp.int32), zeros, zeros, jnp.ones((rows,), bool),
                           zeros, RowSettings.make(rows, max_new_tokens=1), jnp.zeros((rows, 2), jnp.uint32),
                           jnp.int32(0), jnp.int32(0))

    @functools.cached_property
    def insert(self) -> Callable:
        return jax.jit(self._insert, donate_argnums=(1,))

    def _insert(self, prefix: DecodeState, state: DecodeState, row) -> DecodeState:
        """Put a prefilled one-row state (`start` / `finish` at batch 1, the same pool size) into row `row`
        of `state`, between decode chunks (`state.base == state.step`): its pool, position, first token, count,
        settings and key. The row's token buffer restarts empty: the caller has the first token from `prefix`."""
        def put(rows, one):  # rows [B, ...] <- one [1, ...] at `row` along axis 0
            return jax.lax.dynamic_update_slice_in_dim(rows, one.astype(rows.dtype), row, axis=0)

        def put_pool(rows, one):  # pool arrays [L, B, ...]; per-layer arrays [L] (FP8 scales) are shared
            if rows.ndim < 2:
                return rows
            return jax.lax.dynamic_update_slice_in_dim(rows, one.astype(rows.dtype), row, axis=1)

        cache = jax.tree.map(put_pool, state.cache, prefix.cache)
        return state.replace(
            cache=cache, tokens=put(state.tokens, jnp.zeros_like(prefix.tokens)), last=put(state.last, prefix.last),
            pos=put(state.pos, prefix.pos), done=put(state.done, prefix.done), count=put(state.count, prefix.count),
            settings=jax.tree.map(put, state.settings, prefix.settings), key=put(state.key, prefix.key))


def _split_rows(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each row's key [B, 2] -> (the row's next key, a key for this draw), both [B, 2]."""
    both = jax.vmap(jax.random.split)(keys)  # [B, 2, 2]
    return both[:, 0], both[:, 1]


def _finished(token, count, eos_ids, settings: RowSettings) -> jax.Array:
    """[B] bool: the row's token ends it (an EOS, unless ignore_eos) or it has sampled max_new_tokens."""
    return (jnp.isin(token, eos_ids) & ~settings.ignore_eos) | (count >= settings.max_new_tokens)


def data_parallelism(policy: Any) -> int:
    """Size of the mesh's data axis when the policy runs sharded (the batch must divide it), else 1."""
    mesh = getattr(policy, "mesh", None)
    return mesh.shape["data"] if mesh is not None else 1


def pad_prompts(prompts: Sequence[Sequence[int]], multiple: int = 1, prefill_chunk: int | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad to bucketed [B', T'] -> (tokens, lengths [B'], padding-row mask [B']); B' is a multiple of
    `multiple` (the data-parallel width), T' a power of two or, with `prefill_chunk`, a multiple of it."""
    batch = -(-next_pow2(len(prompts)) // multiple) * multiple
    longest = max(len(p) for p in prompts)
    t = next_pow2(longest, MIN_PROMPT_BUCKET) if prefill_chunk is None else -(-longest // prefill_chunk) * prefill_chunk
    tokens = np.zeros((batch, t), np.int32)
    lengths = np.ones((batch,), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
        lengths[i] = len(p)
    is_padding = np.arange(batch) >= len(prompts)
    return tokens, lengths, is_padding


def prefill_plan(policy: Any, lengths: Sequence[int], prefill_chunk: int | None) -> int | None:
    """The chunk size these prompts are prefilled with, or None for the whole-prompt path: `prefill_chunk` rounded
    down to whole pages, when the longest prompt is longer. `prefill_chunk=None` never chunks."""
    if prefill_chunk is None:
        return None
    page_size = policy.page_size
    if not isinstance(prefill_chunk, (int, np.integer)) or isinstance(prefill_chunk, bool) \
            or prefill_chunk < page_size:
        raise ValueError(f"prefill_chunk must be an integer >= the page size ({page_size}), or None for no "
                         f"chunking; got {prefill_chunk!r}")
    chunk = int(prefill_chunk) // page_size * page_size
    longest = max(lengths)
    return chunk if longest > chunk else None


def chunked_prefill(gen: Generator, params, tokens: np.ndarray, lengths: np.ndarray, *, prefill_chunk: int,
                    num_slots: int) -> tuple[PagePool, jax.Array]:
    """Prefill right-padded prompts [B, T] (T a multiple of `prefill_chunk`) one chunk per call -> (cache, logits
    [B, V] at each row's last prompt token). `num_slots` is the decode pool's; the chunks are written into
    `Policy.prefill_slots` slots. The cache still holds the policy's chunked-prefill accumulators (H2O's
    `token_mass`) and, for a prompt longer than a fixed budget, the staging pool: `Generator.finish` folds both
    away."""
    batch, t = tokens.shape
    if t % prefill_chunk:
        raise ValueError(f"prompt length {t} is not a multiple of the prefill chunk {prefill_chunk}")
    staged = gen.policy.prefill_slots(int(np.max(lengths)), num_slots)
    cache, logits = gen.begin_chunks(batch=batch, num_slots=staged)
    for start in range(0, t, prefill_chunk):
        signals.checkpoint("prefill chunk")
        positions, last = chunk_positions(lengths, start, prefill_chunk)
        cache, logits = gen.prefill_chunk(params, cache, jnp.asarray(tokens[:, start:start + prefill_chunk]),
                                          jnp.asarray(positions), logits, jnp.asarray(last))
    return cache, logits


def chunk_positions(lengths: np.ndarray, start: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """The chunk of right-padded prompts (`lengths` [B]) at [start, start + chunk) -> (positions [B, C], -1 past a
    prompt's end; the index in the chunk of each row's last prompt token [B], -1 when it is not in this chunk)."""
    ids = np.arange(start, start + chunk)[None, :]
    positions = np.where(ids < lengths[:, None], ids, -1).astype(np.int32)  # [B, C]
    last = lengths - 1 - start
    return positions, np.where((last >= 0) & (last < chunk), last, -1).astype(np.int32)


def run_generation(gen: Generator, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   eos_ids: Sequence[int], temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                   seed: int = 0, decode_steps: int | None = None,
                   on_tokens: Callable[[np.ndarray, int], None] | None = None,
                   prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK) -> tuple[np.ndarray, DecodeState]:
    """Generate for a batch of token-id prompts; returns (tokens [len(prompts), steps], final state).

    Each jitted decode call runs `decode_steps` steps (default and at most DECODE_CHUNK); `on_tokens(tokens_so_far,
    step)` is called after each (streaming). Prompts longer than `prefill_chunk` tokens (rounded down to whole pages;
    None: never) are prefilled in chunks of that size (`prefill_plan`); the output is the same either way.
    """
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    gen.policy.check_prompts([len(p) for p in prompts])
    plan = prefill_plan(gen.policy, [len(p) for p in prompts], prefill_chunk)
    tokens, lengths, is_padding = pad_prompts(prompts, data_parallelism(gen.policy), prefill_chunk=plan)
    num_slots = gen.policy.num_slots(int(lengths.max()), max_new_tokens)
    batch = tokens.shape[0]
    settings = RowSettings.make(batch, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p)
    keys = batch_keys(seed, batch)
    eos = eos_array(eos_ids)
    signals.checkpoint("prefill")
    if plan is None:
        state = gen.start(params, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(is_padding), eos,
                          settings, keys, num_slots=num_slots)
    else:
        state = gen.finish(*chunked_prefill(gen, params, tokens, lengths, prefill_chunk=plan, num_slots=num_slots),
                           jnp.asarray(lengths), jnp.asarray(is_padding), eos, settings, keys)  # no staging pool kept
    steps_per_call = min(decode_steps or DECODE_CHUNK, DECODE_CHUNK)
    drained: list[np.ndarray] = []
    while True:
        step, base = int(state.step), int(state.base)
        drained.append(np.asarray(state.tokens[:len(prompts), :step - base]))
        if on_tokens is not None:
            on_tokens(np.concatenate(drained, axis=1), step)
        if step >= max_new_tokens or bool(jnp.all(state.done)):
            break
        signals.checkpoint("decode")
        state = state.replace(base=jnp.int32(step))
        state = gen.decode(params, state, jnp.int32(min(step + steps_per_call, max_new_tokens)), eos)
        if int(state.step) <= step and not bool(jnp.all(state.done)):
            raise RuntimeError(f"decoding made no progress at step {step} of {max_new_tokens}")
    out = np.concatenate(drained, axis=1)
    clipped = saturated_entries(state.cache)
    if clipped:
        remedy = ("past the range of the model's calibrated scales: re-run `raas-jax calibrate-kv` on more or longer "
                  "prompts" if state.cache.k_scale is not None
                  else "no k/v scales are applied: `raas-jax calibrate-kv` measures them for this model")
        warnings.warn(f"{clipped} key/value entries of the FP8 page pool sit at its largest magnitude "
                      f"({float(jnp.finfo(state.cache.k.dtype).max):g}): values were clipped ({remedy}). Compare the "
                      "output with --kv-dtype auto (kv_dtype='auto').", stacklevel=2)
    return out, state


def eos_array(eos_ids: Sequence[int]) -> jax.Array:
    """The stop token ids as the decode functions take them: [E] int32 (a model with none: [-1], never sampled)."""
    return jnp.asarray(list(eos_ids) or [-1], jnp.int32)


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
