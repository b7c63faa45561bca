"""KV-cache policies on one page pool: Dense, RaaS, Quest, H2O and StreamingLLM.

Each policy is a frozen (hashable) config that is also the model's cache policy: `init` builds the
cache, `prefill` writes the prompt, `decode` appends one token (evicting if the pool is full),
attends and updates the page statistics. Everything is vectorised over (batch, KV head); the model
scans over layers. See docs/design.md for the algorithm.

Per decode step, for every (layer, sequence, KV head):
  1. append the new key/value: into the current page, or into a new page taken from a free slot or,
     when none is free, from the victim the policy picks (at most one eviction per step);
  2. attend: all resident pages (Dense, RaaS, H2O, StreamingLLM) or the top-K pages by the Quest
     bound (Quest);
  3. update statistics: RaaS stamps the pages judged important with the current position; H2O adds
     the attention mass each page received.

Victims (only full, unpinned pages other than the one being filled):
  RaaS          the oldest stamp (the page unused for longest), ties to the oldest page by position;
  StreamingLLM  the oldest page that holds no sink token;
  H2O           the lowest accumulated attention mass outside the recent window.

docs/policies.md states every rule exactly; tests/support/policy_oracle.py re-derives them in numpy.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from raas_jax.kernels import dispatch as kernels
from raas_jax.kernels.reference import rank_descending, top_half_mask
from raas_jax.decode.cache import (PagePool, append_token, check_kv_dtype, compact_pages, init_pool, layer_at,
                                   page_sums, refresh_stamps, store_layer, write_chunk, write_prompt)
from raas_jax.models.config import ModelConfig
from raas_jax.validation import is_int

INT32_MAX = jnp.iinfo(jnp.int32).max
MIN_DENSE_SLOTS = 16  # smallest bucket of pages for the O(N) policies
DECODE_HEADROOM_PAGES = 2  # a fixed pool needs room for the page being filled and one evictable page


def next_pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def quarter_octave(n: int, minimum: int = 1) -> int:
    """The smallest of 5/4, 6/4, 7/4, 8/4 x 2^k that is >= n (and >= minimum): at most 25% over n, four sizes per
    doubling (a compile each)."""
    n = max(int(n), minimum)
    step = max(1, next_pow2(n) // 8)
    return -(-n // step) * step


# ------------------------------------------------------------------------ selection primitives

def oldest_victim(order_key: jax.Array, candidates: jax.Array, start: jax.Array) -> jax.Array:
    """argmin of `order_key` (RaaS stamp, H2O mass, StreamingLLM start) over `candidates`, ties to the smallest
    `start` (the oldest page by position; slot order means nothing since slots are reused): [B, Hkv, S] -> [B, Hkv]."""
    never = jnp.inf if jnp.issubdtype(order_key.dtype, jnp.floating) else INT32_MAX
    oldest = jnp.min(jnp.where(candidates, order_key, never), axis=-1, keepdims=True)
    tied = candidates & (order_key == oldest)
    return jnp.argmin(jnp.where(tied, start, INT32_MAX), axis=-1).astype(jnp.int32)


def evictable(view: PagePool, page_size: int) -> jax.Array:
    """Full, unpinned slots other than the one being filled: [B, Hkv, S] bool."""
    slot_ids = jnp.arange(view.fill.shape[-1])
    not_current = slot_ids[None, None, :] != view.cur[..., None]
    return (view.fill >= page_size) & ~view.pinned & not_current


def quest_select(scores: jax.Array, cur: jax.Array, fill: jax.Array, k: int, backend: str = "auto") -> jax.Array:
    """The K resident slots with the highest bound, the current slot always among them (ties: lower slot),
    listed in slot order; -1 pads past the resident ones.

    scores/fill [B, Hkv, S], cur [B, Hkv] -> slots [B, Hkv, min(K, S)] int32.
    """
    b, h, num_slots = scores.shape
    k = min(k, num_slots)
    slot_ids = jnp.arange(num_slots, dtype=jnp.int32)
    ranked = jnp.where(slot_ids[None, None, :] == cur[..., None], jnp.inf, scores)
    ranked = jnp.where(fill > 0, ranked, -jnp.inf)
    chosen = kernels.top_k_mask(ranked, k, backend=backend) & (ranked > -jnp.inf)  # [B, Hkv, S]
    position = jnp.where(chosen, jnp.cumsum(chosen, axis=-1) - 1, k)  # k = not listed (dropped below)
    slots = jnp.full((b, h, k), -1, jnp.int32)
    return slots.at[jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], position].set(
        jnp.broadcast_to(slot_ids, chosen.shape), mode="drop")


def softmax_over_resident(scores: jax.Array, resident: jax.Array) -> jax.Array:
    scores = jnp.where(resident, scores, -jnp.inf)
    return jax.nn.softmax(scores, axis=-1, where=resident)


def option(default: Any, help: str, parse: Any = None) -> Any:
    """A policy option: a dataclass field whose CLI flag (--name-with-dashes) is derived from it."""
    return dataclasses.field(default=default, metadata={"help": help, "parse": parse})


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_refresh(text: str) -> str | float:
    if text == "top_half":
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"takes 'top_half' or a number alpha in (0, 1), got {text!r}") from None


# ----------------------------------------------------------------------------------- policies

@dataclasses.dataclass(frozen=True)
class Policy:
    """Shared machinery; subclasses set the victim, the attention set and the statistics."""

    page_size: int = 16
    backend: str = "auto"
    kv_dtype: str = "auto"  # the pages' storage dtype (cache.KV_DTYPES): "auto" = the model's, "fp8" = e4m3fn
    # FP8 pages: calibrated per-layer (key, value) absolute maxima (`raas-jax calibrate-kv`; a loaded model fills
    # them in from its checkpoint), from which the pool's k_scale / v_scale follow (cache.kv_scales). None: unscaled.
    kv_absmax: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    name: ClassVar[str] = "policy"
    fixed_budget: ClassVar[bool] = False  # True: the cache size depends on the budget alone
    pin_prefill = False  # pin the prompt pages (never evicted); a RaaS option (a class attribute here: not a field)

    def __post_init__(self):
        if not is_int(self.page_size) or self.page_size < 1:
            raise ValueError(f"page_size must be an integer >= 1, got {self.page_size!r}")
        check_kv_dtype(self.kv_dtype)

    # sizing ---------------------------------------------------------------------------------
    def num_slots(self, longest_prompt: int, max_new_tokens: int) -> int:
        """Slots per (layer, sequence, KV head). O(N) policies: bucketed total length."""
        pages = -(-(longest_prompt + max_new_tokens) // self.page_size)
        return next_pow2(pages, MIN_DENSE_SLOTS)

    def check_prompts(self, lengths: list[int]) -> None:
        """Raise a ValueError that says what to change when a prompt cannot fit."""

    def init(self, cfg: ModelConfig, batch: int, num_slots: int, dtype: Any) -> PagePool:
        return init_pool(cfg, batch, num_slots, self.page_size, dtype, self.kv_dtype, self.kv_absmax)

    # chunked prefill (docs/design.md, generation) -------------------------------------------------------------
    def prefill_slots(self, longest_prompt: int, num_slots: int) -> int:
        """Slots of the pool a chunked prefill writes into, page j in slot j. O(N) policies size the decode pool
        for the whole sequence, so it is that pool."""
        return num_slots

    def begin_chunked_prefill(self, cfg: ModelConfig, cache: PagePool) -> PagePool:
        """The cache before the first chunk (H2O adds an accumulator that `end_chunked_prefill` folds away)."""
        return cache

    def end_chunked_prefill(self, cache: PagePool) -> PagePool:
        """The cache after the last chunk, with the layout and the pool size `init` gives (what decode expects)."""
        return cache

    # model hooks: `cache` is stacked over layers, `layer` the (traced) index of the calling layer -----
    def prefill(self, cache, layer, q, k, v, positions):
        """q [B, T, Hq, D], k/v [B, T, Hkv, D], positions [B, T] -> the cache with this layer's prompt."""
        view = write_prompt(layer_at(cache, layer), k, v, positions, self.page_size, pin=self.pin_prefill)
        return store_layer(cache, layer, view)

    def prefill_chunk(self, cache, layer, q, k, v, positions):
        """One chunk of the prompts (chunked prefill): q [B, C, Hq, D], k/v [B, C, Hkv, D],
        positions [B, C] (c0, c0 + 1, ... or -1) -> (out [B, C, Hq, D], cache). The chunk attends the prompt pages
        written so far and itself (causal), then its pages are written, page j in slot j: after the last chunk and
        `end_chunked_prefill` the cache is what `prefill` writes for the whole prompt."""
        out = kernels.chunk_attention(q, k, v, positions, cache.k, cache.v, layer=layer, backend=self.backend)
        return out, write_chunk(cache, layer, k, v, positions, self.page_size, pin=self.pin_prefill)

    def decode(self, cache, layer, q, k, v, positions):
        """q [B, Hq, D], k/v [B, Hkv, D], positions [B] -> (out [B, Hq, D], cache)."""
        victim = self.victim(layer_at(cache, layer, pages=False))
        cache, slot, _ = append_token(cache, layer, k, v, positions, victim, self.page_size, backend=self.backend)
        view = layer_at(cache, layer, pages=False)  # metadata; the kernels read k/v/kmin/kmax stacked
        out, mass = self.attend(cache, layer, view, q)
        return out, self.update_stats(cache, layer, view, q, mass, positions, slot)

    # policy-specific ------------------------------------------------------------------------
    def victim(self, view: PagePool) -> jax.Array:
        """The slot to evict if a new page is needed and none is free: [B, Hkv]."""
        return jnp.zeros(view.cur.shape, jnp.int32)  # O(N) policies never evict

    def attend(self, cache, layer, view: PagePool, q) -> tuple[jax.Array, jax.Array | None]:
        """(out [B, Hq, D], per-slot mass [B, Hkv, S] or None) over `layer` of the stacked `cache`."""
        return kernels.decode_attention(q, cache.k, cache.v, view.fill, layer=layer, backend=self.backend)

    def update_stats(self, cache, layer, view: PagePool, q, mass, positions, slot):
        return cache


