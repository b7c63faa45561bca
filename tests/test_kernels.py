"""Reference kernels against per-token numpy brute force."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from raas_jax import kernels

from kernel_cases import ATTENTION_CASES, TOP_K_CASES, page_pool, top_k_scores


def brute_decode(q, k, v, fill):
    """Loop over heads and tokens: softmax over every resident token of the KV head."""
    b, hq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    group = hq // hkv
    out = np.zeros_like(q)
    mass = np.zeros((b, hkv, s))
    for bi in range(b):
        for h in range(hq):
            kh = h // group
            keys, vals, slot_of = [], [], []
            for si in range(s):
                for t in range(fill[bi, kh, si]):
                    keys.append(k[bi, kh, si, t]); vals.append(v[bi, kh, si, t]); slot_of.append(si)
            logits = np.array(keys) @ q[bi, h] / np.sqrt(d)
            probs = np.exp(logits - logits.max()); probs /= probs.sum()
            out[bi, h] = probs @ np.array(vals)
            per_slot = np.bincount(slot_of, weights=probs, minlength=s)
            mass[bi, kh] = np.maximum(mass[bi, kh], per_slot)
    return out, mass


@pytest.mark.parametrize("group,page", [(1, 4), (4, 16), (7, 1)])
def test_decode_attention_matches_brute_force(group, page):
    rng = np.random.default_rng(group * 10 + page)
    b, hkv, s, d = 2, 2, 5, 16
    q = rng.normal(size=(b, hkv * group, d)).astype(np.float32)
    k = rng.normal(size=(b, hkv, s, page, d)).astype(np.float32)
    v = rng.normal(size=(b, hkv, s, page, d)).astype(np.float32)
    fill = rng.integers(0, page + 1, (b, hkv, s)).astype(np.int32)
    fill[:, :, 0] = np.maximum(fill[:, :, 0], 1)  # at least one token per head
    out, mass = kernels.decode_attention(q, k, v, fill)
    ref_out, ref_mass = brute_decode(q, k, v, fill)
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(mass), ref_mass, rtol=1e-5, atol=1e-6)


def test_decode_attention_over_a_slot_list():
    rng = np.random.default_rng(3)
    b, hkv, group, s, page, d = 1, 2, 2, 6, 4, 8
    q = rng.normal(size=(b, hkv * group, d)).astype(np.float32)
    k = rng.normal(size=(b, hkv, s, page, d)).astype(np.float32)
    v = rng.normal(size=(b, hkv, s, page, d)).astype(np.float32)
    fill = np.full((b, hkv, s), page, np.int32)
    slots = np.array([[[4, 1, -1], [0, 5, 2]]], np.int32)
    out, mass = kernels.decode_attention(q, k, v, fill, slots)
    keep = np.zeros_like(fill)
    for h in range(hkv):
        for sl in slots[0, h]:
            if sl >= 0:
                keep[0, h, sl] = page
    ref_out, ref_mass = brute_decode(q, k, v, keep)
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=1e-5, atol=1e-5)
    expected_mass = np.where(slots >= 0, np.take_along_axis(ref_mass, np.maximum(slots, 0), axis=2), 0)
    np.testing.assert_allclose(np.asarray(mass), expected_mass, rtol=1e-5, atol=1e-6)


def test_page_scores_bound_every_key():
    rng = np.random.default_rng(5)
    b, hkv, group, s, page, d = 2, 2, 3, 7, 8, 16
    q = rng.normal(size=(b, hkv * group, d)).astype(np.float32)
    k = rng.normal(size=(b, hkv, s, page, d)).astype(np.float32)
    fill = rng.integers(0, page + 1, (b, hkv, s)).astype(np.int32)
    valid = np.arange(page)[None, None, None, :, None] < fill[..., None, None]
    kmin = np.where(valid, k, np.inf).min(axis=3)
    kmax = np.where(valid, k, -np.inf).max(axis=3)
    kmin, kmax = np.where(fill[..., None] > 0, kmin, 0), np.where(fill[..., None] > 0, kmax, 0)
    scores = np.asarray(kernels.page_scores(q, kmin, kmax, fill))
    assert np.all(np.isneginf(scores[fill == 0]))
    for bi in range(b):
        for h in range(hkv * group):
            for si in range(s):
                for t in range(fill[bi, h // group, si]):
                    assert scores[bi, h // group, si] >= q[bi, h] @ k[bi, h // group, si, t] - 1e-4


def test_causal_attention_masks_padding_and_future():
    rng = np.random.default_rng(7)
    q = rng.normal(size=(1, 4, 2, 8)).astype(np.float32)
    k = rng.normal(size=(1, 4, 1, 8)).astype(np.float32)
    v = rng.normal(size=(1, 4, 1, 8)).astype(np.float32)
    pos = np.array([[0, 1, 2, -1]])
    out = np.asarray(kernels.causal_attention(q, k, v, pos, pos))
    for t in range(3):
        logits = k[0, : t + 1, 0] @ q[0, t].T / np.sqrt(8)  # [t+1, Hq]
        probs = np.exp(logits - logits.max(0)); probs /= probs.sum(0)
        np.testing.assert_allclose(out[0, t], probs.T @ v[0, : t + 1, 0], rtol=1e-5, atol=1e-5)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.page_scores(np.zeros((1, 1, 4)), np.zeros((1, 1, 1, 4)), np.zeros((1, 1, 1, 4)),
                            np.ones((1, 1, 1), np.int32), backend="cuda")


@pytest.mark.parametrize("group,head_dim,page", ATTENTION_CASES)
def test_pallas_decode_attention_matches_reference_in_interpret_mode(group, head_dim, page):
    from raas_jax.kernels import pallas_gpu

    rng = np.random.default_rng(group * 100 + head_dim + page)  # fresh inputs per case
    q, k, v, fill = page_pool(rng, 2, 2, group, 32, page, head_dim)
    ref_out, ref_mass = kernels.decode_attention(q, k, v, fill, backend="reference")
    # default launch, then one that loops over several blocks per program, then one block per program
    for tuning in (pallas_gpu.DEFAULT_TUNING, pallas_gpu.AttentionTuning(block_tokens=32, target_programs=1),
                   pallas_gpu.AttentionTuning(block_tokens=256, target_programs=4096)):
        out, mass = pallas_gpu.decode_attention(q, k, v, fill, interpret=True, tuning=tuning)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(mass), np.asarray(ref_mass), rtol=1e-5, atol=1e-6)
    via_dispatch, _ = kernels.decode_attention(q, k, v, fill, backend="pallas")
    np.testing.assert_allclose(np.asarray(via_dispatch), np.asarray(ref_out), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("live", [(1, 64), (17, 5), (64, 33)])
def test_pallas_live_slots_skips_the_empty_tail(live):
    """With `live_slots`, blocks past the bound are not read: NaN pages there (fill 0) would poison the output if
    they were (0 * NaN in the value dot). Out and mass equal the reference over the clean pool, for launches whose
    round-robin splits end in different places."""
    from raas_jax.kernels import pallas_gpu

    rng = np.random.default_rng(sum(live))
    b, hkv, s, page, widest_block = 2, 2, 64, 4, 16  # the default launch reads 16 slots per block
    q, k, v, fill = page_pool(rng, b, hkv, 4, s, page, 32)
    live_slots = np.asarray(live, np.int32)
    slot = np.arange(s)[None, None, :]  # [1, 1, S]
    fill = np.where(slot >= live_slots[:, None, None], 0, fill).astype(np.int32)
    ref_out, ref_mass = kernels.decode_attention(q, k, v, fill, backend="reference")
    # slots past the last live block of every launch below hold NaN
    poison = (slot >= -(-live_slots[:, None, None] // widest_block) * widest_block)[..., None, None]
    k_nan, v_nan = np.where(poison, np.nan, k).astype(k.dtype), np.where(poison, np.nan, v).astype(v.dtype)
    for tuning in (pallas_gpu.DEFAULT_TUNING, pallas_gpu.AttentionTuning(block_tokens=8, target_programs=1),
                   pallas_gpu.AttentionTuning(block_tokens=8, target_programs=64)):
        out, mass = pallas_gpu.decode_attention(q, k_nan, v_nan, fill, live_slots=live_slots, interpret=True,
                                                tuning=tuning)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(mass), np.asarray(ref_mass), rtol=1e-5, atol=1e-6)
    unbounded, _ = pallas_gpu.decode_attention(q, k_nan, v_nan, fill, interpret=True)
    assert np.isnan(np.asarray(unbounded)).any()  # without the bound the tail is read (what the test relies on)


@pytest.mark.parametrize("group,head_dim,page", ATTENTION_CASES)
def test_pallas_slot_list_matches_reference_in_interpret_mode(group, head_dim, page):
    from raas_jax.kernels import pallas_gpu

    rng = np.random.default_rng(group * 1000 + head_dim + page)
    b, hkv, s, listed = 2, 2, 32, 8
    q, k, v, fill = page_pool(rng, b, hkv, group, s, page, head_dim)
    slots = np.stack([[rng.permutation(s)[:listed] for _ in range(hkv)] for _ in range(b)]).astype(np.int32)
    slots[0, 1, -3:] = -1  # fewer resident pages than the budget: padded with -1
    ref_out, ref_mass = kernels.decode_attention(q, k, v, fill, slots, backend="reference")
    for tuning in (pallas_gpu.DEFAULT_TUNING, pallas_gpu.AttentionTuning(block_tokens=32, target_programs=1)):
        out, mass = pallas_gpu.decode_attention(q, k, v, fill, slots, interpret=True, tuning=tuning)
        assert mass.shape == (b, hkv, listed)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(mass), np.asarray(ref_mass), rtol=1e-5, atol=1e-6)
    via_dispatch, _ = kernels.decode_attention(q, k, v, fill, slots, backend="pallas")
    np.testing.assert_allclose(np.asarray(via_dispatch), np.asarray(ref_out), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["pallas", "pallas_tpu", "reference"])
def test_stacked_pool_reads_the_given_layer(backend):
    """k/v/kmin/kmax stacked over layers with a traced layer index (what decode passes, to avoid a copy of the
    layer) give what the kernels give on that layer's slice: attention, slot lists and page scores."""
    rng = np.random.default_rng(7)
    layers, b, hkv, group, s, page, d = 3, 2, 2, 4, 16, 16, 64
    pools = [page_pool(rng, b, hkv, group, s, page, d) for _ in range(layers)]
    q, fill = pools[0][0], pools[0][3]
    k = np.stack([p[1] for p in pools])  # [L, B, Hkv, S, P, D]
    v = np.stack([p[2] for p in pools])
    kmin, kmax = k.min(axis=4), k.max(axis=4)  # [L, B, Hkv, S, D]
    slots = np.stack([[rng.permutation(s)[:6] for _ in range(hkv)] for _ in range(b)]).astype(np.int32)

    @jax.jit
    def stacked(layer):
        out, mass = kernels.decode_attention(q, k, v, fill, layer=layer, backend=backend)
        listed, _ = kernels.decode_attention(q, k, v, fill, slots, layer=layer, backend=backend)
        return out, mass, listed, kernels.page_scores(q, kmin, kmax, fill, layer=layer, backend=backend)

    for layer in range(layers):
        out, mass, listed, scores = stacked(jnp.int32(layer))
        ref_out, ref_mass = kernels.decode_attention(q, k[layer], v[layer], fill, backend="reference")
        ref_listed, _ = kernels.decode_attention(q, k[layer], v[layer], fill, slots, backend="reference")
        ref_scores = kernels.page_scores(q, kmin[layer], kmax[layer], fill, backend="reference")
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(mass), np.asarray(ref_mass), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(listed), np.asarray(ref_listed), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(scores), np.asarray(ref_scores), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["pallas", "pallas_tpu"])
@pytest.mark.parametrize("group,head_dim", [(1, 64), (4, 128), (7, 64), (8, 128)])
def test_pallas_page_scores_match_reference_in_interpret_mode(group, head_dim, backend):
    rng = np.random.default_rng(group + head_dim)
    b, hkv, s = 2, 2, 96
    q = rng.normal(size=(b, hkv * group, head_dim)).astype(np.float32)
    kmin = rng.normal(size=(b, hkv, s, head_dim)).astype(np.float32)
    kmax = kmin + rng.random(size=kmin.shape).astype(np.float32)
    fill = rng.integers(0, 3, (b, hkv, s)).astype(np.int32)  # empty slots score -inf
    ref = np.asarray(kernels.page_scores(q, kmin, kmax, fill, backend="reference"))
    got = np.asarray(kernels.page_scores(q, kmin, kmax, fill, backend=backend))
    assert (np.isneginf(got) == np.isneginf(ref)).all()
    np.testing.assert_allclose(got[~np.isneginf(ref)], ref[~np.isneginf(ref)], rtol=1e-5, atol=1e-4)


