"""`raas-jax inspect attention`: the traced per-page mass and RaaS's evictions/refreshes on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

import raas_jax
from raas_jax.inspection import attention_map
from raas_jax.cli import main
from raas_jax.policies import Dense, RaaS

PROMPT = list(range(3, 14))  # 11 tokens: pages 0-2 of 4 are the prompt


@pytest.fixture(scope="module")
def model(tiny_llama_converted):
    return raas_jax.load(tiny_llama_converted, dtype="f32")


@pytest.fixture(scope="module")
def traces(model):
    continuation = model.generate([PROMPT], max_new_tokens=40, chat=False)[0].token_ids
    dense = attention_map.trace(model, PROMPT, continuation, Dense(page_size=4), progress=False)
    raas = attention_map.trace(model, PROMPT, continuation, RaaS(budget=24, page_size=4), progress=False)
    return continuation, dense, raas


def test_dense_mass_is_a_distribution_over_resident_pages(model, traces):
    continuation, dense, _ = traces
    steps, layers, hkv, _ = dense.mass.shape
    assert (steps, layers, hkv) == (len(continuation), model.cfg.num_layers, model.cfg.num_kv_heads)
    total = dense.mass.sum(-1)  # max over the group of each page's sum: between 1 and the group size
    assert (total >= 1 - 1e-5).all() and (total <= model.cfg.group_size + 1e-5).all()
    assert (dense.mass[dense.fill == 0] == 0).all()
    grid = dense.page_mass(0)  # page t // 4 exists from the step that writes position 11 + t
    assert np.isnan(grid[0, 0, (len(PROMPT) + 4) // 4])
    assert not np.isnan(grid[-1, 0, (len(PROMPT) + steps - 1) // 4])


def test_raas_events_follow_the_rules(traces):
    _, _, raas = traces
    evictions = 0
    for layer in range(raas.mass.shape[1]):
        for head in range(raas.mass.shape[2]):
            evicted, refreshed = raas.events(layer, head)
            evictions += len(evicted)
            assert all((len(PROMPT) + t) % 4 == 0 for t, _ in evicted)  # only when a page opens
            assert all(page >= 3 for _, page in evicted + refreshed)  # the prompt is pinned: never evicted or ranked
    assert evictions > 0


def test_inspect_attention_cli_writes_png_and_summary(tiny_llama_converted, tmp_path, capsys):
    out = tmp_path / "attention.png"
    assert main(["inspect", "attention", "--model", str(tiny_llama_converted), "--prompt", "the quick fox",
                 "--no-chat", "--max-new-tokens", "24", "--budget", "24", "--page-size", "4", "--out", str(out),
                 "--compare", "streaming,h2o/p1"]) == 0
    assert out.stat().st_size > 10_000
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["evictions"] > 0 and 0 <= summary["regretted"] <= summary["evictions"]
    assert set(summary["lost_mass"]) == {"raas@24/p4", "streaming@24/p4", "h2o@24/p1"}
    assert all(0 <= v < 1 for v in summary["lost_mass"].values())
    assert "RaaS evictions" in capsys.readouterr().out
    assert main(["inspect", "attention", "--model", str(tiny_llama_converted), "--prompt", "x", "--layer", "9"]) == 2


@pytest.mark.slow  # the fast set: the command above in the model's dtype
def test_inspect_attention_over_fp8_pages(tiny_llama_converted, tmp_path, monkeypatch):
    """--kv-dtype fp8: the generation and every traced policy store their pages in FP8, and the summary says so."""
    from raas_jax.inspection import attention_map

    traced = []
    real_trace = attention_map.trace
    monkeypatch.setattr(attention_map, "trace", lambda model, prompt, cont, policy, **kw: (
        traced.append(policy.kv_dtype), real_trace(model, prompt, cont, policy, **kw))[1])
    out = tmp_path / "attention.png"
    assert main(["inspect", "attention", "--model", str(tiny_llama_converted), "--prompt", "the quick fox",
                 "--no-chat", "--max-new-tokens", "16", "--budget", "16", "--page-size", "4", "--out", str(out),
                 "--compare", "h2o", "--kv-dtype", "fp8"]) == 0
    assert traced == ["fp8"] * 3  # dense, raas, h2o
    assert json.loads(out.with_suffix(".json").read_text())["kv_dtype"] == "fp8"


def test_lost_mass_is_zero_for_dense_and_positive_once_raas_evicts(traces):
    _, dense, raas = traces
    assert attention_map.lost_mass(dense, dense) == 0
    assert 0 < attention_map.lost_mass(dense, raas) < 1


@pytest.mark.parametrize(("flags", "message"), [
    (["--compare", "bogus"], "--compare 'bogus': unknown policy"),
    (["--compare", "h2o/pabc"], "the page size after /p must be an integer"),
    (["--compare", "raas:bogus=1"], "--compare 'raas:bogus=1'"),
    (["--out", "x/plot.jpg"], "give a path ending in .png"),
])
def test_inspect_refuses_bad_flags_before_any_work(flags, message, monkeypatch, tmp_path, capsys):
    import raas_jax

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(raas_jax, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["inspect", "attention", "--prompt", "p", *flags]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--index", "--budget", "--page-size", "--max-new-tokens", "--head"])
def test_inspect_negative_numbers_are_refused_at_parse_time(flag, capsys):
    with pytest.raises(SystemExit):
        main(["inspect", "attention", "--prompt", "p", flag, "-1"])
    assert f"argument {flag}:" in capsys.readouterr().err


def test_inspect_unwritable_out_is_refused_before_loading(monkeypatch, tmp_path, capsys):
    import raas_jax

    (tmp_path / "file").write_text("a file where the folder would be")  # unwritable for root too
    monkeypatch.setattr(raas_jax, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["inspect", "attention", "--prompt", "p", "--out", str(tmp_path / "file" / "a.png")]) == 2
    err = capsys.readouterr().err
    assert "cannot write a.png into" in err and "choose an --out in a folder you can write" in err


def test_inspect_out_without_suffix_reports_the_file_it_writes(tiny_llama_converted, tmp_path, capsys):
    assert main(["inspect", "attention", "--model", str(tiny_llama_converted), "--prompt", "the quick fox",
                 "--no-chat", "--max-new-tokens", "8", "--budget", "16", "--page-size", "4",
                 "--out", str(tmp_path / "plot")]) == 0
    assert f"wrote {tmp_path / 'plot.png'}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.json", "plot.png"]  # no temporaries behind


def test_inspect_and_calibrate_take_the_dataset_field_flags(monkeypatch, tmp_path, capsys):
    import json as json_module

    import raas_jax

    data = tmp_path / "d.jsonl"
    data.write_text(json_module.dumps({"q": "one two", "a": "1"}) + "\n")
    monkeypatch.setattr(raas_jax, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    for argv in (["inspect", "attention", "--dataset", str(data), "--out", str(tmp_path / "a.png")],
                 ["calibrate-kv", "--dataset", str(data)]):
        assert main(argv) == 2  # the missing field is found before loading, naming flags the command has
        assert "use --question-field / --answer-field" in capsys.readouterr().err
        with pytest.raises(pytest.fail.Exception, match="a model was loaded"):
            main(argv + ["--question-field", "q", "--answer-field", "a"])


def test_mass_trace_keeps_the_traced_policys_own_state_through_a_chunked_prefill():
    """MassTrace(H2O): H2O's hooks see H2O's state (HeavyHitterMass), never the tracer's, in every hook."""
    import jax
    import jax.numpy as jnp

    from raas_jax.models.config import ModelConfig
    from raas_jax.policies import H2O, HeavyHitterMass

    cfg = ModelConfig(model_type="llama", vocab_size=8, hidden_size=32, intermediate_size=8, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    policy = H2O(budget=16, page_size=4)
    traced = attention_map.MassTrace(policy)
    pool = traced.init(cfg, 2, policy.slot_count, jnp.float32)
    assert isinstance(pool.policy_state, attention_map.TracedState)
    assert isinstance(pool.policy_state.policy_state, HeavyHitterMass)
    q = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 4, 8))
    k, v = jax.random.normal(jax.random.PRNGKey(1), (2, 2, 8, 2, 8))
    positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))

    @jax.jit  # op by op, the chunk's hooks take seconds to compile
    def chunked_prefill(pool):
        chunked = traced.begin_chunked_prefill(cfg, pool)
        assert chunked.policy_state.policy_state.token_mass is not None  # H2O's accumulator, inside the trace
        for layer in range(2):
            _, chunked = traced.prefill_chunk(chunked, jnp.int32(layer), q, k, v, positions)
        alone = policy.end_chunked_prefill(chunked.replace(policy_state=chunked.policy_state.policy_state))
        return traced.end_chunked_prefill(chunked), alone

    folded, alone = chunked_prefill(pool)
    assert folded.policy_state.policy_state.token_mass is None
    np.testing.assert_array_equal(folded.policy_state.policy_state.mass, alone.policy_state.mass)
    assert folded.policy_state.mass.shape == folded.fill.shape
