"""Sharded generate on 8 CPU devices (a subprocess with --xla_force_host_platform_device_count=8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from raas_jax.model_io.checkpoint import convert

from conftest import make_hf_model

SCRIPT = textwrap.dedent('''
    import json, re, sys
    import jax, jax.numpy as jnp, numpy as np
    import raas_jax
    from raas_jax.decode.generate import RowSettings, batch_keys, pad_prompts
    from raas_jax.policies import Dense, H2O, Quest, RaaS, StreamingLLM
    from raas_jax.decode.sharding import cache_spec

    path, meshes = sys.argv[1], sys.argv[2].split(";")
    assert len(jax.devices()) == 8, jax.devices()
    prompts = [[5, 9, 33, 101, 7], list(range(1, 30)), [200] * 12]
    policies = [Dense(page_size=4), RaaS(budget=48, page_size=4), RaaS(budget=48, page_size=1, score="estimate"),
                Quest(budget=16, page_size=4, dense_layers=1), H2O(budget=48, page_size=4),
                StreamingLLM(budget=48, page_size=4)]
    single = raas_jax.load(path, dtype="f32")
    reference = {p: [r.token_ids for r in single.generate(prompts, max_new_tokens=40, chat=False, policy=p)]
                 for p in policies}
    report = {}
    for spec in meshes:
        model = raas_jax.load(path, dtype="f32", mesh=spec)
        leaf = model.params["layers"]["mlp"]["gate_up_proj"]["kernel"]  # [L, H, 2, F]: F over model
        layout = {"mesh": dict(model.mesh.shape), "gate_spec": list(leaf.sharding.spec),
                  "qkv_spec": list(model.params["layers"]["self_attn"]["qkv_proj"]["kernel"].sharding.spec)}
        if spec == "auto":  # the mesh it resolves to is also given by name: generated on there
            report[spec] = layout
            continue
        same = {p.name + str(i): [r.token_ids for r in model.generate(prompts, max_new_tokens=40, chat=False,
                                                                           policy=p)] == reference[p]
                for i, p in enumerate(policies)}
        chunked = {p.name + str(i): [r.token_ids for r in model.generate(prompts, max_new_tokens=40, chat=False,
                                                                              policy=p, prefill_chunk=8)]
                   == reference[p] for i, p in enumerate(policies) if i in (0, 1, 4)}  # dense, raas, h2o
        # the compiled decode loop must not gather the cache: no all-gather producing a pool-shaped array
        policy = RaaS(budget=48, page_size=4)
        gen = model._generator(policy)
        tokens, lengths, padding = pad_prompts(prompts, model.mesh.shape["data"])
        settings = RowSettings.make(len(tokens), max_new_tokens=8)
        eos = jnp.asarray([-1], jnp.int32)
        state = gen.start(model.params, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(padding), eos,
                          settings, batch_keys(0, len(tokens)), num_slots=policy.num_slots(0, 0))
        hlo = gen.decode.lower(model.params, state, jnp.int32(4), eos).compile().as_text()
        gathers = [l for l in hlo.splitlines() if " all-gather(" in l or "all-gather-start(" in l]
        pool_gathers = [l for l in gathers if re.search(r"= \\w+\\[(\\d+,){4,}\\d+\\]", l)]
        report[spec] = {**layout, "same": same, "chunked_same": chunked,
                        "pool_gathers": len(pool_gathers), "cache_spec": list(state.cache.k.sharding.spec)}
    print("REPORT" + json.dumps(report))
''')


def run_on_8_devices(path, meshes):
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path), ";".join(meshes)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("REPORT", 1)[1])


@pytest.mark.slow
def test_sharded_generate_equals_one_device(tmp_path):
    make_hf_model(tmp_path / "hf", "llama", num_attention_heads=8, num_key_value_heads=4, tokenizer=False)
    convert(tmp_path / "hf", tmp_path / "model", dtype="f32", progress=False)
    report = run_on_8_devices(tmp_path / "model", ["auto", "data=2,model=4", "data=8,model=1"])
    auto = report.pop("auto")  # laid out as data=2,model=4, which generates below
    assert auto["mesh"] == {"data": 2, "model": 4}
    named = report["data=2,model=4"]
    assert auto["gate_spec"] == named["gate_spec"] == [None, None, None, "model"]  # [L, hidden, 2, mlp]: columns
    assert auto["qkv_spec"] == named["qkv_spec"] == [None, None, "model", None, None]  # [L, H, Hkv, G+2, D]
    for spec, entry in report.items():
        assert all(entry["same"].values()), (spec, entry["same"])
        assert all(entry["chunked_same"].values()), (spec, entry["chunked_same"])  # prefill in chunks of 8
        assert entry["pool_gathers"] == 0, spec
        model_axis = "model" if entry["mesh"]["model"] > 1 else None  # JAX drops size-1 axes from specs
        assert (entry["cache_spec"] + [None] * 3)[:3] == [None, "data", model_axis], entry  # [L, B, Hkv, ...]


def test_mesh_that_does_not_divide_the_heads_is_explained():
    from raas_jax.models.config import ModelConfig
    from raas_jax.decode.sharding import make_mesh, parse_mesh

    cfg = ModelConfig(model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                      num_heads=6, num_kv_heads=3, head_dim=4)
    import jax

    devices = jax.devices() * 4  # shapes only: make_mesh checks before using them
    with pytest.raises(ValueError, match="model=2 does not divide the model's 3 KV heads"):
        make_mesh(cfg, "data=2,model=2", devices)
    with pytest.raises(ValueError, match="uses 2 devices but 4 are available"):
        make_mesh(cfg, "data=2,model=1", devices)
    with pytest.raises(ValueError, match="--mesh data=2,model=4"):
        parse_mesh("rows=2")
    with pytest.raises(ValueError, match=r"--mesh model=5 does not fit the 4 devices available.*data=4,model=1"):
        make_mesh(cfg, "model=5", devices)  # the message names what was given, not a derived data=0


def test_single_host_needs_no_distributed_setup(monkeypatch):
    from raas_jax.decode.sharding import maybe_initialize_distributed

    for key in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(key, raising=False)
    assert maybe_initialize_distributed() is False
