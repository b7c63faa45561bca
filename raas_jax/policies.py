"""KV-cache policies on one page pool: Dense, RaaS, Quest, H2O and StreamingLLM.

Each policy is a frozen (hashable) config that is also the model's cache ops: `init` builds the
cache, `prefill` writes the prompt, `decode` appends one token (evicting if the pool is full),
attends and updates the page statistics. Everything is vectorised over (batch, KV head); the model
scans over layers. See DESIGN.md section 1 for the algorithm.

Per decode step, for every (layer, sequence, KV head):
  1. append the new key/value: into the current page, or into a new page taken from a free slot or,
     when none is free, from the victim the policy picks (at most one eviction per step);
  2. attend: all resident pages (Dense, RaaS, H2O, StreamingLLM) or the top-K pages by the Quest
     bound (Quest);
  3. update statistics: RaaS stamps the pages judged important with the current position; H2O adds
     the attention mass each page received.

Victims (only full, unpinned pages other than the one being filled):
  RaaS          the oldest stamp (the page unused for longest);
  StreamingLLM  the oldest page that holds no sink token;
  H2O           the lowest accumulated attention mass outside the recent window.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from raas_jax import kernels
from raas_jax.cache import LayerCache, append_token, init_pool, layer_at, store_layer, write_prompt
from raas_jax.models.config import ModelConfig

INT32_MAX = jnp.iinfo(jnp.int32).max
MIN_DENSE_SLOTS = 16  # smallest bucket of pages for the O(N) policies
DECODE_HEADROOM_PAGES = 2  # a fixed pool needs room for the page being filled and one evictable page


def next_pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


# ------------------------------------------------------------------------ selection primitives

def oldest_victim(order_key: jax.Array, candidates: jax.Array) -> jax.Array:
    """argmin of `order_key` over `candidates` (lowest slot on ties): [B, Hkv, S] -> [B, Hkv]."""
    return jnp.argmin(jnp.where(candidates, order_key, INT32_MAX), axis=-1).astype(jnp.int32)


def evictable(view: LayerCache, page_size: int) -> jax.Array:
    """Full, unpinned slots other than the one being filled: [B, Hkv, S] bool."""
    slot_ids = jnp.arange(view["fill"].shape[-1])
    not_current = slot_ids[None, None, :] != view["cur"][..., None]
    return (view["fill"] >= page_size) & ~view["pinned"] & not_current


def top_half_mask(scores: jax.Array, resident: jax.Array, backend: str = "auto") -> jax.Array:
    """The top ceil(S/2) resident slots by score (lower slot wins ties): [B, Hkv, S] bool."""
    keep = (scores.shape[-1] + 1) // 2
    masked = jnp.where(resident, scores, -jnp.inf)
    return kernels.top_k_mask(masked, keep, backend=backend) & resident


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


# ----------------------------------------------------------------------------------- policies

@dataclasses.dataclass(frozen=True)
class Policy:
    """Shared machinery; subclasses set the victim, the attention set and the statistics."""

    page_size: int = 16
    backend: str = "auto"

    name: ClassVar[str] = "policy"
    fixed_budget: ClassVar[bool] = False  # True: the cache size depends on the budget alone
    pin_prompt: ClassVar[bool] = False

    # sizing ---------------------------------------------------------------------------------
    def num_slots(self, longest_prompt: int, max_new_tokens: int) -> int:
        """Slots per (layer, sequence, KV head). O(N) policies: bucketed total length."""
        pages = -(-(longest_prompt + max_new_tokens) // self.page_size)
        return next_pow2(pages, MIN_DENSE_SLOTS)

    def check_prompts(self, lengths: list[int]) -> None:
        """Raise a ValueError that says what to change when a prompt cannot fit."""

    def init(self, cfg: ModelConfig, batch: int, num_slots: int, dtype: Any) -> dict[str, jax.Array]:
        return init_pool(cfg, batch, num_slots, self.page_size, dtype)

    # model hooks: `cache` is stacked over layers, `layer` the (traced) index of the calling layer -----
    def prefill(self, cache, layer, q, k, v, positions):
        """q [B, T, Hq, D], k/v [B, T, Hkv, D], positions [B, T] -> the cache with this layer's prompt."""
        view = write_prompt(layer_at(cache, layer), k, v, positions, self.page_size, pin=self.pin_prompt)
        return store_layer(cache, layer, view)

    def decode(self, cache, layer, q, k, v, positions):
        """q [B, Hq, D], k/v [B, Hkv, D], positions [B] -> (out [B, Hq, D], cache)."""
        victim = self.victim(layer_at(cache, layer, pages=False))
        cache, slot, _ = append_token(cache, layer, k, v, positions, victim, self.page_size)
        view = layer_at(cache, layer, pages=False)  # metadata; the kernels read k/v/kmin/kmax stacked
        out, mass = self.attend(cache, layer, view, q)
        return out, self.update_stats(cache, layer, view, q, mass, positions, slot)

    # policy-specific ------------------------------------------------------------------------
    def victim(self, view: LayerCache) -> jax.Array:
        """The slot to evict if a new page is needed and none is free: [B, Hkv]."""
        return jnp.zeros(view["cur"].shape, jnp.int32)  # O(N) policies never evict

    def attend(self, cache, layer, view: LayerCache, q) -> tuple[jax.Array, jax.Array | None]:
        """(out [B, Hq, D], per-slot mass [B, Hkv, S] or None) over `layer` of the stacked `cache`."""
        return kernels.decode_attention(q, cache["k"], cache["v"], view["fill"], layer=layer, backend=self.backend)

    def update_stats(self, cache, layer, view: LayerCache, q, mass, positions, slot):
        return cache


