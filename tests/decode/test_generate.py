"""Generation: cached decode against the full forward, ragged batches, EOS, streaming, recompiles."""

from __future__ import annotations

import dataclasses
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import raas_jax
from raas_jax.decode.generate import Generator, chunked_prefill, pad_prompts, prefill_plan, run_generation
from raas_jax.policies import H2O, Dense, Quest, RaaS, StreamingLLM
from raas_jax.models.transformer import Transformer

from conftest import VOCAB, make_hf_model


@pytest.fixture(scope="module")
def model(tiny_llama_converted):
    return raas_jax.load(tiny_llama_converted, dtype="f32")


def test_decode_logits_match_full_forward(model):
    """Prefill a ragged batch, then teacher-force tokens one by one: every step's logits equal the
    full causal forward's logits at that position."""
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, VOCAB, 40), rng.integers(0, VOCAB, 40)]
    prompt_lens = np.array([5, 17])
    policy = Dense(page_size=4)
    module = Transformer(model.cfg, model.dtype, policy)
    prefill = jax.jit(lambda *a: module.apply({"params": model.params}, *a[:3], logits_index=a[3]))
    step = jax.jit(lambda *a: module.apply({"params": model.params}, *a, decode=True,
                                           logits_index=jnp.zeros(2, jnp.int32)))
    cache = policy.init(model.cfg, 2, num_slots=12, dtype=model.dtype)
    prompt = np.zeros((2, 24), np.int32)
    for b, n in enumerate(prompt_lens):
        prompt[b, :n] = seqs[b][:n]
    positions = np.where(np.arange(24)[None] < prompt_lens[:, None], np.arange(24)[None], -1)
    logits, cache = prefill(jnp.asarray(prompt), jnp.asarray(positions), cache, jnp.asarray(prompt_lens - 1))
    full = [model.logits(s[None])[0] for s in seqs]  # [T, V] each
    for b, n in enumerate(prompt_lens):
        np.testing.assert_allclose(logits[b], full[b][n - 1], rtol=1e-4, atol=1e-4)
    pos = prompt_lens.copy()
    for _ in range(20):
        tokens = np.array([seqs[b][pos[b]] for b in range(2)], np.int32)
        logits, cache = step(jnp.asarray(tokens[:, None]), jnp.asarray(pos[:, None]), cache)
        for b in range(2):
            np.testing.assert_allclose(logits[b], full[b][pos[b]], rtol=1e-4, atol=1e-4)
        pos += 1


def test_greedy_generation_equals_rerunning_logits(model):
    prompt = [5, 9, 33, 101, 7, 250, 18]
    result = model.generate([prompt], max_new_tokens=12, chat=False)[0]
    # one causal forward over the prompt and the tokens gives every prefix's last logits (a forward per prefix
    # compiles one per length)
    full = model.logits([prompt + result.token_ids[:-1]])[0]
    for i, token in enumerate(result.token_ids):
        assert token == int(np.argmax(full[len(prompt) - 1 + i]))
    assert result.stats["new_tokens"] == len(result.token_ids)
    assert result.stats["cache_bytes"] > 0 and result.stats["seconds"] > 0


def test_ragged_batch_equals_one_by_one(model):
    prompts = [[3, 4, 5], list(range(10, 40)), [200] * 17]
    batched = model.generate(prompts, max_new_tokens=12, chat=False)
    for prompt, result in zip(prompts, batched):
        alone = model.generate([prompt], max_new_tokens=12, chat=False)[0]
        assert result.token_ids == alone.token_ids


def test_stops_at_eos(model):
    prompt = [5, 9, 33, 101]
    free = model.generate([prompt], max_new_tokens=16, chat=False)[0].token_ids
    stop = free[5]
    first = free.index(stop)
    eos_model = raas_jax.Model(model.cfg, model.params, model.dtype, model.tokenizer, (stop,), model.path)
    result = eos_model.generate([prompt], max_new_tokens=16, chat=False)[0]
    assert result.token_ids == free[: first + 1]


