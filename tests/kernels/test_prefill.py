"""Prefill attention without T x T memory (kernels/prefill.py) against the reference: the blockwise passes, the
kernels' wrappers (interpret mode / XLA stand-in on CPU, lowering for GPU and TPU), chunk attention over a pool."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from raas_jax.kernels import dispatch as kernels
from raas_jax.kernels import prefill, reference


def prompt_case(lengths, t, hkv, group, d, seed=0, dtype=np.float32):
    """Right-padded prompts: q [B,T,Hq,D], k/v [B,T,Hkv,D], positions [B,T] (0.. then -1)."""
    rng = np.random.default_rng(seed)
    b = len(lengths)
    q = jnp.asarray(rng.normal(size=(b, t, hkv * group, d)), dtype)
    k = jnp.asarray(rng.normal(size=(b, t, hkv, d)), dtype)
    v = jnp.asarray(rng.normal(size=(b, t, hkv, d)), dtype)
    ids = np.arange(t)[None]
    positions = jnp.asarray(np.where(ids < np.asarray(lengths)[:, None], ids, -1), jnp.int32)
    return q, k, v, positions


def valid_rows(out, positions):
    return np.where(np.asarray(positions >= 0)[..., None, None], np.asarray(out, np.float32), 0)


SHAPES = {  # lengths, T, Hkv, group, D
    "mha-padding": ([37, 20, 1], 37, 2, 1, 16),
    "gqa4": ([64, 50], 64, 2, 4, 32),
    "mqa-odd": ([29, 29, 3], 29, 1, 6, 8),
}


def test_dispatch_picks_the_reference_on_cpu():
    assert jax.default_backend() == "cpu"
    assert prefill.choose_implementation("auto", jnp.float32) == "reference"
    assert prefill.choose_implementation("pallas", jnp.bfloat16) == "reference"
    assert prefill.choose_implementation("auto", jnp.bfloat16, platform="gpu") == "cudnn"
    assert prefill.choose_implementation("auto", jnp.float32, platform="gpu") == "pallas_gpu"
    assert prefill.choose_implementation("auto", jnp.bfloat16, platform="tpu") == "pallas_tpu"
    assert prefill.choose_implementation("reference", jnp.bfloat16, platform="gpu") == "reference"
    q, k, v, pos = prompt_case(*SHAPES["gqa4"])
    out, mass = kernels.causal_attention(q, k, v, pos, pos, return_key_mass=True)
    ref, ref_mass = reference.causal_attention(q, k, v, pos, pos, return_key_mass=True)
    assert np.array_equal(np.asarray(out), np.asarray(ref)) and np.array_equal(np.asarray(mass), np.asarray(ref_mass))
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.causal_attention(q, k, v, pos, pos, backend="cuda")
    with pytest.raises(ValueError, match="unknown prefill implementation"):
        prefill.causal_attention(q, k, v, pos, pos, implementation="flash")


@pytest.mark.parametrize("case", sorted(SHAPES))
@pytest.mark.parametrize("blocks", [(8, 8), (256, 512)])
def test_blockwise_attention_matches_the_reference(case, blocks):
    q, k, v, pos = prompt_case(*SHAPES[case])
    ref = reference.causal_attention(q, k, v, pos, pos)
    out, lse = prefill.blockwise_attention(q, k, v, pos, pos, block_q=blocks[0], block_k=blocks[1])
    np.testing.assert_allclose(valid_rows(out, pos), valid_rows(ref, pos), rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(lse)[np.asarray(pos >= 0)]).all()
    assert np.isneginf(np.asarray(lse)[np.asarray(pos < 0)]).all()  # padding rows see no key: zeros, lse -inf
    assert (np.asarray(out)[np.asarray(pos < 0)] == 0).all()


def test_blockwise_attention_masks_by_position_not_index():
    """Queries at positions 10.. over a longer, shuffled key sequence with holes: the general (reference) rule."""
    rng = np.random.default_rng(7)
    b, t, tk, hkv, group, d = 2, 12, 40, 2, 2, 16
    q = jnp.asarray(rng.normal(size=(b, t, hkv * group, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, tk, hkv, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, tk, hkv, d)), jnp.float32)
    q_pos = jnp.asarray(np.stack([np.arange(10, 10 + t), np.r_[np.arange(10, 18), [-1] * 4]]), jnp.int32)
    k_pos = np.stack([rng.permutation(tk), rng.permutation(tk)])
    k_pos[:, ::7] = -1
    k_pos = jnp.asarray(k_pos, jnp.int32)
    ref = reference.causal_attention(q, k, v, q_pos, k_pos)
    out = prefill.causal_attention(q, k, v, q_pos, k_pos, implementation="blockwise")
    np.testing.assert_allclose(valid_rows(out, q_pos), valid_rows(ref, q_pos), rtol=1e-5, atol=1e-5)
    mass = prefill.blockwise_key_mass(q, k, q_pos, k_pos, block_q=4)
    np.testing.assert_allclose(mass, reference.key_mass(q, k, q_pos, k_pos), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", sorted(SHAPES))
@pytest.mark.parametrize("block_q", [1, 8, None])
def test_blockwise_key_mass_matches_the_reference(case, block_q):
    q, k, v, pos = prompt_case(*SHAPES[case], seed=3)
    ref = reference.key_mass(q, k, pos, pos)  # [B, Hkv, G, T]
    mass = prefill.blockwise_key_mass(q, k, pos, pos, block_q=block_q)
    np.testing.assert_allclose(mass, ref, rtol=1e-5, atol=1e-5)
    _, pooled = reference.causal_attention(q, k, v, pos, pos, return_key_mass=True)
    _, blockwise_pooled = prefill.causal_attention(q, k, v, pos, pos, return_key_mass=True,
                                                   implementation="blockwise")
    np.testing.assert_allclose(blockwise_pooled, pooled, rtol=1e-5, atol=1e-5)
    assert np.allclose(np.asarray(mass).sum(-1), (np.asarray(pos) >= 0).sum(-1)[:, None, None], rtol=1e-5)


def test_key_mass_block_fits_its_memory_budget():
    assert prefill.mass_block(1, 32, 32768) == 64  # 32 heads x 64 rows x 32K keys x 4 B = 256 MiB
    assert prefill.mass_block(16, 32, 8192) == 16
    assert prefill.mass_block(1, 4, 64) == prefill.BLOCK_Q
    assert prefill.mass_block(64, 64, 1 << 20) == 1


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_kernel_wrappers_match_the_reference(case):
    """cuDNN's call run by XLA on the CPU (same arguments, `implementation="xla"`) and the Pallas GPU op in
    interpret mode, on right-padded prompts (T not a multiple of the tile)."""
    q, k, v, pos = prompt_case(*SHAPES[case], seed=5)
    scale = q.shape[-1] ** -0.5
    ref = valid_rows(reference.causal_attention(q, k, v, pos, pos), pos)
    np.testing.assert_allclose(valid_rows(prefill.sdpa_prompt(q, k, v, pos, scale, sdpa="xla"), pos), ref,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(valid_rows(prefill.pallas_gpu_prompt(q, k, v, pos, scale, interpret=True), pos), ref,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl,platform,marker", [("pallas_tpu", "tpu", "tpu_custom_call"),
                                                  ("pallas_gpu", "cuda", "triton")])
def test_kernels_lower_for_their_platform(impl, platform, marker):
    b, t, hkv, group, d = 2, 200, 2, 4, 64
    q = jax.ShapeDtypeStruct((b, t, hkv * group, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, t, hkv, d), jnp.bfloat16)
    pos = jax.ShapeDtypeStruct((b, t), jnp.int32)
    attention = jax.jit(lambda q, k, v, p: prefill.causal_attention(q, k, v, p, p, implementation=impl))
    text = attention.trace(q, kv, kv, pos).lower(lowering_platforms=(platform,)).as_text()
    assert marker in text


def test_a_refused_kernel_hands_over_to_the_next(monkeypatch):
    def refuse(*args, **kwargs):
        raise NotImplementedError("not this case")

    q, k, v, pos = prompt_case(*SHAPES["gqa4"])
    monkeypatch.setattr(prefill, "sdpa_prompt", refuse)
    monkeypatch.setattr(prefill, "pallas_gpu_prompt", refuse)
    monkeypatch.setattr(prefill, "choose_implementation", lambda *a, **k: "cudnn")
    out = prefill.causal_attention(q, k, v, pos, pos)  # cudnn -> pallas_gpu -> blockwise
    np.testing.assert_allclose(valid_rows(out, pos), valid_rows(reference.causal_attention(q, k, v, pos, pos), pos),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError):  # a forced implementation is not replaced
        prefill.causal_attention(q, k, v, pos, pos, implementation="cudnn")


def identity_pool(k, v, page, slots):
    """The prompt's keys/values in a page pool, page j in slot j: [B, Hkv, S, P, D]."""
    b, t, hkv, d = k.shape
    pool = np.zeros((2, b, hkv, slots * page, d), np.float32)
    pool[0, :, :, :t] = np.asarray(k).transpose(0, 2, 1, 3)
    pool[1, :, :, :t] = np.asarray(v).transpose(0, 2, 1, 3)
    pool = pool.reshape(2, b, hkv, slots, page, d)
    return jnp.asarray(pool[0]), jnp.asarray(pool[1])


