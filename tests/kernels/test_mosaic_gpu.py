"""The Mosaic GPU decode attention (kernels/mosaic_gpu.py) on a CPU: its pipeline logic in Pallas' GPU interpret mode
against the reference, and its real form (wgmma, layouts, TMA) lowered for CUDA. On the H200: tests/test_gpu.py.

Interpret mode runs the TMA loads and barriers (with a race detector) but completes SMEM -> GMEM copies at once: the
ordering of the kernel's output copies (`wait_smem_to_gmem`) is exercised only on a GPU."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from raas_jax.kernels import mosaic_gpu, reference

from support.kernel_cases import ATTENTION_CASES, attention_params, page_pool


def _interpret_params(**options):
    try:  # GPU interpret mode is JAX-internal (jax >= 0.10); where it is missing these tests cannot run
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError:
        pytest.skip("this JAX has no Pallas GPU interpret mode")
    return InterpretGPUParams(**options)


def _bf16(*arrays):
    return [jnp.asarray(x, jnp.bfloat16) for x in arrays]


def _check(q, k, v, fill, *, layer=None, live=None, tuning=mosaic_gpu.DEFAULT_TUNING):
    out, mass = mosaic_gpu.decode_attention(q, k, v, jnp.asarray(fill), layer=layer, live_slots=live, tuning=tuning,
                                            interpret=_interpret_params())
    k_layer, v_layer = (k, v) if layer is None else (k[layer], v[layer])
    want, want_mass = reference.decode_attention(q, k_layer, v_layer, jnp.asarray(fill))
    # bf16 inputs, float32 products: the kernel and the reference differ by where q is scaled (before or after
    # the product, as the Triton kernel), and the per-slot sums carry ~16 bits (p as two bf16 halves)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(mass), np.asarray(want_mass), rtol=2e-2, atol=2e-3)
    return out, mass


ONE_SPLIT = mosaic_gpu.MosaicTuning(target_programs=1)  # the kernel's out is final: no combine
LIST_FROM_GMEM = mosaic_gpu.MosaicTuning(staged_list=False)  # a slot list read from GMEM, not staged in SMEM first


@pytest.mark.parametrize("tuning", [mosaic_gpu.DEFAULT_TUNING, ONE_SPLIT])
@pytest.mark.parametrize("group,head_dim,page", attention_params())
def test_matches_the_reference_in_interpret_mode(group, head_dim, page, tuning):
    """Two splits (the default at this size) or one (the kernel's out is final); a head with nothing resident
    (page_pool) attends nothing."""
    rng = np.random.default_rng(group + head_dim + page)
    q, k, v, fill = page_pool(rng, 2, 2, group, 256 // page, page, head_dim)  # 256 tokens: two blocks of 128
    assert mosaic_gpu.plan(2, 2, 256 // page, page, tuning)[1] == (2 if tuning is mosaic_gpu.DEFAULT_TUNING else 1)
    out, _ = _check(*_bf16(q, k, v), fill, tuning=tuning)
    assert not np.asarray(out, np.float32)[1, :group].any()


def test_the_default_pipeline_refills_its_buffer_without_races():
    """The default tuning (one buffer per program) over several blocks per split: each block is copied into the
    buffer the previous one was read from, after the products that read it; the race detector would flag a refill
    before them, and the values would be wrong."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    rng = np.random.default_rng(21)
    b, hkv, group, s, page, d = 1, 2, 4, 48, 16, 64
    assert mosaic_gpu.plan(b, hkv, s, page) == (8, 2, 3)  # 6 blocks: 2 splits of 3 through one buffer
    q, k, v, fill = page_pool(rng, 2, hkv, group, s, page, d)
    q, k, v, fill = q[:b], k[:b], v[:b], fill[:b]
    interpret_pallas_call.reset_gpu_interpret_mode_state()
    out, mass = mosaic_gpu.decode_attention(*_bf16(q, k, v), jnp.asarray(fill),
                                            tuning=mosaic_gpu.DEFAULT_TUNING,
                                            interpret=_interpret_params(detect_races=True))
    assert not interpret_pallas_call.get_races().races_found
    want, want_mass = reference.decode_attention(*_bf16(q, k, v), jnp.asarray(fill))
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(mass), np.asarray(want_mass), rtol=2e-2, atol=2e-3)


