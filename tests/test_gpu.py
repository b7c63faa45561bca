"""On a GPU (marker `gpu`, skipped elsewhere): bf16 kernels and policies at realistic sizes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from raas_jax.kernels import dispatch as kernels
from raas_jax.bench import e2e as bench
from raas_jax.decode.generate import Generator, run_generation
from raas_jax.policies import H2O, Dense, RaaS, StreamingLLM

from support.kernel_cases import random_pool

pytestmark = pytest.mark.gpu


def test_bf16_decode_attention_matches_f32_reference():
    rng = np.random.default_rng(0)
    b, hkv, group, s, p, d = 8, 8, 4, 256, 16, 128
    q = rng.normal(size=(b, hkv * group, d)).astype(np.float32)
    k = rng.normal(size=(b, hkv, s, p, d)).astype(np.float32)
    v = rng.normal(size=(b, hkv, s, p, d)).astype(np.float32)
    fill = rng.integers(0, p + 1, (b, hkv, s)).astype(np.int32)
    ref, ref_mass = kernels.decode_attention(q, k, v, fill, backend="reference")  # f32 oracle
    out, mass = kernels.decode_attention(jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16),
                                         jnp.asarray(v, jnp.bfloat16), jnp.asarray(fill))
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    assert np.linalg.norm(out - np.asarray(ref)) / np.linalg.norm(np.asarray(ref)) <= 1e-2
    assert np.abs(np.asarray(mass) - np.asarray(ref_mass)).max() <= 1e-2


def test_auto_backend_is_pallas_on_gpu():
    assert kernels.resolve("auto") == "pallas" and kernels.resolve("reference") == "reference"


def _relative_error(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.mark.parametrize("group,head_dim,page", [(1, 64, 16), (4, 128, 16), (7, 128, 32), (8, 64, 32)])
@pytest.mark.parametrize("listed", [None, 64])
def test_pallas_decode_attention_on_gpu(group, head_dim, page, listed):
    from raas_jax.kernels import pallas_gpu

    rng = np.random.default_rng(group * 7 + head_dim + page)
    b, hkv, s = 32, 8, 256
    q = jnp.asarray(rng.normal(size=(b, hkv * group, head_dim)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(b, hkv, s, page, head_dim)), jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(b, hkv, s, page, head_dim)), jnp.bfloat16)
    fill = rng.integers(0, page + 1, (b, hkv, s)).astype(np.int32)
    fill[0, 0] = 0  # an empty head
    slots = None
    if listed:
        slots = np.stack([[rng.permutation(s)[:listed] for _ in range(hkv)] for _ in range(b)]).astype(np.int32)
        slots[1, 2, -5:] = -1
        slots = jnp.asarray(slots)
    out, mass = pallas_gpu.decode_attention(q, k, v, jnp.asarray(fill), slots)
    ref, ref_mass = kernels.decode_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                             jnp.asarray(fill), slots, backend="reference")
    assert np.isfinite(np.asarray(out, np.float32)).all() and np.isfinite(np.asarray(mass)).all()
    assert _relative_error(out[1:], ref[1:]) <= 1e-2
    assert _relative_error(mass, ref_mass) <= 1e-2


def test_pallas_live_slots_on_gpu():
    """The Dense bound (`live_slots`): blocks past it are skipped, splits take blocks round-robin."""
    from raas_jax.kernels import pallas_gpu

    rng = np.random.default_rng(5)
    b, hkv, group, s, page, d = 16, 8, 4, 512, 16, 128
    live = rng.integers(1, s + 1, b).astype(np.int32)
    live[:3] = (1, 4, s)
    fill = rng.integers(0, page + 1, (b, hkv, s)).astype(np.int32)
    fill = np.where(np.arange(s)[None, None] < live[:, None, None], fill, 0).astype(np.int32)
    q = jnp.asarray(rng.normal(size=(b, hkv * group, d)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(b, hkv, s, page, d)), jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(b, hkv, s, page, d)), jnp.bfloat16)
    out, mass = pallas_gpu.decode_attention(q, k, v, jnp.asarray(fill), live_slots=jnp.asarray(live))
    ref, ref_mass = kernels.decode_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                             jnp.asarray(fill), backend="reference")
    assert _relative_error(out, ref) <= 1e-2
    assert _relative_error(mass, ref_mass) <= 1e-2


def test_pallas_reads_a_layer_of_a_stacked_pool_past_4_gib():
    """Decode passes the pools of every layer and a layer index; past 4 GiB Pallas switches to int64 offsets.
    The last layer (largest offsets) and the listed-slots path must match the reference on that layer."""
    from raas_jax.kernels import pallas_gpu

    layers, b, hkv, group, s, page, d = 17, 64, 8, 4, 128, 16, 128  # 4.6 GB per pool: int64 offsets
    key_k, key_v = jax.random.split(jax.random.PRNGKey(0))
    k = jax.random.normal(key_k, (layers, b, hkv, s, page, d), jnp.bfloat16)
    v = jax.random.normal(key_v, (layers, b, hkv, s, page, d), jnp.bfloat16)
    assert k.size * 2 > 2**32
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.normal(size=(b, hkv * group, d)), jnp.bfloat16)
    fill = jnp.asarray(rng.integers(1, page + 1, (b, hkv, s)).astype(np.int32))
    slots = jnp.asarray(np.stack([[rng.permutation(s)[:32] for _ in range(hkv)] for _ in range(b)]).astype(np.int32))
    for layer in (0, layers - 1):
        last_k, last_v = k[layer].astype(jnp.float32), v[layer].astype(jnp.float32)
        for listed in (None, slots):
            out, mass = pallas_gpu.decode_attention(q, k, v, fill, listed, layer=jnp.int32(layer))
            ref, ref_mass = kernels.decode_attention(q.astype(jnp.float32), last_k, last_v, fill, listed,
                                                     backend="reference")
            assert _relative_error(out, ref) <= 1e-2, (layer, listed is None)
            assert _relative_error(mass, ref_mass) <= 1e-2


@pytest.mark.parametrize("group,head_dim,page", [(1, 64, 16), (4, 128, 16), (7, 128, 32), (8, 64, 8), (16, 128, 16)])
def test_mosaic_decode_attention_on_gpu(group, head_dim, page):
    """The Mosaic GPU kernel (the default for bf16 pages without a slot list on Hopper) against the f32 reference,
    with live bounds that end mid-pool, on layer 2 of a stacked pool."""
    from raas_jax.kernels import mosaic_gpu

    if not mosaic_gpu.available():
        pytest.skip("not a Hopper GPU")
    rng = np.random.default_rng(group * 7 + head_dim + page)
    layers, b, hkv, s = 3, 32, 8, 2048 // page
    k = jax.random.normal(jax.random.PRNGKey(1), (layers, b, hkv, s, page, head_dim), jnp.bfloat16)
    v = jax.random.normal(jax.random.PRNGKey(2), (layers, b, hkv, s, page, head_dim), jnp.bfloat16)
    q = jnp.asarray(rng.normal(size=(b, hkv * group, head_dim)), jnp.bfloat16)
    live = rng.integers(0, s + 1, b).astype(np.int32)
    live[:3] = (0, 1, s)
    fill = rng.integers(0, page + 1, (b, hkv, s)).astype(np.int32)
    fill = np.where(np.arange(s)[None, None] < live[:, None, None], fill, 0).astype(np.int32)
    out, mass = mosaic_gpu.decode_attention(q, k, v, jnp.asarray(fill), layer=jnp.int32(2),
                                            live_slots=jnp.asarray(live))
    ref, ref_mass = kernels.decode_attention(q.astype(jnp.float32), k[2].astype(jnp.float32),
                                             v[2].astype(jnp.float32), jnp.asarray(fill), backend="reference")
    assert np.isfinite(np.asarray(out, np.float32)).all() and np.isfinite(np.asarray(mass)).all()
    assert _relative_error(out[1:], ref[1:]) <= 1e-2 and not np.asarray(out, np.float32)[0].any()
    assert _relative_error(mass, ref_mass) <= 1e-2


@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("group,head_dim,page", [(4, 128, 16), (8, 64, 8), (7, 128, 32)])
def test_mosaic_slot_lists_on_gpu(group, head_dim, page, staged):
    """Quest's selected pages through the Mosaic GPU kernel (one TMA copy per listed page; the list read from GMEM
    or staged in SMEM first) against the f32 reference, -1 entries included."""
    from raas_jax.kernels import mosaic_gpu

    if not mosaic_gpu.available():
        pytest.skip("not a Hopper GPU")
    rng = np.random.default_rng(group + head_dim + page)
    layers, b, hkv, s = 2, 32, 8, 4096 // page
    listed = 1024 // page
    k = jax.random.normal(jax.random.PRNGKey(3), (layers, b, hkv, s, page, head_dim), jnp.bfloat16)
    v = jax.random.normal(jax.random.PRNGKey(4), (layers, b, hkv, s, page, head_dim), jnp.bfloat16)
    q = jnp.asarray(rng.normal(size=(b, hkv * group, head_dim)), jnp.bfloat16)
    fill = jnp.asarray(rng.integers(0, page + 1, (b, hkv, s)), jnp.int32)
    slots = np.sort(rng.permuted(np.broadcast_to(np.arange(s), (b, hkv, s)), axis=-1)[..., :listed], -1)
    slots[0, :, -5:] = -1
    slots = jnp.asarray(slots, jnp.int32)
    assert mosaic_gpu.supports(q, k, slots, stacked=True)
    tuning = mosaic_gpu.MosaicTuning(staged_list=staged)
    out, mass = mosaic_gpu.decode_attention(q, k, v, fill, slots, layer=jnp.int32(1), tuning=tuning)
    ref, ref_mass = kernels.decode_attention(q.astype(jnp.float32), k[1].astype(jnp.float32),
                                             v[1].astype(jnp.float32), fill, slots, backend="reference")
    assert np.isfinite(np.asarray(out, np.float32)).all() and np.isfinite(np.asarray(mass)).all()
    assert _relative_error(out, ref) <= 1e-2 and _relative_error(mass, ref_mass) <= 1e-2


def test_the_dispatch_takes_mosaic_on_hopper_and_triton_otherwise():
    from raas_jax.kernels import mosaic_gpu

    q = jnp.zeros((2, 32, 128), jnp.bfloat16)
    k = jnp.zeros((2, 8, 64, 16, 128), jnp.bfloat16)
    fill = jnp.full((2, 8, 64), 16, jnp.int32)

    def lowered(k, slots=None):
        attend = lambda q, k, v, fill: kernels.decode_attention(q, k, v, fill, slots)  # noqa: E731
        return jax.jit(attend).lower(q, k, k, fill).as_text()

    assert ("mosaic_gpu" in lowered(k)) == mosaic_gpu.available()
    assert "mosaic_gpu" not in lowered(k.astype(jnp.float8_e4m3fn))  # FP8 pages: Triton
    assert ("mosaic_gpu" in lowered(k, jnp.zeros((2, 8, 8), jnp.int32))) == mosaic_gpu.available()  # slot lists


def test_mosaic_reads_a_layer_of_a_stacked_pool_past_4_gib():
    from raas_jax.kernels import mosaic_gpu

    if not mosaic_gpu.available():
        pytest.skip("not a Hopper GPU")
    layers, b, hkv, group, s, page, d = 17, 64, 8, 4, 128, 16, 128  # 4.6 GB per pool
    k = jax.random.normal(jax.random.PRNGKey(3), (layers, b, hkv, s, page, d), jnp.bfloat16)
    v = jax.random.normal(jax.random.PRNGKey(4), (layers, b, hkv, s, page, d), jnp.bfloat16)
    rng = np.random.default_rng(6)
    q = jnp.asarray(rng.normal(size=(b, hkv * group, d)), jnp.bfloat16)
    fill = jnp.asarray(rng.integers(1, page + 1, (b, hkv, s)).astype(np.int32))
    out, mass = mosaic_gpu.decode_attention(q, k, v, fill, layer=jnp.int32(layers - 1))
    ref, ref_mass = kernels.decode_attention(q.astype(jnp.float32), k[-1].astype(jnp.float32),
                                             v[-1].astype(jnp.float32), fill, backend="reference")
    assert _relative_error(out, ref) <= 1e-2 and _relative_error(mass, ref_mass) <= 1e-2


def test_pallas_page_scores_on_gpu():
    rng = np.random.default_rng(3)
    b, hkv, group, s, d = 32, 8, 4, 2048, 128
    q = jnp.asarray(rng.normal(size=(b, hkv * group, d)), jnp.bfloat16)
    kmin = rng.normal(size=(b, hkv, s, d)).astype(np.float32)
    kmax = kmin + rng.random(size=kmin.shape).astype(np.float32)
    kmin, kmax = jnp.asarray(kmin, jnp.bfloat16), jnp.asarray(kmax, jnp.bfloat16)
    fill = jnp.asarray(rng.integers(0, 3, (b, hkv, s)), jnp.int32)
    got = np.asarray(kernels.page_scores(q, kmin, kmax, fill, backend="pallas"))
    want = np.asarray(kernels.page_scores(q, kmin, kmax, fill, backend="reference"))
    empty = np.isneginf(want)
    assert (np.isneginf(got) == empty).all()
    assert _relative_error(got[~empty], want[~empty]) <= 1e-2


def test_policies_with_room_for_everything_equal_dense_in_bf16():
    cfg = bench.MODEL_SHAPES["tiny"]
    params = bench.random_params(cfg, jnp.bfloat16)
    prompts = np.random.default_rng(1).integers(0, cfg.vocab_size, (4, 40)).tolist()
    dense, _ = run_generation(Generator(cfg, jnp.bfloat16, Dense(), unroll_layers=True), params, prompts,
                              max_new_tokens=64, eos_ids=())
    # same pool shape as Dense here (16 slots), so the same arithmetic: tokens must match exactly
    for policy in (RaaS(budget=256), H2O(budget=256), StreamingLLM(budget=256)):
        out, _ = run_generation(Generator(cfg, jnp.bfloat16, policy, unroll_layers=True), params, prompts,
                                max_new_tokens=64, eos_ids=())
        assert (out == dense).all(), policy


def test_sharded_decode_runs_the_mosaic_kernel_and_matches_one_device(monkeypatch):
    """The policies under `shard_map` (what `--mesh` runs) on a one-device mesh: the Mosaic kernel is traced inside
    it (on Hopper) and the tokens equal the unsharded run's, so the kernel lowers and runs per shard."""
    from raas_jax.kernels import mosaic_gpu
    from raas_jax.policies import Quest
    from raas_jax.decode.sharding import ShardedPolicy, make_mesh

    cfg = dataclasses.replace(bench.MODEL_SHAPES["tiny"], num_heads=8, num_kv_heads=2, head_dim=64)
    params = bench.random_params(cfg, jnp.bfloat16)
    prompts = np.random.default_rng(2).integers(0, cfg.vocab_size, (4, 40)).tolist()
    mesh = make_mesh(cfg, "data=1,model=1", jax.devices()[:1])
    traced = []
    real = mosaic_gpu.decode_attention
    monkeypatch.setattr(mosaic_gpu, "decode_attention", lambda *a, **kw: traced.append(1) or real(*a, **kw))
    for policy in (Dense(), RaaS(budget=128), Quest(budget=128, dense_layers=0)):  # Quest: lists of 8 pages
        def generate(p):
            return run_generation(Generator(cfg, jnp.bfloat16, p, unroll_layers=True), params, prompts,
                                  max_new_tokens=160, eos_ids=())[0]

        alone = generate(policy)
        traced.clear()
        sharded = generate(ShardedPolicy(policy, mesh))
        assert bool(traced) == mosaic_gpu.available(), policy
        assert (sharded == alone).all(), policy