def test_sampling_is_seeded(model):
    prompt = [[1, 2, 3, 4]]
    a = model.generate(prompt, max_new_tokens=16, temperature=1.0, seed=1, chat=False)[0].token_ids
    b = model.generate(prompt, max_new_tokens=16, temperature=1.0, seed=1, chat=False)[0].token_ids
    c = model.generate(prompt, max_new_tokens=16, temperature=1.0, seed=2, chat=False)[0].token_ids
    greedy = model.generate(prompt, max_new_tokens=16, chat=False)[0].token_ids
    top1 = model.generate(prompt, max_new_tokens=16, temperature=1.0, top_k=1, seed=3, chat=False)[0].token_ids
    assert a == b and a != c
    assert top1 == greedy


def test_text_prompts_stream_and_chat_template(model):
    pieces: list[str] = []
    result = model.generate("the quick fox", max_new_tokens=20, on_text=lambda i, t: pieces.append(t), decode_steps=4)[0]
    assert "".join(pieces) == result.text
    chat_ids = model.encode("the quick fox", chat=True)
    plain_ids = model.encode("the quick fox", chat=False)
    assert len(chat_ids) > len(plain_ids)
    assert model.tokenizer.decode(chat_ids).startswith("<|im_start|>user\nthe quick fox<|im_end|>")
    assert result.stats["prompt_tokens"] == len(chat_ids)


