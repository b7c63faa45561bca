"""The serving engine: fixed rows of KV pages, JetStream's contract (prefill, insert, generate, free), in JAX.

A row is one sequence's slice of every decode-state array (axis 1 of the page pool, axis 0 of the rest). RaaS,
H2O and StreamingLLM rows are their budget-sized pools, so a row holds a request however long it decodes; Dense
and Quest rows hold `max_model_len` tokens. The engine knows nothing of HTTP or text: it takes token ids and
settings, and gives tokens back. The compiled functions are `Generator`'s, the same that `Model.generate` runs.

    prefill = engine.start_prefill(ids, settings, seed)       # host-side plan: whole prompt or chunks
    while not engine.prefill_step(prefill): ...              # one chunk per call (a long prompt: several)
    state = engine.insert(prefill.prefix, state, row)        # jitted, state donated
    state, new = engine.generate(state, steps)               # jitted while_loop over every row, state donated
    state = engine.free(state, row)                          # the row stops sampling; the next insert reuses it
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from raas_jax.decode.cache import PagePool
from raas_jax.decode.generate import (DECODE_CHUNK, DEFAULT_PREFILL_CHUNK, DecodeState, Generator, RowSettings,
                                      chunk_positions, eos_array, pad_prompts, prefill_plan, row_keys)
from raas_jax.policies import Policy


@dataclasses.dataclass(frozen=True)
class RequestSettings:
    """What one request asked for (host side; the engine turns it into a row of `RowSettings`)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    ignore_eos: bool = False


@dataclasses.dataclass
class Prefill:
    """A prompt on its way into a row: whole in one call, or chunk by chunk (`Engine.prefill_step`)."""

    ids: list[int]
    settings: RequestSettings
    seed: int
    chunk: int | None  # tokens per call; None: the whole prompt in one call
    pool_slots: int  # slots of the pool the chunks fill (`Policy.prefill_slots`: > the row's for a staging pool)
    tokens: np.ndarray  # [1, T] the padded prompt
    lengths: np.ndarray  # [1]
    next_start: int = 0  # the next chunk's first position
    cache: PagePool | None = None  # the pool being filled (chunked)
    logits: jax.Array | None = None  # [1, V] at the last prompt token so far (chunked)
    prefix: DecodeState | None = None  # the one-row state once done (its first token sampled)

    @property
    def done(self) -> bool:
        return self.prefix is not None

    def first_token(self) -> int:
        assert self.prefix is not None, "the prefill has not finished"
        return int(self.prefix.last[0])