@pytest.mark.parametrize("slots,k", [(2048, 128), (64, 32), (8192, 512)])
def test_pallas_top_k_mask_on_gpu(slots, k):
    from raas_jax.kernels import pallas_gpu

    rng = np.random.default_rng(slots + k)
    scores = rng.normal(size=(32, 8, slots)).astype(np.float32)
    scores[:, :, ::7] = np.round(scores[:, :, ::7])  # ties
    scores[:, 0, :100] = -np.inf
    got = np.asarray(pallas_gpu.top_k_mask(jnp.asarray(scores), k))
    want = np.asarray(kernels.top_k_mask(jnp.asarray(scores), k, backend="reference"))
    assert (got == want).all()


@pytest.mark.parametrize("kv_dtype", [None, jnp.float8_e4m3fn])
def test_pallas_append_on_gpu(kv_dtype):
    """The one-launch append writes what the XLA scatters write, at decode shapes, on the real Triton path (FP8
    pages: the GPU's saturating cast gives the reference's clipped values)."""
    rng = np.random.default_rng(5)
    layers, b, hkv, s, page, d = 4, 8, 8, 160, 16, 128
    pool = random_pool(rng, layers, b, hkv, s, page, d, jnp.bfloat16, kv_dtype)
    k = jnp.asarray(rng.normal(size=(b, hkv, d)), jnp.bfloat16).at[0, 0, 7].set(1000.0)
    v = jnp.asarray(rng.normal(size=(b, hkv, d)), jnp.bfloat16).at[1, 2, 0].set(-1000.0)
    positions = jnp.asarray(rng.integers(3000, 4000, b), jnp.int32)
    victim = jnp.asarray(rng.integers(0, s, (b, hkv)), jnp.int32)
    for layer in (0, layers - 1):
        want = kernels.append_token(pool, jnp.int32(layer), k, v, positions, victim, page, backend="reference")
        got = kernels.append_token(pool, jnp.int32(layer), k, v, positions, victim, page, backend="pallas")
        for name in kernels.APPEND_ARRAYS:
            np.testing.assert_array_equal(np.asarray(got[0][name]), np.asarray(want[0][name]), err_msg=name)
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
        np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(want[2]))