def test_bad_generation_input(model):
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate("   ")
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate([[]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate("hi", max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate("hi", top_p=0.0)


def test_missing_tokenizer_is_explained(tmp_path):
    make_hf_model(tmp_path / "hf", "llama", tokenizer=False)
    model = raas_jax.load(tmp_path / "hf", dtype="f32")
    with pytest.raises(ValueError, match="no tokenizer"):
        model.generate("hello")
    assert len(model.generate([[1, 2, 3]], max_new_tokens=3)[0].token_ids) == 3


def test_new_lengths_in_a_bucket_do_not_recompile(model):
    model.generate([[1, 2, 3]], max_new_tokens=20, chat=False)
    gen = model._generator(None)
    compiled = (gen.start._cache_size(), gen.decode._cache_size())
    model.generate([[4, 5, 6, 7, 8]], max_new_tokens=30, chat=False)
    model.generate([[9, 10]], max_new_tokens=25, chat=False, temperature=0.7, top_p=0.9, top_k=5)
    assert (gen.start._cache_size(), gen.decode._cache_size()) == compiled


def test_max_new_tokens_must_be_an_integer_and_decoding_must_progress(model, monkeypatch):
    from raas_jax.decode.generate import run_generation

    for bad in (3.5, 2.0, True, "8"):
        with pytest.raises(ValueError, match="max_new_tokens must be an integer"):
            model.generate([[1, 2, 3]], max_new_tokens=bad)
    assert len(model.generate([[1, 2, 3]], max_new_tokens=np.int64(3))[0].token_ids) == 3
    gen = model._generator(None)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer"):
        run_generation(gen, model.params, [[1, 2, 3]], max_new_tokens=3.5, eos_ids=())
    monkeypatch.setitem(gen.__dict__, "decode", lambda params, state, *args: state)  # a chunk that does nothing
    with pytest.raises(RuntimeError, match="no progress"):
        run_generation(gen, model.params, [[1, 2, 3]], max_new_tokens=40, eos_ids=())


def test_sizes_past_the_context_or_the_device_are_refused(model, monkeypatch):
    from raas_jax import api
    from raas_jax.policies import RaaS

    context = model.cfg.max_position_embeddings
    with pytest.warns(UserWarning, match=rf"exceeds this model's context length \({context}\).*<= {context - 3}"):
        with pytest.raises(ValueError, match=r"would take .* GiB, more than the .* free on the cpu device: at most "):
            model.generate([[1, 2, 3]], max_new_tokens=1_000_000_000)  # a dense cache of ~1 TB
    for policy in (RaaS(budget=32, page_size=4), None):
        with pytest.warns(UserWarning, match="context length"):
            out = model.generate([[1, 2, 3]], max_new_tokens=context, policy=policy)
        ids = out[0].token_ids  # past the context: decoded to the end, or until this random model's EOS
        assert len(ids) == context or (len(ids) < context and ids[-1] in model.eos_ids)
    room = api._pool_bytes(Dense(), model.cfg, 1, Dense().num_slots(3, 200), model.dtype)
    monkeypatch.setattr(api, "device_free_bytes", lambda: room)
    with pytest.raises(ValueError, match=r"would take .* MiB, more than the .* MiB free on the cpu device: at most "
                                         r"\d+ new tokens fit"):
        model.generate([[1, 2, 3]], max_new_tokens=400)
    fit = int(re.search(r"at most (\d+)", str(_refusal(model, 400))).group(1))
    assert 200 <= fit < 400
    assert len(model.generate([[1, 2, 3]], max_new_tokens=fit)[0].token_ids) == fit
    with pytest.raises(ValueError, match="at most"):
        model.generate([[1, 2, 3]], max_new_tokens=fit + 1)


def _refusal(model, max_new_tokens):
    try:
        model.generate([[1, 2, 3]], max_new_tokens=max_new_tokens)
    except ValueError as e:
        return e
    raise AssertionError("not refused")


def test_numpy_prompts(model):
    one = model.generate(np.array([1, 2, 3]), max_new_tokens=2)
    two = model.generate(np.array([[1, 2, 3], [4, 5, 6]], np.int32), max_new_tokens=2)
    assert len(one) == 1 and len(two) == 2 and two[0].token_ids == one[0].token_ids
    for bad in (np.array([1.0, 2.0]), np.array([True, False]), np.array([[[1]]]), b"abc", [1.5, 2], [[1, True]]):
        with pytest.raises(ValueError, match="prompt"):
            model.generate(bad, max_new_tokens=2)


# ------------------------------------------------------------------------------------- chunked prefill

CHUNK_POLICIES = {
    "dense": Dense(page_size=4),
    "raas": RaaS(budget=64, page_size=4),
    "raas-unpinned": RaaS(budget=64, page_size=4, pin_prefill=False),
    "quest": Quest(budget=16, page_size=4, dense_layers=1),
    "h2o": H2O(budget=64, page_size=4),
    "h2o-token": H2O(budget=64, page_size=1),
    "streaming": StreamingLLM(budget=64, page_size=4),
    "dense-fp8": Dense(page_size=4, kv_dtype="fp8"),  # the prompt attends its pages as stored, chunked or whole
    "h2o-fp8": H2O(budget=64, page_size=4, kv_dtype="fp8"),
    # calibrated scales (2 layers): pages hold k / k_scale, v / v_scale in both paths
    "raas-fp8-scaled": RaaS(budget=64, page_size=4, kv_dtype="fp8", kv_absmax=((20.0, 30.0), (10.0, 20.0))),
}
# variants of the code paths the fast set takes with dense, h2o-fp8 (H2O's key mass, FP8 pages) and raas-fp8-scaled
# (RaaS's pinned prompt, FP8 pages with k/v scales)
SLOW_CHUNK_POLICIES = ("raas", "raas-unpinned", "h2o-token", "h2o", "quest", "streaming", "dense-fp8")
CHUNK_PROMPTS = [list(range(3, 48)), [7, 8, 9] * 7, [250] * 5]  # 45, 21 and 5 tokens: padding in every chunk


def whole_and_chunked_prefill(model, policy, prompts, chunk, max_new_tokens=20):
    """The same prompts prefilled whole (one forward) and in chunks: ((logits, cache), (logits, cache))."""
    gen = Generator(model.cfg, model.dtype, policy)
    tokens, lengths, _ = pad_prompts(prompts, prefill_chunk=chunk)
    num_slots = policy.num_slots(int(lengths.max()), max_new_tokens)
    ids = np.arange(tokens.shape[1])[None]
    positions = np.where(ids < lengths[:, None], ids, -1)
    cache = policy.init(model.cfg, tokens.shape[0], num_slots, model.dtype)
    whole = jax.jit(gen.module.apply)({"params": model.params}, jnp.asarray(tokens), jnp.asarray(positions), cache,
                                      logits_index=jnp.asarray(lengths - 1))
    cache, logits = chunked_prefill(gen, model.params, tokens, lengths, prefill_chunk=chunk, num_slots=num_slots)
    return whole, (logits, policy.end_chunked_prefill(cache))


def assert_same_cache(chunked, whole, page_size):
    assert jax.tree.structure(chunked) == jax.tree.structure(whole)
    filled = np.arange(page_size) < np.asarray(whole.fill)[..., None]  # [L, B, Hkv, S, P]
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(whole), jax.tree.leaves(chunked)):
        name = jax.tree_util.keystr(path)  # e.g. ".fill", ".policy_state.mass"
        got, want = (np.asarray(a, np.float32 if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype) for a in (y, x))
        if name in (".k", ".v"):  # empty slots and unfilled offsets hold anything
            got, want = got * filled[..., None], want * filled[..., None]
        if np.issubdtype(want.dtype, np.floating):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)


def assert_chunked_generation_equals_whole(model, policy, max_new_tokens):
    """Greedy generation of CHUNK_PROMPTS prefilled whole and in chunks of 16: the same tokens. -> the chunked
    run's final state."""
    gen = model._generator(policy)
    whole_tokens, _ = run_generation(gen, model.params, CHUNK_PROMPTS, max_new_tokens=max_new_tokens, eos_ids=(),
                                     prefill_chunk=None)
    chunk_tokens, state = run_generation(gen, model.params, CHUNK_PROMPTS, max_new_tokens=max_new_tokens,
                                         eos_ids=(), prefill_chunk=16)
    np.testing.assert_array_equal(chunk_tokens, whole_tokens)
    return state


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CHUNK_POLICIES else n
                                  for n in sorted(CHUNK_POLICIES)])