def test_float16_pages():
    rng = np.random.default_rng(4)
    q, k, v, fill = page_pool(rng, 2, 2, 4, 16, 16, 128)
    _check(*[jnp.asarray(x, jnp.float16) for x in (q, k, v)], fill)


def test_splits_live_bound_and_a_layer_of_a_stacked_pool():
    """Several splits (blocks round-robin), sequences whose live bound ends mid-split or at 0, layer 1 of 3."""
    rng = np.random.default_rng(3)
    layers, b, hkv, group, s, page, d = 3, 3, 2, 4, 64, 16, 64
    q, k, v, _ = page_pool(rng, b, hkv, group, s, page, d)
    k = rng.normal(size=(layers,) + k.shape).astype(np.float32)
    v = rng.normal(size=(layers,) + v.shape).astype(np.float32)
    live = np.array([64, 19, 0], np.int32)
    fill = rng.integers(1, page + 1, (b, hkv, s)).astype(np.int32)
    fill = np.where(np.arange(s)[None, None] < live[:, None, None], fill, 0).astype(np.int32)
    tuning = mosaic_gpu.MosaicTuning(block_tokens=64, stages=2, target_programs=4 * b * hkv)  # 4 splits, 2 stages
    assert mosaic_gpu.plan(b, hkv, s, page, tuning) == (4, 4, 4)
    k_pool, v_pool = _bf16(k, v)
    # blocks past sequence 1's bound (slots 20 on: block 4 holds its last live slot, 18) are not read
    k_pool, v_pool = k_pool.at[:, 1, :, 20:].set(jnp.nan), v_pool.at[:, 1, :, 20:].set(jnp.nan)
    out, mass = mosaic_gpu.decode_attention(jnp.asarray(q, jnp.bfloat16), k_pool, v_pool, jnp.asarray(fill),
                                            layer=jnp.int32(1), live_slots=jnp.asarray(live), tuning=tuning,
                                            interpret=_interpret_params())
    assert np.isfinite(np.asarray(out, np.float32)).all() and np.isfinite(np.asarray(mass)).all()
    want, want_mass = reference.decode_attention(jnp.asarray(q, jnp.bfloat16), *_bf16(k[1], v[1]), jnp.asarray(fill))
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(mass), np.asarray(want_mass), rtol=2e-2, atol=2e-3)
    assert not np.asarray(mass)[2].any() and not np.asarray(out, np.float32)[2].any()  # nothing live: zeros