@pytest.mark.parametrize("listed", [None, 64])
def test_pallas_fp8_decode_attention_on_gpu(listed):
    """An FP8 pool at Llama-3-8B's attention shapes: the kernel's per-tile upcast equals the reference over the
    same values in bf16."""
    rng = np.random.default_rng(8)
    b, hkv, group, s, page, d = 16, 8, 4, 256, 16, 128
    q = jnp.asarray(rng.normal(size=(b, hkv * group, d)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(2, b, hkv, s, page, d)), jnp.float32).astype(jnp.float8_e4m3fn)
    v = jnp.asarray(rng.normal(size=(2, b, hkv, s, page, d)), jnp.float32).astype(jnp.float8_e4m3fn)
    fill = jnp.asarray(rng.integers(0, page + 1, (b, hkv, s)), jnp.int32)
    slots = None if listed is None else jnp.asarray(np.sort(rng.permutation(s)[:listed]) * np.ones((b, hkv, 1),
                                                                                                 np.int64), jnp.int32)
    want, want_mass = kernels.decode_attention(q, k[1].astype(jnp.bfloat16), v[1].astype(jnp.bfloat16), fill, slots,
                                               backend="reference")
    from raas_jax.kernels import pallas_gpu

    for tuning in (pallas_gpu.DEFAULT_TUNING, pallas_gpu.AttentionTuning(pack_fp8=False)):  # uint16 pairs, bytes
        out, mass = pallas_gpu.decode_attention(q, k, v, fill, slots, layer=jnp.int32(1), tuning=tuning)
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)
        np.testing.assert_allclose(np.asarray(mass), np.asarray(want_mass), rtol=2e-2, atol=2e-3)
    # the kernel saturates q at float16's range itself: a NaN must stay NaN (Triton's clip would drop it)
    poisoned, _ = pallas_gpu.decode_attention(q.at[0, 0, 0].set(jnp.nan), k, v, fill, slots, layer=jnp.int32(1))
    assert np.isnan(np.asarray(poisoned[0, 0], np.float32)).all()