def test_chunked_prefill_equals_the_whole_prompt(model, name):
    """Logits at each prompt's last token and the cache after a prefill in chunks of 16 equal the whole-prompt
    prefill's; so does the generation that follows."""
    policy = CHUNK_POLICIES[name]
    pool = policy.num_slots(45, 20)
    assert policy.prefill_slots(45, pool) == pool and prefill_plan(policy, [45, 21, 5], 16) == 16
    (logits, cache), (chunk_logits, chunk_cache) = whole_and_chunked_prefill(model, policy, CHUNK_PROMPTS, 16)
    np.testing.assert_allclose(chunk_logits[:3], logits[:3], rtol=1e-4, atol=1e-4)
    assert_same_cache(chunk_cache, cache, policy.page_size)
    state = assert_chunked_generation_equals_whole(model, policy, max_new_tokens=24)
    assert jax.tree.structure(state.cache) == jax.tree.structure(
        jax.eval_shape(lambda: policy.init(model.cfg, 4, 16, model.dtype)))


LONG_PROMPT_POLICIES = {  # 32-token pools: the 45-token prompt's 12 pages do not fit
    "raas-unpinned": RaaS(budget=32, page_size=4, pin_prefill=False),
    "h2o": H2O(budget=32, page_size=4),
    "h2o-token": H2O(budget=32, page_size=1),
    "streaming": StreamingLLM(budget=32, page_size=4, sink_tokens=6),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("h2o-token", "streaming") else n
                                  for n in LONG_PROMPT_POLICIES])
def test_a_prompt_longer_than_the_pool_is_chunked_through_a_staging_pool(model, name):
    """A prompt longer than a fixed budget is chunked into a staging pool that holds it all; the policy then keeps
    the pages its whole-prompt prefill keeps: same logits, same cache, same greedy tokens."""
    policy = LONG_PROMPT_POLICIES[name]
    assert policy.prefill_slots(45, policy.slot_count) > policy.slot_count
    assert prefill_plan(policy, [45, 21, 5], 16) == 16
    (logits, cache), (chunk_logits, chunk_cache) = whole_and_chunked_prefill(model, policy, CHUNK_PROMPTS, 16)
    np.testing.assert_allclose(chunk_logits[:3], logits[:3], rtol=1e-4, atol=1e-4)
    assert chunk_cache.fill.shape == cache.fill.shape  # compacted to the budget's pool
    assert_same_cache(chunk_cache, cache, policy.page_size)
    assert int(np.sum(np.asarray(cache.fill[0, 0, 0]) > 0)) == policy.slot_count  # the long row fills the pool
    state = assert_chunked_generation_equals_whole(model, policy, max_new_tokens=12)
    assert state.cache.fill.shape[-1] == policy.slot_count