@pytest.mark.parametrize("tuning", [mosaic_gpu.DEFAULT_TUNING, ONE_SPLIT, LIST_FROM_GMEM])
@pytest.mark.parametrize("group,head_dim,page", attention_params([c for c in ATTENTION_CASES if c[2] >= 8]))
def test_slot_lists_match_the_reference_in_interpret_mode(group, head_dim, page, tuning):
    """Quest's selected pages: block i holds the pages listed at its positions (one TMA copy per page), -1 entries
    (no page) and a head whose pages are all empty attend nothing; layer 1 of a stacked pool, with the race detector
    on (several copies arrive on one barrier)."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    rng = np.random.default_rng(group + head_dim + page + 1)
    layers, b, hkv, s = 2, 2, 2, 2 * 512 // page
    listed = 256 // page  # two blocks of 128 tokens
    q, _, _, fill = page_pool(rng, b, hkv, group, s, page, head_dim)
    k = rng.normal(size=(layers, b, hkv, s, page, head_dim)).astype(np.float32)
    v = rng.normal(size=(layers, b, hkv, s, page, head_dim)).astype(np.float32)
    slots = np.sort(np.stack([[rng.choice(s, listed, replace=False) for _ in range(hkv)] for _ in range(b)]), -1)
    slots[0, 1, -3:] = -1
    slots = jnp.asarray(slots, jnp.int32)
    q, k, v = _bf16(q, k, v)
    interpret_pallas_call.reset_gpu_interpret_mode_state()
    out, mass = mosaic_gpu.decode_attention(q, k, v, jnp.asarray(fill), slots, layer=jnp.int32(1), tuning=tuning,
                                            interpret=_interpret_params(detect_races=True))
    assert not interpret_pallas_call.get_races().races_found
    want, want_mass = reference.decode_attention(q, k[1], v[1], jnp.asarray(fill), slots)
    assert mass.shape == (b, hkv, listed)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(mass), np.asarray(want_mass), rtol=2e-2, atol=2e-3)
    assert not np.asarray(mass)[0, 1, -3:].any()


@pytest.mark.parametrize("batch,tokens,splits", [
    (20, 32768, 8), (17, 32768, 8), (24, 32768, 8), (12, 32768, 8),  # 1-2 waves at 256: more, down to 32 blocks
    (1, 1024, 8), (1, 4096, 32), (32, 1024, 1), (32, 4096, 1), (32, 32768, 1),  # one wave or less: as before
    (128, 4096, 1), (816, 2048, 1),  # several waves already
    (20, 1024, 2), (20, 4096, 2)])  # splits of fewer than 64 blocks are not halved
def test_programs_fill_one_wave_or_several(batch, tokens, splits):
    """Between one and four waves of co-resident programs (264 on 132 SMs), the splits keep doubling: measured on
    an H200, 320 programs of Dense B=20 32K were the slowest split count (docs/kernels.md)."""
    block_slots, got, per_split = mosaic_gpu.plan(batch, 8, tokens // 16, 16)
    assert (block_slots, got, per_split) == (8, splits, tokens // 128 // splits)
    rule = mosaic_gpu.MosaicTuning(full_waves=0)  # the plain doubling to target_programs
    assert mosaic_gpu.plan(20, 8, 32768 // 16, 16, rule)[1] == 2


def test_a_staged_list_is_laid_out_in_whole_tma_rows():
    assert mosaic_gpu.list_width(128) == 64 and mosaic_gpu.list_width(48) == 16 and mosaic_gpu.list_width(8) == 8
    assert mosaic_gpu.list_width(2048) == 64  # 32 rows of 64: 8 KB, the most staged
    assert mosaic_gpu.list_width(4096) is None  # more would crowd a second program out of the SM
    assert mosaic_gpu.list_width(6) is None  # rows of 2 entries: under TMA's 16 bytes


def test_slot_lists_need_whole_smem_tiles_per_page():
    q, k = jnp.zeros((2, 8, 128), jnp.bfloat16), jnp.zeros((2, 2, 64, 16, 128), jnp.bfloat16)
    slots = jnp.zeros((2, 2, 16), jnp.int32)
    assert mosaic_gpu.supports(q, k, slots)
    assert not mosaic_gpu.supports(q, jnp.zeros((2, 2, 256, 4, 128), jnp.bfloat16), slots)  # 4-token pages


def test_the_per_slot_sums_keep_float32_precision():
    """The slot mass goes through a bf16 product (p @ E); as two halves it stays within ~1e-5 of the float32 sums,
    where one bf16 product is off by up to 2^-9 of each value."""
    rng = np.random.default_rng(11)
    q, k, v, fill = page_pool(rng, 2, 2, 4, 16, 16, 64)
    q, k, v = _bf16(q, k, v)
    want = np.asarray(reference.decode_attention(q, k, v, jnp.asarray(fill))[1])
    errors = {}
    for exact in (True, False):
        tuning = mosaic_gpu.MosaicTuning(exact_sums=exact)
        mass = mosaic_gpu.decode_attention(q, k, v, jnp.asarray(fill), tuning=tuning, interpret=_interpret_params())[1]
        errors[exact] = np.abs(np.asarray(mass) - want).max()
    assert errors[True] < 1e-5 < errors[False], errors


def _lowered(group, head_dim, tuning, dtype=jnp.bfloat16, s=64, page=16, listed=None):
    layers, b, hkv = 2, 4, 8
    q = jax.ShapeDtypeStruct((b, hkv * group, head_dim), dtype)
    k = jax.ShapeDtypeStruct((layers, b, hkv, s, page, head_dim), dtype)
    fill = jax.ShapeDtypeStruct((b, hkv, s), jnp.int32)
    live = jax.ShapeDtypeStruct((b,), jnp.int32)
    slots = None if listed is None else jax.ShapeDtypeStruct((b, hkv, listed), jnp.int32)

    def attend(q, k, v, fill, live, slots):
        return mosaic_gpu.decode_attention(q, k, v, fill, slots, layer=jnp.int32(1), live_slots=live, tuning=tuning)

    return jax.jit(attend).trace(q, k, k, fill, live, slots).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("tuning", [mosaic_gpu.DEFAULT_TUNING, mosaic_gpu.MosaicTuning(64, 3, 528),
                                    mosaic_gpu.MosaicTuning(128, 2, 264, exact_sums=False), ONE_SPLIT,
                                    mosaic_gpu.MosaicTuning(256, 1, 256)])
@pytest.mark.parametrize("group,head_dim,dtype", [(4, 128, jnp.bfloat16), (7, 64, jnp.bfloat16),
                                                  (16, 128, jnp.float16)])
def test_the_gpu_form_lowers_for_cuda(tuning, group, head_dim, dtype):
    """wgmma with transposed operands, the layouts of the softmax, TMA copies (q's rows read in place, the final
    out stored transposed at one split): Mosaic GPU checks them while lowering, which runs on a CPU
    (`lowering_platforms`); one Mosaic GPU call, nothing else but XLA ops."""
    text = _lowered(group, head_dim, tuning, dtype)
    assert re.findall(r"stablehlo.custom_call @(\w+)", text) == ["mosaic_gpu_v2"]


@pytest.mark.parametrize("page,tuning", [(16, mosaic_gpu.DEFAULT_TUNING), (8, mosaic_gpu.DEFAULT_TUNING),
                                         (32, mosaic_gpu.MosaicTuning(64, 3, 528)), (16, ONE_SPLIT),
                                         (16, LIST_FROM_GMEM)])
def test_the_slot_list_form_lowers_for_cuda(page, tuning):
    """One TMA copy per listed page into its rows of the block's SMEM buffer, all arriving on one barrier."""
    text = _lowered(4, 128, tuning, s=64, page=page, listed=32)
    assert re.findall(r"stablehlo.custom_call @(\w+)", text) == ["mosaic_gpu_v2"]