class Engine:
    """Fixed rows over one model and cache policy (see the module docstring)."""

    def __init__(self, gen: Generator, params: Any, eos_ids: Sequence[int], *, max_rows: int,
                 max_model_len: int, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 tokens, got {max_model_len}")
        self.gen, self.params = gen, params
        self.policy: Policy = gen.policy
        self.eos_ids = tuple(eos_ids)
        self.eos = eos_array(self.eos_ids)
        self.max_rows = int(max_rows)
        self.max_model_len = int(max_model_len)
        self.prefill_chunk = prefill_chunk
        # every row's pool has the same size: the budget's pages, or max_model_len's for Dense / Quest
        self.num_slots = self.policy.num_slots(0, self.max_model_len)
        self._free = jax.jit(_free_row, donate_argnums=(0,))

    # ----------------------------------------------------------------------------------------------- rows
    @property
    def fixed_rows(self) -> bool:
        """Whether a row's size depends on the budget alone (RaaS, H2O, StreamingLLM)."""
        return self.policy.fixed_budget

    def row_capacity(self) -> int | None:
        """Tokens (prompt + generated) a row can hold; None: any number (fixed-budget pools evict)."""
        return None if self.fixed_rows else self.max_model_len

    def check_request(self, prompt_len: int, max_tokens: int) -> None:
        """Raise a ValueError saying why a request cannot have a row, or what to change."""
        if prompt_len < 1:
            raise ValueError("the prompt is empty")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        total = prompt_len + max_tokens
        if total > self.max_model_len:
            what = ("this server's --max-model-len" if not self.fixed_rows else "the model's context length "
                    "(--max-model-len)")
            raise ValueError(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {total} exceeds "
                             f"{what}, {self.max_model_len}: lower max_tokens to at most "
                             f"{max(self.max_model_len - prompt_len, 0)} or shorten the prompt")
        self.policy.check_prompts([prompt_len])  # e.g. RaaS: the prompt's pages must fit the budget to be pinned

    def init_state(self) -> DecodeState:
        """Every row free: an empty pool of `max_rows` rows, all done."""
        return self.gen.empty_state(self.max_rows, self.num_slots)

    # -------------------------------------------------------------------------------------------- prefill
    def start_prefill(self, ids: Sequence[int], settings: RequestSettings, seed: int) -> Prefill:
        """Plan the prefill of one prompt (nothing runs yet)."""
        self.check_request(len(ids), settings.max_tokens)
        chunk = prefill_plan(self.policy, [len(ids)], self.prefill_chunk)
        tokens, lengths, _ = pad_prompts([list(ids)], prefill_chunk=chunk)
        pool_slots = self.policy.prefill_slots(len(ids), self.num_slots) if chunk else self.num_slots
        return Prefill(list(ids), settings, int(seed), chunk, pool_slots, tokens, lengths)

    def prefill_step(self, job: Prefill) -> bool:
        """Run the next call of `job` (the whole prompt, or one chunk); True once its prefix is ready."""
        if job.done:
            return True
        gen, settings = self.gen, self._row_settings(job.settings)
        keys = row_keys([job.seed])
        lengths = jnp.asarray(job.lengths)
        not_done = jnp.zeros((1,), bool)
        if job.chunk is None:
            job.prefix = gen.start(self.params, jnp.asarray(job.tokens), lengths, not_done, self.eos, settings, keys,
                                   num_slots=self.num_slots)
            return True
        if job.cache is None:
            job.cache, job.logits = gen.begin_chunks(batch=1, num_slots=job.pool_slots)
        start, chunk = job.next_start, job.chunk
        positions, last = chunk_positions(job.lengths, start, chunk)
        job.cache, job.logits = gen.prefill_chunk(self.params, job.cache, jnp.asarray(job.tokens[:, start:start + chunk]),
                                                  jnp.asarray(positions), job.logits, jnp.asarray(last))
        job.next_start += chunk
        if job.next_start < job.tokens.shape[1]:
            return False
        job.prefix = gen.finish(job.cache, job.logits, lengths, not_done, self.eos, settings, keys)
        job.cache = job.logits = None
        return True

    def _row_settings(self, s: RequestSettings) -> RowSettings:
        return RowSettings.make(1, max_new_tokens=s.max_tokens, ignore_eos=s.ignore_eos, temperature=s.temperature,
                                top_k=s.top_k, top_p=s.top_p)

    # ------------------------------------------------------------------------------ insert / generate / free
    def insert(self, prefix: DecodeState, state: DecodeState, row: int) -> DecodeState:
        """Put a finished prefill into `row` of `state` (between generate calls); `state` is donated."""
        if not 0 <= row < self.max_rows:
            raise ValueError(f"row {row} out of range [0, {self.max_rows})")
        return self.gen.insert(prefix, state, jnp.int32(row))

    def generate(self, state: DecodeState, steps: int) -> tuple[DecodeState, np.ndarray, np.ndarray, np.ndarray]:
        """Decode up to `steps` (<= DECODE_CHUNK) steps of every live row; `state` is donated. Returns (state,
        tokens [R, n] sampled in this call (row r's new ones are its first `new[r]`), new [R], done [R])."""
        if not 1 <= steps <= DECODE_CHUNK:
            raise ValueError(f"steps must be in [1, {DECODE_CHUNK}], got {steps}")
        before = np.asarray(state.count)
        step = int(state.step)
        state = state.replace(base=jnp.int32(step))
        state = self.gen.decode(self.params, state, jnp.int32(step + steps), self.eos)
        taken = int(state.step) - step
        tokens = np.asarray(state.tokens[:, :taken])
        count, done = np.asarray(state.count), np.asarray(state.done)
        return state, tokens, count - before, done

    def free(self, state: DecodeState, row: int) -> DecodeState:
        """Stop `row` sampling (a cancelled request); its pool is overwritten by the next insert."""
        return self._free(state, jnp.int32(row))


def _free_row(state: DecodeState, row) -> DecodeState:
    return state.replace(done=state.done.at[row].set(True))


def warm_up(engine: Engine, decode_steps: int, prompt_lengths: Sequence[int] = (1,)) -> None:
    """Compile what serving runs (the prefill of each prompt-length bucket in `prompt_lengths`, insert, a decode
    call, free) on a scratch state, so that requests do not wait for compiles."""
    state = engine.init_state()
    token = engine.eos_ids[0] if engine.eos_ids else 0
    buckets = {}
    for length in prompt_lengths:  # one prompt per distinct padded shape
        job = engine.start_prefill([token] * int(length), RequestSettings(max_tokens=1), seed=0)
        buckets.setdefault((job.tokens.shape, job.chunk, job.pool_slots), job)
    for job in buckets.values():  # one one-row pool alive at a time (a Dense row can be GBs)
        while not engine.prefill_step(job):
            pass
        state = engine.insert(job.prefix, state, 0)
        job.prefix = None
    state, *_ = engine.generate(state, min(decode_steps, DECODE_CHUNK))
    jax.block_until_ready(engine.free(state, 0))


def admission_bytes(gen: Generator, max_model_len: int,
                    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK) -> tuple[int, int]:
    """(bytes of one row's pool, bytes that admitting one request adds beside the running rows): the prefilled
    one-row pool and the insert's copy of it, plus, where a prompt may be longer than a fixed budget's pool (H2O,
    StreamingLLM, unpinned RaaS) and than `prefill_chunk`, the staging pool its chunked prefill fills
    (`Policy.prefill_slots`) with the policy's chunked-prefill accumulators, at the longest prompt `max_model_len`
    allows."""
    from raas_jax.decode.cache import cache_bytes

    def pool_bytes(num_slots: int, extras: bool = False) -> int:
        def init():
            cache = gen.policy.init(gen.cfg, 1, num_slots, gen.dtype)
            return gen.policy.begin_chunked_prefill(gen.cfg, cache) if extras else cache
        return cache_bytes(jax.eval_shape(init))

    num_slots = gen.policy.num_slots(0, max_model_len)
    per_row = pool_bytes(num_slots)
    longest = max_model_len - 1  # a prompt leaves room for one new token
    chunked = prefill_plan(gen.policy, [longest], prefill_chunk) is not None
    staged = gen.policy.prefill_slots(longest, num_slots) if chunked else num_slots
    return per_row, 2 * per_row + (pool_bytes(staged, extras=True) if staged > num_slots else 0)


def rows_that_fit(gen: Generator, params: Any, max_model_len: int, *, limit: int | None, reserve: int = 2 * 2**30,
                  cap: int = 4096, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK) -> int:
    """`--max-rows auto`: the most rows whose compiled decode fits the device (raas_jax.decode.memory) beside what
    admitting a request takes at the same time (`admission_bytes`, added to the reserve); on a device that reports
    no limit (the CPU), `cap` rows of at most 1 GiB of pool."""
    from raas_jax.decode import memory

    num_slots = gen.policy.num_slots(0, max_model_len)
    per_row, admission = admission_bytes(gen, max_model_len, prefill_chunk)
    if limit is None:
        return max(1, min(cap, 2**30 // max(per_row, 1)))
    rows, _ = memory.largest_batch(gen, params, num_slots, limit, reserve=reserve + admission, cap=cap)
    if rows < 1:
        raise ValueError(f"not even one row of {num_slots} pages fits the device's {limit / 2**30:.1f} GiB with the "
                         "weights: lower --max-model-len (Dense / Quest) or the budget")
    return rows