def test_pallas_plan_splits_long_ranges_and_refuses_odd_pages():
    from raas_jax.kernels import pallas_gpu

    block_slots, splits, per_split = pallas_gpu.plan(32, 8, 2048, 16)  # dense-like: B=32, 32K tokens
    assert block_slots * 16 == pallas_gpu.DEFAULT_TUNING.block_tokens and 32 * 8 * splits >= 1024
    assert block_slots * splits * per_split == 2048
    assert pallas_gpu.plan(1, 8, 64, 16)[1] > 1  # B=1: one head's 1K tokens are split across programs
    assert pallas_gpu.plan(1, 1, 5, 16) is not None  # odd slot counts: one slot per block
    assert pallas_gpu.plan(1, 1, 8, 12) is None  # pages of 12 tokens: not a power of two -> reference
    q = jax.ShapeDtypeStruct((64, 32, 128), np.float32)
    assert pallas_gpu.supports(q, jax.ShapeDtypeStruct((64, 8, 1024, 16, 128), np.float32))
    stacked = jax.ShapeDtypeStruct((32, 64, 8, 64, 16, 128), jnp.bfloat16)  # 2^31 elements: Triton offsets int32
    assert pallas_gpu.supports(q, stacked, stacked=True)
    huge = jax.ShapeDtypeStruct((32, 492, 8, 64, 16, 128), jnp.bfloat16)  # > 4 GiB: Pallas offsets int64
    assert pallas_gpu.supports(q, huge, stacked=True)
    fp8_wrap = jax.ShapeDtypeStruct((32, 96, 8, 64, 16, 128), jnp.int8)  # 3 * 2^30 one-byte elements: int32 wraps
    assert not pallas_gpu.supports(q, fp8_wrap, stacked=True)


@settings(max_examples=40, deadline=None)
@given(*TOP_K_CASES)
def test_pallas_top_k_mask_equals_lax_top_k_in_interpret_mode(log_slots, k, seed, kind):
    from raas_jax.kernels import pallas_gpu

    scores = top_k_scores(log_slots, seed, kind)
    got = np.asarray(pallas_gpu.top_k_mask(scores, k, interpret=True))
    want = np.asarray(kernels.top_k_mask(scores, k, backend="reference"))
    assert (got == want).all()
    assert (got.sum(-1) == min(k, scores.shape[-1])).all()
    np.testing.assert_array_equal(np.asarray(kernels.top_k_mask(scores, k, backend="pallas")), want)


def test_auto_backend_is_the_reference_on_cpu():
    assert kernels.resolve("auto") == "reference"