@dataclasses.dataclass(frozen=True)
class Dense(Policy):
    """Keep everything, attend everything: O(N) time and memory."""

    name: ClassVar[str] = "dense"

    def num_slots(self, longest_prompt: int, max_new_tokens: int) -> int:
        """Pages for the whole sequence in quarter-octave buckets: a power-of-two bucket holds up to twice the
        tokens, and Dense's largest batch is set by its pool (Quest keeps powers of two for its top-k kernel)."""
        return quarter_octave(-(-(longest_prompt + max_new_tokens) // self.page_size), MIN_DENSE_SLOTS)

    def attend(self, cache, layer, view: PagePool, q) -> tuple[jax.Array, jax.Array | None]:
        # A Dense pool holds page j in slot j (prompt pages from slot 0, each new page in the lowest free slot),
        # so the slots past the current one are empty: the kernel skips them (the pool is sized for the whole
        # generation, so early on most of it is). tests/test_policies.py checks the invariant.
        live_slots = jnp.max(view.cur, axis=1) + 1  # [B]
        return kernels.decode_attention(q, cache.k, cache.v, view.fill, layer=layer, live_slots=live_slots,
                                        backend=self.backend)


@dataclasses.dataclass(frozen=True)
class _FixedBudget(Policy):
    """A pool of budget / page_size slots, whatever the number of generated tokens."""

    budget: int = 1024

    fixed_budget: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if not is_int(self.budget) or self.budget < 1:
            raise ValueError(f"budget must be an integer >= 1 (tokens), got {self.budget!r}")
        if self.budget % self.page_size:
            raise ValueError(f"budget {self.budget} is not a multiple of page_size {self.page_size}; "
                             f"use e.g. budget={self.budget // self.page_size * self.page_size or self.page_size}")
        if self.budget // self.page_size < DECODE_HEADROOM_PAGES + 1:
            raise ValueError(f"budget {self.budget} gives {self.budget // self.page_size} pages of "
                             f"{self.page_size}; {self.name} needs at least {DECODE_HEADROOM_PAGES + 1}")

    @property
    def slot_count(self) -> int:
        """S: the pool's slots (pages) per (layer, row, KV head)."""
        return self.budget // self.page_size

    def num_slots(self, longest_prompt: int, max_new_tokens: int) -> int:
        return self.slot_count

    def prefill_slots(self, longest_prompt: int, num_slots: int) -> int:
        """A prompt longer than the pool is chunked into a staging pool that holds every prompt page (quarter-octave
        buckets), and `end_chunked_prefill` keeps the pages `kept_prompt_pages` chooses, as the whole-prompt
        prefill does (docs/design.md, chunked prefill)."""
        pages = -(-longest_prompt // self.page_size)
        return num_slots if pages <= num_slots else quarter_octave(pages)

    def prompt_pages(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Prompt page indices [N] and each row's prompt page count [B, 1, 1] for a prompt block [B, T]."""
        pages = -(-positions.shape[1] // self.page_size)
        count = (jnp.max(positions, axis=1) // self.page_size + 1)[:, None, None]
        return jnp.arange(pages, dtype=jnp.int32), count

    def kept_prompt_pages(self, page: jax.Array, count: jax.Array, page_mass: jax.Array | None) -> jax.Array:
        """Which prompt pages stay when a prompt may be longer than the pool: page [N] indices, count [..., 1] each
        row's prompt pages, page_mass [..., N] the attention the prompt gave each page (H2O) -> kept [..., N] bool,
        at most `slot_count` per row. This one keeps every prompt page (it must fit)."""
        return page < count

    def end_chunked_prefill(self, cache):
        return self.compact_staging_pool(super().end_chunked_prefill(cache), page_mass=None)

    def compact_staging_pool(self, cache: PagePool, page_mass: jax.Array | None) -> PagePool:
        """A staging pool (`prefill_slots`) is compacted to the budget's: per (layer, row, KV head) the kept prompt
        pages (`kept_prompt_pages`, given `page_mass` [L, B, Hkv, S'] or None), in page order, into slots 0, 1, ...;
        `cur` the slot of the page holding the last prompt token. A pool of the budget's size is returned as is."""
        staged = cache.fill.shape[-1]
        if staged <= self.slot_count:
            return cache
        lead = cache.fill.shape[:-1]  # (L, B, Hkv)
        length = jnp.max(cache.start + cache.fill, axis=-1, keepdims=True)  # [L, B, Hkv, 1]
        count = -(-length // self.page_size)
        page = jnp.arange(staged, dtype=jnp.int32)
        kept = self.kept_prompt_pages(page, count, page_mass) & (cache.fill > 0)  # [L, B, Hkv, S']
        layout = compact_pages(kept.reshape((-1,) + kept.shape[2:]), self.slot_count).reshape(lead + (self.slot_count,))
        source = jnp.maximum(layout, 0)  # [L, B, Hkv, S]

        def gather(x):  # [L, B, Hkv, S', ...] -> [L, B, Hkv, S, ...], zero where no page is kept
            index = source.reshape(source.shape + (1,) * (x.ndim - 4))
            taken = jnp.take_along_axis(x, index, axis=3)
            return jnp.where((layout >= 0).reshape(index.shape), taken, jnp.zeros((), x.dtype))

        pool = jax.tree.map(lambda x: gather(x) if x.ndim >= 4 and x.shape[:4] == lead + (staged,) else x, cache)
        last_page = count - 1  # [L, B, Hkv, 1]
        cur = jnp.argmax((layout >= 0) & (layout == last_page), axis=-1).astype(jnp.int32)  # [L, B, Hkv]
        return pool.replace(cur=cur)


@dataclasses.dataclass(frozen=True)
class RaaS(_FixedBudget):
    """Reasoning-Aware Attention Sparsity: pinned prompt, timestamps refreshed by use, evict the stalest.

    Refresh ranks the pages that can be evicted (full, unpinned, not the page being filled) by `score`:
    "exact" is the attention mass each page received this step (max over the KV group's query heads; a
    distribution over the resident pages), "estimate" the Quest bound of q.k (softmaxed over the resident pages
    when compared with alpha). "top_half" stamps the top ceil(C/2) of those C pages, alpha stamps those whose
    score exceeds alpha. The default, exact / top_half, is what the ablation in docs/accuracy.md chose; the
    RaaS authors' code ranks by the bound: RaaS(score="estimate") or --policy raas:score=estimate.
    """

    pin_prefill: bool = option(True, "RaaS: pin the prompt pages (never evicted)", parse_bool)
    refresh: str | float = option("top_half", "RaaS: 'top_half' or an alpha threshold, e.g. 0.01", parse_refresh)
    score: str = option("exact", "RaaS page score: 'exact' (the attention mass, default) or 'estimate' (the Quest "
                        "bound, the RaaS authors' rule)")

    name: ClassVar[str] = "raas"

    def __post_init__(self):
        super().__post_init__()
        if self.score not in ("estimate", "exact"):
            raise ValueError(f"RaaS score must be 'estimate' or 'exact', got {self.score!r}")
        if not (self.refresh == "top_half" or (isinstance(self.refresh, (int, float))
                                               and not isinstance(self.refresh, bool) and 0 < self.refresh < 1)):
            raise ValueError(f"RaaS refresh must be 'top_half' or an alpha in (0, 1), got {self.refresh!r}")

    def check_prompts(self, lengths: list[int]) -> None:
        if not self.pin_prefill:
            return
        longest = max(lengths)
        need = -(-longest // self.page_size) + DECODE_HEADROOM_PAGES
        if need > self.slot_count:
            fits = need * self.page_size
            raise ValueError(
                f"a prompt of {longest} tokens needs {need - DECODE_HEADROOM_PAGES} pages of {self.page_size} "
                f"plus {DECODE_HEADROOM_PAGES} to decode ({need} pages), but raas pins the prompt and budget "
                f"{self.budget} holds {self.slot_count}: use budget >= {fits}, a shorter prompt, or Quest, which keeps "
                "everything")

    def prefill_slots(self, longest_prompt: int, num_slots: int) -> int:
        if self.pin_prefill:  # a pinned prompt fits the pool (`check_prompts` refuses a longer one): no staging
            return num_slots
        return super().prefill_slots(longest_prompt, num_slots)

    def kept_prompt_pages(self, page, count, page_mass):
        if self.pin_prefill:  # every prompt page, pinned (`check_prompts`: they fit)
            return page < count
        return (page < count) & (page >= count - self.slot_count)  # the newest that fit: StreamingLLM without sinks

    def prefill(self, cache, layer, q, k, v, positions):
        if not self.pin_prefill:
            page, count = self.prompt_pages(positions)
            kept = jnp.broadcast_to(self.kept_prompt_pages(page, count, None),
                                    cache.cur.shape[1:] + page.shape)  # [B, Hkv, N]
            view = write_prompt(layer_at(cache, layer), k, v, positions, self.page_size, pin=False,
                                layout=compact_pages(kept, self.slot_count))
            return store_layer(cache, layer, view)
        return super().prefill(cache, layer, q, k, v, positions)

    def victim(self, view):
        return oldest_victim(view.stamp, evictable(view, self.page_size), view.start)

    def importance(self, cache, layer, view, q, mass) -> jax.Array:
        """Pages judged important this step, among the pages that can be evicted: [B, Hkv, S] bool."""
        candidates = evictable(view, self.page_size)  # post-append: `cur` is the page written now
        if self.score == "exact":
            scores = mass
        else:
            scores = kernels.page_scores(q, cache.kmin, cache.kmax, view.fill, layer=layer, backend=self.backend)
        if self.refresh == "top_half":
            return top_half_mask(scores, candidates)
        if self.score == "estimate":  # the bound as a distribution over resident pages (mass already is one)
            scores = softmax_over_resident(scores * q.shape[-1] ** -0.5, view.fill > 0)
        return candidates & (scores > self.refresh)

    def update_stats(self, cache, layer, view, q, mass, positions, slot):
        if self.score == "estimate" and self.refresh == "top_half":  # the authors' rule: one kernel on a GPU
            pool = {name: getattr(cache, name) for name in kernels.REFRESH_ARRAYS}
            stamp = kernels.refresh_top_half(q, pool, layer, positions, self.page_size, backend=self.backend)
            return cache.replace(stamp=stamp)
        return refresh_stamps(cache, layer, self.importance(cache, layer, view, q, mass), positions)


@dataclasses.dataclass(frozen=True)
class Quest(Policy):
    """Keep everything (O(N) memory); attend the top K = max(3, budget / page_size) pages by the Quest bound.

    The first `dense_layers` layers attend every page, as in the Quest paper.
    """

    budget: int = 1024
    dense_layers: int = option(2, "Quest: leading layers that attend every page", int)

    name: ClassVar[str] = "quest"
    MIN_PAGES: ClassVar[int] = 3  # the Quest reference never selects fewer pages

    def __post_init__(self):
        super().__post_init__()
        if self.budget < 1:
            raise ValueError(f"Quest budget must be >= 1, got {self.budget}")
        if self.budget % self.page_size:
            raise ValueError(f"budget {self.budget} is not a multiple of page_size {self.page_size}")
        if self.dense_layers < 0:
            raise ValueError(f"Quest dense_layers must be >= 0, got {self.dense_layers}")

    @property
    def selected_pages(self) -> int:
        return max(self.MIN_PAGES, self.budget // self.page_size)

    def attend(self, cache, layer, view, q):
        def dense(_):
            out, _ = kernels.decode_attention(q, cache.k, cache.v, view.fill, layer=layer, backend=self.backend)
            return out

        def sparse(_):
            scores = kernels.page_scores(q, cache.kmin, cache.kmax, view.fill, layer=layer, backend=self.backend)
            slots = quest_select(scores, view.cur, view.fill, self.selected_pages, self.backend)
            out, _ = kernels.decode_attention(q, cache.k, cache.v, view.fill, slots, layer=layer, backend=self.backend)
            return out

        return jax.lax.cond(layer < self.dense_layers, dense, sparse, None), None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HeavyHitterMass:
    """H2O's own arrays in the pool (`PagePool.policy_state`); a layer view has them without the leading L."""

    mass: jax.Array  # [L, B, Hkv, S] float32 attention mass each page has accumulated
    token_mass: jax.Array | None = None  # [L, B, Hkv, G, S*P] float32 chunked prefill only: per query head

    def replace(self, **changes: Any) -> HeavyHitterMass:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class H2O(_FixedBudget):
    """Heavy-Hitter Oracle: a recent window (recent_fraction of the pages) plus the pages with the most
    accumulated attention mass; evict the lowest mass outside the window. Nothing is pinned: a prompt longer
    than the pool keeps its recent window and its heaviest pages. Its arrays: `HeavyHitterMass`."""

    recent_fraction: float = option(0.5, "H2O: share of the pool kept as the recent window", float)

    name: ClassVar[str] = "h2o"

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.recent_fraction < 1 or self.recent_pages() > self.slot_count - DECODE_HEADROOM_PAGES:
            raise ValueError(f"recent_fraction {self.recent_fraction} leaves no heavy-hitter page in a pool of "
                             f"{self.slot_count} pages; use a smaller fraction or a larger budget")

    def recent_pages(self) -> int:
        """R: the window's pages, the page being filled included."""
        return max(1, math.ceil(self.recent_fraction * self.slot_count))

    def init(self, cfg, batch, num_slots, dtype):
        pool = super().init(cfg, batch, num_slots, dtype)
        return pool.replace(policy_state=HeavyHitterMass(jnp.zeros(pool.fill.shape, jnp.float32)))  # [L, B, Hkv, S]

    def prefill(self, cache, layer, q, k, v, positions):
        key_mass = jnp.max(kernels.key_mass(q, k, positions, positions, backend=self.backend), axis=2)  # [B, Hkv, T]
        page_mass = page_sums(key_mass, self.page_size)  # [B, Hkv, N]
        page, count = self.prompt_pages(positions)
        layout = compact_pages(self.kept_prompt_pages(page, count, page_mass), self.slot_count)  # [B, Hkv, S]
        view = write_prompt(layer_at(cache, layer), k, v, positions, self.page_size, pin=False, layout=layout)
        mass = jnp.where(layout >= 0, jnp.take_along_axis(page_mass, jnp.maximum(layout, 0), axis=-1), 0.0)
        return store_layer(cache, layer, view.replace(policy_state=view.policy_state.replace(mass=mass)))

    def kept_prompt_pages(self, page, count, page_mass):
        """The recent window and, in the rest of the pool, the heaviest older pages."""
        in_prompt = page < count  # [..., N]
        recent = in_prompt & (page >= count - self.recent_pages())
        heavy = in_prompt & ~recent & (rank_descending(page_mass, in_prompt & ~recent)
                                       < self.slot_count - jnp.sum(recent, axis=-1, keepdims=True))
        return recent | heavy

    def begin_chunked_prefill(self, cfg, cache):
        """Adds `token_mass` [L, B, Hkv, G, S*P]: per query head, the mass each pool token has received from the
        prompt queries so far. Kept per query head because the prompt's statistic is the max over the group of a sum
        over all queries, which per-chunk maxima would overstate."""
        layers, batch, hkv, num_slots = cache.fill.shape
        shape = (layers, batch, hkv, cfg.num_heads // cfg.num_kv_heads, num_slots * self.page_size)
        return cache.replace(policy_state=cache.policy_state.replace(token_mass=jnp.zeros(shape, jnp.float32)))

    def prefill_chunk(self, cache, layer, q, k, v, positions):
        out, cache = super().prefill_chunk(cache, layer, q, k, v, positions)
        mass = kernels.chunk_key_mass(q, positions, cache.k, layer=layer, backend=self.backend)  # [B, Hkv, G, S*P]
        state = cache.policy_state
        return out, cache.replace(policy_state=state.replace(token_mass=state.token_mass.at[layer].add(mass)))

    def end_chunked_prefill(self, cache):
        """Folds `token_mass` into `mass` as `prefill` computes it (max over the group, summed per page), then
        keeps the pages `kept_prompt_pages` chooses by that mass (`_FixedBudget.compact_staging_pool`)."""
        key_mass = jnp.max(cache.policy_state.token_mass, axis=3)  # [L, B, Hkv, S*P]
        page_mass = key_mass.reshape(key_mass.shape[:-1] + (-1, self.page_size)).sum(-1)  # [L, B, Hkv, S]
        mass = jnp.where(cache.fill > 0, page_mass, 0.0)  # [L, B, Hkv, S]
        return self.compact_staging_pool(cache.replace(policy_state=HeavyHitterMass(mass)), page_mass=mass)

    def protected(self, view) -> jax.Array:
        """Before the append that opens a page: the R - 1 newest resident pages, which stay in the window once
        the new page joins it: [B, Hkv, S]."""
        newest_start = jnp.max(jnp.where(view.fill > 0, view.start, -1), axis=-1, keepdims=True)
        return (view.fill > 0) & (view.start > newest_start - (self.recent_pages() - 1) * self.page_size)

    def victim(self, view):
        candidates = evictable(view, self.page_size) & ~self.protected(view)
        return oldest_victim(view.policy_state.mass, candidates, view.start)  # the lightest; ties to the oldest page

    def update_stats(self, cache, layer, view, q, mass, positions, slot):
        opened = (jnp.arange(view.fill.shape[-1]) == slot[..., None]) & (view.fill == 1)  # new this step
        total = jnp.where(opened, 0.0, view.policy_state.mass) + mass  # [B, Hkv, S]
        state = cache.policy_state
        return cache.replace(policy_state=state.replace(mass=state.mass.at[layer].set(total)))


@dataclasses.dataclass(frozen=True)
class StreamingLLM(_FixedBudget):
    """Attention sinks (the pages holding the first `sink_tokens` tokens) plus the most recent pages.
    Nothing is pinned: a prompt longer than the pool keeps its sinks and its newest pages."""

    sink_tokens: int = option(4, "StreamingLLM: attention-sink tokens at the start", int)

    name: ClassVar[str] = "streaming"

    def __post_init__(self):
        super().__post_init__()
        if self.sink_tokens < 0 or self.sink_pages() + DECODE_HEADROOM_PAGES > self.slot_count:
            raise ValueError(f"{self.sink_tokens} sink tokens fill the {self.slot_count}-page pool; "
                             "use fewer sink tokens or a larger budget")

    def sink_pages(self) -> int:
        return -(-self.sink_tokens // self.page_size)

    def kept_prompt_pages(self, page, count, page_mass):
        return (page < count) & ((page < self.sink_pages()) | (page >= count - (self.slot_count - self.sink_pages())))

    def prefill(self, cache, layer, q, k, v, positions):
        page, count = self.prompt_pages(positions)
        kept = jnp.broadcast_to(self.kept_prompt_pages(page, count, None),
                                cache.cur.shape[1:] + page.shape)  # [B, Hkv, N]
        view = write_prompt(layer_at(cache, layer), k, v, positions, self.page_size, pin=False,
                            layout=compact_pages(kept, self.slot_count))
        return store_layer(cache, layer, view)

    def victim(self, view):
        candidates = evictable(view, self.page_size) & (view.start >= self.sink_tokens)
        return oldest_victim(view.start, candidates, view.start)


POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (Dense, RaaS, Quest, H2O, StreamingLLM)}


def policy_key(name: str) -> str:
    """Canonical CLI name: 'StreamingLLM', 'streaming-llm' -> 'streaming'."""
    key = name.lower().replace("-", "").replace("_", "")
    return {"streamingllm": "streaming"}.get(key, key)


def policy_options(cls: type[Policy]) -> list[dataclasses.Field]:
    """The policy-specific options of `cls` (fields declared with `option`), in declaration order."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def parse_policy_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'raas' or 'raas:score=exact:refresh=0.01' -> ('raas', {'score': 'exact', 'refresh': 0.01}): a policy name
    and options, each parsed as its CLI flag is."""
    name, *items = [part.strip() for part in spec.split(":")]
    key = policy_key(name)
    if key not in POLICIES:
        raise ValueError(f"unknown policy {name!r} in {spec!r}; choose one of {', '.join(POLICIES)}")
    fields = {f.name: f for f in policy_options(POLICIES[key])}
    options: dict[str, Any] = {}
    for item in items:
        option_name, eq, text = item.partition("=")
        option_name = option_name.strip().replace("-", "_")
        if not eq or option_name not in fields:
            takes = ", ".join(fields) or "no options"
            raise ValueError(f"{spec!r}: {item!r} is not OPTION=VALUE for policy {key!r} (it takes {takes})")
        try:
            options[option_name] = parse_option(fields[option_name], text.strip())
        except ValueError as e:
            raise ValueError(f"{spec!r}: {option_name}: {e}") from None
    return key, options


def parse_option(field: dataclasses.Field, text: str) -> Any:
    """A policy option's value from its text (the field's `parse`, else the text itself); ValueError if bad."""
    return (field.metadata["parse"] or str)(text)


def make_policy(name: str, budget: int | None = None, page_size: int = 16, **options: Any) -> Policy:
    """A policy from its CLI name: dense | raas | quest | h2o | streaming."""
    key = policy_key(name)
    if key not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    cls = POLICIES[key]
    allowed = {f.name for f in policy_options(cls)} | {"backend", "kv_dtype"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        flags = ", ".join("--" + n.replace("_", "-") for n in unknown)
        takes = ", ".join("--" + n.replace("_", "-") for n in sorted(allowed - {"backend", "kv_dtype"})) or "no options"
        raise ValueError(f"{flags} does not apply to policy {key!r} (it takes {takes})")
    if cls is Dense:
        if budget is not None:
            raise ValueError("--budget does not apply to policy 'dense' (it keeps every token): drop it or choose a "
                             f"sparse policy ({', '.join(n for n in POLICIES if n != 'dense')})")
        return Dense(page_size=page_size, **options)
    if budget is None:
        raise ValueError(f"policy {name!r} needs a budget (e.g. --budget 1024)")
    return cls(page_size=page_size, budget=budget, **options)
