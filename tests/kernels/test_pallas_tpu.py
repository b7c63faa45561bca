"""Pallas TPU kernels (kernels/pallas_tpu.py) against the jnp reference, on CPU in TPU interpret mode
(`pltpu.InterpretParams()`: HBM, VMEM, SMEM, DMAs and semaphores simulated), and their lowering for the TPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax.experimental.pallas import tpu as pltpu

from raas_jax.kernels import dispatch as kernels
from raas_jax.kernels import pallas_tpu

from support.kernel_cases import ATTENTION_CASES, TOP_K_CASES, attention_params, page_pool, top_k_scores

SMALL_BLOCKS = 64  # tokens per DMA block: several blocks per head, so the double buffer and online softmax work


def _slot_lists(rng, b, hkv, s, listed):
    slots = np.stack([[rng.permutation(s)[:listed] for _ in range(hkv)] for _ in range(b)]).astype(np.int32)
    slots[0, 1, -3:] = -1  # fewer resident pages than the budget: padded with -1
    return slots


def _assert_attention_close(got, want):
    (out, mass), (ref_out, ref_mass) = got, want
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype and mass.shape == ref_mass.shape
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(mass), np.asarray(ref_mass), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group,head_dim,page", attention_params())
def test_decode_attention_matches_reference(group, head_dim, page):
    rng = np.random.default_rng(group * 100 + head_dim + page)
    q, k, v, fill = page_pool(rng, 2, 2, group, 32, page, head_dim)
    want = kernels.decode_attention(q, k, v, fill, backend="reference")
    # default blocks through the dispatch (1 or 2 blocks per head here), then small ones (8 or 16 per head)
    _assert_attention_close(kernels.decode_attention(q, k, v, fill, backend="pallas_tpu"), want)
    _assert_attention_close(pallas_tpu.decode_attention(q, k, v, fill, interpret=True, block_tokens=SMALL_BLOCKS),
                            want)


@pytest.mark.parametrize("group,head_dim,page", attention_params())
def test_slot_list_matches_reference(group, head_dim, page):
    rng = np.random.default_rng(group * 1000 + head_dim + page)
    b, hkv, s, listed = 2, 2, 32, 8
    q, k, v, fill = page_pool(rng, b, hkv, group, s, page, head_dim)
    slots = _slot_lists(rng, b, hkv, s, listed)
    want = kernels.decode_attention(q, k, v, fill, slots, backend="reference")
    assert want[1].shape == (b, hkv, listed)
    _assert_attention_close(kernels.decode_attention(q, k, v, fill, slots, backend="pallas_tpu"), want)
    _assert_attention_close(pallas_tpu.decode_attention(q, k, v, fill, slots, interpret=True,  # one grid step
                                                        block_tokens=SMALL_BLOCKS, heads_per_step=4), want)


# stacked pools with a traced layer index: tests/kernels/test_kernels.py, for every backend


def test_bf16_pool_matches_reference():
    """The accelerator dtype: bf16 pages are 16-row tiles, q and the probabilities are rounded as the reference
    rounds them; products accumulate in float32 in both."""
    rng = np.random.default_rng(11)
    q, k, v, fill = (jnp.asarray(x) for x in page_pool(rng, 2, 2, 4, 16, 16, 128))
    q, k, v = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
    slots = _slot_lists(rng, 2, 2, 16, 8)
    for listed in (None, slots):
        out, mass = pallas_tpu.decode_attention(q, k, v, fill, listed, interpret=True, block_tokens=SMALL_BLOCKS,
                                                heads_per_step=1)  # one KV head per grid step
        ref_out, ref_mass = kernels.decode_attention(q, k, v, fill, listed, backend="reference")
        assert out.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), rtol=2e-2,
                                   atol=2e-2)
        np.testing.assert_allclose(np.asarray(mass), np.asarray(ref_mass), rtol=1e-4, atol=1e-5)


def test_double_buffer_has_no_races():
    """DMAs executed as soon as they start (`dma_execution_mode="eager"`) under the interpreter's race detector:
    the next block lands in the other buffer half while the current one is read, across heads and sequences."""
    try:
        from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter
    except ImportError:  # a private module: the detector's result is read from it
        pytest.skip("this jax has no jax._src.pallas.mosaic.interpret.interpret_pallas_call to read races from")
    rng = np.random.default_rng(13)
    q, k, v, fill = page_pool(rng, 2, 2, 4, 16, 16, 64)
    slots = _slot_lists(rng, 2, 2, 16, 8)
    params = pltpu.InterpretParams(dma_execution_mode="eager", detect_races=True)
    for listed in (None, slots):
        got = pallas_tpu.decode_attention(q, k, v, fill, listed, interpret=params, block_tokens=64, heads_per_step=4)
        _assert_attention_close(got, kernels.decode_attention(q, k, v, fill, listed, backend="reference"))
        assert not tpu_interpreter.races.races_found


# page scores at GQA groups 1/4/7/8 and head_dim 64/128: tests/kernels/test_kernels.py, for both Pallas backends


def test_page_scores_in_blocks_of_slots():
    """S = 384: three grid steps of 128 slots (lanes of the output block) per head."""
    rng = np.random.default_rng(3)
    q = rng.normal(size=(1, 4, 64)).astype(np.float32)
    kmin = rng.normal(size=(1, 2, 384, 64)).astype(np.float32)
    kmax = rng.normal(size=kmin.shape).astype(np.float32)  # kmin > kmax in places: the bound still matches
    fill = rng.integers(0, 2, (1, 2, 384)).astype(np.int32)
    assert pallas_tpu.score_block_slots(384, 128) == 128
    got = np.asarray(pallas_tpu.page_scores(q, kmin, kmax, fill, interpret=True, block_slots=128))
    ref = np.asarray(kernels.page_scores(q, kmin, kmax, fill, backend="reference"))
    assert (np.isneginf(got) == np.isneginf(ref)).all()
    np.testing.assert_allclose(got[~np.isneginf(ref)], ref[~np.isneginf(ref)], rtol=1e-5, atol=1e-4)


def _check_top_k(log_slots, k, seed, kind):
    scores = top_k_scores(log_slots, seed, kind)  # 6 rows: padded to 8 sublanes
    got = np.asarray(pallas_tpu.top_k_mask(scores, k, interpret=True))
    want = np.asarray(kernels.top_k_mask(scores, k, backend="reference"))
    assert (got == want).all()
    assert (got.sum(-1) == min(k, scores.shape[-1])).all()


@settings(max_examples=8, deadline=None)
@given(*TOP_K_CASES)
def test_top_k_mask_equals_lax_top_k(log_slots, k, seed, kind):
    _check_top_k(log_slots, k, seed, kind)


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(*TOP_K_CASES)
def test_top_k_mask_equals_lax_top_k_more_cases(log_slots, k, seed, kind):
    _check_top_k(log_slots, k, seed, kind)


def test_top_k_mask_odd_rows_and_all_ties():
    scores = np.zeros((3, 7, 1536), np.float32)  # 21 rows: two grid steps of 16; S not a power of two; all tied
    assert pallas_tpu.top_k_block_rows(21, 1536) == 16
    scores[1, 2, 7] = -0.0  # -0.0 ranks just below +0.0, as in lax.top_k
    scores[2, 6, 1000:1010] = 1.0
    for k in (0, 1, 13, 1536):
        got = np.asarray(kernels.top_k_mask(scores, k, backend="pallas_tpu"))
        np.testing.assert_array_equal(got, np.asarray(kernels.top_k_mask(scores, k, backend="reference")))


def test_unsupported_shapes_fall_back_and_bad_input_is_refused():
    rng = np.random.default_rng(5)
    q, k, v, fill = page_pool(rng, 2, 2, 2, 6, 4, 16)  # pages of 4 rows, head_dim 16: not whole VMEM tiles
    assert not pallas_tpu.supports(q, k)
    got = kernels.decode_attention(q, k, v, fill, backend="pallas_tpu")
    _assert_attention_close(got, kernels.decode_attention(q, k, v, fill, backend="reference"))
    with pytest.raises(ValueError, match="does not take"):
        pallas_tpu.decode_attention(q, k, v, fill, interpret=True)
    with pytest.raises(ValueError, match="fill must be"):
        kernels.decode_attention(q, k, v, fill[:, :, :3], backend="pallas_tpu")
    with pytest.raises(ValueError, match="q must be"):
        kernels.decode_attention(q[:, :3], k, v, fill, backend="pallas_tpu")
    with pytest.raises(ValueError, match="slots must be"):
        kernels.decode_attention(q, k, v, fill, np.zeros((2, 5), np.int32), backend="pallas_tpu")
    q, k, v, fill = page_pool(rng, 2, 2, 2, 6, 16, 64)
    with pytest.raises(ValueError, match="must divide"):
        pallas_tpu.decode_attention(q, k, v, fill, interpret=True, heads_per_step=3)  # of B * Hkv = 4
    with pytest.raises(ValueError, match=r"\[L, B, Hkv, S, P, D\]"):
        kernels.decode_attention(q, k, v, fill, layer=0, backend="pallas_tpu")
    big_list = jax.ShapeDtypeStruct((64, 8, 512), jnp.int32)  # 2^18 entries: more than SMEM holds
    pool = jax.ShapeDtypeStruct((64, 8, 512, 16, 128), jnp.bfloat16)
    assert pallas_tpu.supports(jax.ShapeDtypeStruct((64, 32, 128), jnp.bfloat16), pool)
    assert not pallas_tpu.supports(jax.ShapeDtypeStruct((64, 32, 128), jnp.bfloat16), pool, big_list)


def test_backend_names_and_auto(monkeypatch):
    assert "pallas_tpu" in kernels.BACKENDS
    assert kernels.resolve("auto") == "reference"  # this machine: CPU
    assert kernels.resolve("pallas_tpu") == "pallas_tpu"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert kernels.resolve("auto") == "pallas_tpu"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert kernels.resolve("auto") == "pallas"


def test_block_sizes():
    assert pallas_tpu.block_slots_for(128, 16) == 32  # 512 tokens per DMA block
    assert pallas_tpu.block_slots_for(48, 16, 256) == 16
    assert pallas_tpu.block_slots_for(7, 16) == 7  # a prime count of slots: one block of them all
    assert pallas_tpu.block_slots_for(2048, 32) == 16
    assert pallas_tpu.score_block_slots(96) == 96 and pallas_tpu.score_block_slots(2048) == 512
    assert pallas_tpu.heads_per_step_for(64 * 8, 128) == 64  # B = 64, 8 KV heads: 8 steps of 64 heads
    assert pallas_tpu.heads_per_step_for(8, 128) == 4  # B = 1: two steps, one per TensorCore of a megacore
    assert pallas_tpu.heads_per_step_for(32 * 8, 2048) == 16  # long pools: fill blocks kept to 128 KiB of SMEM
    assert pallas_tpu.top_k_block_rows(512, 128) == 256 and pallas_tpu.top_k_block_rows(6, 64) == 8


def test_kernels_lower_to_mosaic_for_tpu():
    """Lower for the TPU platform on this CPU-only machine: Pallas emits the Mosaic (tpu dialect) module and
    wraps it in a `tpu_custom_call`. This checks the Pallas -> Mosaic lowering (block shapes against the (8, 128)
    rule, scalar prefetch, DMAs, semaphores, SMEM/VMEM refs); Mosaic's own layout passes run only in the TPU
    compiler (not in the CPU jaxlib), so a TPU can still reject a kernel that lowers here."""
    layers, b, hkv, group, s, page, d = 4, 8, 8, 4, 128, 16, 128
    q = jax.ShapeDtypeStruct((b, hkv * group, d), jnp.bfloat16)
    pool = jax.ShapeDtypeStruct((layers, b, hkv, s, page, d), jnp.bfloat16)
    bounds = jax.ShapeDtypeStruct((layers, b, hkv, s, d), jnp.bfloat16)
    fill = jax.ShapeDtypeStruct((b, hkv, s), jnp.int32)
    slots = jax.ShapeDtypeStruct((b, hkv, 32), jnp.int32)
    layer = jax.ShapeDtypeStruct((), jnp.int32)
    scores = jax.ShapeDtypeStruct((b, hkv, s), jnp.float32)
    calls = [  # (kernel name, function, abstract arguments)
        ("raas_tpu_decode_attention", lambda q, k, f, i: pallas_tpu.decode_attention(q, k, k, f, layer=i),
         (q, pool, fill, layer)),
        ("raas_tpu_decode_attention", lambda q, k, f, sl, i: pallas_tpu.decode_attention(q, k, k, f, sl, layer=i),
         (q, pool, fill, slots, layer)),
        ("raas_tpu_page_scores", lambda q, m, f, i: pallas_tpu.page_scores(q, m, m, f, layer=i),
         (q, bounds, fill, layer)),
        ("raas_tpu_top_k_mask", lambda x: pallas_tpu.top_k_mask(x, 64), (scores,)),
    ]
    for name, fn, args in calls:
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
        assert text.count("stablehlo.custom_call @tpu_custom_call") == 1, name
        assert f'kernel_name = "{name}"' in text, name
        call = next(line for line in text.splitlines() if "@tpu_custom_call" in line)
        operand_types = call.rsplit(" : (", 1)[1].split(") ->")[0]
        if name != "raas_tpu_top_k_mask":  # the pool / bounds of every layer go in whole: read in place
            assert f"tensor<{'x'.join(map(str, args[1].shape))}xbf16>" in operand_types, name
            assert "dynamic_slice" not in text and "gather" not in text, name


@pytest.mark.slow
@pytest.mark.parametrize("group,head_dim,page", ATTENTION_CASES)
def test_larger_pools_match_reference(group, head_dim, page):
    """Slot counts that are not powers of two (blocks of a divisor), an odd batch, longer slot lists, and 3 or 2
    (sequence, KV head) pairs per grid step (steps that start mid-sequence)."""
    rng = np.random.default_rng(group * 7 + head_dim + page)
    b, hkv, s = 3, 2, 48
    q, k, v, fill = page_pool(rng, b, hkv, group, s, page, head_dim)
    slots = _slot_lists(rng, b, hkv, s, 24)
    for listed in (None, slots):
        want = kernels.decode_attention(q, k, v, fill, listed, backend="reference")
        for block_tokens, heads_per_step in ((pallas_tpu.BLOCK_TOKENS, None), (128, 2)):
            _assert_attention_close(pallas_tpu.decode_attention(q, k, v, fill, listed, interpret=True,
                                                                block_tokens=block_tokens,
                                                                heads_per_step=heads_per_step), want)
