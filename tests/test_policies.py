"""Policies: equal to dense when nothing must be evicted, and eviction/refresh/selection rules
checked against brute force on random score sequences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import raas_jax
from raas_jax.api import teacher_forced_logits
from raas_jax.models.config import ModelConfig
from raas_jax.policies import (H2O, Dense, Quest, RaaS, StreamingLLM, make_policy, oldest_victim, quest_select,
                               top_half_mask)

PROMPTS = [[5, 9, 33, 101, 7], list(range(1, 22))]
BIG = 256  # budget >= prompt + max_new_tokens for every prompt here

ALL_POLICIES = {
    "raas": RaaS(budget=BIG, page_size=4),
    "raas-exact-alpha": RaaS(budget=BIG, page_size=4, score="exact", refresh=0.01),
    "raas-token": RaaS(budget=BIG, page_size=1),
    "quest": Quest(budget=BIG, page_size=4, dense_layers=0),
    "quest-token": Quest(budget=BIG, page_size=1, dense_layers=1),
    "h2o": H2O(budget=BIG, page_size=4),
    "h2o-token": H2O(budget=BIG, page_size=1),
    "streaming": StreamingLLM(budget=BIG, page_size=4),
    "streaming-token": StreamingLLM(budget=BIG, page_size=1),
}


@pytest.fixture(scope="module")
def model(tiny_llama_converted):
    return raas_jax.load(tiny_llama_converted, dtype="f32")


@pytest.fixture(scope="module")
def dense_run(model):
    tokens = [r.token_ids for r in model.generate(PROMPTS, max_new_tokens=40, chat=False)]
    return tokens, teacher_forced_logits(model, PROMPTS, tokens, Dense())


# the fast set keeps every policy and both page sizes: raas (pages and exact scores), quest and streaming in tokens,
# h2o in pages; the other variants run in the full set
SLOW_POLICIES = ("raas-token", "quest", "h2o-token", "streaming")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_POLICIES else n
                                  for n in sorted(ALL_POLICIES)])
def test_large_budget_equals_dense(model, dense_run, name):
    policy = ALL_POLICIES[name]
    dense_tokens, dense_logits = dense_run
    tokens = [r.token_ids for r in model.generate(PROMPTS, max_new_tokens=40, chat=False, policy=policy)]
    assert tokens == dense_tokens
    for ours, ref in zip(teacher_forced_logits(model, PROMPTS, dense_tokens, policy), dense_logits):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_teacher_forced_dense_matches_full_forward(model, dense_run):
    tokens, logits = dense_run
    for prompt, cont, lg in zip(PROMPTS, tokens, logits):
        full = model.logits([prompt + cont])[0, len(prompt) - 1:len(prompt) + len(cont) - 1]
        np.testing.assert_allclose(lg, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", [RaaS(budget=64, page_size=4),
                                    pytest.param(H2O(budget=64, page_size=4), marks=pytest.mark.slow),
                                    pytest.param(StreamingLLM(budget=64, page_size=4), marks=pytest.mark.slow),
                                    Dense()], ids=lambda p: p.name)
def test_cache_bytes_do_not_grow_with_new_tokens(model, policy):
    """A fixed budget: the same pool for 20 and 100 new tokens (121 tokens in a budget of 64); Dense grows."""
    short = model.generate(PROMPTS, max_new_tokens=20, chat=False, policy=policy)[0].stats["cache_bytes"]
    if policy.fixed_budget:
        long = model.generate(PROMPTS, max_new_tokens=100, chat=False, policy=policy)[0].stats["cache_bytes"]
        assert short == long
    else:
        long = model.generate(PROMPTS, max_new_tokens=300, chat=False, policy=policy)[0].stats["cache_bytes"]
        assert long > short  # pages of 16: 16 -> 24 slots


def test_twice_the_tokens_compiles_nothing_new(model):
    policy = RaaS(budget=64, page_size=4)
    model.generate(PROMPTS, max_new_tokens=50, chat=False, policy=policy)
    gen = model._generator(policy)
    compiled = (gen.start._cache_size(), gen.decode._cache_size())
    model.generate(PROMPTS, max_new_tokens=100, chat=False, policy=policy)
    assert (gen.start._cache_size(), gen.decode._cache_size()) == compiled


def test_prompt_larger_than_budget_is_explained(model):
    with pytest.raises(ValueError, match=r"21 tokens needs 6 pages of 4 plus 2.*budget >= 32.*Quest"):
        model.generate(PROMPTS, max_new_tokens=5, chat=False, policy=RaaS(budget=28, page_size=4))


def test_bad_policy_configs():
    with pytest.raises(ValueError, match="not a multiple of page_size"):
        RaaS(budget=100, page_size=16)
    with pytest.raises(ValueError, match="unknown policy 'foo'"):
        make_policy("foo", budget=64)
    with pytest.raises(ValueError, match="refresh"):
        RaaS(budget=64, page_size=4, refresh=2.0)
    with pytest.raises(ValueError, match="needs a budget"):
        make_policy("raas")
    assert make_policy("StreamingLLM", budget=64, page_size=4) == StreamingLLM(budget=64, page_size=4)


# ----------------------------------------------------------------- selection primitives (brute force)

score_arrays = st.integers(0, 2**31 - 1).map(lambda seed: np.random.default_rng(seed))


@settings(max_examples=40, deadline=None)
@given(rng=score_arrays, slots=st.integers(2, 9))
def test_top_half_refreshes_the_top_half_of_the_candidates(rng, slots):
    scores = rng.permutation(slots * 6).reshape(2, 3, slots)[..., :slots].astype(np.float32)  # distinct
    candidates = rng.random((2, 3, slots)) < 0.7
    got = np.asarray(jax.jit(top_half_mask)(jnp.asarray(scores), jnp.asarray(candidates)))
    for b in range(2):
        for h in range(3):
            pool = [s for s in np.argsort(-scores[b, h]) if candidates[b, h, s]]
            want = np.zeros(slots, bool)
            want[pool[:(len(pool) + 1) // 2]] = True  # ceil(C / 2) of the C candidates
            assert (got[b, h] == want).all()


@settings(max_examples=12, deadline=None)
@given(rng=score_arrays, slots=st.integers(1, 12), k=st.integers(1, 12))
def test_quest_selection_is_brute_force_top_k(rng, slots, k):
    check_quest_selection(rng, slots, k)


@pytest.mark.slow
@settings(max_examples=28, deadline=None)  # 40 in all, as before the split
@given(rng=score_arrays, slots=st.integers(1, 12), k=st.integers(1, 12))
def test_quest_selection_is_brute_force_top_k_more_cases(rng, slots, k):
    check_quest_selection(rng, slots, k)


def check_quest_selection(rng, slots, k):
    scores = rng.normal(size=(2, 2, slots)).astype(np.float32)
    fill = (rng.random((2, 2, slots)) < 0.8).astype(np.int32)
    cur = rng.integers(0, slots, (2, 2))
    fill[np.arange(2)[:, None], np.arange(2)[None, :], cur] = 1
    select = jax.jit(quest_select, static_argnums=3)  # jitted, as in the decode loop: op by op took seconds
    got = np.asarray(select(jnp.asarray(scores), jnp.asarray(cur), jnp.asarray(fill), k))
    for b in range(2):
        for h in range(2):
            resident = [s for s in range(slots) if fill[b, h, s] and s != cur[b, h]]
            ranked = [cur[b, h]] + sorted(resident, key=lambda s: -scores[b, h, s])
            want = sorted(ranked[:min(k, slots)])  # listed in slot order
            assert got.shape[-1] == min(k, slots)
            assert [s for s in got[b, h] if s >= 0] == want
            assert (got[b, h][len(want):] == -1).all()


@settings(max_examples=40, deadline=None)
@given(rng=score_arrays, slots=st.integers(2, 10))
def test_oldest_victim_breaks_ties_by_position_not_slot(rng, slots):
    stamps = rng.integers(0, 5, (3, slots)).astype(np.int32)  # many ties
    starts = np.stack([rng.permutation(slots) * 4 for _ in range(3)]).astype(np.int32)  # slot order != age
    candidates = rng.random((3, slots)) < 0.6
    candidates[:, 0] |= ~candidates.any(axis=1)
    got = np.asarray(jax.jit(oldest_victim)(jnp.asarray(stamps)[None], jnp.asarray(candidates)[None],
                                            jnp.asarray(starts)[None]))[0]
    for row in range(3):
        pool = [s for s in range(slots) if candidates[row, s]]
        assert got[row] == min(pool, key=lambda s: (stamps[row, s], starts[row, s]))


# -------------------------------------------------------------- pool simulation against brute force

B, HKV, GROUP, D = 2, 2, 2, 8
SIM_CFG = ModelConfig(model_type="llama", vocab_size=8, hidden_size=32, intermediate_size=8, num_layers=1,
                      num_heads=HKV * GROUP, num_kv_heads=HKV, head_dim=D)


_JITTED: dict = {}


def jitted(policy):
    """One compiled (prefill, decode) pair per policy, shared by every hypothesis example."""
    if policy not in _JITTED:
        _JITTED[policy] = (jax.jit(policy.prefill), jax.jit(policy.decode))
    return _JITTED[policy]


def simulate(policy, prompt_lengths, steps, seed, max_prompt=9):
    """Run prefill + `steps` decode steps on a one-layer cache with random q/k/v; yield (before, after, pos, q)."""
    rng = np.random.default_rng(seed)
    prefill, decode = jitted(policy)
    slots = policy.budget // policy.page_size
    t = max_prompt
    cache = policy.init(SIM_CFG, B, slots, jnp.float32)
    positions = np.where(np.arange(t)[None] < np.array(prompt_lengths)[:, None], np.arange(t)[None], -1)
    q = rng.normal(size=(B, t, HKV * GROUP, D)).astype(np.float32)
    k = rng.normal(size=(B, t, HKV, D)).astype(np.float32)
    layer = jnp.int32(0)
    cache = prefill(cache, layer, q, k, k, jnp.asarray(positions))
    pos = np.array(prompt_lengths, np.int32)
    for _ in range(steps):
        q1 = rng.normal(size=(B, HKV * GROUP, D)).astype(np.float32) * 3
        k1 = rng.normal(size=(B, HKV, D)).astype(np.float32)
        before = jax.tree.map(lambda x: np.asarray(x[0]), cache)
        _, cache = decode(cache, layer, q1, k1, k1, jnp.asarray(pos))
        yield before, jax.tree.map(lambda x: np.asarray(x[0]), cache), pos.copy(), q1
        pos += 1


def test_dense_pool_holds_page_j_in_slot_j():
    """Dense.attend tells the kernel that slots past `cur` are empty (`live_slots`): that holds because page j sits
    in slot j. Checked after every step of padded prompts of different lengths, pages opening mid-run."""
    policy = Dense(page_size=2)
    prefill, decode = jitted(policy)
    rng = np.random.default_rng(0)
    lengths, t, slots = np.array([3, 8]), 9, 16
    cache = policy.init(SIM_CFG, B, slots, jnp.float32)
    positions = np.where(np.arange(t)[None] < lengths[:, None], np.arange(t)[None], -1)
    k = rng.normal(size=(B, t, HKV, D)).astype(np.float32)
    cache = prefill(cache, jnp.int32(0), k.repeat(GROUP, axis=2), k, k, jnp.asarray(positions))
    for step in range(14):
        fill, start, cur = (np.asarray(x[0]) for x in (cache.fill, cache.start, cache.cur))
        pos = lengths + step  # the next token's position
        for b in range(B):
            for h in range(HKV):
                resident = np.flatnonzero(fill[b, h])
                np.testing.assert_array_equal(resident, np.arange(-(-pos[b] // 2)))  # pages 0 .. last, in order
                np.testing.assert_array_equal(start[b, h, resident], resident * 2)  # page j in slot j
                assert cur[b, h] == resident[-1]
        k1 = rng.normal(size=(B, HKV, D)).astype(np.float32)
        _, cache = decode(cache, jnp.int32(0), k1.repeat(GROUP, axis=1), k1, k1, jnp.asarray(pos, np.int32))


def oldest_stamp_then_oldest_page(st_, b, h, candidates):
    return min(candidates, key=lambda s: (st_.stamp[b, h, s], st_.start[b, h, s]))


def check_common(policy, before, after, pos, victim_rule):
    page = policy.page_size
    slots = after.fill.shape[-1]
    for b in range(B):
        for h in range(HKV):
            assert (after.fill[b, h] <= page).all() and (after.fill[b, h] >= 0).all()
            assert (after.fill[b, h] > 0).sum() <= slots
            cur = before.cur[b, h]
            needs_page = before.fill[b, h, cur] >= page
            free = np.flatnonzero(before.fill[b, h] == 0)
            slot = after.cur[b, h]
            if not needs_page:
                assert slot == cur and after.fill[b, h, cur] == before.fill[b, h, cur] + 1
                continue
            assert after.start[b, h, slot] == pos[b] and after.fill[b, h, slot] == 1
            if len(free):
                assert slot == free[0]
                continue
            assert slot != cur, "the page filled at this step was evicted"
            assert not before.pinned[b, h, slot], "a pinned page was evicted"
            candidates = [s for s in range(slots) if before.fill[b, h, s] == page and not before.pinned[b, h, s]
                          and s != cur]
            assert slot == victim_rule(before, b, h, candidates)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), lengths=st.tuples(st.integers(1, 8), st.integers(1, 8)))
def test_raas_evicts_the_oldest_stamp_and_refreshes_the_top_half(seed, lengths):
    """The authors' rule (the Quest bound ranks the pages); the default's exact-mass ranking is checked against the
    oracle in test_policy_oracle.py."""
    policy = RaaS(budget=6 * 2, page_size=2, score="estimate")
    for before, after, pos, q in simulate(policy, lengths, 30, seed):
        check_common(policy, before, after, pos, oldest_stamp_then_oldest_page)
        # refresh: brute-force Quest bound on the post-append pages, max over the group, ranked over the pages
        # that can be evicted (full, unpinned, not the page written now)
        qg = q.reshape(B, HKV, GROUP, D)
        bound = np.maximum(qg[:, :, :, None] * after.kmax[:, :, None], qg[:, :, :, None] * after.kmin[:, :, None])
        bound = bound.sum(-1).max(2)  # [B, Hkv, S]
        for b in range(B):
            for h in range(HKV):
                cur = after.cur[b, h]
                candidates = [s for s in range(bound.shape[-1]) if after.fill[b, h, s] == policy.page_size
                              and not after.pinned[b, h, s] and s != cur]
                top = sorted(candidates, key=lambda s: (-bound[b, h, s], s))[:(len(candidates) + 1) // 2]
                refreshed = set(np.flatnonzero(after.stamp[b, h] == pos[b]))
                assert refreshed == set(top) | {cur}  # the page written now is stamped too (novice protection)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 10_000), lengths=st.tuples(st.integers(1, 9), st.integers(1, 9)))
def test_streaming_keeps_sinks_and_newest_pages(seed, lengths):
    policy = StreamingLLM(budget=6 * 2, page_size=2, sink_tokens=3)
    for before, after, pos, _ in simulate(policy, lengths, 30, seed):
        check_common(policy, before, after, pos,
                     lambda st_, b, h, c: min([s for s in c if st_.start[b, h, s] >= 3],
                                              key=lambda s: (st_.start[b, h, s], s)))
        for b in range(B):
            for h in range(HKV):
                starts = sorted(after.start[b, h][after.fill[b, h] > 0])
                sinks = [s for s in (0, 2) if s <= pos[b]]  # the sink tokens 0..2 live in pages 0 and 1
                assert starts[:len(sinks)] == sinks
                rest = starts[len(sinks):]
                if rest:
                    assert rest == list(range(rest[0], rest[0] + 2 * len(rest), 2))  # contiguous newest pages
                    assert rest[-1] <= pos[b] < rest[-1] + 2


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 10_000), lengths=st.tuples(st.integers(1, 9), st.integers(1, 9)))
def test_h2o_keeps_its_recent_window_and_evicts_the_lightest(seed, lengths):
    policy = H2O(budget=8 * 2, page_size=2, recent_fraction=0.5)
    for before, after, pos, _ in simulate(policy, lengths, 30, seed):
        def lightest(st_, b, h, c):
            # 4 recent pages: the new page joins the window, so the 3 newest resident pages are protected
            protected = sorted(st_.start[b, h][st_.fill[b, h] > 0])[-3:]
            outside = [s for s in c if st_.start[b, h, s] not in protected]
            return min(outside, key=lambda s: (st_.policy_state.mass[b, h, s], st_.start[b, h, s]))

        check_common(policy, before, after, pos, lightest)
        for b in range(B):
            for h in range(HKV):
                starts = set(after.start[b, h][after.fill[b, h] > 0])
                newest = max(starts)
                assert {newest - 2 * i for i in range(4) if newest - 2 * i >= 0} <= starts


def test_token_level_raas_step():
    """page_size=1: every decode step opens a page and (once full) evicts exactly one."""
    policy = RaaS(budget=6, page_size=1)
    evictions = 0
    for before, after, pos, _ in simulate(policy, (3, 2), 12, 0):
        check_common(policy, before, after, pos, oldest_stamp_then_oldest_page)
        evictions += int((before.fill > 0).all())
    assert evictions > 0


@pytest.mark.parametrize("name,options", [
    pytest.param("raas", {"score": "exact", "budget": 64}, marks=pytest.mark.slow),
    ("raas", {"score": "estimate", "budget": 32}), ("dense", {})])
def test_pallas_backend_generates_like_the_reference(model, name, options):
    """The Pallas kernels (interpret mode here) drive a real decode loop: RaaS's refresh by attention mass or by
    the page-bound kernel with evictions, Dense's over prompts of different lengths with the pool's empty tail
    skipped (`live_slots`)."""
    reference = make_policy(name, page_size=4, **options)
    pallas = make_policy(name, page_size=4, backend="pallas", **options)
    want = [r.token_ids for r in model.generate(PROMPTS, max_new_tokens=40, chat=False, policy=reference)]
    got = [r.token_ids for r in model.generate(PROMPTS, max_new_tokens=40, chat=False, policy=pallas)]
    assert got == want


def _pallas_operand_shapes(jaxpr) -> list[list[tuple[int, ...]]]:
    """Operand shapes of every pallas_call in `jaxpr` and the jaxprs nested in it (scan, cond, jit, ...)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append([tuple(v.aval.shape) for v in eqn.invars])
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += _pallas_operand_shapes(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += _pallas_operand_shapes(sub)
    return found


@pytest.mark.parametrize("name", ["dense", "raas", "quest", "h2o", "streaming"])
def test_pallas_kernels_get_whole_stacked_pools_not_layer_slices(name):
    """A layer slice handed to a custom call is copied by XLA (a pool per layer per step: the RaaS B=64 step went
    15.1 -> 9.2 ms on the H200 without it), so every pool-sized kernel operand must be the stacked array."""
    from raas_jax.models.transformer import Transformer

    cfg = ModelConfig(model_type="llama", vocab_size=32, hidden_size=32, intermediate_size=16, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=16)
    policy = make_policy(name, budget=None if name == "dense" else 64, page_size=16, backend="pallas")
    cache = policy.init(cfg, 2, 8, jnp.float32)
    module = Transformer(cfg, jnp.float32, policy)
    tokens = jnp.zeros((2, 1), jnp.int32)
    # shapes only (an eager init would run every interpret-mode kernel op by op): make_jaxpr needs no values
    params = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), tokens, tokens, cache, decode=True))["params"]
    step = jax.make_jaxpr(lambda p, c: module.apply({"params": p}, tokens, tokens + 20, c, decode=True))(params, cache)
    calls = _pallas_operand_shapes(step.jaxpr)
    assert len(calls) >= 1  # dense/raas/quest...: attention (+ page scores / top-k for raas and quest)
    pool = [shape for call in calls for shape in call if len(shape) == 5]  # k/v [L,B,H,S*P,D], kmin/kmax
    assert pool and all(shape[0] == cfg.num_layers for shape in pool), calls


