"""Reference kernels against per-token numpy brute force."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from raas_jax.kernels import dispatch as kernels

from support.kernel_cases import TOP_K_CASES, attention_params, page_pool, random_pool, top_k_scores


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


@pytest.mark.parametrize("group,head_dim,page", attention_params())
def test_pallas_decode_attention_matches_reference_in_interpret_mode(group, head_dim, page):
    from raas_jax.kernels import pallas_gpu

    rng = np.random.default_rng(group * 100 + head_dim + page)  # fresh inputs per case
    q, k, v, fill = page_pool(rng, 2, 2, group, 32, page, head_dim)
    ref_out, ref_mass = kernels.decode_attention(q, k, v, fill, backend="reference")
    # default launch, then one that loops over several blocks per program, then one block per program
    for tuning in (pallas_gpu.DEFAULT_TUNING, pallas_gpu.AttentionTuning(block_tokens=32, target_programs=1),
                   pallas_gpu.AttentionTuning(block_tokens=256, target_programs=4096),
                   pallas_gpu.AttentionTuning(block_tokens=32, target_programs=1, num_stages=3)):
        out, mass = pallas_gpu.decode_attention(q, k, v, fill, interpret=True, tuning=tuning)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(mass), np.asarray(ref_mass), rtol=1e-5, atol=1e-6)
    via_dispatch, _ = kernels.decode_attention(q, k, v, fill, backend="pallas")
    np.testing.assert_allclose(np.asarray(via_dispatch), np.asarray(ref_out), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "pallas", "pallas_tpu"])  # pallas_tpu: falls back to the reference
@pytest.mark.parametrize("q_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("listed", [False, True])
def test_fp8_pool_attends_as_its_values_upcast(backend, q_dtype, listed):
    """An FP8 pool (kv_dtype="fp8") is stored only: attention over it equals attention over the same values in q's
    dtype, with or without a slot list, stacked over layers."""
    rng = np.random.default_rng(7 + listed)
    q, k, v, fill = page_pool(rng, 2, 2, 4, 32, 16, 128)
    q = jnp.asarray(q, q_dtype)
    k8 = jnp.stack([jnp.asarray(3 * k), jnp.asarray(k)]).astype(jnp.float8_e4m3fn)  # [L=2, ...]: layer 1 read
    v8 = jnp.stack([jnp.asarray(v), jnp.asarray(2 * v)]).astype(jnp.float8_e4m3fn)
    slots = jnp.asarray(rng.integers(-1, 32, (2, 2, 8)), jnp.int32) if listed else None
    out, mass = kernels.decode_attention(q, k8, v8, fill, slots, layer=1, backend=backend)
    want, want_mass = kernels.decode_attention(q, k8[1].astype(q_dtype), v8[1].astype(q_dtype), fill, slots,
                                               backend="reference")
    assert out.dtype == q.dtype
    tol = 1e-5 if q_dtype == "float32" else 2e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(mass), np.asarray(want_mass), rtol=tol, atol=tol)
    if backend == "pallas" and q_dtype == "bfloat16":  # the kernel's other form: bf16 compute (the default: f16)
        from raas_jax.kernels import pallas_gpu

        tuning = pallas_gpu.AttentionTuning(block_tokens=32, target_programs=1, fp8_as_f16=False)
        out, mass = pallas_gpu.decode_attention(q, k8, v8, fill, slots, layer=1, interpret=True, tuning=tuning)
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
        np.testing.assert_allclose(np.asarray(mass), np.asarray(want_mass), rtol=tol, atol=tol)
        huge, _ = pallas_gpu.decode_attention(q * 1e6, k8, v8, fill, slots, layer=1, interpret=True)  # past float16
        assert np.isfinite(np.asarray(huge, np.float32)).all()


@pytest.mark.parametrize("group,head_dim,kv_dtype", [  # fast: an odd group in pairs, more than 16 heads in bytes
    pytest.param(3, 32, "float8_e4m3fn", marks=pytest.mark.slow), (7, 64, "float8_e5m2"),
    pytest.param(16, 64, "float8_e4m3fn", marks=pytest.mark.slow), (24, 16, "float8_e4m3fn")])
def test_pallas_fp8_query_rows_and_channels_for_any_group(group, head_dim, kv_dtype):
    """Over FP8 pools the kernel pads, scales and casts q itself: groups that are not a power of two (padding rows
    repeat the last head), exactly 16 heads (no padding: a contiguous load), more than 16, pairs (head dim >= 32)
    and bytes (16), e4m3 and e5m2, with a slot list; and a NaN query stays NaN (interpret mode; test_gpu.py checks
    the Triton lowering, where a clip would drop it)."""
    from raas_jax.kernels import pallas_gpu

    rng = np.random.default_rng(group + head_dim)
    q, k, v, fill = page_pool(rng, 2, 2, group, 16, 8, head_dim)
    q = jnp.asarray(q, jnp.bfloat16)
    k8, v8 = (jnp.stack([jnp.asarray(-x), jnp.asarray(x)]).astype(kv_dtype) for x in (k, v))  # layer 1 is read
    slots = jnp.asarray(rng.integers(-1, 16, (2, 2, 8)), jnp.int32)
    for listed in (None, slots):
        want, want_mass = kernels.decode_attention(q, k8[1].astype(q.dtype), v8[1].astype(q.dtype), fill, listed,
                                                   backend="reference")
        tuning = pallas_gpu.AttentionTuning(block_tokens=16, target_programs=8)
        out, mass = pallas_gpu.decode_attention(q, k8, v8, fill, listed, layer=1, interpret=True, tuning=tuning)
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)
        np.testing.assert_allclose(np.asarray(mass), np.asarray(want_mass), rtol=2e-2, atol=2e-3)
    poisoned, _ = pallas_gpu.decode_attention(q.at[0, 0, 0].set(jnp.nan), k8, v8, fill, layer=1, interpret=True)
    assert np.isnan(np.asarray(poisoned[0, 0], np.float32)).all()


def test_fp8_pools_are_read_as_uint16_pairs():
    """The kernel reads an FP8 pool as uint16 pairs (the default; one byte per load is the other form), which also
    keeps a pool of 2^31 to 2^32 one-byte values inside Triton's int32 offsets: both forms against the reference at a
    small size, and the dispatch keeps the Pallas call for 2.25 Gi values (abstractly) even with bytes asked for."""
    from raas_jax.kernels import pallas_gpu

    rng = np.random.default_rng(11)
    q, k, v, fill = page_pool(rng, 2, 2, 4, 32, 16, 64)
    q = jnp.asarray(q, jnp.bfloat16)
    k8, v8 = (jnp.stack([jnp.asarray(x), jnp.asarray(-x)]).astype(jnp.float8_e4m3fn) for x in (k, v))
    want, want_mass = kernels.decode_attention(q, k8[1].astype(q.dtype), v8[1].astype(q.dtype), fill,
                                               backend="reference")
    for pack, fp8_as_f16 in ((True, True), (True, False), (False, True)):
        tuning = pallas_gpu.AttentionTuning(block_tokens=32, target_programs=4, pack_fp8=pack, fp8_as_f16=fp8_as_f16)
        out, mass = pallas_gpu.decode_attention(q, k8, v8, fill, layer=1, interpret=True, tuning=tuning)
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)
        np.testing.assert_allclose(np.asarray(mass), np.asarray(want_mass), rtol=2e-2, atol=2e-3)
    def packed(d, tuning=pallas_gpu.DEFAULT_TUNING):  # whether the kernel reads a small FP8 pool of head dim d as pairs
        pool = jax.ShapeDtypeStruct((1, 1, 2, 8, 16, d), jnp.float8_e4m3fn)
        jaxpr = jax.make_jaxpr(lambda q, k, f: pallas_gpu.decode_attention(q, k, k, f, layer=0, tuning=tuning))(
            jax.ShapeDtypeStruct((1, 8, d), jnp.bfloat16), pool, jax.ShapeDtypeStruct((1, 2, 8), jnp.int32))
        return "bitcast_convert_type" in str(jaxpr)

    assert packed(64) and not packed(64, pallas_gpu.AttentionTuning(pack_fp8=False))  # pairs are the default
    assert not packed(16)  # head dim 16: dots over 8 channels would be too small for Triton; bytes instead
    big = jax.ShapeDtypeStruct((2, 1, 1, 2**20 // 16 * 9, 16, 128), jnp.float8_e4m3fn)  # 2.25 * 2^30 elements
    assert not pallas_gpu.offsets_fit(big) and pallas_gpu.supports(jax.ShapeDtypeStruct((1, 4, 128), jnp.bfloat16),
                                                                   big, stacked=True)
    bytewise = pallas_gpu.AttentionTuning(pack_fp8=False)
    jaxpr = jax.make_jaxpr(lambda q, k, f: pallas_gpu.decode_attention(q, k, k, f, layer=0, tuning=bytewise))(
        jax.ShapeDtypeStruct((1, 4, 128), jnp.bfloat16), big, jax.ShapeDtypeStruct((1, 1, 2**20 // 16 * 9), jnp.int32))
    assert "pallas_call" in str(jaxpr) and "bitcast_convert_type" in str(jaxpr)


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


@pytest.mark.parametrize("group,head_dim,page", attention_params())
def test_pallas_slot_list_matches_reference_in_interpret_mode(group, head_dim, page):
    from raas_jax.kernels import pallas_gpu

    rng = np.random.default_rng(group * 1000 + head_dim + page)
    b, hkv, s, listed = 2, 2, 32, 8
    q, k, v, fill = page_pool(rng, b, hkv, group, s, page, head_dim)
    slots = np.stack([[rng.permutation(s)[:listed] for _ in range(hkv)] for _ in range(b)]).astype(np.int32)
    slots[0, 1, -3:] = -1  # fewer resident pages than the budget: padded with -1
    ref_out, ref_mass = kernels.decode_attention(q, k, v, fill, slots, backend="reference")
    for tuning in (pallas_gpu.DEFAULT_TUNING, pallas_gpu.AttentionTuning(block_tokens=32, target_programs=1),
                   pallas_gpu.AttentionTuning(block_tokens=16, target_programs=1)):
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


def _check_pallas_top_k(log_slots, k, seed, kind):
    from raas_jax.kernels import pallas_gpu

    scores = top_k_scores(log_slots, seed, kind)
    got = np.asarray(pallas_gpu.top_k_mask(scores, k, interpret=True))
    want = np.asarray(kernels.top_k_mask(scores, k, backend="reference"))
    assert (got == want).all()
    assert (got.sum(-1) == min(k, scores.shape[-1])).all()
    np.testing.assert_array_equal(np.asarray(kernels.top_k_mask(scores, k, backend="pallas")), want)


@settings(max_examples=10, deadline=None)
@given(*TOP_K_CASES)
def test_pallas_top_k_mask_equals_lax_top_k_in_interpret_mode(log_slots, k, seed, kind):
    _check_pallas_top_k(log_slots, k, seed, kind)


@pytest.mark.slow
@settings(max_examples=30, deadline=None)  # 40 in all, as before the split
@given(*TOP_K_CASES)
def test_pallas_top_k_mask_equals_lax_top_k_more_cases(log_slots, k, seed, kind):
    _check_pallas_top_k(log_slots, k, seed, kind)


def test_auto_backend_is_the_reference_on_cpu():
    assert kernels.resolve("auto") == "reference"


def stored(x, dtype):
    """A key or value row as a pool of `dtype` stores it: FP8 saturates at its largest finite value."""
    x = np.asarray(x, np.float32)
    if np.dtype(dtype).itemsize == 1:
        top = float(jnp.finfo(dtype).max)
        x = np.clip(x, -top, top)
    return x.astype(dtype)


def brute_append(pool, layer, k, v, positions, victim, page):
    """Per (sequence, head) with Python control flow: the append rule of kernels/reference.py's docstring."""
    out = {name: np.array(x) for name, x in pool.items()}
    b, hkv = out["cur"].shape[1:]
    slots, evicted = np.zeros((b, hkv), np.int32), np.full((b, hkv), -1, np.int32)
    for bi in range(b):
        for h in range(hkv):
            fill, cur = out["fill"][layer, bi, h], out["cur"][layer, bi, h]
            new_page = fill[cur] >= page
            if not new_page:
                slot, offset = cur, fill[cur]
            else:
                free = [j for j in range(len(fill)) if fill[j] == 0]
                slot, offset = (free[0] if free else victim[bi, h]), 0
                if not free:
                    evicted[bi, h] = victim[bi, h]
            key = stored(k[bi, h], out["k"].dtype)
            out["k"][layer, bi, h, slot, offset] = key
            out["v"][layer, bi, h, slot, offset] = stored(v[bi, h], out["v"].dtype)
            key = key.astype(out["kmin"].dtype)  # the bounds bound the key as stored
            at = (layer, bi, h, slot)
            out["kmin"][at] = key if new_page else np.minimum(out["kmin"][at], key)
            out["kmax"][at] = key if new_page else np.maximum(out["kmax"][at], key)
            out["fill"][at], out["stamp"][at] = offset + 1, positions[bi]
            out["start"][at] = positions[bi] if new_page else out["start"][at]
            out["pinned"][at] = out["pinned"][at] and not new_page
            out["cur"][layer, bi, h] = slots[bi, h] = slot
    return out, slots, evicted