@pytest.mark.parametrize("policy", [pytest.param(Dense(page_size=4), marks=pytest.mark.slow),
                                    RaaS(budget=76, page_size=4)], ids=["dense", "raas"])
def test_chunks_padded_past_the_pool_are_dropped(model, policy):
    """A 65-token prompt in chunks of 32 pads to 24 pages; Dense's pool for it and 8 new tokens has 20 slots and
    RaaS's budget 19: the last chunk's padding pages fall outside the pool and must not overwrite earlier pages
    (a clamped slice update did). The generation equals the whole-prompt one."""
    prompts = [[(7 * i) % 250 + 3 for i in range(65)], [9, 8, 7] * 7]
    assert policy.num_slots(65, 8) < 24 and prefill_plan(policy, [65, 21], 32) == 32
    gen = model._generator(policy)
    whole, _ = run_generation(gen, model.params, prompts, max_new_tokens=8, eos_ids=(), prefill_chunk=None)
    chunked, state = run_generation(gen, model.params, prompts, max_new_tokens=8, eos_ids=(), prefill_chunk=32)
    np.testing.assert_array_equal(chunked, whole)
    fill = np.asarray(state.cache.fill[0, 0, 0])  # layer 0, the 65-token row, KV head 0
    # the prompt and the 7 new tokens fed back (the 8th is sampled, not cached): 18 pages, none lost
    np.testing.assert_array_equal(np.flatnonzero(fill), np.arange(-(-(65 + 7) // 4)))


def test_chunked_prefill_through_the_blockwise_kernels(model, monkeypatch):
    """What a TPU (and a GPU that refuses cuDNN) runs: chunks and H2O's key mass through the blockwise jnp passes,
    the whole prompt through blockwise attention, against the reference prefill."""
    from raas_jax.kernels import prefill

    policy = H2O(budget=64, page_size=4)
    reference, _ = whole_and_chunked_prefill(model, policy, CHUNK_PROMPTS, 16)
    monkeypatch.setattr(prefill, "choose_implementation", lambda backend, *a, **k: "blockwise")
    (logits, cache), (chunk_logits, chunk_cache) = whole_and_chunked_prefill(model, policy, CHUNK_PROMPTS, 16)
    for got in (logits, chunk_logits):
        np.testing.assert_allclose(got[:3], reference[0][:3], rtol=1e-4, atol=1e-4)
    assert_same_cache(chunk_cache, reference[1], policy.page_size)
    assert_same_cache(cache, reference[1], policy.page_size)


def test_when_prompts_are_chunked(model):
    raas, h2o = RaaS(budget=32, page_size=4), H2O(budget=32, page_size=4)
    streaming = StreamingLLM(budget=32, page_size=4)
    assert prefill_plan(raas, [20, 5], None) is None  # None never chunks
    assert prefill_plan(raas, [16, 5], 16) is None  # fits one chunk: the whole-prompt path
    assert prefill_plan(raas, [17, 5], 18) == 16  # rounded down to whole pages
    assert prefill_plan(Dense(), [5000], 2048) == 2048
    assert prefill_plan(h2o, [40], 16) == 16 and prefill_plan(streaming, [40], 16) == 16  # staged (longer than the pool)
    for bad in (2, 0, 16.0, True, "16"):
        with pytest.raises(ValueError, match="prefill_chunk must be an integer >= the page size"):
            prefill_plan(raas, [40], bad)
    with pytest.raises(ValueError, match="prefill_chunk"):
        model.generate([[1, 2, 3]], max_new_tokens=2, prefill_chunk=0)


def test_new_prompt_lengths_reuse_the_compiled_chunk(model):
    policy = RaaS(budget=128, page_size=4)
    gen = model._generator(policy)
    compiled = None
    for length in (40, 70, 33):  # 3, 5 and 3 chunks of 16
        result = model.generate([list(range(1, length + 1)), [5, 6]], max_new_tokens=3, policy=policy,
                                prefill_chunk=16, chat=False)
        assert all(len(r.token_ids) == 3 for r in result)
        sizes = (gen.begin_chunks._cache_size(), gen.prefill_chunk._cache_size(), gen.finish_chunks._cache_size())
        assert compiled is None or sizes == compiled
        compiled = sizes
    assert "start" not in gen.__dict__  # the whole-prompt prefill was never compiled


FP8_POLICIES = [Dense(page_size=4), RaaS(budget=64, page_size=4), Quest(budget=16, page_size=4),
                H2O(budget=64, page_size=4), StreamingLLM(budget=64, page_size=4)]
SLOW_FP8_POLICIES = ("quest", "h2o", "streaming")  # the fast set: dense (no decision on the rounding) and raas (one)


@pytest.mark.parametrize("policy", [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW_FP8_POLICIES else p
                                    for p in FP8_POLICIES], ids=lambda p: p.name)
def test_fp8_kv_cache_stores_8_bit_pages_and_stays_close(model, policy):
    """kv_dtype="fp8": every policy decodes from 8-bit pages (the cache says so), with teacher-forced logits within
    a few percent of the f32 cache's. The error is an FP8 one: ~10x bf16's on the same run (so the pages really
    are 8-bit), and a RaaS or H2O eviction may differ where the stored keys round differently."""
    from raas_jax.api import teacher_forced_logits

    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 300, 40)), list(rng.integers(3, 300, 23))]
    continuations = [list(rng.integers(3, 300, 60)), list(rng.integers(3, 300, 60))]
    full, fp8, bf16 = (teacher_forced_logits(model, prompts, continuations, dataclasses.replace(policy, kv_dtype=kv))
                       for kv in ("auto", "fp8", "bfloat16"))
    error = lambda other: max(float(np.max(np.abs(a - b))) for a, b in zip(full, other))  # noqa: E731
    scale = max(float(np.max(np.abs(a))) for a in full)
    assert error(fp8) < 0.1 * scale
    if policy.name in ("dense", "quest", "streaming"):  # no decision rides on the rounding
        assert error(fp8) > 3 * error(bf16)
    gen = model._generator(dataclasses.replace(policy, kv_dtype="fp8"))
    tokens, state = run_generation(gen, model.params, prompts, max_new_tokens=40, eos_ids=(), prefill_chunk=16)
    assert state.cache.k.dtype == state.cache.v.dtype == jnp.float8_e4m3fn
    assert state.cache.kmin.dtype == jnp.float32
    assert np.isfinite(np.asarray(state.cache.k, np.float32)).all()
    assert all(len(t) == 40 for t in tokens)