def test_pallas_fp8_pool_past_int32_offsets_on_gpu():
    """An FP8 pool of 2.25 Gi values (past Triton's int32 offsets, under its 4 GiB switch to int64) is read as uint16
    pairs: equal to the reference over the same values in bf16."""
    from raas_jax.kernels import pallas_gpu

    b, hkv, group, s, page, d = 4, 8, 4, 18432, 16, 128
    keys = jax.random.split(jax.random.PRNGKey(9), 3)
    q = jax.random.normal(keys[0], (b, hkv * group, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (2, b, hkv, s, page, d), jnp.bfloat16).astype(jnp.float8_e4m3fn)
    v = jax.random.normal(keys[2], (2, b, hkv, s, page, d), jnp.bfloat16).astype(jnp.float8_e4m3fn)
    fill = jnp.full((b, hkv, s), page, jnp.int32).at[:, :, -1].set(3)
    assert not pallas_gpu.offsets_fit(k) and pallas_gpu.supports(q, k, stacked=True)
    out, mass = kernels.decode_attention(q, k, v, fill, layer=jnp.int32(1), backend="pallas")
    want, want_mass = kernels.decode_attention(q, k[1].astype(jnp.bfloat16), v[1].astype(jnp.bfloat16), fill,
                                               backend="reference")
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(mass), np.asarray(want_mass), rtol=2e-2, atol=1e-5)