@pytest.mark.parametrize("policy", [H2O(budget=16, page_size=4),
                                    pytest.param(StreamingLLM(budget=16, page_size=4), marks=pytest.mark.slow),
                                    pytest.param(H2O(budget=8, page_size=1), marks=pytest.mark.slow),
                                    StreamingLLM(budget=8, page_size=1)], ids=lambda p: f"{p.name}-p{p.page_size}")
def test_h2o_and_streaming_take_prompts_longer_than_the_pool(model, policy):
    """Token-level methods in their papers: they evict prompt tokens like any other (nothing is refused)."""
    long_prompts = [list(range(1, 41)), list(range(3, 20))]
    results = model.generate(long_prompts, max_new_tokens=12, chat=False, policy=policy)
    assert [r.stats["new_tokens"] for r in results] == [12, 12]


def test_streaming_prefill_keeps_sinks_and_the_newest_prompt_pages():
    policy = StreamingLLM(budget=6 * 2, page_size=2, sink_tokens=3)
    lengths = (9, 4)
    prefill, _ = jitted(policy)
    cache = policy.init(SIM_CFG, B, policy.slot_count, jnp.float32)
    t = 9
    positions = np.where(np.arange(t)[None] < np.array(lengths)[:, None], np.arange(t)[None], -1)
    kv = np.random.default_rng(0).normal(size=(B, t, HKV, D)).astype(np.float32)
    q = np.random.default_rng(1).normal(size=(B, t, HKV * GROUP, D)).astype(np.float32)
    cache = jax.tree.map(lambda x: np.asarray(x[0]), prefill(cache, jnp.int32(0), q, kv, kv, jnp.asarray(positions)))
    for b, length in enumerate(lengths):
        for h in range(HKV):
            starts = sorted(cache.start[b, h][cache.fill[b, h] > 0])
            pages = list(range(0, length, 2))
            want = pages if len(pages) <= 6 else pages[:2] + pages[-4:]  # sinks 0..2 live in pages 0 and 1
            assert starts == want
            assert cache.start[b, h, cache.cur[b, h]] == pages[-1]