@pytest.mark.parametrize("backend", ["reference", "pallas"])
@pytest.mark.parametrize("slots,free,kv_dtype", [  # 5, 12: not 2^n; fast: a free slot, a victim, both FP8 formats
    pytest.param(8, True, None, marks=pytest.mark.slow), pytest.param(8, False, None, marks=pytest.mark.slow),
    pytest.param(5, False, None, marks=pytest.mark.slow), (12, True, None), (8, False, "float8_e4m3fn"),
    (5, True, "float8_e5m2")])
def test_append_token_matches_brute_force(backend, slots, free, kv_dtype):
    """The append (reference: XLA scatters; pallas: one kernel, interpret mode here) writes exactly what the rule
    says into the given layer and nothing else: the current page, else the first free slot, else the victim.
    FP8 pages: the row saturates (one key is 1000, past e4m3fn's 448) and the bounds take the stored key."""
    rng = np.random.default_rng(slots + free)
    layers, b, hkv, page, d = 3, 4, 2, 4, 16
    for trial in range(3):
        pool = random_pool(rng, layers, b, hkv, slots, page, d, kv_dtype=kv_dtype)
        fill = np.array(pool["fill"])
        cur = rng.integers(0, slots - 1, (layers, b, hkv)).astype(np.int32)  # never the last slot
        fill[:, :2, 0] = page  # rows 0, 1 of head 0: every page full, the current one included
        if free:
            fill[..., -1] = 0  # a free slot in every row besides random ones
        else:
            fill[fill == 0] = 1
        pool["fill"], pool["cur"] = jnp.asarray(fill), jnp.asarray(cur)
        k = jnp.asarray(rng.normal(size=(b, hkv, d)), jnp.float32).at[0, 0, 3].set(1000.0)
        v = jnp.asarray(rng.normal(size=(b, hkv, d)), jnp.float32).at[1, 1, 0].set(-1000.0)
        positions = jnp.asarray(rng.integers(500, 900, b), jnp.int32)
        victim = jnp.asarray(rng.integers(0, slots, (b, hkv)), jnp.int32)
        layer = trial % layers
        got, got_slot, got_evicted = jax.jit(
            lambda p, l: kernels.append_token(p, l, k, v, positions, victim, page, backend=backend))(pool, layer)
        want, want_slot, want_evicted = brute_append(pool, layer, k, v, np.asarray(positions), np.asarray(victim), page)
        np.testing.assert_array_equal(np.asarray(got_slot), want_slot)
        np.testing.assert_array_equal(np.asarray(got_evicted), want_evicted)
        assert (want_evicted >= 0).any() == (not free)
        for name in kernels.APPEND_ARRAYS:
            assert got[name].dtype == pool[name].dtype, name
            np.testing.assert_array_equal(np.asarray(got[name]), want[name], err_msg=name)
        assert not np.isnan(np.asarray(got["k"], np.float32)).any()