@dataclasses.dataclass(frozen=True)
class Dense(Policy):
    """Keep everything, attend everything: O(N) time and memory."""

    name: ClassVar[str] = "dense"


@dataclasses.dataclass(frozen=True)
class _FixedBudget(Policy):
    """A pool of budget / page_size slots, whatever the number of generated tokens."""

    budget: int = 1024

    fixed_budget: ClassVar[bool] = True

    def __post_init__(self):
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.budget % self.page_size:
            raise ValueError(f"budget {self.budget} is not a multiple of page_size {self.page_size}; "
                             f"use e.g. budget={self.budget // self.page_size * self.page_size or self.page_size}")
        if self.budget // self.page_size < DECODE_HEADROOM_PAGES + 1:
            raise ValueError(f"budget {self.budget} gives {self.budget // self.page_size} pages of "
                             f"{self.page_size}; {self.name} needs at least {DECODE_HEADROOM_PAGES + 1}")

    def num_slots(self, longest_prompt: int, max_new_tokens: int) -> int:
        return self.budget // self.page_size

    def check_prompts(self, lengths: list[int]) -> None:
        slots = self.budget // self.page_size
        longest = max(lengths)
        need = -(-longest // self.page_size) + DECODE_HEADROOM_PAGES
        if need > slots:
            fits = need * self.page_size
            raise ValueError(
                f"a prompt of {longest} tokens needs {need - DECODE_HEADROOM_PAGES} pages of {self.page_size} "
                f"plus {DECODE_HEADROOM_PAGES} to decode ({need} pages), but {self.name} budget {self.budget} "
                f"holds {slots}: use budget >= {fits}, a shorter prompt, or Quest, which keeps everything")


@dataclasses.dataclass(frozen=True)
class RaaS(_FixedBudget):
    """Reasoning-Aware Attention Sparsity: pinned prompt, timestamps refreshed by use, evict the stalest.

    refresh: "top_half" (pages in the top ceil(S/2) by score get stamp = now) or a float alpha
    (pages whose normalised score exceeds alpha). score: "estimate" (Quest bound, softmax-normalised
    over resident pages for alpha) or "exact" (the attention mass each page received this step).
    """

    pin_prefill: bool = True
    refresh: str | float = "top_half"
    score: str = "estimate"
    dense_layers: int = 0

    name: ClassVar[str] = "raas"

    def __post_init__(self):
        super().__post_init__()
        if self.score not in ("estimate", "exact"):
            raise ValueError(f"RaaS score must be 'estimate' or 'exact', got {self.score!r}")
        if not (self.refresh == "top_half" or (isinstance(self.refresh, (int, float))
                                               and not isinstance(self.refresh, bool) and 0 < self.refresh < 1)):
            raise ValueError(f"RaaS refresh must be 'top_half' or an alpha in (0, 1), got {self.refresh!r}")
        if self.dense_layers:
            raise ValueError("RaaS(dense_layers > 0) is not supported: a dense layer would need an O(N) cache "
                             "beside the fixed pool; use dense_layers=0 (Quest supports dense_layers)")

    @property
    def pin_prompt(self) -> bool:  # type: ignore[override]
        return self.pin_prefill

    def victim(self, view):
        return oldest_victim(view["stamp"], evictable(view, self.page_size))

    def importance(self, cache, layer, view, q, mass) -> jax.Array:
        """Pages judged important this step: [B, Hkv, S] bool."""
        resident = view["fill"] > 0
        if self.score == "exact":
            scores = mass
            normalised = mass
        else:
            scores = kernels.page_scores(q, cache["kmin"], cache["kmax"], view["fill"], layer=layer,
                                         backend=self.backend)
            normalised = softmax_over_resident(scores * q.shape[-1] ** -0.5, resident)
        if self.refresh == "top_half":
            return top_half_mask(scores, resident, self.backend)
        return resident & (normalised > self.refresh)

    def update_stats(self, cache, layer, view, q, mass, positions, slot):
        important = self.importance(cache, layer, view, q, mass)
        stamp = jnp.where(important, positions[:, None, None], view["stamp"])
        return {**cache, "stamp": cache["stamp"].at[layer].set(stamp)}


@dataclasses.dataclass(frozen=True)
class Quest(Policy):
    """Keep everything (O(N) memory); attend the top-K pages by the Quest bound (K = budget / page_size).

    The first `dense_layers` layers attend every page, as in the Quest paper.
    """

    budget: int = 1024
    dense_layers: int = 2

    name: ClassVar[str] = "quest"

    def __post_init__(self):
        if self.budget % self.page_size:
            raise ValueError(f"budget {self.budget} is not a multiple of page_size {self.page_size}")

    def attend(self, cache, layer, view, q):
        def dense(_):
            out, _ = kernels.decode_attention(q, cache["k"], cache["v"], view["fill"], layer=layer,
                                              backend=self.backend)
            return out

        def sparse(_):
            scores = kernels.page_scores(q, cache["kmin"], cache["kmax"], view["fill"], layer=layer,
                                         backend=self.backend)
            slots = quest_select(scores, view["cur"], view["fill"], self.budget // self.page_size, self.backend)
            out, _ = kernels.decode_attention(q, cache["k"], cache["v"], view["fill"], slots, layer=layer,
                                              backend=self.backend)
            return out

        return jax.lax.cond(layer < self.dense_layers, dense, sparse, None), None


@dataclasses.dataclass(frozen=True)
class H2O(_FixedBudget):
    """Heavy-Hitter Oracle: a recent window (recent_fraction of the pages) plus the pages with the most
    accumulated attention mass; evict the lowest mass outside the window."""

    recent_fraction: float = 0.5

    name: ClassVar[str] = "h2o"

    def __post_init__(self):
        super().__post_init__()
        slots = self.budget // self.page_size
        if not 0 <= self.recent_fraction < 1 or self.recent_pages() > slots - DECODE_HEADROOM_PAGES:
            raise ValueError(f"recent_fraction {self.recent_fraction} leaves no heavy-hitter page in a pool of "
                             f"{slots} pages; use a smaller fraction or a larger budget")

    def recent_pages(self) -> int:
        return math.ceil(self.recent_fraction * (self.budget // self.page_size))

    def init(self, cfg, batch, num_slots, dtype):
        pool = super().init(cfg, batch, num_slots, dtype)
        return {**pool, "mass": jnp.zeros(pool["fill"].shape, jnp.float32)}  # [L, B, Hkv, S]

    def prefill(self, cache, layer, q, k, v, positions):
        cache = super().prefill(cache, layer, q, k, v, positions)
        _, key_mass = kernels.causal_attention(q, k, v, positions, positions, return_key_mass=True,
                                               backend=self.backend)  # [B, Hkv, T]
        num_slots = cache["fill"].shape[-1]
        page = jnp.where(positions >= 0, positions // self.page_size, num_slots)  # [B, T]
        b, hkv, _ = key_mass.shape
        mass = jnp.zeros((b, hkv, num_slots), jnp.float32)
        mass = mass.at[jnp.arange(b)[:, None, None], jnp.arange(hkv)[None, :, None], page[:, None, :]].add(
            key_mass, mode="drop")
        return {**cache, "mass": cache["mass"].at[layer].set(mass)}

    def recent(self, view) -> jax.Array:
        """The newest `recent_pages` pages (by start position), the current one included: [B, Hkv, S]."""
        newest_start = jnp.max(jnp.where(view["fill"] > 0, view["start"], -1), axis=-1, keepdims=True)
        window = (self.recent_pages() - 1) * self.page_size
        return (view["fill"] > 0) & (view["start"] >= newest_start - window)

    def victim(self, view):
        candidates = evictable(view, self.page_size) & ~self.recent(view)
        order = jnp.where(candidates, view["mass"], jnp.inf)
        return jnp.argmin(order, axis=-1).astype(jnp.int32)

    def update_stats(self, cache, layer, view, q, mass, positions, slot):
        opened = (jnp.arange(view["fill"].shape[-1]) == slot[..., None]) & (view["fill"] == 1)  # new this step
        total = jnp.where(opened, 0.0, view["mass"]) + mass  # [B, Hkv, S]
        return {**cache, "mass": cache["mass"].at[layer].set(total)}


@dataclasses.dataclass(frozen=True)
class StreamingLLM(_FixedBudget):
    """Attention sinks (the pages holding the first `sink_tokens` tokens) plus the most recent pages."""

    sink_tokens: int = 4

    name: ClassVar[str] = "streaming"

    def __post_init__(self):
        super().__post_init__()
        sink_pages = -(-self.sink_tokens // self.page_size)
        if sink_pages + DECODE_HEADROOM_PAGES > self.budget // self.page_size:
            raise ValueError(f"{self.sink_tokens} sink tokens fill the {self.budget // self.page_size}-page pool; "
                             "use fewer sink tokens or a larger budget")

    def victim(self, view):
        candidates = evictable(view, self.page_size) & (view["start"] >= self.sink_tokens)
        return oldest_victim(view["start"], candidates)


POLICIES = {"dense": Dense, "raas": RaaS, "quest": Quest, "h2o": H2O, "streaming": StreamingLLM}


def policy_key(name: str) -> str:
    """Canonical CLI name: 'StreamingLLM', 'streaming-llm' -> 'streaming'."""
    key = name.lower().replace("-", "").replace("_", "")
    return {"streamingllm": "streaming"}.get(key, key)


def make_policy(name: str, budget: int | None = None, page_size: int = 16, **options: Any) -> Policy:
    """A policy from its CLI name: dense | raas | quest | h2o | streaming."""
    key = policy_key(name)
    if key not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    cls = POLICIES[key]
    if cls is Dense:
        return Dense(page_size=page_size, **options)
    if budget is None:
        raise ValueError(f"policy {name!r} needs a budget (e.g. --budget 1024)")
    return cls(page_size=page_size, budget=budget, **options)
