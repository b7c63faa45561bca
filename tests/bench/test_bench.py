"""The e2e benchmark's machinery on a tiny model (the real runs need a GPU)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from raas_jax.bench import e2e as bench
from raas_jax.cli import main as cli_main
from raas_jax.decode.generate import Generator
from raas_jax.decode.cache import pool_dtype
from raas_jax.policies import Dense, Quest, RaaS

CFG = bench.MODEL_SHAPES["tiny"]


@pytest.mark.parametrize("policy", [Dense(page_size=4), Quest(budget=32, page_size=4, dense_layers=1),
                                    pytest.param(RaaS(budget=32, page_size=4), marks=pytest.mark.slow),  # as fp8
                                    RaaS(budget=32, page_size=4, kv_dtype="fp8")],
                         ids=["dense", "quest", "raas", "raas-fp8"])
def test_synthetic_state_is_consistent_and_decodes(policy):
    position, prompt = 100, 12
    cache = bench.synthetic_cache(policy, CFG, 2, position, prompt, 10, jnp.float32)
    fill, start = np.asarray(cache.fill), np.asarray(cache.start)
    page = policy.page_size
    assert (fill <= page).all() and (start % page == 0).all()
    resident_tokens = fill.sum(axis=-1)
    if policy.fixed_budget:
        assert (fill > 0).all() and np.asarray(cache.pinned)[..., :3].all()  # 12 prompt tokens = 3 pages
        assert (np.asarray(cache.stamp) >= start).all() and (np.asarray(cache.stamp) < position).all()
        assert (start + fill).max() == position  # the current page ends at the position
    else:
        assert (resident_tokens == position).all()
    assert cache.k.dtype == pool_dtype(policy.kv_dtype, jnp.float32) and cache.kmin.dtype == jnp.float32
    k = np.asarray(cache.k, np.float32)
    assert not np.allclose(k[0], k[1]) and np.asarray(cache.v, np.float32).std() > 0.5  # every layer drawn, v too
    valid = np.arange(page)[None, None, None, None, :, None] < fill[..., None, None]
    np.testing.assert_allclose(np.asarray(cache.kmax), np.where(valid, k, -np.inf).max(4).clip(
        min=np.where(fill[..., None] > 0, -np.inf, 0)), rtol=1e-6)
    gen = Generator(CFG, jnp.float32, policy)
    params = bench.random_params(CFG, jnp.float32)
    seconds, compiled, _ = bench.time_decode(gen, params, cache, 2, position, 8)
    assert seconds > 0 and not compiled


@pytest.mark.parametrize("policy", [pytest.param(Dense(page_size=4), marks=pytest.mark.slow),
                                    RaaS(budget=32, page_size=4)], ids=["dense", "raas"])
def test_largest_decode_batch_fits_the_limit_and_not_much_more(policy):
    gen = Generator(CFG, jnp.float32, policy)
    limit, reserve = 16 * 2**20, 2**20
    batch, sizes = bench.largest_decode_batch(gen, 100, limit, reserve=reserve, probes=(4, 16))
    assert [s["batch"] for s in sizes[:2]] == [4, 16] and sizes[-1]["batch"] == batch
    assert sizes[-1]["total"] <= limit - reserve  # checked by compiling the decode at the answer
    over = bench.decode_memory(gen, int(batch * 1.1) + 1, 100)
    assert over["total"] > limit - reserve  # and the answer is not far below what fits
    assert sizes[-1]["argument"] > sum(x.nbytes for x in jax.tree.leaves(bench.random_params(CFG, jnp.float32)))


def test_kv_bytes_read_by_policy():
    cfg = bench.MODEL_SHAPES["llama3-8b"]
    per_token = 2 * 8 * 128 * 2 * 32  # k+v, 8 KV heads, head_dim 128, bf16, 32 layers
    assert bench.kv_bytes_read(Dense(), cfg, 1, 4096, jnp.bfloat16) == 4096 * per_token
    assert bench.kv_bytes_read(RaaS(budget=1024), cfg, 2, 32768, jnp.bfloat16) == 2 * 1024 * per_token
    quest = bench.kv_bytes_read(Quest(budget=1024), cfg, 1, 32768, jnp.bfloat16)
    assert 1024 * per_token < quest < 32768 * per_token
    assert bench.kv_bytes_read(RaaS(budget=1024, kv_dtype="fp8"), cfg, 2, 32768, jnp.bfloat16) == 1024 * per_token


def test_bench_cli_refuses_a_cpu_unless_allowed(capsys):
    assert cli_main(["bench", "e2e"]) == 2
    assert "needs a GPU" in capsys.readouterr().err


@pytest.mark.slow  # the fast set runs `bench e2e --allow-cpu` on a mesh: test_bench_e2e_on_a_mesh_of_4_cpu_devices
def test_bench_cli_on_cpu(tmp_path, capsys):
    assert cli_main(["bench", "e2e", "--models", "tiny", "--allow-cpu", "--positions", "256", "--batches", "1",
                     "--steps", "4", "--no-largest-batch", "--hf-reference", "--out-dir", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "e2e_tiny.json").read_text())
    rows = saved["rows"]
    assert {r["policy"] for r in rows} == {"dense", "quest", "raas"}
    assert all(r["live_gib"] >= 0 and r["step_ms"] > 0 and not r["compiled_during_timing"] for r in rows)
    [hf] = saved["hf_reference"]  # torch (CPU) dense decode of the same shape, from a child process
    assert hf["position"] == 256 and hf["batch"] == 1 and hf["step_ms"] > 0
    for png in ("e2e_step_ms_b1.png", "e2e_live_gib_b1.png", "e2e_tokens_per_s.png"):
        assert (tmp_path / png).stat().st_size > 1000


MESH_SCRIPT = '''
import json, sys
import jax, jax.numpy as jnp
from raas_jax.bench import e2e as bench
from raas_jax.cli import main
from raas_jax.decode.generate import Generator
from raas_jax.policies import RaaS
from raas_jax.decode.sharding import ShardedPolicy, make_mesh
assert len(jax.devices()) == 4
out, full = sys.argv[1], sys.argv[2] == "full"
policies, batches = ("raas,dense", "1,2,4") if full else ("raas", "1,2")
assert main(["bench", "e2e", "--models", "tiny", "--allow-cpu", "--policies", policies, "--positions", "512",
             "--batches", batches, "--steps", "4", "--no-largest-batch", "--mesh", "data=2,model=2",
             "--out-dir", out]) == 0
rows = json.load(open(out + "/e2e_tiny.json"))["rows"]
if not full:
    print(json.dumps({"rows": rows}))
    sys.exit(0)
cfg = bench.MODEL_SHAPES["tiny"]
one = Generator(cfg, jnp.float32, RaaS(budget=32, page_size=4))
spread = Generator(cfg, jnp.float32, ShardedPolicy(RaaS(budget=32, page_size=4), make_mesh(cfg, "data=2,model=2")))
batch, sizes = bench.largest_decode_batch(spread, 512, 8 * 2**20, reserve=0, probes=(4, 16))
print(json.dumps({"rows": rows, "batch": batch, "spread": bench.decode_memory(spread, 16, 512)["total"],
                  "one": bench.decode_memory(one, 16, 512)["total"]}))
'''


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["raas", "full"])
def test_bench_e2e_on_a_mesh_of_4_cpu_devices(tmp_path, full):
    """The fast set: RaaS at B = 2 on the mesh (B = 1 skipped); the full set: RaaS and Dense at B = 2 and 4, the
    largest batch on the mesh and the memory it spreads."""
    import os
    import subprocess
    import sys

    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(tmp_path), "full" if full else "short"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = report["rows"]
    policies, batches = (("raas", "dense"), (2, 4)) if full else (("raas",), (2,))
    assert {(r["policy"], r["batch"]) for r in rows} == {(p, b) for p in policies for b in batches}
    assert "skipping B=[1]: not a multiple of the mesh's data axis (2)" in proc.stdout
    assert all(r["mesh"] == "data=2,model=2" and not r["compiled_during_timing"] for r in rows)
    if not full:
        return
    assert report["batch"] > 0 and report["batch"] % 2 == 0  # a multiple of the data axis
    assert report["spread"] < 0.5 * report["one"]  # one device holds a quarter of the pool, half the weights