def test_chunked_prefill_stages_a_prompt_longer_than_the_pool():
    """O(N) policies chunk into the decode pool; fixed budgets too while the prompt's pages fit it, else into a
    staging pool that holds every prompt page (quarter-octave buckets)."""
    assert Dense(page_size=4).prefill_slots(10**6, 40) == 40 and Quest(budget=16, page_size=4).prefill_slots(99, 32) == 32
    for policy in (RaaS(budget=64, page_size=4, pin_prefill=False), H2O(budget=64, page_size=4),
                   StreamingLLM(budget=64, page_size=4)):
        assert policy.prefill_slots(64, 16) == 16 and policy.prefill_slots(65, 16) == 20, policy  # 17 pages -> 20
        assert policy.prefill_slots(4000, 16) == 1024, policy  # 1000 pages -> 8/4 x 512
    assert H2O(budget=64, page_size=1).prefill_slots(65, 64) == 80
    assert RaaS(budget=64, page_size=4).prefill_slots(65, 16) == 16  # pinned: a longer prompt is refused, not staged
    h2o, raas = H2O(budget=64, page_size=4), RaaS(budget=64, page_size=4, pin_prefill=False)
    staging = h2o.begin_chunked_prefill(SIM_CFG, h2o.init(SIM_CFG, B, 20, jnp.float32))
    assert staging.policy_state.token_mass is not None  # H2O's accumulator over the chunks (folded away after them)
    assert raas.begin_chunked_prefill(SIM_CFG, raas.init(SIM_CFG, B, 20, jnp.float32)).policy_state is None


def test_dense_pool_buckets_are_quarter_octaves():
    """Dense's pool: the smallest j/4 x 2^k (j = 5..8) page count that holds the sequence; at most 25% spare."""
    from raas_jax.policies import quarter_octave

    sizes = sorted({j * 2**k // 4 for k in range(2, 16) for j in range(5, 9)} | {16})
    for pages in range(1, 5000, 7):
        want = min(x for x in sizes if x >= max(pages, 16))
        assert quarter_octave(pages, 16) == want
        assert Dense(page_size=16).num_slots(pages * 16 - 5, 5) == want
        assert want <= max(16, pages * 1.25)


def test_sizes_are_refused_with_the_parameter_named():
    """What the CLI refuses at parse time the classes refuse too, naming the parameter (no 'use budget=-16')."""
    for kwargs, message in ((dict(budget=-5), "budget must be an integer >= 1"), (dict(budget=64.0), "budget must"),
                            (dict(page_size=0), "page_size must be an integer >= 1")):
        with pytest.raises(ValueError, match=message):
            RaaS(**kwargs)
    with pytest.raises(ValueError, match="--budget does not apply to policy 'dense'"):
        make_policy("dense", budget=128)