@pytest.mark.parametrize("impl", ["reference", "blockwise"])
@pytest.mark.parametrize("chunk,page", [pytest.param(16, 4, marks=pytest.mark.slow), (24, 8),
                                        pytest.param(48, 16, marks=pytest.mark.slow)])  # the sizes: slow
def test_chunks_over_the_pool_equal_the_whole_prompt(impl, chunk, page):
    """Each chunk's queries over the pool (the earlier chunks) and the chunk itself give the whole prompt's
    attention; summed over chunks, the key masses give the whole prompt's."""
    lengths = [45, 20, 33]
    q, k, v, pos = prompt_case(lengths, 48, 2, 3, 16, seed=11)
    k_pool, v_pool = identity_pool(k, v, page, slots=64 // page)
    stacked_k, stacked_v = jnp.stack([jnp.zeros_like(k_pool), k_pool]), jnp.stack([jnp.zeros_like(v_pool), v_pool])
    ref = valid_rows(reference.causal_attention(q, k, v, pos, pos), pos)
    total = 0
    for start in range(0, 48, chunk):
        part = slice(start, start + chunk)
        out = prefill.chunk_attention(q[:, part], k[:, part], v[:, part], pos[:, part], stacked_k, stacked_v,
                                      layer=jnp.int32(1), implementation=impl)
        np.testing.assert_allclose(valid_rows(out, pos[:, part]), ref[:, part], rtol=1e-5, atol=1e-5)
        total = total + prefill.chunk_key_mass(q[:, part], pos[:, part], k_pool, implementation=impl)
    total = np.asarray(total)
    np.testing.assert_allclose(total[..., :48], reference.key_mass(q, k, pos, pos), rtol=1e-5, atol=1e-5)
    assert (total[..., 48:] == 0).all()


def test_merge_of_two_key_sets_is_attention_over_their_union():
    q, k, v, pos = prompt_case([30, 30], 30, 2, 2, 16, seed=2)
    ids = np.arange(30)
    first = jnp.asarray(np.where(ids < 13, ids, -1)[None].repeat(2, 0), jnp.int32)
    second = jnp.asarray(np.where(ids >= 13, ids, -1)[None].repeat(2, 0), jnp.int32)
    parts = [prefill.blockwise_attention(q, k, v, pos, key_pos) for key_pos in (first, second)]
    merged = prefill.merge_attention(*parts)
    np.testing.assert_allclose(merged, reference.causal_attention(q, k, v, pos, pos), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cudnn_prompt_and_chunks_match_the_f32_reference():
    """bf16 on the GPU: the whole prompt through cuDNN, chunks through cuDNN (two parts merged by their f32
    log-sum-exp) and through the blockwise fallback, against the f32 reference."""
    lengths = [1000, 700, 1]
    q, k, v, pos = prompt_case(lengths, 1024, 8, 4, 128, seed=4)
    ref = valid_rows(reference.causal_attention(q, k, v, pos, pos), pos)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]

    def error(out, rows=slice(None)):
        got = valid_rows(out, pos[:, rows])
        return np.linalg.norm(got - ref[:, rows]) / np.linalg.norm(ref[:, rows])

    assert prefill.choose_implementation("auto", jnp.bfloat16) == "cudnn"
    assert error(prefill.causal_attention(*bf, pos, pos, implementation="cudnn")) < 1e-2
    assert error(prefill.causal_attention(*bf, pos, pos, implementation="pallas_gpu")) < 1e-2
    k_pool, v_pool = (x.astype(jnp.bfloat16) for x in identity_pool(k, v, 16, 128))
    for impl in ("cudnn", "blockwise"):
        for start in range(0, 1024, 256):
            part = slice(start, start + 256)
            out = prefill.chunk_attention(bf[0][:, part], bf[1][:, part], bf[2][:, part], pos[:, part], k_pool, v_pool,
                                          implementation=impl)
            assert error(out, part) < 1e-2, (impl, start)
