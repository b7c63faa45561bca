"""The serving engine: requests inserted into rows at different times decode exactly as `Model.generate` alone."""

from __future__ import annotations

import numpy as np
import pytest

import raas_jax
from raas_jax.policies import H2O, Dense, Quest, RaaS, StreamingLLM
from raas_jax.serve.engine import Engine, RequestSettings

POLICIES = {
    "dense": Dense(page_size=4),
    "raas": RaaS(budget=48, page_size=4),
    "quest": Quest(budget=16, page_size=4, dense_layers=1),
    "h2o": H2O(budget=48, page_size=4),
    "streaming": StreamingLLM(budget=48, page_size=4),
}
PROMPTS = [[5, 9, 33, 101, 7], list(range(1, 30)), [200] * 12, [17, 4, 99] * 7]
NEW = [24, 40, 9, 31]


@pytest.fixture(scope="module")
def model(tiny_llama_converted):
    return raas_jax.load(tiny_llama_converted, dtype="f32")


def _alone(model, policy, ids, new):
    return model.generate([ids], max_new_tokens=new, chat=False, policy=policy)[0].token_ids


def _serve(model, policy, *, rows, prefill_chunk=None, steps=7):
    """Request i is admitted after i decode calls (staggered arrivals) into the first free row; every row is
    drained after each call. Returns each request's tokens up to and including its stop."""
    engine = Engine(model._generator(policy), model.params, model.eos_ids, max_rows=rows, max_model_len=128,
                    prefill_chunk=prefill_chunk)
    state = engine.init_state()
    free, owner, out = list(range(rows)), {}, {i: [] for i in range(len(PROMPTS))}
    waiting = list(range(len(PROMPTS)))
    calls = 0
    while waiting or owner:
        if waiting and free and waiting[0] <= calls:
            i = waiting.pop(0)
            job = engine.start_prefill(PROMPTS[i], RequestSettings(max_tokens=NEW[i]), seed=0)
            while not engine.prefill_step(job):
                pass
            out[i].append(job.first_token())
            row = free.pop(0)
            state = engine.insert(job.prefix, state, row)
            if bool(job.prefix.done[0]):
                free.append(row)
            else:
                owner[row] = i
            continue
        if owner:
            state, tokens, new, done = engine.generate(state, steps)
            for row, i in list(owner.items()):
                out[i] += tokens[row, :new[row]].tolist()
                if done[row]:
                    del owner[row]
                    free.append(row)
        calls += 1
        assert calls < 200, "serving made no progress"
    return [out[i] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("name", list(POLICIES))
def test_staggered_rows_equal_generate_alone(model, name):
    policy = POLICIES[name]
    want = [_alone(model, policy, ids, new) for ids, new in zip(PROMPTS, NEW)]
    assert _serve(model, policy, rows=3) == want


def test_chunked_prefill_into_rows_equals_generate_alone(model):
    policy = POLICIES["raas"]
    want = [_alone(model, policy, ids, new) for ids, new in zip(PROMPTS, NEW)]
    assert _serve(model, policy, rows=2, prefill_chunk=8) == want


def test_requests_that_cannot_have_a_row_are_refused(model):
    dense = Engine(model._generator(Dense(page_size=4)), model.params, model.eos_ids, max_rows=2, max_model_len=64)
    with pytest.raises(ValueError, match="max_tokens to at most 54"):
        dense.start_prefill(list(range(10)), RequestSettings(max_tokens=60), seed=0)
    raas = Engine(model._generator(RaaS(budget=32, page_size=4)), model.params, model.eos_ids, max_rows=2,
                  max_model_len=512)
    with pytest.raises(ValueError, match="pins the prompt"):
        raas.start_prefill(list(range(1, 40)), RequestSettings(max_tokens=8), seed=0)
    # a RaaS row is never refused for its length: 400 new tokens in a 32-token pool
    job = raas.start_prefill([3, 4, 5], RequestSettings(max_tokens=400), seed=0)
    assert raas.prefill_step(job) and job.prefix.cache.k.shape[3] == raas.num_slots


def test_free_stops_a_row_and_insert_reuses_it(model):
    engine = Engine(model._generator(POLICIES["raas"]), model.params, model.eos_ids, max_rows=2, max_model_len=512)
    state = engine.init_state()
    job = engine.start_prefill(PROMPTS[0], RequestSettings(max_tokens=300, ignore_eos=True), seed=0)
    engine.prefill_step(job)
    state = engine.insert(job.prefix, state, 1)
    state, _, new, done = engine.generate(state, 4)
    assert new.tolist() == [0, 4] and done.tolist() == [True, False]
    state = engine.free(state, 1)
    state, _, new, done = engine.generate(state, 4)
    assert new.tolist() == [0, 0] and done.all()
    # the freed row takes the next request and decodes it as if alone
    job = engine.start_prefill(PROMPTS[2], RequestSettings(max_tokens=NEW[2]), seed=0)
    engine.prefill_step(job)
    state = engine.insert(job.prefix, state, 1)
    tokens = [job.first_token()]
    while not bool(np.asarray(state.done)[1]):
        state, out, new, _ = engine.generate(state, 5)
        tokens += out[1, :new[1]].tolist()
    assert tokens == _alone(model, POLICIES["raas"], PROMPTS[2], NEW[2])


def test_sampled_and_greedy_rows_share_a_batch(model):
    """A sampled row beside a greedy one: the greedy row's tokens are those of generate alone, and the sampled row
    is reproducible from its seed whatever the other rows hold."""
    policy = POLICIES["raas"]
    engine = Engine(model._generator(policy), model.params, model.eos_ids, max_rows=2, max_model_len=512)

    def run(other_prompt):
        state = engine.init_state()
        rows = []
        for row, (ids, settings) in enumerate([(PROMPTS[0], RequestSettings(max_tokens=20, temperature=1.0,
                                                                             ignore_eos=True)),
                                               (other_prompt, RequestSettings(max_tokens=20, ignore_eos=True))]):
            job = engine.start_prefill(ids, settings, seed=123)
            engine.prefill_step(job)
            state = engine.insert(job.prefix, state, row)
            rows.append([job.first_token()])
        while not np.asarray(state.done).all():
            state, out, new, _ = engine.generate(state, 8)
            for row in range(2):
                rows[row] += out[row, :new[row]].tolist()
        return rows

    sampled, greedy = run(PROMPTS[1])
    alone = _alone(model, policy, PROMPTS[1], 20)  # stops at an EOS, which the row ignores
    assert len(greedy) == 20 and greedy[:len(alone)] == alone
    assert run(PROMPTS[2])[0] == sampled  # the sampled row does not depend on its neighbour
    assert sampled != _alone(model, policy, PROMPTS[0], 20)[:20]  # and it did sample (temperature 1)


def test_admission_reserves_the_staging_pool_of_a_prompt_longer_than_the_pool(model):
    """`--max-rows auto` leaves room for admitting a request: two rows' pools, and where a prompt may be longer than a
    fixed budget (H2O, StreamingLLM, unpinned RaaS) the staging pool its chunked prefill fills, with H2O's
    accumulator; a pinned RaaS prompt always fits its pool, Dense's pool holds the whole sequence."""
    import jax

    from raas_jax.decode.cache import cache_bytes
    from raas_jax.serve.engine import admission_bytes

    def pool(policy, num_slots, extras=False):
        def init():
            cache = policy.init(model.cfg, 1, num_slots, model.dtype)
            return policy.begin_chunked_prefill(model.cfg, cache) if extras else cache
        return cache_bytes(jax.eval_shape(init))

    for policy in (RaaS(budget=32, page_size=4), Dense(page_size=4)):
        per_row, admission = admission_bytes(model._generator(policy), 256, prefill_chunk=16)
        assert per_row == pool(policy, policy.num_slots(0, 256)) and admission == 2 * per_row, policy
    for policy in (H2O(budget=32, page_size=4), StreamingLLM(budget=32, page_size=4),
                   RaaS(budget=32, page_size=4, pin_prefill=False)):
        gen = model._generator(policy)
        per_row, admission = admission_bytes(gen, 256, prefill_chunk=16)
        staging = pool(policy, 64, extras=True)  # a 255-token prompt: 64 pages of 4, a quarter octave
        assert per_row == pool(policy, 8) and admission == 2 * per_row + staging, policy
        assert (staging > pool(policy, 64)) == isinstance(policy, H2O)  # H2O's accumulator is counted
        # no staging where prompts are never chunked: no chunking, or no prompt longer than the chunk
        assert admission_bytes(gen, 256, prefill_chunk=None)[1] == admission_bytes(gen, 256)[1] == 2 * per_row


def test_warm_up_compiles_each_staging_pool_size(model):
    """Two prompts of one padded length (32 tokens, chunks of 16) fill staging pools of 5 and 8 pages in a 4-page H2O
    pool: the warm-up compiles both, so neither request compiles while served."""
    from raas_jax.serve.engine import warm_up

    policy = H2O(budget=16, page_size=4, recent_fraction=0.25)
    engine = Engine(model._generator(policy), model.params, model.eos_ids, max_rows=2, max_model_len=64,
                    prefill_chunk=16)
    jobs = [engine.start_prefill([5] * n, RequestSettings(max_tokens=2), seed=0) for n in (17, 31)]
    assert [j.tokens.shape for j in jobs] == [(1, 32)] * 2 and [j.pool_slots for j in jobs] == [5, 8]
    warm_up(engine, 4, [17, 31])
    compiled = engine.gen.begin_chunks._cache_size(), engine.gen.prefill_chunk._cache_size()
    assert compiled[0] == 2
    for job in jobs:
        while not engine.prefill_step(job):
            pass
        assert job.prefix.cache.fill.shape[-1] == policy.slot_count
    assert (engine.gen.begin_chunks._cache_size(), engine.gen.prefill_chunk._cache_size()) == compiled
