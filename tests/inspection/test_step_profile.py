"""`raas-jax bench profile` (raas_jax/inspection/step_profile.py): its reading and plotting of saved step profiles (profiling itself needs a GPU)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script():
    return importlib.import_module("raas_jax.inspection.step_profile")


def test_kernels_fall_into_their_parts():
    category = _script().category
    assert category("anonymous_mosaic_gpu_kernel") == "attention"  # the Mosaic decode attention
    assert category("raas_decode_attention") == "attention"  # the Triton one
    assert category("nvjet_sm90_tst_192x208_64x4_2x1_v_bz_coopB_NNT") == "matmul"
    assert category("raas_refresh_top_half") == category("raas_append_token") == "bookkeeping"
    assert category("loop_multiply_fusion") == "other"


def test_a_saved_profile_reads_back_as_parts_that_sum_to_its_kernel_time(tmp_path):
    script = _script()
    saved = ROOT / "docs" / "results" / "profile_raas_b816_049c1c1.txt"
    wall, parts = script.read_profile(saved)
    assert wall == pytest.approx(49.67)
    assert sum(parts.values()) == pytest.approx(47.42, abs=0.05)  # the table's rows cover every kernel
    assert parts["attention"] == pytest.approx(25.91, abs=0.01) and parts["bookkeeping"] == pytest.approx(2.86, abs=0.01)
    png = script.plot_parts({"049c1c1": saved, "again": saved}, tmp_path / "parts.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_file_that_is_not_a_profile_is_refused(tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("some notes\n")
    with pytest.raises(ValueError, match="not a table written by `raas-jax bench profile`"):
        _script().read_profile(other)
