"""The kernel benchmark's machinery on a CPU (interpreted Pallas, tiny shapes): every family is timed and checked."""

from __future__ import annotations

import json

import pytest

from raas_jax.bench import kernels as bench_kernels


@pytest.mark.slow  # the fast set: run_kernels on one variant (below)
def test_run_kernels_times_every_variant_and_writes_json(tmp_path):
    shapes = [bench_kernels.Shape("tiny", 1, 64), bench_kernels.Shape("tiny quest", 1, 128, 32)]
    rows = bench_kernels.run_kernels(shapes, calls=2, out=tmp_path / "k.json", verbose=False)
    assert all(r["error"] == "" for r in rows), [r for r in rows if r["error"]]
    variants = {(r["shape"], r["variant"]) for r in rows}
    assert ("tiny", "pallas (default)") in variants and ("tiny", "jnp reference (XLA)") in variants
    assert ("tiny quest", "page_scores + top-k (pallas)") in variants
    assert all(r["us"] > 0 and r["tbps"] > 0 for r in rows)
    saved = json.loads((tmp_path / "k.json").read_text())
    assert len(saved["rows"]) == len(rows)
    table = bench_kernels.summary_table(rows)
    assert table.count("\n") == 3 and "tiny quest" in table
    png = bench_kernels.plot_kernels(rows, tmp_path / "k.png", device="cpu", copy_tbps=1.0)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_run_kernels_times_only_the_variants_asked_for():
    rows = bench_kernels.run_kernels([bench_kernels.Shape("tiny", 1, 64, 32)], calls=2, verbose=False,
                                     variants=("pallas (default)",))
    assert [r["variant"] for r in rows] == ["pallas (default)"] and rows[0]["error"] == ""


def test_bench_kernels_cli_refuses_cpu_and_unknown_shapes(tmp_path, capsys):
    from raas_jax.cli import main as cli_main

    assert cli_main(["bench", "kernels", "--out-dir", str(tmp_path)]) == 2
    assert "needs a GPU" in capsys.readouterr().err
    assert cli_main(["bench", "kernels", "--allow-cpu", "--shapes", "no such shape", "--out-dir", str(tmp_path)]) == 2
    assert "raas B=32 1K" in capsys.readouterr().err  # the error lists the shapes there are


def test_per_call_time_cancels_the_fixed_cost_of_a_run():
    """A run of n calls costs fixed + n * per_call (the loop's launch, ~0.3 ms on an H200): the difference of
    n and 2n calls gives per_call alone, where total / n would add fixed / n to each call."""
    runs = []

    def seconds_for(n):
        runs.append(n)
        return 3e-4 + n * 1.5e-4

    assert bench_kernels._per_call(seconds_for, 20) == pytest.approx(1.5e-4)
    assert runs == [20, 40]
    assert bench_kernels._per_call(lambda n: 1.0, 20) == pytest.approx(1 / 40)  # no difference: the plain average


def test_mosaic_launch_names_the_launch_a_sweep_variant_resolves_to():
    """Sweep variants of different names can be the same launch (docs/kernels.md: 528 and 792 target programs at
    B=32 4K); the row's `launch` says so."""
    shape = bench_kernels.Shape("raas B=32 4K", 32, 4096)
    sweep = bench_kernels.mosaic_sweep()
    by_target = {t.target_programs: bench_kernels.mosaic_launch(shape, t) for t in sweep.values()
                 if t.stages == 1 and t.block_tokens == 128 and t.staged_list}
    assert by_target[528] == by_target[792] == "1024 programs of 8 blocks"
    assert by_target[256] == bench_kernels.mosaic_launch(shape) == "256 programs of 32 blocks"  # the default
    assert by_target[1056] == "2048 programs of 4 blocks"
    assert bench_kernels.mosaic_launch(shape, sweep["pallas mosaic T=256 s=1 prog=256"]) == "256 programs of 16 blocks"