@pytest.mark.parametrize("slots", [64, 160])
def test_pallas_bookkeeping_lowers_to_triton_calls_that_write_in_place(slots):
    """For CUDA the append and the refresh are one Triton custom call each, whose pool outputs alias their pool
    inputs (checked without a GPU: lowering for another platform needs none)."""
    from raas_jax.kernels import pallas_gpu

    pool = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        random_pool(np.random.default_rng(0), 2, 3, 2, slots, 16, 128, jnp.bfloat16))
    scalar, token = jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((3, 2, 128), jnp.bfloat16)
    positions, victim = jax.ShapeDtypeStruct((3,), jnp.int32), jax.ShapeDtypeStruct((3, 2), jnp.int32)
    append = jax.jit(lambda *args: pallas_gpu.append_token(*args, page_size=16))
    text = append.trace(pool, scalar, token, token, positions, victim).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("raas_append_token") >= 1 and text.count("__gpu$xla.gpu.triton") == 1
    assert text.count("output_operand_alias<") == len(kernels.APPEND_ARRAYS)
    if slots <= pallas_gpu.MAX_REFRESH_SLOTS:
        q = jax.ShapeDtypeStruct((3, 8, 128), jnp.bfloat16)
        for tuning in (pallas_gpu.RefreshTuning(), pallas_gpu.RefreshTuning(gather_q=False)):
            refresh = jax.jit(lambda *args, t=tuning: pallas_gpu.refresh_top_half(*args, page_size=16, tuning=t))
            text = refresh.trace(q, pool, scalar, positions).lower(lowering_platforms=("cuda",)).as_text()
            assert text.count("raas_refresh_top_half") >= 1 and text.count("__gpu$xla.gpu.triton") == 1
            assert text.count("output_operand_alias<") == 1