def test_fp8_pool_warns_when_values_reach_its_limit(model):
    """Keys and values past e4m3fn's 448 are clipped when stored (no k/v scales): generation says so with a warning
    that counts them, and an ordinary model's FP8 run stays silent."""
    gen = model._generator(Dense(kv_dtype="fp8"))
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_generation(gen, model.params, prompts, max_new_tokens=4, eos_ids=())
    assert not [w for w in caught if "FP8 page pool" in str(w.message)]
    loud = jax.tree_util.tree_map_with_path(  # q, k and v projections x 1e4: keys and values far past 448
        lambda path, x: x * 1e4 if "qkv_proj" in jax.tree_util.keystr(path) else x, model.params)
    with pytest.warns(UserWarning, match=r"\d+ key/value entries of the FP8 page pool sit at its largest magnitude \(448\)"):
        run_generation(gen, loud, prompts, max_new_tokens=4, eos_ids=())


@pytest.mark.slow  # the fast set: scales measured and put in the pool (test_calibrate.py), chunks over scaled pages
def test_calibrated_fp8_scales_store_large_keys_and_values(model):
    """The model with keys and values 1e4 x larger (q and o_proj / 1e4 keep its function): unscaled FP8
    pages clip them (far off, and a warning), pages with calibrated scales (calibrate.measure_kv_absmax ->
    k_scale, v_scale) carry them with the error FP8 pages give the original model."""
    import copy

    from raas_jax.api import teacher_forced_logits
    from raas_jax.eval.calibrate import measure_kv_absmax

    c, group = 1e4, model.cfg.num_heads // model.cfg.num_kv_heads
    factor = np.concatenate([np.full(group, 1 / c), [c, c]])[:, None]  # per fused row: the group's q heads, k, v

    def louder(path, x):
        name = jax.tree_util.keystr(path)
        if "qkv_proj" in name:  # kernel [..., Hkv, G + 2, D], bias [..., Hkv, G + 2, D]
            return x * factor.astype(x.dtype)
        return x / c if "o_proj" in name and "kernel" in name else x

    loud = copy.copy(model)
    loud.params = jax.tree_util.tree_map_with_path(louder, model.params)
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(3, 300, 30)), list(rng.integers(3, 300, 17))]
    continuations = [list(rng.integers(3, 300, 24)), list(rng.integers(3, 300, 24))]

    def logits(m, **policy):
        return teacher_forced_logits(m, prompts, continuations, RaaS(budget=48, page_size=4, **policy))

    want = logits(model)
    error = lambda got: max(float(np.max(np.abs(a - b))) for a, b in zip(want, got))  # noqa: E731
    assert error(logits(loud)) < 1e-3  # the same function in a float32 cache
    baseline = error(logits(model, kv_dtype="fp8"))  # FP8's own error on the original model
    absmax = measure_kv_absmax(loud, prompts, max_new_tokens=24, progress=False)
    assert min(absmax[0]) > 448 and min(absmax[1]) > 448  # past e4m3fn's largest value in every layer
    assert error(logits(loud, kv_dtype="fp8", kv_absmax=absmax)) < 3 * baseline + 1e-3

    def stored_keys(policy):  # the prompt's keys as the pages give them back (times k_scale if any) [L, B, Hkv, S, P, D]
        _, state = run_generation(loud._generator(policy), loud.params, prompts, max_new_tokens=1, eos_ids=())
        k = np.asarray(state.cache.k, np.float32)
        scale = state.cache.k_scale
        return k if scale is None else k * np.asarray(scale).reshape(-1, 1, 1, 1, 1, 1)

    want_keys = stored_keys(Dense(page_size=4))
    relative = lambda k: np.linalg.norm(k - want_keys) / np.linalg.norm(want_keys)  # noqa: E731
    assert relative(stored_keys(Dense(page_size=4, kv_dtype="fp8", kv_absmax=absmax))) < 0.05  # FP8's rounding
    with pytest.warns(UserWarning, match="no k/v scales are applied: `raas-jax calibrate-kv`"):
        assert relative(stored_keys(Dense(page_size=4, kv_dtype="fp8"))) > 0.5  # clipped at 448
    gen = loud._generator(RaaS(budget=48, page_size=4, kv_dtype="fp8", kv_absmax=absmax))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, state = run_generation(gen, loud.params, prompts, max_new_tokens=8, eos_ids=())
    assert state.cache.k_scale.shape == (model.cfg.num_layers,)
    assert not [w for w in caught if "FP8 page pool" in str(w.message)]  # scaled: nothing at the limit


def test_a_prompt_alone_past_the_context_says_to_shorten_it(model, monkeypatch):
    """Not 'max_new_tokens <= 0 stays inside', which is no value a user can pass."""
    context = model.cfg.max_position_embeddings
    with pytest.warns(UserWarning, match=rf"the prompt alone \({context + 1} tokens\).*shorten the prompt") as caught:
        model._check_size(Dense(), [[1] * (context + 1)], 1)
    assert not any("<= 0" in str(w.message) for w in caught)