@pytest.mark.parametrize("group,head_dim,tokens,stages", [(16, 128, 128, 3), (8, 128, 128, 4), (8, 64, 128, 7),
                                                          (8, 128, 64, 7), (8, 128, 128, 3), (16, 64, 64, 12)])
def test_the_smem_estimate_bounds_what_lowering_allocates(group, head_dim, tokens, stages):
    """`supports` refuses what would not fit in SMEM (the lowering's own check, which it reports in bytes):
    the estimate is above the allocation and within 2 KB of it."""
    tuning = mosaic_gpu.MosaicTuning(tokens, stages, 8)
    estimate = mosaic_gpu.smem_bytes(8 * -(-group // 8), head_dim, tokens, stages)
    try:
        _lowered(group, head_dim, tuning, s=16 * stages * tokens // 16)
        assert estimate <= mosaic_gpu.SMEM_BYTES + 2048  # it fit: the estimate did not refuse far below the limit
    except ValueError as e:
        allocated = int(re.search(r"smem_bytes=(\d+)", str(e)).group(1))
        assert allocated <= estimate <= allocated + 2048
        assert estimate > mosaic_gpu.SMEM_BYTES


def test_supports_only_what_the_kernel_takes():
    q = jnp.zeros((2, 8, 128), jnp.bfloat16)
    k = jnp.zeros((2, 2, 16, 16, 128), jnp.bfloat16)
    assert mosaic_gpu.supports(q, k)
    assert mosaic_gpu.supports(q, k[None], stacked=True)
    assert not mosaic_gpu.supports(q, k.astype(jnp.float8_e4m3fn))  # FP8 pages: the Triton kernel
    assert not mosaic_gpu.supports(q, k, slots=jnp.zeros((2, 2, 4), jnp.int32))  # a list of less than a block: Triton
    assert not mosaic_gpu.supports(q[..., :96], k[..., :96])  # head dims other than 64 and 128
    assert mosaic_gpu.supports(q.astype(jnp.float16), k.astype(jnp.float16))
    assert not mosaic_gpu.supports(q.astype(jnp.float16), k)  # q and the pages in one dtype
    wide = jnp.zeros((2, 2 * 24, 128), jnp.bfloat16)  # a group of 24 (24 padded heads): not run on a GPU
    assert mosaic_gpu.supports(wide[:, :32], k) and not mosaic_gpu.supports(wide, k)
    assert not mosaic_gpu.supports(q.astype(jnp.float32), k.astype(jnp.float32))  # wgmma takes 16-bit here
    assert not mosaic_gpu.supports(q, k[:, :, :12])  # 12 slots: no whole 128-token block
    if jax.default_backend() == "cpu":
        assert not mosaic_gpu.available()  # the dispatch never picks it here