def brute_refresh(q, pool, layer, positions, page):
    """Per (sequence, head): the evictable pages sorted by the Quest bound (ties: lower slot), top half stamped."""
    stamp = np.array(pool["stamp"])
    b, hq, d = q.shape
    hkv = stamp.shape[2]
    group = hq // hkv
    for bi in range(b):
        for h in range(hkv):
            kmin, kmax = (np.asarray(pool[n][layer, bi, h], np.float64) for n in ("kmin", "kmax"))
            qs = np.asarray(q[bi, h * group:(h + 1) * group], np.float64)  # [G, D]
            bound = np.max(np.sum(np.maximum(qs[:, None] * kmin, qs[:, None] * kmax), axis=-1), axis=0)  # [S]
            fill, pinned = np.asarray(pool["fill"][layer, bi, h]), np.asarray(pool["pinned"][layer, bi, h])
            cur = int(pool["cur"][layer, bi, h])
            candidates = [j for j in range(len(fill)) if fill[j] >= page and not pinned[j] and j != cur]
            ranked = sorted(candidates, key=lambda j: (-bound[j], j))
            for j in ranked[:(len(candidates) + 1) // 2]:
                stamp[layer, bi, h, j] = positions[bi]
    return stamp


@pytest.mark.parametrize("backend", ["reference", "pallas", "pallas_tpu"])  # pallas_tpu: its page scores + XLA
@pytest.mark.parametrize("group,slots", [  # 200: past the kernel's rows; fast: an odd group over 12 slots, and 200
    pytest.param(1, 8, marks=pytest.mark.slow), pytest.param(4, 64, marks=pytest.mark.slow), (7, 12),
    pytest.param(4, 128, marks=pytest.mark.slow), (2, 200)])
@pytest.mark.parametrize("values", ["normal", "ties"])
def test_refresh_top_half_matches_brute_force(backend, group, slots, values):
    """Scores from normal values, or from small integers (many equal bounds, and a sequence whose query is 0: every
    bound ties), so the lower-slot tie rule decides; head dim 64 takes the kernel's bound sum in two channel chunks."""
    rng = np.random.default_rng(group * 1000 + slots)
    layers, b, hkv, page, d = 2, 3, 2, 4, 64
    pool = random_pool(rng, layers, b, hkv, slots, page, d)
    q = rng.normal(size=(b, hkv * group, d))
    if values == "ties":
        pool["kmin"] = jnp.asarray(rng.integers(-1, 1, pool["kmin"].shape), jnp.float32)
        q = np.round(q).clip(-1, 1) * (rng.random((1, 1, d)) < 0.1)  # a few nonzero channels: few distinct bounds
        q[0] = 0
    pool["kmax"] = pool["kmin"] + jnp.asarray(rng.integers(0, 2, pool["kmin"].shape), jnp.float32)  # kmin <= kmax
    q = jnp.asarray(q, jnp.float32)
    fill = np.asarray(pool["fill"]).copy()
    fill[..., : slots // 2] = page  # at least half full: several candidates per row
    pool["fill"] = jnp.asarray(fill)
    positions = jnp.asarray(rng.integers(1000, 2000, b), jnp.int32)
    for layer in range(layers):
        got = jax.jit(lambda p, l: kernels.refresh_top_half(q, p, l, positions, page, backend=backend))(pool, layer)
        want = brute_refresh(np.asarray(q), pool, layer, np.asarray(positions), page)
        np.testing.assert_array_equal(np.asarray(got), want)
        assert (np.asarray(got) != np.asarray(pool["stamp"])).any()


@pytest.mark.parametrize("slots", [12, 64])  # 12: padding lanes re-read the last slot; 64: one contiguous row
@pytest.mark.parametrize("tuning", [{"heads_per_program": 2, "channels": 16},
                                    {"heads_per_program": 2, "channels": 128, "num_stages": 2},
                                    {"gather_q": False}, {"gather_q": False, "heads_per_program": 2}])
def test_refresh_kernel_tunings_match_brute_force(slots, tuning):
    """Two KV heads per program (the kernel's loop over them), other channel chunks per bound product, and query
    rows padded by XLA (the default gathers them in the kernel) stamp what brute force stamps."""
    from raas_jax.kernels import pallas_gpu

    rng = np.random.default_rng(slots)
    layers, b, hkv, group, page, d = 2, 3, 2, 4, 4, 128
    pool = random_pool(rng, layers, b, hkv, slots, page, d)
    pool["kmax"] = pool["kmin"] + jnp.asarray(rng.random(pool["kmin"].shape), jnp.float32)
    fill = np.asarray(pool["fill"]).copy()
    fill[..., : slots // 2] = page
    pool["fill"] = jnp.asarray(fill)
    q = jnp.asarray(rng.normal(size=(b, hkv * group, d)), jnp.float32)
    positions = jnp.asarray(rng.integers(1000, 2000, b), jnp.int32)
    got = pallas_gpu.refresh_top_half(q, pool, jnp.int32(1), positions, page_size=page, interpret=True,
                                      tuning=pallas_gpu.RefreshTuning(**tuning))
    np.testing.assert_array_equal(np.asarray(got), brute_refresh(np.asarray(q), pool, 1, np.asarray(positions), page))