def test_pallas_refresh_on_gpu():
    """The one-launch RaaS refresh stamps the pages the reference stamps (page bounds in f32 both ways; only
    a near-tie at the top-half boundary, summed in another order, may flip a row)."""
    rng = np.random.default_rng(6)
    layers, b, hkv, group, s, page, d = 3, 64, 8, 4, 64, 16, 128
    pool = random_pool(rng, layers, b, hkv, s, page, d, jnp.bfloat16)
    pool["kmax"] = (pool["kmin"].astype(jnp.float32) + jnp.asarray(rng.random(pool["kmin"].shape))).astype(jnp.bfloat16)
    q = jnp.asarray(rng.normal(size=(b, hkv * group, d)), jnp.bfloat16)
    positions = jnp.asarray(rng.integers(3000, 4000, b), jnp.int32)
    for layer in (0, layers - 1):
        want = np.asarray(kernels.refresh_top_half(q, pool, jnp.int32(layer), positions, page, backend="reference"))
        got = np.asarray(kernels.refresh_top_half(q, pool, jnp.int32(layer), positions, page, backend="pallas"))
        rows_differ = (got != want).any(axis=-1).sum()
        assert rows_differ <= 1, rows_differ
        assert (got != np.asarray(pool["stamp"]))[layer].any()
